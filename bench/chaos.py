"""Kill test (issue 3): SIGKILL the ingest worker at random moments, restart the
broker, and check that the final live memory equals an uninterrupted reference run.

The long run, on durable s3:// broker storage with three broker restarts (the
figures in RELIABILITY.md come from the same command with ``--events 600 --batch 15``)::

    .venv/bin/python bench/chaos.py --events 5000 --batch 100 --kills 20 \\
        --broker-restarts 3 --storage s3 \\
        --data /work/shared/data/squad_v1.1/documents.jsonl --out bench/results/chaos.json

What it does:

1. Generates a deterministic stream of ``--events`` document events from ``--data``
   (JSONL with doc_id/title/text): new documents, updates of earlier ones (changed
   text, later ``published_at``), deletes, and exact duplicates of earlier events.
   Passages are reused with suffixed doc ids to reach N; texts are cut to
   ``--max-chars`` so that the CPU pipeline stays quick.
2. Reference run: fresh home and topic, all events produced, then one uninterrupted
   ``knowstream ingest --once`` subprocess. Its live version is read back in this
   process once the subprocess has exited (Qdrant local mode: one process per path).
3. Chaos run: another fresh home and topic, the same events. A continuous
   ``knowstream ingest`` subprocess is SIGKILLed (with its process group) ``--kills``
   times and restarted each time. Kills rotate over four targets: during pipeline
   work (a random delay into a batch), during publish (a random delay after the
   "pipeline:" log line), right after the "published memory version" log line (the
   window between publish and offset commit), and a pure random delay. Each kill is
   then classified from the evidence left behind: a ``pending`` version in the
   registry means "during publish", a published version whose offsets the consumer
   group has not committed means "between publish and commit". With ``--storage s3``
   the broker (and its s3rver) is also restarted ``--broker-restarts`` times while
   the worker runs. A final uninterrupted ``ingest --once`` drains the topic.
4. Compares the two live versions: ``VersionView.digest()`` (sha256 over every
   visible point's payload and vector), doc ids, content hashes, modulation
   checksums, triples, chunk texts and tombstones. Version numbers and point ids
   differ between the runs by design (a point id includes the version that wrote
   it, and killed publishes use up version numbers), so content is compared.
   Both runs are also checked against an oracle computed from the events alone
   (which doc ids must be live), reported separately.

Exit status 0 iff there are no mismatches between the runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from knowstream.settings import Settings  # noqa: E402

KNOWSTREAM = ROOT / ".venv" / "bin" / "knowstream"
PUBLISHED = "published memory version"
PIPELINE = "pipeline: "
TARGETS = ("pipeline", "publish", "after_publish", "random")
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)

console = Console(stderr=True)


# --- the event stream -----------------------------------------------------------------


def _short(text: str, max_chars: int) -> str:
    """The text cut to ``max_chars`` at a sentence end when there is one."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > max_chars // 3 else cut


def load_passages(path: Path, max_chars: int, limit: int = 20_000) -> list[dict]:
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            text = _short(row.get("text") or "", max_chars)
            if row.get("doc_id") and text:
                out.append({"doc_id": row["doc_id"], "title": row.get("title") or "", "text": text})
            if len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no documents with doc_id and text")
    return out


def make_events(passages: list[dict], n: int, seed: int = 0) -> list[dict]:
    """A deterministic stream of ``n`` events: about 55 % new documents, 20 % updates
    of live documents, 12 % deletes, 8 % exact duplicates of an earlier event and
    5 % re-creations of deleted documents. ``published_at`` grows by a second per
    event, so an update is always newer than what it replaces and a duplicate is
    as old as its original."""
    rng = random.Random(seed)
    events: list[dict] = []
    live: dict[str, dict] = {}  # doc id -> its current upsert event
    deleted: list[str] = []
    next_passage = 0

    def upsert(doc_id: str, title: str, text: str, t: datetime, k: int) -> dict:
        return {
            "doc_id": doc_id,
            "op": "upsert",
            "title": title,
            "text": text,
            "source": "chaos",
            "url": f"https://example.org/{doc_id}",
            "published_at": t.isoformat().replace("+00:00", "Z"),
            "metadata": {"event": k},
            "schema_version": 1,
        }

    for k in range(n):
        t = BASE_TIME + timedelta(seconds=k)
        r = rng.random()
        if r < 0.55 or len(live) < 5:
            p = passages[next_passage % len(passages)]
            cycle = next_passage // len(passages)
            next_passage += 1
            doc_id = p["doc_id"] if cycle == 0 else f"{p['doc_id']}__r{cycle}"
            e = upsert(doc_id, p["title"], p["text"], t, k)
            live[doc_id] = e
        elif r < 0.75:
            doc_id = rng.choice(sorted(live))
            old = live[doc_id]
            if rng.random() < 0.5:  # another passage's text: new chunks and triples
                text = passages[rng.randrange(len(passages))]["text"]
            else:
                text = f"{old['text']} It was revised in event {k}."
            if text == old["text"]:
                text += f" Revised {k}."
            e = upsert(doc_id, old["title"], text, t, k)
            live[doc_id] = e
        elif r < 0.87:
            doc_id = rng.choice(sorted(live))
            del live[doc_id]
            deleted.append(doc_id)
            e = {"doc_id": doc_id, "op": "delete", "published_at": t.isoformat()[:19] + "Z"}
        elif r < 0.95 and events:
            e = dict(events[rng.randrange(len(events))])  # exact duplicate, resent
        elif deleted:
            doc_id = deleted.pop(rng.randrange(len(deleted)))
            p = passages[rng.randrange(len(passages))]
            e = upsert(doc_id, p["title"], p["text"], t, k)
            live[doc_id] = e
        else:
            e = dict(events[-1])
        events.append(e)
    return events


def oracle_live(events: list[dict]) -> set[str]:
    """Doc ids that must be live after all events: per doc, the event with the
    latest ``published_at`` (ties: the later one) is an upsert."""
    last: dict[str, tuple[str, int, str]] = {}
    for i, e in enumerate(events):
        key = (e["published_at"], i)
        if e["doc_id"] not in last or key > last[e["doc_id"]][:2]:
            last[e["doc_id"]] = (*key, e["op"])
    return {d for d, (_, _, op) in last.items() if op == "upsert"}


def event_mix(events: list[dict]) -> dict[str, int]:
    seen: set[str] = set()
    docs: set[str] = set()
    mix = {"new": 0, "update": 0, "delete": 0, "duplicate": 0}
    for e in events:
        line = json.dumps(e, sort_keys=True)
        if line in seen:
            mix["duplicate"] += 1
        elif e["op"] == "delete":
            mix["delete"] += 1
        elif e["doc_id"] in docs:
            mix["update"] += 1
        else:
            mix["new"] += 1
        seen.add(line)
        docs.add(e["doc_id"])
    return mix


def write_events(events: list[dict], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return path


# --- the worker subprocess ----------------------------------------------------------


def worker_env(
    settings: Settings, prefect_home: Path, batch: int, prefect_api: str | None = None
) -> dict[str, str]:
    """Environment of a worker subprocess. With ``prefect_api`` (a running Prefect
    server) the worker skips starting an ephemeral API, which saves ~17 s a start."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    env.update(
        {
            "KNOWSTREAM_HOME": str(settings.home),
            "KNOWSTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "KNOWSTREAM_TOPIC": settings.topic,
            "KNOWSTREAM_GROUP_ID": settings.group_id,
            "KNOWSTREAM_MAX_BATCH_MESSAGES": str(batch),
            "KNOWSTREAM_POLL_TIMEOUT_MS": str(settings.poll_timeout_ms),
            "KNOWSTREAM_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
            "KNOWSTREAM_RETRY_BASE_S": "0.5",
            "KNOWSTREAM_RETRY_MAX_S": "4",
            "KNOWSTREAM_RETRY_ATTEMPTS": "20",
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
        }
    )
    return env


class Worker:
    """One ``knowstream ingest`` subprocess in its own process group; its output goes
    to ``log`` and its "pipeline:" / "published" lines to ``events``."""

    running: set[Worker] = set()  # killed by `kill_all` when the harness fails

    def __init__(self, env: dict[str, str], log: Path, once: bool) -> None:
        argv = [str(KNOWSTREAM), "ingest"] + (["--once"] if once else [])
        self.log = log
        self.events: queue.Queue[tuple[str, float, str]] = queue.Queue()
        self.published = 0
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        Worker.running.add(self)

    @classmethod
    def kill_all(cls) -> None:
        for w in list(cls.running):
            w.kill()

    def _read(self) -> None:
        with self.log.open("ab") as f:
            for raw in self.proc.stdout:
                f.write(raw)
                f.flush()
                line = raw.decode("utf-8", "replace")
                if PUBLISHED in line:
                    self.published += 1
                    self.events.put(("published", time.monotonic(), line))
                elif PIPELINE in line:
                    self.events.put(("pipeline", time.monotonic(), line))

    def wait_for(self, kind: str, timeout: float) -> bool:
        """Until the next ``kind`` line (True) or exit/timeout (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got, _, _ = self.events.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    return False
                continue
            if got == kind:
                return True
        return False

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._reader.join(timeout=5)
        Worker.running.discard(self)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        Worker.running.discard(self)
        return rc


# --- reading a memory back ----------------------------------------------------------


def snapshot(settings: Settings) -> dict:
    """Content of the live version: digest, per-doc table, tombstones, registry counts.

    Opens Qdrant local mode: call only while no worker runs on ``settings.home``.
    """
    from knowstream.connectors.qdrant import close_clients, visible
    from knowstream.memory import Memory

    memory = Memory(settings)
    try:
        live = memory.registry.live()
        versions = memory.registry.versions()
        states: dict[str, int] = {}
        for v in versions:
            states[v.state] = states.get(v.state, 0) + 1
        if live is None:
            return {"live": None, "digest": None, "docs": {}, "tombstones": {}, "states": states}
        view = memory.view(live)
        docs: dict[str, dict] = {}
        chunks: dict[str, list] = {}
        tombstones: dict[str, str] = {}
        for p in memory.store.scroll(visible(view.lineage)):
            pl = p.payload
            if pl["kind"] == "doc":
                docs[pl["doc_id"]] = {
                    "content_hash": pl["content_hash"],
                    "published_at": pl["published_at"],
                    "modulation": pl["modulation"]["checksum"],
                    "triples": sorted(json.dumps(t, sort_keys=True) for t in pl["triples"]),
                }
            elif pl["kind"] == "chunk":
                chunks.setdefault(pl["doc_id"], []).append((pl["index"], pl["text"]))
            elif pl["kind"] == "tombstone":
                tombstones[pl["doc_id"]] = pl["published_at"]
        for doc_id, d in docs.items():
            d["chunks"] = [t for _, t in sorted(chunks.pop(doc_id, []))]
        return {
            "live": live,
            "digest": view.digest(),
            "docs": docs,
            "tombstones": tombstones,
            "orphan_chunks": sorted(chunks),  # chunks of docs that have no doc point
            "states": states,
        }
    finally:
        close_clients()


def compare(ref: dict, got: dict) -> list[str]:
    """Every difference between two snapshots, as readable lines (empty: equal)."""
    out = []
    if ref["digest"] != got["digest"]:
        out.append(f"digest {ref['digest']} != {got['digest']}")
    rd, gd = ref["docs"], got["docs"]
    for d in sorted(rd.keys() - gd.keys()):
        out.append(f"doc {d}: missing")
    for d in sorted(gd.keys() - rd.keys()):
        out.append(f"doc {d}: extra")
    for d in sorted(rd.keys() & gd.keys()):
        for k in ("content_hash", "published_at", "modulation", "triples", "chunks"):
            if rd[d][k] != gd[d][k]:
                out.append(f"doc {d}: {k} differs")
    if ref["tombstones"] != got["tombstones"]:
        out.append(
            "tombstones differ: "
            f"{sorted(set(ref['tombstones'].items()) ^ set(got['tombstones'].items()))[:10]}"
        )
    if got.get("orphan_chunks"):
        out.append(f"orphan chunks for {got['orphan_chunks'][:10]}")
    return out


def content_hash(snap: dict) -> str:
    """A hash of the per-doc table (what `compare` checks besides the digest)."""
    body = json.dumps({"docs": snap["docs"], "tombstones": snap["tombstones"]}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


# --- classifying a kill -------------------------------------------------------------


def classify(settings: Settings) -> str:
    """What the killed worker left behind: "publish" (a pending version),
    "after_publish" (a published version whose offsets are not committed) or
    "other" (pipeline, polling, commit done, start-up)."""
    from knowstream.connectors.kafka import committed_offsets
    from knowstream.connectors.mlflow import Registry

    if not (settings.home / "mlflow.db").exists():
        return "other"
    versions = Registry(settings).versions()
    if any(v.state == "pending" for v in versions):
        return "publish"
    published = [v for v in versions if v.state == "published"]
    if not published:
        return "other"
    committed = committed_offsets(settings, settings.group_id)
    for o in json.loads(published[-1].tags.get("offsets", "[]")):
        if committed.get(o["partition"], 0) < o["end"]:
            return "after_publish"
    return "other"


# --- the two runs -------------------------------------------------------------------


@dataclass
class ChaosStats:
    kills: int = 0
    kills_by_target: dict[str, int] = field(default_factory=dict)
    kills_by_phase: dict[str, int] = field(default_factory=dict)
    worker_starts: int = 0
    broker_restarts: int = 0
    publishes_seen: int = 0
    kill_log: list[dict] = field(default_factory=list)


def produce(settings: Settings, path: Path) -> int:
    from knowstream.connectors.kafka import produce_file

    return produce_file(settings, path)


def run_reference(settings: Settings, env: dict[str, str], logs: Path) -> dict:
    t0 = time.monotonic()
    w = Worker(env, logs / "reference.log", once=True)
    rc = w.wait(timeout=24 * 3600)
    if rc != 0:
        raise RuntimeError(f"reference ingest failed (rc {rc}); see {w.log}")
    lines = [line for line in w.log.read_text(errors="replace").splitlines() if PIPELINE in line]
    return {"seconds": round(time.monotonic() - t0, 1), "batches": len(lines)}


def run_chaos(
    settings: Settings,
    env: dict[str, str],
    logs: Path,
    *,
    kills: int,
    broker_restarts: int,
    seed: int,
    batch_s: float,
    publish_s: float,
    broker: Settings | None = None,
    on_kill=None,
) -> ChaosStats:
    """Kill the continuous worker ``kills`` times, restart the broker
    ``broker_restarts`` times in between, then drain with ``ingest --once``."""
    from knowstream.infra.services import start_broker, stop_broker

    rng = random.Random(seed + 1)
    stats = ChaosStats()
    # Broker restarts happen after these kills (spread over the run).
    restart_after = {round((i + 1) * kills / (broker_restarts + 1)) for i in range(broker_restarts)}
    for i in range(kills):
        target = TARGETS[i % len(TARGETS)]
        w = Worker(env, logs / f"chaos-{i:03d}.log", once=False)
        stats.worker_starts += 1
        limit = 150 + 4 * batch_s
        if target == "pipeline":
            # Into the next batch after a publish: polling and pipeline work.
            w.wait_for("published", limit)
            time.sleep(rng.uniform(0.1, 0.7) * batch_s)
        elif target == "publish":
            w.wait_for("pipeline", limit)
            time.sleep(rng.uniform(0.0, 1.0) * publish_s)
        elif target == "after_publish":
            w.wait_for("published", limit)
        else:
            time.sleep(rng.uniform(2.0, 10.0 + batch_s))
        exited = w.proc.poll()
        w.kill()
        stats.publishes_seen += w.published
        phase = classify(settings) if exited is None else "exited"
        stats.kills += 1
        stats.kills_by_target[target] = stats.kills_by_target.get(target, 0) + 1
        stats.kills_by_phase[phase] = stats.kills_by_phase.get(phase, 0) + 1
        entry = {"kill": i + 1, "target": target, "phase": phase, "published": w.published}
        if (i + 1) in restart_after:
            # Restart the broker under a running worker (it retries with backoff).
            w2 = Worker(env, logs / f"chaos-{i:03d}-broker.log", once=False)
            stats.worker_starts += 1
            w2.wait_for("published", limit)
            stop_broker(broker)  # its run files live under the broker's own home
            time.sleep(rng.uniform(1.0, 5.0))
            restart_broker(broker, start_broker)
            stats.broker_restarts += 1
            w2.wait_for("published", limit)  # it recovered and made progress
            w2.kill()
            stats.publishes_seen += w2.published
            entry["broker_restart"] = True
            entry["published_after_broker_restart"] = w2.published
            phase2 = classify(settings)
            stats.kills += 1
            stats.kills_by_target["after_broker_restart"] = (
                stats.kills_by_target.get("after_broker_restart", 0) + 1
            )
            stats.kills_by_phase[phase2] = stats.kills_by_phase.get(phase2, 0) + 1
        stats.kill_log.append(entry)
        if on_kill:
            on_kill(stats)
    w = Worker(env, logs / "chaos-final.log", once=True)
    stats.worker_starts += 1
    rc = w.wait(timeout=24 * 3600)
    stats.publishes_seen += w.published
    if rc != 0:
        raise RuntimeError(f"final ingest --once failed (rc {rc}); see {w.log}")
    return stats


def restart_broker(settings: Settings, start, within_s: float = 120.0) -> None:
    """Start the broker again on its port. ``start_broker`` refuses a port that
    cannot be bound without SO_REUSEADDR, which is the case for up to a minute
    after a stop while the old connections sit in TIME_WAIT: retry until then."""
    from knowstream.infra.services import ServiceError

    deadline = time.monotonic() + within_s
    while True:
        try:
            start(settings)
            return
        except ServiceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def batch_timing(log: Path) -> tuple[float, float]:
    """Mean seconds per batch and from "pipeline:" to "published", from a reference
    log whose lines carry Prefect's HH:MM:SS.mmm timestamps."""
    import re

    stamp = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)")

    def secs(line: str) -> float | None:
        m = stamp.search(line)
        if not m:
            return None
        h, mi, s, ms = map(int, m.groups())
        return h * 3600 + mi * 60 + s + ms / 1000

    pipe, pub = [], []
    for line in log.read_text(errors="replace").splitlines():
        t = secs(line)
        if t is None:
            continue
        if PIPELINE in line:
            pipe.append(t)
        elif PUBLISHED in line:
            pub.append(t)
    batch = (pipe[-1] - pipe[0]) / (len(pipe) - 1) if len(pipe) > 1 else 10.0
    pubs = [b - a for a, b in zip(pipe, pub, strict=False) if 0 <= b - a < 600]
    publish = sum(pubs) / len(pubs) if pubs else 2.0
    return max(batch, 1.0), max(publish, 0.3)


def chaos_test(
    *,
    base: Settings,
    data: Path,
    events: int,
    kills: int,
    broker_restarts: int,
    batch: int,
    max_chars: int,
    seed: int,
    work: Path,
    prefect_home: Path,
    prefect_api: str | None = None,
    progress=None,
) -> dict:
    """Both runs and the comparison; returns the result record. ``base`` points at a
    running broker (its home holds the broker's run files)."""
    started = datetime.now(UTC)
    t0 = time.monotonic()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stream = make_events(load_passages(data, max_chars), events, seed)
    path = write_events(stream, work / "events.jsonl")

    def side(name: str) -> Settings:
        return base.model_copy(
            update={
                "home": work / f"home-{name}",
                "topic": f"chaos-{name}-{seed}-{os.getpid()}",
                "group_id": f"chaos-{name}-{seed}-{os.getpid()}",
            }
        )

    ref_s, chaos_s = side("reference"), side("chaos")
    say = progress or (lambda msg: None)
    say(f"reference: producing {len(stream)} events")
    produce(ref_s, path)
    say("reference: ingest --once")
    ref_run = run_reference(ref_s, worker_env(ref_s, prefect_home, batch, prefect_api), logs)
    ref = snapshot(ref_s)
    batch_s, publish_s = batch_timing(logs / "reference.log")
    say(f"chaos: producing {len(stream)} events; {kills} kills, {broker_restarts} broker restarts")
    produce(chaos_s, path)
    t1 = time.monotonic()
    stats = run_chaos(
        chaos_s,
        worker_env(chaos_s, prefect_home, batch, prefect_api),
        logs,
        kills=kills,
        broker_restarts=broker_restarts,
        seed=seed,
        broker=base,
        batch_s=batch_s,
        publish_s=publish_s,
        on_kill=lambda s: say(f"chaos: {s.kills} kills, {s.broker_restarts} broker restarts"),
    )
    chaos_seconds = round(time.monotonic() - t1, 1)
    got = snapshot(chaos_s)
    purged = sum(
        (logs / f).read_text(errors="replace").count("purged versions left pending")
        for f in os.listdir(logs)
        if f.startswith("chaos")
    )
    mismatches = compare(ref, got)
    must_live = oracle_live(stream)
    oracle = {
        name: {
            "missing": sorted(must_live - snap["docs"].keys()),
            "extra": sorted(snap["docs"].keys() - must_live),
        }
        for name, snap in (("reference", ref), ("chaos", got))
    }
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "params": {
            "events": events,
            "batch": batch,
            "max_chars": max_chars,
            "seed": seed,
            "storage": base.broker_storage,
            "data": str(data),
        },
        "event_mix": event_mix(stream),
        "reference": {
            **ref_run,
            "live": ref["live"],
            "digest": ref["digest"],
            "docs": len(ref["docs"]),
            "tombstones": len(ref["tombstones"]),
            "versions": ref["states"],
            "table_sha256": content_hash(ref),
            "batch_s": round(batch_s, 2),
            "publish_s": round(publish_s, 2),
        },
        "chaos": {
            "seconds": chaos_seconds,
            "live": got["live"],
            "digest": got["digest"],
            "docs": len(got["docs"]),
            "tombstones": len(got["tombstones"]),
            "versions": got["states"],
            "table_sha256": content_hash(got),
            "kills": stats.kills,
            "kills_by_target": stats.kills_by_target,
            "kills_by_phase": stats.kills_by_phase,
            "worker_starts": stats.worker_starts,
            "broker_restarts": stats.broker_restarts,
            "publishes_seen": stats.publishes_seen,
            "abandoned_versions": got["states"].get("abandoned", 0),
            "recover_purges_logged": purged,
            "kill_log": stats.kill_log,
        },
        "mismatches": mismatches,
        "oracle": oracle,
        "note": "version numbers and point ids differ between the runs by design (point "
        "ids include the writing version; killed publishes use up version numbers): "
        "content is compared",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "sample" / "stream.jsonl")
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--broker-restarts", type=int, default=3)
    ap.add_argument("--storage", choices=("s3", "memory"), default="s3")
    ap.add_argument("--batch", type=int, default=100, help="KNOWSTREAM_MAX_BATCH_MESSAGES")
    ap.add_argument("--max-chars", type=int, default=300, help="text cut per document")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    args = ap.parse_args(argv)
    if args.broker_restarts and args.storage != "s3":
        ap.error("broker restarts need durable storage: --storage s3")

    from knowstream.infra.services import (
        start_broker,
        start_prefect_server,
        stop_broker,
        stop_prefect_server,
    )
    from tests.fixtures_broker import free_port, local_settings

    work = args.work or Path(tempfile.mkdtemp(prefix="knowstream-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    prefect_home = work / "prefect"
    storage = "s3://tansu/" if args.storage == "s3" else "memory://tansu/"
    if args.storage == "s3":
        os.environ.setdefault("KNOWSTREAM_S3_PORT", str(free_port()))
    base = local_settings(work / "broker", broker_storage=storage)
    start_broker(base)
    # One Prefect server for every worker start (an ephemeral API costs ~17 s each).
    os.environ["PREFECT_HOME"] = str(prefect_home)
    prefect_api = start_prefect_server(base, port=free_port())
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task("chaos", total=None)
            result = chaos_test(
                base=base,
                data=args.data,
                events=args.events,
                kills=args.kills,
                broker_restarts=args.broker_restarts,
                batch=args.batch,
                max_chars=args.max_chars,
                seed=args.seed,
                work=work,
                prefect_home=prefect_home,
                prefect_api=prefect_api,
                progress=lambda msg: bar.update(task, description=msg),
            )
    finally:
        Worker.kill_all()
        stop_prefect_server(base)
        stop_broker(base)
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title="kill test: chaos run vs uninterrupted reference")
    table.add_column("figure")
    table.add_column("value", justify="right")
    c, r = result["chaos"], result["reference"]
    rows = [
        ("events", f"{args.events} ({result['event_mix']})"),
        ("batch cap", str(args.batch)),
        ("broker storage", storage),
        ("reference: seconds / batches", f"{r['seconds']} / {r['batches']}"),
        ("chaos: seconds", str(c["seconds"])),
        ("kills (SIGKILL)", str(c["kills"])),
        ("kills by target", json.dumps(c["kills_by_target"])),
        ("kills by phase found", json.dumps(c["kills_by_phase"])),
        ("worker starts", str(c["worker_starts"])),
        ("broker restarts", str(c["broker_restarts"])),
        ("abandoned (purged) versions", str(c["abandoned_versions"])),
        ("live docs ref / chaos", f"{r['docs']} / {c['docs']}"),
        ("live version ref / chaos", f"{r['live']} / {c['live']}"),
        ("digest equal", str(r["digest"] == c["digest"])),
        ("mismatches", str(len(result["mismatches"]))),
        (
            "oracle (missing/extra) ref",
            f"{len(result['oracle']['reference']['missing'])}/"
            f"{len(result['oracle']['reference']['extra'])}",
        ),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    for line in result["mismatches"][:20]:
        console.print(f"[red]mismatch[/red] {line}")
    console.print(f"result: {args.out}")
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
