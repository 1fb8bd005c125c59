"""One typed settings object for every entry point.

Every value reads from the environment as ``KNOWSTREAM_<NAME>`` (for example
``KNOWSTREAM_BOOTSTRAP_SERVERS=kafka:9092``) and most CLI flags override it.
Entry points build it once (``Settings()``) and pass it down; nothing else reads
the environment.

Defaults are the embedded, single-machine setup: a tansu broker on loopback,
qdrant-edge (Qdrant's embedded engine) under ``home``, MLflow on SQLite under ``home``, Beam's
in-process FnApiRunner. Production swaps these by configuration only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Telemetry and hub lookups off before any of these libraries is imported:
# the machines this runs on have no network, and an offline hub lookup retries
# for ~47 s before failing.
for _k, _v in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # S3 clients (boto3 for Beam, pyarrow for the store) send checksums that S3-compatible
    # stores such as s3rver do not understand: pyarrow's objects were stored corrupt.
    # AWS's own S3 accepts either way.
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
}.items():
    os.environ.setdefault(_k, _v)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KNOWSTREAM_", extra="ignore")

    # --- where local state lives -------------------------------------------------
    home: Path = Path(".knowstream")  # broker pids/logs, Qdrant path, MLflow DB, staging

    # --- Kafka --------------------------------------------------------------------
    bootstrap_servers: str = "127.0.0.1:19092"  # production: your brokers
    topic: str = "documents"  # document events; dead letters go to "<topic>.dlq"
    group_id: str = "knowstream-ingest"  # consumer group of the ingest flow
    partitions: int = 1  # partitions when knowstream creates the topic
    max_batch_messages: int = 5000  # micro-batch cap
    poll_timeout_ms: int = 1500  # an empty poll this long ends a micro-batch
    session_timeout_ms: int = 6000  # tansu joins take ~half of this; keep it small
    retry_attempts: int = 3  # tries of a batch: all errors in --once, non-transient ones always
    retry_base_s: float = 1.0  # first backoff; doubles each retry
    retry_max_s: float = 60.0  # backoff cap (continuous ingest retries forever)
    broker_storage: str = "memory://tansu/"  # `knowstream up`: memory:// or s3://bucket/
    max_message_bytes: int = 4 * 1024 * 1024  # larger messages are dead-lettered unparsed
    # A dead letter's whole Kafka message (key, body, headers) stays under this; the
    # payload is cut to fit. Must stay below the producer's max_request_size (1 MiB).
    dead_letter_max_bytes: Annotated[int, Field(ge=4096, le=1_000_000)] = 64 * 1024
    stop_grace_s: float = 8.0  # after SIGINT/SIGTERM, exit by force after this long

    # --- Qdrant -------------------------------------------------------------------
    qdrant_url: str | None = None  # a server (http://host:6333); None = embedded
    qdrant_path: Path | None = None  # embedded store's folder; None = <home>/qdrant
    # embedded backend: "edge" (qdrant-edge: payload indexes, one process per folder) or
    # "local" (qdrant-client's local mode: scans; the tests' stand-in for a server)
    qdrant_embedded: Literal["edge", "local"] = "edge"
    collection: str = "knowstream"  # one collection holds every version
    # qdrant-edge builds its vector index (HNSW) in steps, after publishes: a step indexes
    # the points written since the last one once they pass this many KB of vectors (~670
    # 384-d vectors per MB; Qdrant's own default). Smaller: shorter steps, more segments.
    qdrant_index_kb: Annotated[int, Field(ge=1)] = 10_000
    # Costs that follow the batch (applied by ingest after each publish, and by the
    # `compact` and `retain` commands): fold live's line into a new root once it is
    # longer than this many versions (None: never), and retire what the policy
    # "the last N published versions and every version live pointed to in the last
    # D days" no longer keeps, freeing its points (None: keep everything).
    compact_after: int | None = None
    retain_last: int | None = None
    retain_live_days: float = 7.0

    # --- MLflow -------------------------------------------------------------------
    mlflow_uri: str | None = None  # tracking server; None = sqlite:///<home>/mlflow.db
    memory_model: str = "knowstream-memory"  # registered model whose versions are snapshots
    amortizer_model: str = "knowstream-amortizer"  # registered model of trained amortizers

    # --- pipeline -----------------------------------------------------------------
    chunk_tokens: int = 128  # word pieces per chunk (MiniLM tokenizer)
    chunk_overlap: int = 32  # word pieces shared by neighbouring chunks
    embed_batch: int = 32  # chunks per embedding forward pass (on a GPU: a few hundred)
    embed_device: str = "cpu"  # where the embed stage's encoder runs: "cpu", "cuda", "cuda:1"
    amortize_batch: int = 16  # documents per amortizer forward pass
    max_text_chars: int = 200_000  # larger documents go to the dead-letter topic
    # checkpoint folder, "bundled" (the trained checkpoint shipped in models/checkpoints/),
    # "init" (seeded, untrained weights), or a version of the MLflow registry:
    # "models:/NAME@ALIAS", "models:/NAME/VERSION", "registry" (= models:/<amortizer_model>@live)
    amortizer: str = "bundled"
    beam_args: list[str] = Field(default_factory=lambda: ["--runner=FnApiRunner"])
    # Where each batch's Parquet delta is staged: a folder, or s3://bucket/prefix that
    # remote Beam workers can reach (None = <home>/staging). S3 credentials come from the
    # AWS default chain (AWS_ACCESS_KEY_ID, ...) of every process, workers included.
    staging: str | None = None
    s3_endpoint_url: str | None = None  # an S3-compatible store (s3rver, MinIO); None = AWS
    s3_region: str = "us-east-1"
    torch_threads: int = 1  # on 2 busy cores one thread is often fastest
    amortize_device: str = "cpu"  # where the amortize stage runs: "cpu", "cuda", "cuda:1"
    amortize_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # its compute
    amortize_window_batch: int = 8  # length-sorted windows per encoder forward (amortize)
    # one amortizer per machine, shared by its Beam worker processes (a GPU, several workers)
    amortize_shared: bool = False
    # Fault injection, off by default: stage -> doc ids that raise ``InjectedFault`` in that
    # stage (pipelines/faults.py), e.g. KNOWSTREAM_FAILPOINTS='{"embed": ["doc-7"]}'. For tests
    # and drills: a failing document is dead-lettered and the rest of its batch publishes.
    failpoints: dict[Literal["chunk", "embed", "triples", "amortize"], list[str]] = Field(
        default_factory=dict
    )

    # --- serving ------------------------------------------------------------------
    api_token: SecretStr | None = None  # bearer token for /ask and /admin; env only, never logged

    # --- operating ----------------------------------------------------------------
    log_level: str = "INFO"  # knowstream's own loggers; other libraries stay at WARNING

    @field_validator("amortizer")
    @classmethod
    def _amortizer_spec(cls, spec: str) -> str:
        if spec.startswith("models:/") and not re.fullmatch(r"models:/[^/@]+(@[\w-]+|/\d+)", spec):
            raise ValueError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, not {spec!r}")
        return spec

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def qdrant_location(self) -> Path:
        return self.qdrant_path or self.home / "qdrant"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return (self.home / "mlartifacts").resolve()

    @property
    def staging_url(self) -> str:
        return self.staging or str((self.home / "staging").resolve())

    @property
    def run_dir(self) -> Path:
        return self.home / "run"  # pid files, service logs

    def broker_address(self) -> tuple[str, int]:
        """Host and port of the first bootstrap server."""
        host, _, port = self.bootstrap_servers.split(",")[0].rpartition(":")
        return host or "127.0.0.1", int(port)
