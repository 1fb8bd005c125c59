"""Helpers every benchmark shares: timers, machine description, input, result header.

Each benchmark imports this as ``bench._common``; the scripts put the repository root at
the *end* of ``sys.path`` when it is missing (``python bench/x.py`` only adds ``bench/``,
and ``PYTHONSAFEPATH=1`` adds nothing), so a ``knowstream`` found earlier on the path (an
editable install, or the GPU machine's ``/tmp/ks`` layout, see ``bench/amortize.py``) wins.

Nothing here imports knowstream, apache_beam, pyarrow, qdrant or mlflow: ``bench/amortize.py``
runs on machines without them.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from rich.console import Console

# Tables stay readable when output goes to a file or a CI log (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 140)

# Fields of a DocumentEvent (schemas/event.py); anything else on a line (SQuAD questions,
# answers) is not part of the document and is left out of the event.
EVENT_FIELDS = ("doc_id", "title", "text", "source", "url", "published_at", "metadata")


# --- timing ------------------------------------------------------------------------------------
class StepTimer:
    """Wall seconds, process CPU seconds and call counts per named step, summed over calls.

    Why wrappers instead of timing inside the library: the code under test must run
    unchanged. Wrapping the functions it calls (and restoring them afterwards) times exactly
    those calls, in place, without a single edit to library code.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)  # process CPU seconds, all threads
        self.calls: dict[str, int] = defaultdict(int)
        self.last_cpu: dict[str, float] = {}  # the CPU seconds that the last take() cleared
        self.on_enter: Callable[[str], None] | None = None  # e.g. a progress description

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        # A plain closure, not functools.wraps: some targets are Prefect Task objects, whose
        # attribute dict must not be copied onto a function.
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.on_enter is not None:
                self.on_enter(name)
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.cpu[name] += time.process_time() - cpu_start
                self.calls[name] += 1

        return timed

    def take(self) -> dict[str, float]:
        """The wall seconds so far, and start over (their CPU seconds go to ``last_cpu``)."""
        out = dict(self.seconds)
        self.last_cpu = dict(self.cpu)
        self.seconds.clear()
        self.cpu.clear()
        self.calls.clear()
        return out


@contextmanager
def instrumented(timer: StepTimer, targets: Sequence[tuple[object, str, str]]) -> Iterator[None]:
    """Replace ``owner.attr`` by a timed wrapper for each (owner, attr, step name); restore after.

    Module attributes must be patched where they are looked up: ``process_batch`` calls
    ``run_batch`` through ``knowstream.flows.batch``'s globals, so that module is the owner,
    not ``knowstream.pipelines.pipeline``. Methods are patched on their class.
    """
    saved: list[tuple[object, str, Any]] = []
    try:
        for owner, attr, name in targets:
            original = getattr(owner, attr)
            saved.append((owner, attr, original))
            setattr(owner, attr, timer.wrap(name, original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def written_bytes() -> int:
    """Bytes this process has caused to be written to storage so far (Linux
    ``/proc/self/io``; 0 where it is not available)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("write_bytes:"))
    except (OSError, StopIteration, ValueError):
        return 0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between closest ranks
    (numpy's default), without numpy."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --- machine and software ----------------------------------------------------------------------
def machine_info(packages: Sequence[str] = ()) -> dict[str, Any]:
    """What the figures were measured on; written into the JSON next to them.

    ``packages``: distributions whose versions to record ("not installed" when absent).
    GPUs are listed when torch is importable and sees CUDA.
    """
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            model,
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    versions = {}
    for name in packages:
        try:
            versions[name] = package_version(name)
        except Exception:
            versions[name] = "not installed"
    gpus: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpus": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def run_header(
    benchmark: str,
    started: datetime,
    load_before: tuple[float, float, float],
    packages: Sequence[str],
) -> dict[str, Any]:
    """The first keys of every result JSON: what ran, when, where, under which load."""
    return {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": machine_info(packages),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
    }


def write_result(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {out}")


# --- input -------------------------------------------------------------------------------------
def jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON values of a JSONL file, plain or gzipped (``.gz``), blank lines skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def load_documents(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` distinct documents of a JSONL file, as upsert events.

    A dev.jsonl-style file, where several question lines share one passage, is deduplicated
    by ``doc_id`` (the first line of each doc wins). Lines that are not upserts with a string
    ``doc_id`` and a non-empty ``text`` are skipped: the benchmarks measure documents, and
    dead-letter routing is not what they are about (the e2e tests cover that path).
    """
    seen: set[str] = set()
    docs: list[dict[str, Any]] = []
    for row in jsonl_rows(path):
        doc_id, text = row.get("doc_id"), row.get("text")
        if not isinstance(doc_id, str) or doc_id in seen or row.get("op", "upsert") != "upsert":
            continue
        if not isinstance(text, str) or not text.strip():
            continue
        seen.add(doc_id)
        event = {k: row[k] for k in EVENT_FIELDS if row.get(k) is not None}
        docs.append({**event, "op": "upsert"})
        if len(docs) == n:
            break
    return docs


def load_questions(path: Path, doc_ids: set[str], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` questions of ``path`` about ``doc_ids``, spread over the documents.

    Round-robin over documents in file order (first question of each doc, then the second,
    ...), so a small sample asks about many documents rather than many times about the first.
    Returns {"doc_id", "question", "answers"} dicts.
    """
    per_doc: dict[str, list[dict[str, Any]]] = {}
    for row in jsonl_rows(path):
        q, doc_id = row.get("question"), row.get("doc_id")
        if doc_id in doc_ids and isinstance(q, str) and q.strip():
            per_doc.setdefault(doc_id, []).append(
                {"doc_id": doc_id, "question": q, "answers": row.get("answers", [])}
            )
    out: list[dict[str, Any]] = []
    rank = 0
    while len(out) < n and any(len(qs) > rank for qs in per_doc.values()):
        for qs in per_doc.values():
            if len(qs) > rank and len(out) < n:
                out.append(qs[rank])
        rank += 1
    return out


def free_port() -> int:
    """A loopback port nobody listens on right now (as tests/fixtures_broker.py does)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def isolate_prefect(home: Path) -> None:
    """A private, ephemeral Prefect API under ``home``, as the test suite uses.

    Why: with ``PREFECT_API_URL`` set, the flow would report to (and be slowed by) whatever
    server the shell points at, and runs would pile up in the developer's Prefect database.
    Must run before Prefect is first imported; Prefect reads its settings at import.
    """
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # keep the progress bars readable
