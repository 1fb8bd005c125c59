"""Event-to-answerable under `knowstream serve --ingest`: how long after a document is
produced does `/ask` return it as evidence?

    .venv/bin/python bench/freshness.py --rate 1 --seconds 120 \
        --out bench/results/freshness-1ps-120s.json

How, on the real parts (a tansu broker, `serve --ingest` as a separate process with
qdrant-edge, MLflow on SQLite and Prefect's local API, MiniLM, spaCy, the MAC amortizer):

1. Start a broker and `knowstream serve --ingest` on a fresh home; wait until the first
   (warm-up) document is answerable, so model loading and Prefect's first start are not
   counted.
2. Produce ``--rate`` documents per second for ``--seconds``, each a short text with a
   unique made-up fact; the clock of a document starts just before its send.
3. One poller asks `/ask` (evidence mode, k=3) with each pending document's own text, oldest
   first, and stops a document's clock when its doc id is among the evidence. It asks
   whenever `/healthz` shows a new live version, and at least once a second
   (``--poller every``: every 50 ms, whatever changed, as the first runs did).
4. p50, p95 and max over the documents, a line on the terminal and JSON in ``--out``.
5. `knowstream rollback` and `promote` as a user runs them, 3 times each: through the
   running server, then with the server stopped (straight to the registry).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # as in bench/publish.py: the root after an installed knowstream
    sys.path.append(str(ROOT))
from bench._common import free_port, percentile, run_header, write_result  # noqa: E402

PACKAGES = ("qdrant-edge-py", "mlflow", "prefect", "apache-beam", "torch")
SYLLABLES = "ka lo mi ren zu tar vel osh pri dun e ami gor thal ix ule bra sen".split()


def word(rng: random.Random, n: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def document(rng: random.Random, i: int) -> dict:
    """A short document whose text states one made-up fact, unique to it."""
    text = (
        f"{word(rng)} {word(rng, 2)} founded the city of {word(rng, 4)} in the year "
        f"{rng.randint(1000, 1999)}, and its river is called the {word(rng)}."
    )
    return {
        "doc_id": f"fresh-{i:05d}",
        "op": "upsert",
        "title": f"Fact {i}",
        "text": text,
        "published_at": datetime.now(UTC).isoformat(),
    }


def move_live(env: dict, live: int, times: int = 3) -> dict[str, list[float]]:
    """Wall seconds of `knowstream rollback` and `promote` as a user runs them (a new
    process each), back and forth between ``live`` and the version before it."""
    out: dict[str, list[float]] = {"rollback": [], "promote": []}
    for _ in range(times):
        for command in ("rollback", "promote"):
            target = str(live - 1) if command == "rollback" else str(live)
            t0 = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "knowstream.cli", command, target],
                env=env,
                check=True,
                capture_output=True,
            )
            out[command].append(time.monotonic() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=1.0, help="documents per second")
    ap.add_argument("--seconds", type=float, default=120.0, help="how long to produce")
    ap.add_argument("--poll-timeout-ms", type=int, help="KNOWSTREAM_POLL_TIMEOUT_MS for serve")
    ap.add_argument("--out", type=Path, default=Path("bench/results/freshness.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--poller",
        choices=("live", "every"),
        default="live",
        help="live: /ask the pending documents when /healthz shows a new live version (and "
        "once a second); every: /ask each pending document every 50 ms (the first runs: its "
        "embedding calls took CPU from the ingest on 2 cores)",
    )
    ap.add_argument("--keep-home", action="store_true", help="keep the temporary home (logs)")
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="knowstream-fresh-"))
    from knowstream.connectors.kafka import EventProducer, ensure_topics
    from knowstream.infra.services import start_broker, stop_broker
    from knowstream.settings import Settings

    settings = Settings(
        home=home / "home",
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        broker_storage="memory://tansu/",
        qdrant_url=None,
        mlflow_uri=None,
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "KNOWSTREAM_HOME": str(settings.home),
        "KNOWSTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "PREFECT_HOME": str(home / "prefect"),
    }
    for k in ("KNOWSTREAM_QDRANT_URL", "KNOWSTREAM_MLFLOW_URI", "PREFECT_API_URL"):
        env.pop(k, None)
    if args.poll_timeout_ms:
        env["KNOWSTREAM_POLL_TIMEOUT_MS"] = str(args.poll_timeout_ms)
    started, load_before = datetime.now(UTC), os.getloadavg()
    start_broker(settings)
    ensure_topics(settings, [settings.topic, settings.dlq_topic], settings.partitions)
    log = (home / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "knowstream.cli", "serve", "--ingest", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rng = random.Random(args.seed)
    sent: dict[str, tuple[float, str]] = {}  # doc id -> (send time, its text)
    answered: dict[str, float] = {}  # doc id -> seconds from send to answerable
    lock, done = threading.Lock(), threading.Event()

    def answerable(doc_id: str, text: str) -> bool:
        r = httpx.post(f"{url}/ask", json={"question": text, "k": 3}, timeout=30)
        return r.status_code == 200 and doc_id in {e["doc_id"] for e in r.json()["evidence"]}

    def live_now() -> int | None:
        try:
            return httpx.get(f"{url}/healthz", timeout=10).json()["live"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def poller() -> None:
        seen, asked_at = None, 0.0
        while not done.is_set():
            if args.poller == "live":
                # A document can only become answerable when serving's live version
                # changes: watch /healthz (no model call), ask when it moved, and at
                # least once a second in case a change was missed.
                live = live_now()
                if live == seen and time.monotonic() - asked_at < 1.0:
                    time.sleep(0.05)
                    continue
                seen, asked_at = live, time.monotonic()
            with lock:
                pending = [(d, t, x) for d, (t, x) in sent.items() if d not in answered]
            for doc_id, t0, text in sorted(pending, key=lambda p: p[1]):
                try:
                    if answerable(doc_id, text):
                        with lock:
                            answered[doc_id] = time.monotonic() - t0
                except httpx.HTTPError:
                    pass  # not up yet
            time.sleep(0.05)

    def send(producer, doc: dict) -> None:
        with lock:
            sent[doc["doc_id"]] = (time.monotonic(), doc["text"])
        producer.send(settings.topic, doc["doc_id"].encode(), json.dumps(doc).encode())
        producer.flush()

    thread = threading.Thread(target=poller, daemon=True)
    try:
        with EventProducer(settings) as producer:
            thread.start()
            warm = document(rng, 0)
            send(producer, warm)
            deadline = time.monotonic() + 600
            while warm["doc_id"] not in answered:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not answer the warm-up; see {home}/serve.log")
                time.sleep(0.2)
            n = int(args.rate * args.seconds)
            first = time.monotonic()
            for i in range(1, n + 1):
                time.sleep(max(0.0, first + (i - 1) / args.rate - time.monotonic()))
                send(producer, document(rng, i))
        deadline = time.monotonic() + 120
        while len(answered) < n + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        done.set()
        live = httpx.get(f"{url}/healthz", timeout=10).json()["live"]
        moves = {"through serve": move_live(env, live)}
    finally:
        done.set()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    try:
        moves["direct (no server)"] = move_live(env, live)
    finally:
        stop_broker(settings)
    latencies = [answered[d] for d in sorted(answered) if d != warm["doc_id"]]
    missing = n - len(latencies)
    result = {
        **run_header("freshness", started, load_before, PACKAGES),
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "poll_timeout_ms": args.poll_timeout_ms or settings.poll_timeout_ms,
        "poller": args.poller,
        "documents": n,
        "never_answerable": missing,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "max_s": max(latencies),
        "latencies_s": latencies,
        "cli_seconds": moves,
    }
    print(
        f"{len(latencies)} of {n} documents answerable: p50 {result['p50_s']:.2f} s, "
        f"p95 {result['p95_s']:.2f} s, max {result['max_s']:.2f} s"
    )
    for where, times in moves.items():
        print(f"{where}: " + ", ".join(f"{c} {max(t):.2f} s max" for c, t in times.items()))
    write_result(args.out, result)
    if args.keep_home:
        print(f"home kept: {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
