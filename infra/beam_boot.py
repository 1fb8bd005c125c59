"""Start one Beam SDK worker for the worker pool: the SDK container contract.

    beam_pool --container_executable BOOT  ->  BOOT --id=... --provision_endpoint=...

This is what the boot program of Beam's SDK container images does: fetch the job's
provision info (its pipeline options) and run the SDK harness with them. The pool's
default command starts a harness *without* the pipeline options, so on a worker
Beam's S3 filesystem has no endpoint or region ("Must provide one of client or
options") and options-driven settings are lost. Staged artifacts are not fetched:
the workers run from this installation, which has knowstream and its models.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from apache_beam.portability.api import (
    beam_provision_api_pb2,
    beam_provision_api_pb2_grpc,
    endpoints_pb2,
)
from apache_beam.runners.worker import sdk_worker_main
from google.protobuf import json_format, text_format


def _descriptor(url: str) -> str:
    return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--id", required=True)
    parser.add_argument("--provision_endpoint", required=True)
    parser.add_argument("--control_endpoint", required=True)
    parser.add_argument("--logging_endpoint", required=True)
    parser.add_argument("--artifact_endpoint")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.provision_endpoint) as channel:
        info = (
            beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
            .GetProvisionInfo(
                beam_provision_api_pb2.GetProvisionInfoRequest(),
                metadata=[("worker_id", args.id)],
            )
            .info
        )
    os.environ.update(
        WORKER_ID=args.id,
        PIPELINE_OPTIONS=json_format.MessageToJson(info.pipeline_options),
        CONTROL_API_SERVICE_DESCRIPTOR=_descriptor(args.control_endpoint),
        LOGGING_API_SERVICE_DESCRIPTOR=_descriptor(args.logging_endpoint),
    )
    # The pool pipes our stdout and never reads it: a chatty worker would block on a
    # full pipe. Its stderr is the pool's log.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sdk_worker_main.main(sys.argv[:1])


if __name__ == "__main__":
    main()
