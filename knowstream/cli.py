"""The ``knowstream`` command line. ``knowstream --help`` lists the commands.

Global options override the matching ``KNOWSTREAM_*`` environment variables;
every command builds one :class:`Settings` from them. A command that fails says
why and what to do in one line on stderr and exits with 1; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer._click.core import Context as ClickContext  # typer vendors its click
from typer.core import TyperGroup
from typer.exceptions import TyperException

from knowstream.display import console, print_result, snapshot_table
from knowstream.errors import BadInput, KnowstreamError
from knowstream.settings import Settings


class PlainErrors(TyperGroup):
    """Every failure of a command ends as one line on stderr and exit code 1; with
    ``--debug``, as the traceback. Usage errors stay click's."""

    def invoke(self, ctx: ClickContext):
        try:
            return super().invoke(ctx)
        except (TyperException, typer.Exit, typer.Abort):  # usage errors, exits, Ctrl-C
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(1) from None


def one_line(e: Exception) -> str:
    if isinstance(e, KnowstreamError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first} (unexpected: rerun with --debug for the traceback)"


app = typer.Typer(
    cls=PlainErrors,
    help="Keep a language model's knowledge current from a live document stream.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option(help="Local state folder [KNOWSTREAM_HOME].")] = None,
    bootstrap_servers: Annotated[
        str | None, typer.Option(help="Kafka brokers [KNOWSTREAM_BOOTSTRAP_SERVERS].")
    ] = None,
    topic: Annotated[str | None, typer.Option(help="Document topic [KNOWSTREAM_TOPIC].")] = None,
    qdrant_url: Annotated[
        str | None, typer.Option(help="Qdrant server; default: local mode [KNOWSTREAM_QDRANT_URL].")
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI; default: SQLite [KNOWSTREAM_MLFLOW_URI]."),
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show the traceback of a failure.")] = False,
) -> None:
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "home": home,
            "bootstrap_servers": bootstrap_servers,
            "topic": topic,
            "qdrant_url": qdrant_url,
            "mlflow_uri": mlflow_uri,
        }.items()
        if v is not None
    }
    try:
        ctx.obj = Settings(**overrides)
    except ValidationError as e:
        raise BadInput(_invalid_settings(e)) from None
    ctx.call_on_close(_close_stores)
    from knowstream import logs

    logs.setup(ctx.obj)


def _invalid_settings(e: ValidationError) -> str:
    """'invalid setting NAME [KNOWSTREAM_NAME]: why', for each invalid setting."""
    parts = []
    for err in e.errors():
        name = ".".join(str(x) for x in err["loc"])
        why = err["msg"].removeprefix("Value error, ")
        parts.append(f"invalid setting {name} [KNOWSTREAM_{name.upper()}]: {why}")
    return "; ".join(parts)


def _amortizer_option(spec: str | None) -> str | None:
    """``--amortizer``: a named spec, a registry version, a URL, or a checkpoint folder
    that exists here."""
    from knowstream.models.inference import is_registry_spec

    if spec is None or spec in ("bundled", "init") or is_registry_spec(spec) or "://" in spec:
        return spec
    if not (Path(spec) / "config.json").is_file():
        raise BadInput(
            f"--amortizer {spec!r}: no checkpoint folder there (config.json, model.safetensors); "
            "or give bundled, init, registry or models:/NAME@ALIAS"
        )
    return str(Path(spec).resolve())


def _close_stores() -> None:
    # Qdrant local mode's client closes in __del__, which fails noisily at interpreter exit.
    qdrant = sys.modules.get("knowstream.connectors.qdrant")
    if qdrant is not None:
        qdrant.close_clients()


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj


def _server(settings: Settings) -> str | None:
    """The URL of a `serve` running on this home: commands then go through its API."""
    from knowstream.serving.client import running_server

    return running_server(settings)


def _api(settings: Settings, url: str, method: str, path: str, body: dict | None = None):
    from knowstream.serving.client import ApiError, call

    try:
        return call(settings, url, method, path, body)
    except ApiError as e:
        _fail(str(e))


def _fail(line: str) -> NoReturn:
    typer.echo(f"error: {line}", err=True)
    raise typer.Exit(1)


@contextmanager
def _store() -> Iterator[None]:
    """A held embedded store is one line, not a traceback."""
    from knowstream.connectors.qdrant import StoreHeld

    try:
        yield
    except StoreHeld as e:
        _fail(str(e))


# --- services ------------------------------------------------------------------------
@app.command()
def up(
    ctx: typer.Context,
    with_prefect_server: Annotated[bool, typer.Option(help="Also start a Prefect server.")] = False,
    with_mlflow_server: Annotated[bool, typer.Option(help="Also start an MLflow server.")] = False,
    beam: Annotated[
        bool, typer.Option(help="Also start Beam's job service and an SDK worker pool.")
    ] = False,
    beam_job_port: Annotated[int, typer.Option(help="Port of Beam's job service.")] = 8099,
    beam_pool_port: Annotated[int, typer.Option(help="Port of the SDK worker pool.")] = 50000,
    workers: Annotated[
        int, typer.Option(help="Prefect workers on the 'knowstream' process work pool.")
    ] = 0,
    prefect_port: Annotated[
        int, typer.Option(help="Port of the Prefect server (its state: <home>/prefect).")
    ] = 4200,
) -> None:
    """Start the local broker (and optional servers) on loopback."""
    from knowstream.infra import services

    s = _settings(ctx)
    with console.status("starting the Kafka-protocol broker (tansu)..."):
        services.start_broker(s)
    console.print(f"broker ready at {s.bootstrap_servers} ({s.broker_storage})")
    if services.local_s3_staging(s):
        with console.status("starting the S3 emulator for staging (s3rver)..."):
            env = services.start_s3(s)
        exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("AWS_"))
        console.print(f"staging on {s.staging_url} (s3rver): export {exports}")
    if beam:
        with console.status("starting Beam's job service and SDK worker pool..."):
            args = services.start_beam(s, beam_job_port, beam_pool_port)
        console.print(f"beam ready: export KNOWSTREAM_BEAM_ARGS='{json.dumps(args)}'")
    if with_prefect_server:
        with console.status("starting the Prefect server..."):
            url = services.start_prefect_server(s, port=prefect_port)
        console.print(f"prefect server ready: export PREFECT_API_URL={url}")
        if workers:
            with console.status(f"starting {workers} Prefect workers..."):
                names = services.start_prefect_workers(s, url, workers)
            console.print(f"workers {', '.join(names)} poll work pool {services.WORK_POOL}")
    if with_mlflow_server:
        with console.status("starting the MLflow server..."):
            url = services.start_mlflow_server(s)
        console.print(f"mlflow server ready: use --mlflow-uri {url}")


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop everything `up` started."""
    from knowstream.infra import services

    services.stop_all(_settings(ctx))
    console.print("stopped")


@app.command()
def status(ctx: typer.Context) -> None:
    """Live version, consumer lag (read to the end), dead letters, broker state, log file."""
    from knowstream import logs
    from knowstream.connectors.kafka import consumer_lag, dead_letter_summary, require_broker
    from knowstream.connectors.mlflow import _alias
    from knowstream.errors import BrokerUnreachable
    from knowstream.health import read_health
    from knowstream.infra import services

    s = _settings(ctx)
    broker = services.broker_status(s)
    table = Table(title="knowstream status", show_header=False)
    table.add_row("broker", json.dumps(broker))
    for name in ("s3", "beam-job", "beam-pool"):
        if (service := services.service_status(s, name))["running"]:
            table.add_row(name, json.dumps(service))
    if url := _server(s):
        state = _api(s, url, "GET", "/admin/status")
        live, health = state["live"], state["ingest"]
        table.add_row("server", url + (" (serve --ingest)" if state["serve_ingest"] else ""))
    else:
        try:  # the embedded registry without importing MLflow
            live = _alias.read_live(s)
        except _alias.Fallback:
            from knowstream.connectors.mlflow import Registry

            live = Registry(s).live()
        health = read_health(s)
    table.add_row("live version", str(live))
    table.add_row("ingest worker", json.dumps(health) if health else "never ran here")
    unreachable = None
    try:
        require_broker(s)  # seconds, not the Kafka client's minute of retries
    except BrokerUnreachable as e:  # say so after the rest of the table
        unreachable = e
        table.add_row("kafka", "unreachable")
    if unreachable is None:
        lag = consumer_lag(s, s.group_id)
        table.add_row("consumer lag", str(lag["total"]))
        dlq = dead_letter_summary(s)
        table.add_row(
            "dead letters",
            f"{dlq['distinct']} records {json.dumps(dlq['by_reason'])}"
            + (f" ({dlq['messages']} messages)" if dlq["messages"] != dlq["distinct"] else ""),
        )
    table.add_row("log file", str(logs.log_file(s).resolve()))
    console.print(table)
    if unreachable is not None:
        raise unreachable


# --- data ------------------------------------------------------------------------------
@app.command()
def produce(ctx: typer.Context, file: Path) -> None:
    """Send document events from a JSONL or Parquet FILE to the topic."""
    from knowstream.connectors.kafka import produce_file, require_broker

    if not file.is_file():
        raise BadInput(f"no file {file}: give a JSONL or Parquet file of document events")
    s = _settings(ctx)
    require_broker(s)
    with _progress() as bar:
        task = bar.add_task(f"produce {file.name}", total=None)
        n = produce_file(s, file, progress=lambda k: bar.update(task, completed=k))
    console.print(f"sent {n} messages to {s.topic}")


@app.command()
def ingest(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option(help="Drain what is on the topic, then exit.")] = False,
    max_batches: Annotated[int | None, typer.Option(help="Stop after this many batches.")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on this port (loopback).")
    ] = None,
) -> None:
    """Consume micro-batches, run the pipeline, publish snapshots, commit offsets.

    SIGINT/SIGTERM stop it within seconds (the current batch is abandoned; exit status
    128 + signal); an error retrying cannot fix stops it as failed (exit status 1)."""
    from knowstream import metrics
    from knowstream.flows.ingest import ingest_flow
    from knowstream.flows.stopping import Stopped, exit_now, start_prefect_api, stop_on_signals

    if metrics_port:
        metrics.default().serve(metrics_port)

    from knowstream.memory import Memory
    from knowstream.progress import BatchProgress

    s = _settings(ctx)
    try:
        with _store(), stop_on_signals(s.stop_grace_s):
            Memory(s).open_store()  # a held store is one line, before any consumer or flow starts
            start_prefect_api()  # in its own session: a group signal must not stop it first
            with BatchProgress(console, "records") as bar:
                reports = ingest_flow(s, once=once, max_batches=max_batches, on_batch=bar.batch)
    except Stopped as e:
        console.print(f"{e}: current batch abandoned; the next start resumes from the commits")
        exit_now(e.exit_code)
    versions = [r.version for r in reports if r.version]
    console.print(
        f"{len(reports)} batches, {sum(r.messages for r in reports)} records -> "
        + (f"version {versions[-1]}" if versions else "no new version")
        + f" ({sum(len(r.dead_letters) for r in reports)} dead letters)"
    )


def _partition_offsets(option: str, values: list[str] | None) -> dict[int, int] | None:
    if not values:
        return None
    offsets = {}
    for v in values:
        p, _, o = v.partition(":")
        if not (p.isdigit() and o.isdigit()):
            raise BadInput(f"{option} {v!r} is not PARTITION:OFFSET: give e.g. {option} 0:1200")
        offsets[int(p)] = int(o)
    return offsets


def _ms(option: str, ts: str | None) -> int | None:
    if not ts:
        return None
    try:
        when = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(
            f"{option} {ts!r} is not an ISO-8601 time: give e.g. {option} 2026-12-01T03:00:00Z"
        ) from None
    return int(when.timestamp() * 1000)


@app.command()
def skip(
    ctx: typer.Context,
    partition: Annotated[int, typer.Option(help="Partition of the stuck message.")],
    offset: Annotated[int, typer.Option(help="Its offset: the next one the group reads.")],
) -> None:
    """Move the ingest group past one message, recording it on the dead-letter topic as
    "skipped by operator". Stop the group's ingest workers first."""
    from knowstream.flows.skip import skip_message

    s = _settings(ctx)
    try:
        skip_message(s, partition, offset)
    except (ValueError, LookupError) as e:
        _fail(f"skip: {e}")
    console.print(f"skipped {s.topic}[{partition}] offset {offset}: on {s.dlq_topic}")


@app.command()
def backfill(
    ctx: typer.Context,
    from_offset: Annotated[
        list[str] | None, typer.Option(help="PARTITION:OFFSET, inclusive.")
    ] = None,
    to_offset: Annotated[
        list[str] | None, typer.Option(help="PARTITION:OFFSET, exclusive.")
    ] = None,
    from_time: Annotated[str | None, typer.Option(help="ISO-8601 start time.")] = None,
    to_time: Annotated[str | None, typer.Option(help="ISO-8601 end time.")] = None,
    archive: Annotated[Path | None, typer.Option(help="Replay a Parquet archive instead.")] = None,
    base: Annotated[str, typer.Option(help="'live', 'none' or a version number.")] = "live",
    amortizer: Annotated[
        str | None, typer.Option(help="Amortizer checkpoint to build with.")
    ] = None,
    promote: Annotated[bool, typer.Option(help="Make the result live.")] = False,
) -> None:
    """Replay a range into a side line of versions without touching live."""
    from knowstream.connectors.kafka import require_broker
    from knowstream.flows.backfill import backfill_flow
    from knowstream.progress import BatchProgress

    s = _settings(ctx)
    if archive is not None and not archive.is_file():
        raise BadInput(f"no archive {archive}: give a Parquet file of document events")
    options = {
        "start": _partition_offsets("--from-offset", from_offset),
        "end": _partition_offsets("--to-offset", to_offset),
        "start_ts_ms": _ms("--from-time", from_time),
        "end_ts_ms": _ms("--to-time", to_time),
        "archive": str(archive.resolve()) if archive else None,
        "base": base,
        "amortizer": _amortizer_option(amortizer),
        "promote": promote,
    }
    if archive is None:
        require_broker(s)
    if url := _server(s):
        with console.status(f"backfilling through {url}..."):
            report = _api(s, url, "POST", "/admin/backfill", options)
        messages, version = report["messages"], report["version"]
    else:
        with _store(), BatchProgress(console, "records replayed") as bar:
            report = backfill_flow(s, **options)
            bar.batch(report)
        messages, version = report.messages, report.version
    if messages == 0:
        raise BadInput(
            f"no records in that range of {archive or s.topic}: nothing was replayed "
            "(check the offsets or times; `knowstream status` shows the topic's state)"
        )
    console.print(f"replayed {messages} records -> version {version}")


@app.command()
def promote(ctx: typer.Context, version: int) -> None:
    """Make VERSION live (moves the alias; through the server when one runs)."""
    _move_live(_settings(ctx), version, "/admin/live")
    console.print(f"live -> version {version}")


@app.command()
def rollback(ctx: typer.Context, version: int) -> None:
    """Point live back at an earlier VERSION (O(1): moves the alias)."""
    _move_live(_settings(ctx), version, "/admin/rollback")
    console.print(f"rolled back: live -> version {version}")


@app.command()
def compact(
    ctx: typer.Context,
    version: Annotated[int | None, typer.Argument(help="Default: live.")] = None,
) -> None:
    """Fold VERSION's line into a new root version with the same content (live follows)."""
    s = _settings(ctx)
    if url := _server(s):
        root = _api(s, url, "POST", "/admin/compact", {"version": version})["version"]
    else:
        from knowstream.memory import Memory

        with _store():
            root = Memory(s).compact(version).version
    console.print(f"compacted into version {root}")


@app.command()
def retain(
    ctx: typer.Context,
    keep_last: Annotated[int, typer.Option(help="Keep the last N published versions.")],
    live_days: Annotated[
        float, typer.Option(help="Keep every version live pointed to in the last D days.")
    ] = 7.0,
) -> None:
    """Retire the versions the policy no longer keeps and free their points."""
    s = _settings(ctx)
    if url := _server(s):
        body = {"keep_last": keep_last, "live_days": live_days}
        retired = _api(s, url, "POST", "/admin/retain", body)["retired"]
    else:
        from knowstream.memory import Memory

        try:
            with _store():
                retired = Memory(s).retain(keep_last, live_days)
        except ValueError as e:
            _fail(str(e))
    console.print(f"retired {len(retired)} versions: {retired}" if retired else "retired nothing")


def _move_live(s: Settings, version: int, path: str) -> None:
    """Through the server when one runs (it serves the new version at once), else
    straight to the registry: moving an alias needs no Prefect run and no store."""
    if url := _server(s):
        _api(s, url, "POST", path, {"version": version})
        return
    from knowstream.connectors.mlflow import _alias

    try:  # the embedded registry: its SQLite tables, without importing MLflow (~2 s)
        _alias.move_live(s, version, backwards=path == "/admin/rollback")
        return
    except _alias.Fallback:
        pass
    from knowstream.connectors.mlflow import Registry

    registry = Registry(s)
    if path == "/admin/rollback":
        registry.rollback(version)
    else:
        registry.set_live(version)


@app.command()
def deploy(
    ctx: typer.Context,
    cron: Annotated[str | None, typer.Option(help="When to run, e.g. '0 3 * * *'.")] = None,
    pool: Annotated[
        str | None, typer.Option(help="Deploy to this work pool (see `up --workers`).")
    ] = None,
    base: Annotated[str, typer.Option(help="'live', 'none' or a version number.")] = "none",
    amortizer: Annotated[str | None, typer.Option(help="Amortizer checkpoint.")] = None,
    promote: Annotated[bool, typer.Option(help="Make each result live.")] = False,
) -> None:
    """Deploy the backfill flow to a work pool (--pool), or serve it on a cron from this
    process, against a Prefect server (PREFECT_API_URL). The runs get this command's
    settings (--home, --bootstrap-servers, ...)."""
    from knowstream.flows.deploy import (
        backfill_deployment,
        deploy_backfill,
        serve,
        settings_parameter,
    )

    s = _settings(ctx)
    if pool:
        one_at_a_time = s.qdrant_url is None  # embedded stores: one process
        parameters = {
            "base": base,
            "amortizer": _amortizer_option(amortizer),
            "promote": promote,
            "settings": settings_parameter(s),
        }
        deploy_backfill(pool, one_at_a_time=one_at_a_time, cron=cron, parameters=parameters)
        console.print(f"deployment backfill/backfill on work pool {pool}")
        return
    if cron is None:
        raise BadInput("deploy needs --cron (served from here), --pool, or both")
    spec = _amortizer_option(amortizer)
    serve(backfill_deployment(cron, settings=s, base=base, amortizer=spec, promote=promote))


@app.command()
def report(
    ctx: typer.Context,
    eval_file: Annotated[
        Path | None, typer.Option("--eval", help="Eval result JSON; default: the latest.")
    ] = None,
) -> None:
    """Write one self-contained HTML page with plots under <home>/reports/."""
    from knowstream import report as page
    from knowstream.connectors.mlflow import Registry

    s = _settings(ctx)
    path = page.write(s, Registry(s), eval_path=eval_file)
    console.print(f"report written: {path.resolve()}")


@app.command()
def snapshots(ctx: typer.Context) -> None:
    """The snapshot history as a table."""
    from knowstream.memory import Memory

    s = _settings(ctx)
    url = _server(s)
    console.print(snapshot_table(_api(s, url, "GET", "/snapshots") if url else Memory(s).history()))


@app.command()
def ask(
    ctx: typer.Context,
    question: str,
    version: Annotated[int | None, typer.Option(help="Memory version; default: live.")] = None,
    k: Annotated[int, typer.Option(help="Chunks to retrieve.")] = 5,
    mode: Annotated[
        str, typer.Option(help="evidence | rag | mac | mac+rag (the last three: LM answers).")
    ] = "evidence",
) -> None:
    """Evidence chunks, source docs, related triples and (modes rag, mac, mac+rag) the
    LM's answer for QUESTION: the code path of the HTTP API's /ask."""
    from knowstream.connectors.qdrant import Hit
    from knowstream.memory import Memory
    from knowstream.query import QueryResult
    from knowstream.serving.generate import MODES, answer, retrieve

    if mode not in ("evidence", *MODES):
        raise BadInput(f"--mode {mode!r} is unknown: give evidence, {', '.join(MODES)}")
    if k < 1:
        raise BadInput(f"--k {k}: retrieve at least 1 chunk (e.g. --k 5)")
    settings = _settings(ctx)
    if url := _server(settings):
        body = {"question": question, "version": version, "k": k, "mode": mode}
        got = _api(settings, url, "POST", "/ask", body)
        result = QueryResult(
            question, got["version"], [Hit(**h) for h in got["evidence"]], got["docs"]
        )
        result.triples, reply = got["triples"], got["answer"]
        print_result(result)
    else:
        with _store():
            memory = Memory(settings)
            result, bank = retrieve(memory, question, version=version, k=k, mode=mode)
            print_result(result)
            reply = answer(memory, result, bank, mode)
    if reply is not None:
        console.print(f"[bold]answer ({mode}, version {result.version}):[/bold] {reply}")


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    ingest: Annotated[
        bool, typer.Option(help="Also run the continuous ingest worker in this process.")
    ] = False,
) -> None:
    """HTTP API (OpenAPI docs at /docs) that follows the live version. With --ingest,
    the one process that holds the embedded store; other commands go through it."""
    import uvicorn

    from knowstream.flows.backfill import backfill_flow
    from knowstream.flows.ingest import ingest_flow
    from knowstream.flows.stopping import exit_now, start_prefect_api
    from knowstream.serving.app import create_app

    s = _settings(ctx)
    if url := _server(s):
        _fail(f"a server already runs for {s.home} at {url}")
    if ingest:
        start_prefect_api()  # its flows' API: in its own session (see flows/stopping.py)
    with _store():
        reach = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where clients connect
        app_ = create_app(
            s,
            ingest_flow=ingest_flow if ingest else None,
            backfill_flow=backfill_flow,
            address=f"http://{reach}:{port}",
        )
    # SIGINT/SIGTERM: uvicorn stops accepting, gives open requests 5 s and runs the
    # shutdown hooks. Then exit without the interpreter's teardown (4-5 s measured).
    try:
        uvicorn.run(app_, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        exit_now(130)
    exit_now(0)


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    data: Annotated[
        Path, typer.Option(help="SQuAD-format JSONL (doc_id, title, text, question, answers).")
    ],
    checkpoint: Annotated[
        Path | None, typer.Option(help="MAC checkpoint folder (mac_* modes).")
    ] = None,
    split_file: Annotated[Path, typer.Option(help="Article split lists.")] = Path(
        "data/splits/squad_v1.1.json"
    ),
    split: Annotated[str, typer.Option(help="train | validation | eval")] = "eval",
    modes: Annotated[str, typer.Option(help="Comma-separated modes.")] = "closed_book,gold_passage",
    n: Annotated[int | None, typer.Option(help="Questions (default: all of the split).")] = None,
    retrieval: Annotated[
        Path | None, typer.Option(help="Hits file of models/retrieve.py (default: computed).")
    ] = None,
    retention_modes: Annotated[
        str, typer.Option(help="Retention rows, e.g. rag@5,mac@5,mac_wrong@5.")
    ] = "",
    out: Annotated[Path | None, typer.Option(help="Write the full result JSON here.")] = None,
) -> None:
    """SQuAD EM/F1 with 95% bootstrap intervals, each MAC mode beside its wrong-passage
    control (modes: see ``python -m knowstream.models.evaluate --help``; @k modes retrieve
    k chunks with the pipeline's chunker and embedder). The checkpoint defaults to the
    bundled one."""
    from knowstream.models.evaluate import evaluate as run_eval
    from knowstream.models.inference import bundled_checkpoint
    from knowstream.progress import StepProgress

    with StepProgress(console) as bar:
        res = run_eval(
            data,
            checkpoint or bundled_checkpoint(),
            modes.split(","),
            n,
            split_file,
            split,
            retrieval=retrieval,
            retention_modes=[m for m in retention_modes.split(",") if m],
            on_batch=bar.update,
        )
    table = Table(title=f"{res['split']} split: {res['n']} questions, {res['n_articles']} articles")
    for col in ("mode", "n", "EM [95% CI]", "F1 [95% CI]"):
        table.add_column(col)
    for mode, r in res["rows"].items():
        em_lo, em_hi = r["em_ci"]
        f1_lo, f1_hi = r["f1_ci"]
        table.add_row(
            mode,
            str(r["n"]),
            f"{r['em']:.2f} [{em_lo:.2f}, {em_hi:.2f}]",
            f"{r['f1']:.2f} [{f1_lo:.2f}, {f1_hi:.2f}]",
        )
    for pair, diff in res["paired_f1"].items():
        lo, hi = diff["ci"]
        table.add_row(f"{pair} (paired)", "", "", f"{diff['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    console.print(table)
    for mode, r in res.get("retention", {}).get("rows", {}).items():
        f1s = ", ".join(f"{p} in memory {x['f1']:.2f}" for p, x in r["f1"].items())
        console.print(f"retention {mode}: F1 {f1s}")
    if out:
        out.write_text(json.dumps(res, indent=1))
    # Kept under --home too: `knowstream report` shows the latest one.
    saved = _settings(ctx).home / "eval" / f"eval-{datetime.now():%Y%m%dT%H%M%S}.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(res, indent=1))


@app.command("retrieve")
def retrieve_hits(
    data: Annotated[Path, typer.Option(help="SQuAD-format JSONL (.gz ok).")],
    out: Annotated[Path, typer.Option(help="The hits file to write (JSON).")],
    split_file: Annotated[Path, typer.Option(help="Article split lists.")] = Path(
        "data/splits/squad_v1.1.json"
    ),
    split: Annotated[str, typer.Option(help="train | validation | eval")] = "eval",
    top: Annotated[int, typer.Option(help="Hits kept per question.")] = 50,
    coverage: Annotated[
        bool, typer.Option("--coverage", help="Only report the coverage of --out's hits.")
    ] = False,
) -> None:
    """Each question's best chunks (the pipeline's chunker and embedder, exact cosine), the
    hits file that `eval --retrieval` and the GPU evaluation read; then, for k = 1, 3, 5,
    how often the gold document is among the k retrieved (its entry in the bank), an answer
    is in the k chunks (the prompt), and the first without the second."""
    from knowstream.models.retrieve import coverage_report, retrieve_split

    if not data.is_file():
        raise BadInput(f"--data {data}: no such file")
    if split not in ("train", "validation", "eval"):
        raise BadInput(f"--split {split!r}: give train, validation or eval")
    if coverage and not out.is_file():
        raise BadInput(f"--out {out}: no hits file to report on (run without --coverage)")
    if not coverage:
        n, hit1 = retrieve_split(data, split_file, split, out, top)
        console.print(f"{n} questions, top-1 chunk from the gold passage: {hit1:.3f} -> {out}")
    table = Table("k", "gold entry in the bank", "answer in the prompt", "entry only")
    for at, row in coverage_report(data, split_file, split, out).items():
        cells = (row[m] for m in ("gold_entry", "answer_in_prompt", "entry_only"))
        table.add_row(at, *(f"{v:.1%}" for v in cells))
    console.print(table)


@app.command("plot")
def plot_result(
    result: Annotated[Path, typer.Argument(help="Result JSON of `knowstream eval --out`.")],
    out: Annotated[Path, typer.Argument(help="The PNG to write.")],
) -> None:
    """F1 per mode of an evaluation result, each MAC bar beside its control, as a PNG."""
    from knowstream.models.plot_eval import plot

    if not result.is_file():
        raise BadInput(f"{result}: no such file (write one with `knowstream eval --out`)")
    plot(str(result), str(out))
    console.print(f"wrote {out}")


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train MAC: runs the script models/train.py with --name=value options, each a
    field of its TrainConfig (e.g. --squad=DEV.jsonl --extra=TRAIN.jsonl.gz --device=cuda)."""
    import runpy
    import sys

    sys.argv = ["knowstream train", *ctx.args]
    runpy.run_module("knowstream.models.train", run_name="__main__", alter_sys=True)


@app.command()
def demo(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="Folder with stream.jsonl, updates.jsonl.")] = Path(
        "data/sample"
    ),
) -> None:
    """The end-to-end walk-through that `make run` runs (fresh state under --home)."""
    from knowstream.flows.demo import run_demo

    run_demo(_settings(ctx), data, console)


# --- rendering ---------------------------------------------------------------------------
def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


if __name__ == "__main__":
    app()
