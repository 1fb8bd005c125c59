"""Beam's SDK worker pool for EXTERNAL environments, bound to loopback only.

    python -m knowstream.infra.beam_pool --port 50000

Beam's own entry point (``apache_beam.runners.worker.worker_pool_main``) listens on
every interface, and the pool runs whatever pipeline code a caller sends it: a local
pool must not be reachable from the network. This is Beam's servicer unchanged
(one SDK worker subprocess per StartWorker request) behind a loopback address, with
``--container_executable`` (``infra/beam_boot.py``) starting each worker with the job's
pipeline options.
"""

from __future__ import annotations

import argparse
import logging

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
from apache_beam.utils import thread_pool_executor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--container_executable", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = grpc.server(thread_pool_executor.shared_unbounded_instance())
    server.add_insecure_port(f"{args.host}:{args.port}")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
        BeamFnExternalWorkerPoolServicer(
            use_process=True, container_executable=args.container_executable
        ),
        server,
    )
    server.start()
    logging.info("Beam SDK worker pool listening on %s:%d", args.host, args.port)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
