"""Amortize-stage throughput (docs/s): the raw batched forward against the stage's code path.

    .venv/bin/python bench/amortize.py --data /work/shared/data/squad_v1.1/dev.jsonl \
        --n 2000 --device cpu --dtype float32 --out bench/results/amortize-cpu.json

On the `device` tool's GPU machine: ``bash bench/pipeline_gpu.sh amortize`` (after its
``stash`` call), which carries what this needs and maps ``knowstream`` onto the
repository's folders.

Over the first ``--n`` distinct documents of ``--data`` (JSONL with doc_id, title, text; a
dev.jsonl with one line per question is deduplicated by doc_id), in batches of ``--batch``
documents (the stage's ``amortize_batch``, 16 by default), each repeat measures:

(a) raw forward: the document reader on inputs prepared beforehand, out of the timer; the
    compute a perfect pipeline would pay and nothing else. Per ``MACConfig.amortizer``:
    - "reader" (MiniLM + ``Amortizer``; entry (T, d_lm)): MiniLM token ids cut into windows,
      sorted by length, padded into id and mask tensors already on the device. Timed: the
      encoder forward per window batch, gathering each document's window states, padding
      them, the Amortizer forward.
    - "lm" (``LMAmortizer``, the frozen SmolLM2 with LoRA; entry ``config.entry_shape``):
      LM token ids cut to ``max_doc_tokens``, sorted by length, in LM passes of
      ``LMAmortizer.docs_per_pass(--window-batch)`` documents (one on the CPU); MiniLM ids of
      the documents padded on the device.
      Timed: ``LMAmortizer.read`` per batch (its padding and the LM pass), the MiniLM key
      (encoder forward, mean pool) and the entries put together.
    Both end with a device sync.
(b) stage path: ``amortize_compute.amortize_batch`` per batch, the function the stage's
    RunInference model (``Amortize.run_inference``) calls: tokenization, the reader's
    ``amortize_texts`` (length-bucketed batches), conversion to float16, one MODULATION row
    (bytes + sha256) per document.
(c) with ``--unsorted``: the stage path with ``sort_by_length=False`` (MiniLM windows or LM
    documents batched in input order).

Reported: docs/s of each, the ratio (b)/(a) (what the stage adds to the raw forward), the
largest difference between the first batch's entries of (a) and (b), the padding share of the
reader's tokens (MiniLM window tokens, or LM document tokens) with and without sorting, and
the bytes of a stored entry: the float16 vector of ``config.entry_shape``, the ``modulation``
object of the Qdrant doc point as ``connectors/qdrant/_target.py`` writes it (base64 data,
shape, dtype, checksum, version; JSON-encoded), and both for 10,000 documents. Models (the LM
of an "lm" reader too) load before timing; one warm-up batch per path runs first (CUDA
context, kernel selection) and is not counted.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the root; append,
    sys.path.append(str(ROOT))  # so that an installed knowstream stays first (bench/_common.py)

from rich.table import Table  # noqa: E402

from bench._common import (  # noqa: E402
    console,
    load_documents,
    run_header,
    timed_call,
    write_result,
)

VERSIONED_PACKAGES = ("torch", "transformers", "safetensors", "pydantic", "pyarrow")
BANK_DOCS = 10_000  # memory-bank size the bytes are reported for


def pyarrow_stand_in() -> bool:
    """Make ``import pyarrow`` succeed where it is not installed; True if a stand-in was needed.

    ``schemas/event.py`` and ``schemas/modulation.py`` build their Parquet schema constants
    (``pa.schema([...])``) at import; ``DocumentEvent``, ``parse_event`` and ``Modulation``,
    which the stage path uses, never touch pyarrow. On a GPU machine without pyarrow the
    stand-in answers those constant definitions with None, so the stage code runs unchanged.
    Nothing that writes or reads Parquet is imported by this benchmark.
    """
    try:
        import pyarrow  # noqa: F401

        return False
    except ImportError:
        pass

    def attribute(name: str) -> Callable[..., None]:
        if name.startswith("__"):  # __file__, __path__, ...: absent, as tools probing expect
            raise AttributeError(name)
        return lambda *args, **kwargs: None  # pa.schema(...), pa.string(), ...

    stand_in = types.ModuleType("pyarrow", "stand-in: bench/amortize.py, pyarrow not installed")
    stand_in.__getattr__ = attribute  # type: ignore[attr-defined]
    sys.modules["pyarrow"] = stand_in
    return True


# --- inputs ------------------------------------------------------------------------------------
def make_events(docs: list[dict[str, Any]]) -> list[Any]:
    """DocumentEvents as the Parse stage makes them (``parse_event`` on the message bytes)."""
    from knowstream.schemas.event import parse_event

    return [
        parse_event(d["doc_id"].encode(), json.dumps(d, ensure_ascii=False).encode()) for d in docs
    ]


def batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def windows_of(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[int]]:
    """Windows of token ids with [CLS]/[SEP] and the text each comes from, as amortize_texts
    cuts them."""
    from knowstream.models.encoder import MAX_TOKENS

    step = MAX_TOKENS - 2
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    windows, owner = [], []
    for i, x in enumerate(ids):
        for start in range(0, max(len(x), 1), step):
            windows.append(
                [tokenizer.cls_token_id, *x[start : start + step], tokenizer.sep_token_id]
            )
            owner.append(i)
    return windows, owner


def lm_ids(tokenizer: Any, texts: list[str], max_doc_tokens: int) -> list[list[int]]:
    """LM token ids of texts as ``LMAmortizer.amortize_texts`` reads them: cut to
    ``max_doc_tokens``, an empty text one EOS."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [x[:max_doc_tokens] or [tokenizer.eos_token_id] for x in ids]


def sequences_of(mac: Any, encoder: Any, texts: list[str]) -> list[list[int]]:
    """What the document reader pads into batches: MiniLM windows ("reader"), or each
    document's LM token ids ("lm")."""
    if mac.config.amortizer == "lm":
        return lm_ids(mac.amortizer.frozen_lm()[1], texts, mac.config.max_doc_tokens)
    return windows_of(encoder.tokenizer, texts)[0]


def padding(sequences: list[list[int]], batch: int, sort: bool) -> tuple[int, int]:
    """(real tokens, padded positions) of these sequences in batches of ``batch``."""
    lengths = [len(w) for w in sequences]
    if sort:
        lengths.sort()
    real = sum(lengths)
    padded = sum(
        max(lengths[i : i + batch]) * len(lengths[i : i + batch])
        for i in range(0, len(lengths), batch)
    )
    return real, padded


# --- the raw forward (a), per reader: prepare_* out of the timer, then forward_* -------------
def prepare_reader(mac: Any, encoder: Any, texts: list[str], window_batch: int) -> dict[str, Any]:
    """One document batch, tokenized, windowed, sorted by length and padded on the device."""
    import torch

    tokenizer, device = encoder.tokenizer, encoder.device
    windows, owner = windows_of(tokenizer, texts)
    order = sorted(range(len(windows)), key=lambda w: len(windows[w]))
    encoder_batches = []
    for start in range(0, len(order), window_batch):
        idx = order[start : start + window_batch]
        length = max(len(windows[w]) for w in idx)
        ids = torch.full((len(idx), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for j, w in enumerate(idx):
            ids[j, : len(windows[w])] = torch.tensor(windows[w])
            mask[j, : len(windows[w])] = 1
        encoder_batches.append((idx, ids.to(device), mask.to(device)))
    text_lengths = [0] * len(texts)
    for w, window in enumerate(windows):
        text_lengths[owner[w]] += len(window)
    return {
        "n_texts": len(texts),
        "n_windows": len(windows),
        "owner": owner,
        "window_lengths": [len(w) for w in windows],
        "text_lengths": torch.tensor(text_lengths, device=device),
        "batches": encoder_batches,
    }


def forward_reader(mac: Any, encoder: Any, prepared: dict[str, Any]) -> Any:
    """Encoder + Amortizer on a prepared batch: (B, T, d_lm) entries."""
    import torch

    states_of: list[Any] = [None] * prepared["n_windows"]
    lengths = prepared["window_lengths"]
    for idx, ids, mask in prepared["batches"]:
        states = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for j, w in enumerate(idx):
            states_of[w] = states[j, : lengths[w]]  # right-padded: a view, no device sync
    per_text: list[list[Any]] = [[] for _ in range(prepared["n_texts"])]
    for w, s in enumerate(states_of):
        per_text[prepared["owner"][w]].append(s)
    docs = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in per_text]
    param = mac.amortizer.queries
    doc_states = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True).to(param.dtype)
    doc_mask = (
        torch.arange(doc_states.shape[1], device=param.device) < prepared["text_lengths"][:, None]
    )
    return mac.amortizer(doc_states, doc_mask)


def prepare_lm(mac: Any, encoder: Any, texts: list[str], window_batch: int) -> dict[str, Any]:
    """One document batch: LM ids sorted by length in LM passes of
    ``LMAmortizer.docs_per_pass(window_batch)`` documents, and the MiniLM inputs of the key
    on the device."""
    from knowstream.models.encoder import MAX_TOKENS

    ids = sequences_of(mac, encoder, texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    key_inputs = encoder.tokenizer(
        texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    ).to(encoder.device)
    per_pass = mac.amortizer.docs_per_pass(window_batch)
    lm_batches = [(idx, [ids[i] for i in idx]) for idx in batches(order, per_pass)]
    return {"batches": lm_batches, "key_inputs": key_inputs}


def forward_lm(mac: Any, encoder: Any, prepared: dict[str, Any]) -> Any:
    """LM reads + MiniLM key on a prepared batch: (B, *entry_shape) entries."""
    import torch

    c, key_inputs = mac.config, prepared["key_inputs"]
    rows: list[Any] = [None] * len(key_inputs["input_ids"])
    for idx, ids in prepared["batches"]:
        for i, kv in zip(idx, mac.amortizer.read(ids), strict=True):
            rows[i] = kv
    kv = torch.stack(rows)
    from knowstream.models.encoder import sentence_embedding

    states = encoder.model(**key_inputs).last_hidden_state
    key = sentence_embedding(states, key_inputs["attention_mask"])
    return torch.cat([kv, key.view(len(rows), c.key_rows, c.kv_width).to(kv)], 1)


RAW = {"reader": (prepare_reader, forward_reader), "lm": (prepare_lm, forward_lm)}


def prepare_raw(mac: Any, encoder: Any, texts: list[str], window_batch: int) -> dict[str, Any]:
    """The raw forward's inputs of one document batch, for ``mac``'s reader (not timed)."""
    return RAW[mac.config.amortizer][0](mac, encoder, texts, window_batch)


def raw_forward(mac: Any, encoder: Any, prepared: dict[str, Any]) -> Any:
    """``mac``'s reader on ``prepare_raw``'s inputs: (B, *entry_shape) entries, on the device."""
    return RAW[mac.config.amortizer][1](mac, encoder, prepared)


# --- measurement -------------------------------------------------------------------------------
def timed_pass(fn: Callable[[Any], Any], items: list[Any], sync: Callable[[], None]) -> dict:
    """``fn`` over every item, synced at the end: wall and process CPU seconds."""
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = [fn(item) for item in items]
    sync()
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,
        "outputs": outputs,
    }


def entry_bytes(row: dict[str, Any]) -> dict[str, int]:
    """Bytes of one stored entry: the float16 vector, and the ``modulation`` object of the
    Qdrant doc point exactly as ``connectors/qdrant/_target.py`` builds it, JSON-encoded."""
    payload = {
        "amortizer_version": row["amortizer_version"],
        "shape": list(row["shape"]),
        "dtype": row["dtype"],
        "data": base64.b64encode(row["data"]).decode("ascii"),
        "checksum": row["checksum"],
    }
    return {
        "vector_float16": len(row["data"]),
        "qdrant_modulation_payload_json": len(json.dumps({"modulation": payload}).encode()),
        "base64_data": len(payload["data"]),
    }


# --- report ------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> None:
    n = result["docs"]
    table = Table(
        title=f"amortize: {n} docs, batch {result['batch']}, {result['device']} "
        f"{result['dtype']}, {result['repeats']} repeat(s), median",
        title_justify="left",
    )
    for col in ("path", "wall s", "docs/s", "ms/doc", "CPU s", "vs raw"):
        table.add_column(col, justify="left" if col == "path" else "right")
    raw = result["paths"]["raw_forward"]["median_wall_s"]
    for name, p in result["paths"].items():
        w = p["median_wall_s"]
        table.add_row(
            name,
            f"{w:.2f}",
            f"{n / w:.1f}",
            f"{1000 * w / n:.2f}",
            f"{p['median_cpu_s']:.2f}",
            f"{w / raw:.2f}x",
        )
    console.print(table)
    pad = result["reader_tokens"]
    console.print(
        f"{pad['unit']}: {pad['real']} real; padded positions {pad['padded_sorted']} sorted "
        f"({pad['padding_share_sorted']:.1%} padding), {pad['padded_unsorted']} unsorted "
        f"({pad['padding_share_unsorted']:.1%} padding)"
    )
    b = result["bytes"]
    console.print(
        f"per entry {tuple(b['entry_shape'])}: {b['per_entry']['vector_float16']:,} B float16, "
        f"{b['per_entry']['qdrant_modulation_payload_json']:,} B as the Qdrant payload's "
        f"modulation (JSON, base64); {BANK_DOCS:,} docs: "
        f"{b['bank_10k']['vector_float16'] / 1e6:.1f} MB vectors, "
        f"{b['bank_10k']['qdrant_modulation_payload_json'] / 1e6:.1f} MB payload"
    )


# --- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--data", type=Path, required=True, help="JSONL (or .jsonl.gz) with doc_id, text"
    )
    ap.add_argument("--n", type=int, default=2000, help="distinct documents")
    ap.add_argument("--device", help="cpu, cuda, ... (default: settings amortize_device)")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: settings amortize_dtype)",
    )
    ap.add_argument("--batch", type=int, help="docs per batch (default: settings amortize_batch)")
    ap.add_argument(
        "--window-batch",
        type=int,
        help='windows per encoder forward, "lm": documents per LM pass (default: settings)',
    )
    ap.add_argument(
        "--threads", type=int, help="torch CPU threads (default: settings torch_threads)"
    )
    ap.add_argument("--amortizer", help='checkpoint folder or "init" (default: settings amortizer)')
    ap.add_argument("--repeats", type=int, default=1, help="passes over the documents per path")
    ap.add_argument("--unsorted", action="store_true", help="also time the unsorted stage path")
    ap.add_argument("--out", type=Path, help="JSON results (default: bench/results/amortize.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stand_in = pyarrow_stand_in()

    import numpy as np
    import torch

    from knowstream.models.inference import amortizer_version, load_amortizer
    from knowstream.pipelines.stages.amortize_compute import amortize_batch, load_stage_encoder
    from knowstream.schemas.modulation import Modulation
    from knowstream.settings import Settings

    settings = Settings()
    device = args.device or settings.amortize_device
    dtype = args.dtype or settings.amortize_dtype
    batch = args.batch or settings.amortize_batch
    window_batch = args.window_batch or settings.amortize_window_batch
    spec = args.amortizer or settings.amortizer
    threads = args.threads or settings.torch_threads
    torch.set_num_threads(threads)
    out = args.out or Path(__file__).parent / "results" / "amortize.json"

    docs = load_documents(args.data, args.n)
    if not docs:
        console.print(f"[red]no documents in {args.data}[/red]")
        return 2
    if len(docs) < args.n:
        console.print(f"[yellow]{args.data} has {len(docs)} distinct documents, not {args.n}[/]")
    events = make_events(docs)
    event_batches = batches(events, batch)
    n = len(events)

    started = datetime.now(UTC)
    load_before = os.getloadavg()
    loads = {}
    encoder, loads["encoder"] = timed_call(lambda: load_stage_encoder(device, dtype))
    mac, loads["amortizer"] = timed_call(lambda: load_amortizer(spec, device, dtype))
    version, loads["amortizer version (weights hash)"] = timed_call(lambda: amortizer_version(spec))
    config = mac.config
    if config.amortizer == "lm":  # else the first read would load it, in the warm-up
        _, loads["lm"] = timed_call(mac.amortizer.frozen_lm)
    on_cuda = torch.device(device).type == "cuda"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    with console.status("preparing the raw-forward inputs (not timed)..."):
        prepared, prepare_s = timed_call(
            lambda: [
                prepare_raw(mac, encoder, [e.text for e in b], window_batch) for b in event_batches
            ]
        )
    # Padding as the stage sees it: per document batch, sequences sorted or in input order.
    per_batch = [sequences_of(mac, encoder, [e.text for e in b]) for b in event_batches]
    n_sequences = sum(len(s) for s in per_batch)
    group = window_batch
    if mac.config.amortizer == "lm":
        group = mac.amortizer.docs_per_pass(window_batch)
    real = sum(padding(s, group, True)[0] for s in per_batch)
    padded_sorted = sum(padding(s, group, True)[1] for s in per_batch)
    padded_unsorted = sum(padding(s, group, False)[1] for s in per_batch)

    def raw(p: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return raw_forward(mac, encoder, p)

    def stage(b: list[Any]) -> list[dict]:
        return amortize_batch(mac, encoder, b, version, window_batch)

    def stage_unsorted(b: list[Any]) -> list[dict]:
        return amortize_batch(mac, encoder, b, version, window_batch, sort_by_length=False)

    paths: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
        "raw_forward": (raw, prepared),
        "stage_path": (stage, event_batches),
    }
    if args.unsorted:
        paths["stage_path_unsorted"] = (stage_unsorted, event_batches)
    with console.status("warm-up (one batch per path, not timed)..."):
        for fn, items in paths.values():
            fn(items[0])
        sync()
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    check: dict[str, Any] = {}
    for rep in range(args.repeats):
        for name, (fn, items) in paths.items():
            with console.status(f"repeat {rep + 1}/{args.repeats}: {name} over {n} docs..."):
                r = timed_pass(fn, items, sync)
            if rep == 0:
                check[name] = r["outputs"][0]
            runs[name].append({"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]})
            console.print(f"  {name}: {r['wall_s']:.2f} s, {n / r['wall_s']:.1f} docs/s")

    # The two paths compute the same entries: the stage's rows against the raw forward.
    raw_first = check["raw_forward"].float().cpu().numpy()
    stage_first = np.stack([Modulation.from_row(r).to_array() for r in check["stage_path"]])
    max_abs_diff = float(np.abs(raw_first - stage_first.astype(np.float32)).max())
    max_abs_raw = float(np.abs(raw_first).max())
    row = check["stage_path"][0]
    assert tuple(row["shape"]) == config.entry_shape, (row["shape"], config.entry_shape)
    per_entry = entry_bytes(row)

    paths_out = {}
    for name, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        paths_out[name] = {
            "median_wall_s": wall,
            "median_cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "docs_per_s": n / wall,
            "ms_per_doc": 1000 * wall / n,
            "runs": rs,
        }
    raw_s = paths_out["raw_forward"]["median_wall_s"]
    result: dict[str, Any] = {
        **run_header("amortize", started, load_before, VERSIONED_PACKAGES),
        "pyarrow": "stand-in (schema constants only)" if stand_in else "installed",
        "data": str(args.data),
        "docs": n,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "dtype": dtype,
        "batch": batch,
        "window_batch": window_batch,
        "torch_threads": threads,
        "amortizer": spec,
        "amortizer_version": version,
        "reader": config.amortizer,
        "repeats": args.repeats,
        "load_s": loads,
        "prepare_raw_inputs_s": prepare_s,
        "reader_tokens": {
            "unit": "LM document tokens" if config.amortizer == "lm" else "MiniLM window tokens",
            "sequences": n_sequences,  # MiniLM windows, or LM documents
            "sequences_per_doc": n_sequences / n,
            "real": real,
            "padded_sorted": padded_sorted,
            "padded_unsorted": padded_unsorted,
            "padding_share_sorted": 1 - real / padded_sorted,
            "padding_share_unsorted": 1 - real / padded_unsorted,
        },
        "paths": paths_out,
        "stage_over_raw": paths_out["stage_path"]["median_wall_s"] / raw_s,
        "first_batch_max_abs_diff_raw_vs_stage": max_abs_diff,
        "first_batch_max_abs_raw": max_abs_raw,
        "bytes": {
            "entry_shape": list(config.entry_shape),
            "per_entry": per_entry,
            "bank_10k": {k: BANK_DOCS * v for k, v in per_entry.items()},
        },
    }
    if "stage_path_unsorted" in paths_out:
        result["unsorted_over_sorted"] = (
            paths_out["stage_path_unsorted"]["median_wall_s"]
            / paths_out["stage_path"]["median_wall_s"]
        )
    render(result)
    console.print(
        f"stage path / raw forward = {result['stage_over_raw']:.2f}x; "
        f"first batch max |raw - stage| = {max_abs_diff:.2e} of max |raw| {max_abs_raw:.2e} "
        "(stage stores float16)"
    )
    write_result(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
