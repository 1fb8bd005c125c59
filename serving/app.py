"""The HTTP API: answers from the memory version that ``live`` points at.

    knowstream serve                       # http://127.0.0.1:8000/docs for the OpenAPI UI
    knowstream serve --ingest              # and the continuous ingest worker, same process

- ``POST /ask``: evidence chunks, source docs and related triples, plus a
  generated answer for modes ``rag``, ``mac`` and ``mac+rag``.
- ``GET /snapshots``, ``GET /healthz``, ``GET /metrics`` (Prometheus text).
- ``POST /admin/live``: point ``live`` at a published version (promote);
  ``POST /admin/rollback``: the same, only backwards; ``POST /admin/backfill``: a
  backfill run inside the server; ``POST /admin/compact``, ``POST /admin/retain``:
  compaction and retention; ``GET /admin/status``: live version and the
  ingest worker's health. The CLI uses these while the server holds the store
  (see ``serving/client.py``).

With ``ingest_flow`` given (``serve --ingest``) the continuous ingest flow runs in a
thread of the same process, over the same embedded store: the one process that
may open it. The server writes its address to ``<home>/run/server.json``.

The server follows the ``live`` alias by polling the registry every few seconds,
so ingest, promote and rollback reach it without a restart; with ``--ingest`` it reads
``live`` again as soon as its worker has published a version. A request reads the
live version once, at its start, and uses that version to the end: it never
mixes two snapshots. With ``KNOWSTREAM_API_TOKEN`` set, ``/ask`` and
``/admin/*`` require ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import Counter, generate_latest
from pydantic import AfterValidator, BaseModel, Field

from knowstream import metrics as metrics_module
from knowstream.errors import AmortizerMismatch, VersionNotFound, VersionNotServable
from knowstream.health import read_health
from knowstream.memory import Memory
from knowstream.serving.client import remove_address, write_address
from knowstream.serving.generate import answer, retrieve
from knowstream.settings import Settings

log = logging.getLogger("knowstream.serve")


def _not_blank(question: str) -> str:
    if not question.strip():  # would retrieve arbitrary evidence for nothing
        raise ValueError("question is blank")
    return question


# Versions are registry numbers from 1; past SQLite's 64-bit INTEGER a number is no version
# (and made the registry lookup raise OverflowError: a 500).
Version = Annotated[int, Field(ge=1, le=2**63 - 1)]


class AskRequest(BaseModel):
    question: Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(_not_blank)]
    version: Version | None = Field(default=None, description="Memory version; default: live.")
    k: int = Field(default=5, ge=1, le=50, description="Chunks to retrieve.")
    mode: Literal["evidence", "rag", "mac", "mac+rag"] = "evidence"


class LiveRequest(BaseModel):
    version: Version


def _short(text: object, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, lone surrogates replaced (so it encodes)."""
    return str(text)[:limit].encode("utf-8", "replace").decode("utf-8")


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 that says where and what, bounded: FastAPI's default echoes each error's input,
    so a 1 MB question came back whole, and one with a lone surrogate failed to encode (500)."""
    detail = [
        {"loc": [_short(x, 64) for x in e["loc"]], "msg": _short(e["msg"]), "type": e["type"]}
        for e in exc.errors()[:10]
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


class CompactRequest(BaseModel):
    version: int | None = None  # default: live


class RetainRequest(BaseModel):
    keep_last: int = Field(ge=1)
    live_days: float = Field(ge=0)


class BackfillRequest(BaseModel):
    """The options of ``knowstream backfill`` (offsets as {partition: offset})."""

    start: dict[int, int] | None = None
    end: dict[int, int] | None = None
    start_ts_ms: int | None = None
    end_ts_ms: int | None = None
    archive: str | None = None
    base: str = "live"
    amortizer: str | None = None
    promote: bool = False


class IngestWorker:
    """The continuous ingest flow in a thread of the server process."""

    def __init__(
        self,
        settings: Settings,
        flow: Callable[..., object],
        on_batch: Callable[[Any], object],
        on_published: Callable[[int], object] | None = None,
    ) -> None:
        self.settings, self.flow, self.on_batch = settings, flow, on_batch
        self.on_published = on_published
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop after the current batch (a batch cut short is redelivered anyway)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            self.flow(
                self.settings,
                once=False,
                on_batch=self.on_batch,
                stop=self._stop,
                on_published=self.on_published,
            )
        except Exception:  # its health record says why; serving goes on
            log.exception("the ingest worker stopped")


class LiveVersion:
    """The version ``live`` points at, refreshed in the background.

    A refresh that fails (registry unreachable) keeps the last version served; it is
    logged and counted, and ``age_s`` (in /healthz) says how old the served view is.
    """

    def __init__(self, memory: Memory, interval_s: float, failures: Counter) -> None:
        self.memory, self.interval_s, self.failures = memory, interval_s, failures
        self.current: int | None = memory.registry.live()
        self.read_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-version", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> int | None:
        self.current = self.memory.registry.live()
        self.read_at = time.monotonic()
        return self.current

    def age_s(self) -> float:
        """Seconds since ``live`` was last read successfully."""
        return time.monotonic() - self.read_at

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception as e:  # registry unreachable: keep serving the last version
                self.failures.inc()
                log.warning(
                    "reading live failed, still serving version %s (read %.0f s ago): %s",
                    self.current,
                    self.age_s(),
                    e,
                )


def create_app(
    settings: Settings,
    *,
    poll_s: float = 2.0,
    metrics: metrics_module.Metrics | None = None,
    ingest_flow: Callable[..., object] | None = None,
    backfill_flow: Callable[..., Any] | None = None,
    address: str | None = None,
) -> FastAPI:
    """``metrics``: default: the process's registry (shared with the ingest worker).
    ``ingest_flow``: run it continuously in a thread (``serve --ingest``);
    ``backfill_flow``: what ``/admin/backfill`` runs. The CLI hands both in, so
    serving imports no flows. ``address``: the URL to publish in
    ``<home>/run/server.json``."""
    memory = Memory(settings)
    memory.open_store()  # a held store fails the start with its one line
    metrics = metrics or metrics_module.default()
    live = LiveVersion(memory, poll_s, metrics.live_refresh_failures)
    token = settings.api_token.get_secret_value() if settings.api_token else None

    def authorized(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    ingest = ingest_flow is not None
    # A batch's version is answered as soon as it is published and live (not after its
    # commit and annotations, nor at the next poll of the registry); after the batch too,
    # since maintenance (compaction) may move live again.
    worker = (
        IngestWorker(
            settings,
            ingest_flow,
            on_batch=lambda report: live.refresh(),
            on_published=lambda version: live.refresh(),
        )
        if ingest_flow
        else None
    )

    def started() -> None:
        live.start()
        if worker:
            worker.start()
        if address:
            write_address(settings, address, ingest=ingest)

    def stopping() -> None:
        if address:
            remove_address(settings)
        if worker:
            # Not the whole batch: one cut short is abandoned safely (nothing committed,
            # a half publish purged, a publish not yet committed resumed at restart).
            worker.stop(timeout_s=settings.stop_grace_s / 2)
        live.stop()

    app = FastAPI(
        title="knowstream",
        description="Answers from versioned memory snapshots of a live document stream.",
        on_startup=[started],
        on_shutdown=[stopping],
        exception_handlers={RequestValidationError: _invalid_request},
    )
    app.state.live = live

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        # Every route and status, 401/422/500 included; unknown paths share one label.
        started = time.perf_counter()
        status = 500  # an exception that escapes the app is answered with 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.request_seconds.labels(route).observe(time.perf_counter() - started)

    @app.post("/ask", dependencies=[Depends(authorized)])
    def ask(req: AskRequest) -> dict:
        started = time.perf_counter()
        version = req.version if req.version is not None else live.current
        if version is None:
            raise HTTPException(503, "no live memory version yet")
        try:
            # The embedded stores serialize their own calls (connectors/qdrant).
            result, bank = retrieve(memory, req.question, version=version, k=req.k, mode=req.mode)
        except (VersionNotFound, VersionNotServable) as e:
            raise HTTPException(404, str(e)) from None
        try:
            reply = answer(memory, result, bank, req.mode)
        except AmortizerMismatch as e:
            raise HTTPException(409, str(e)) from None
        metrics.answer_seconds.labels(req.mode).observe(time.perf_counter() - started)
        return {
            "question": req.question,
            "answer": reply,
            "mode": req.mode,
            "version": result.version,
            "evidence": [h.__dict__ for h in result.hits],
            "docs": result.docs,
            "triples": result.triples,
        }

    @app.get("/snapshots")
    def snapshots() -> list[dict]:
        return memory.history()

    @app.get("/healthz")
    def healthz() -> dict:
        # A view older than a few refresh intervals means the registry is not answering.
        age = live.age_s()
        status = "ok" if age < max(30.0, 5 * poll_s) else "stale"
        # The ingest worker's record when it shares this home ("failed" with its reason).
        ingest = read_health(settings)
        age_s = round(age, 1)
        return {"status": status, "live": live.current, "live_age_s": age_s, "ingest": ingest}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        try:
            metrics.observe_versions(memory.registry)
        except Exception:  # registry briefly unreachable: the last values stand
            metrics.live_version.set(live.current or 0)
        return generate_latest(metrics.registry).decode()

    @app.get("/report", response_class=HTMLResponse)
    def report_page() -> str:
        """The page `knowstream report` writes: versions, ingest, dead letters, eval."""
        from knowstream.report import render

        return render(settings, memory.registry)

    @app.post("/admin/live", dependencies=[Depends(authorized)])
    def set_live(req: LiveRequest) -> dict:
        try:
            memory.set_live(req.version)
        except VersionNotFound as e:
            raise HTTPException(404, str(e)) from None
        except VersionNotServable as e:
            raise HTTPException(409, str(e)) from None
        return {"live": live.refresh()}

    @app.post("/admin/rollback", dependencies=[Depends(authorized)])
    def rollback(req: LiveRequest) -> dict:
        try:
            memory.rollback(req.version)
        except (ValueError, KeyError) as e:
            raise HTTPException(409, str(e)) from None
        return {"live": live.refresh()}

    @app.post("/admin/compact", dependencies=[Depends(authorized)])
    def compact(req: CompactRequest) -> dict:
        try:
            root = memory.compact(req.version)
        except (ValueError, LookupError) as e:
            raise HTTPException(409, str(e)) from None
        return {"version": root.version, "live": live.refresh()}

    @app.post("/admin/retain", dependencies=[Depends(authorized)])
    def retain(req: RetainRequest) -> dict:
        try:
            return {"retired": memory.retain(req.keep_last, req.live_days)}
        except ValueError as e:
            raise HTTPException(409, str(e)) from None

    @app.get("/admin/status", dependencies=[Depends(authorized)])
    def status() -> dict:
        return {"live": live.refresh(), "ingest": read_health(settings), "serve_ingest": ingest}

    @app.post("/admin/backfill", dependencies=[Depends(authorized)])
    def backfill(req: BackfillRequest) -> dict:
        if backfill_flow is None:
            raise HTTPException(501, "this server runs no backfills")
        try:
            report = backfill_flow(settings, **req.model_dump())
        except (ValueError, LookupError) as e:
            raise HTTPException(409, str(e)) from None
        live.refresh()
        return {"messages": report.messages, "version": report.version}

    return app
