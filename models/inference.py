"""Inference with the frozen LM and the MAC networks, shared by serving, evaluation,
training and the amortize stage: prompts, the MAC prefix cache, greedy decoding,
loading the models and the amortizer (and its weights hash).

One copy of each, so served answers are produced exactly the way the measured
ones are (``models/evaluate.py``) and trained ones were (``models/train.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from knowstream.models.build_lock import BUILD_LOCK
from knowstream.models.encoder import TextEncoder
from knowstream.models.lm import gguf_path, load_lm, with_cache
from knowstream.models.mac import MAC, MACConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ----------------------------------------------------------------------------- prompts


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Token ids of each question in the LM's chat template, up to the assistant turn."""
    texts = tokenizer.apply_chat_template(
        [[{"role": "user", "content": q}] for q in questions],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def passage_prompt(passage: str, question: str) -> str:
    """The user turn of a question with evidence text (gold passage or retrieved chunks)."""
    return (
        "Answer the question with a short span copied from the passage.\n\n"
        f"Passage: {passage}\n\nQuestion: {question}"
    )


def prefix_cache(mac: MAC, summary: Tensor, dtype: torch.dtype) -> DynamicCache:
    """The LM cache of MAC's prefix (task prompt + memory): P = ``mac.config.prefix_len``."""
    pairs = mac.expansion.key_values(summary)
    return DynamicCache([(k.to(dtype), v.to(dtype)) for k, v in pairs])


def memory_mask(mac: MAC, bank_mask: Tensor | None) -> Tensor | None:
    """The real tokens (B, cache length) of ``prefix_cache``'s cache for a bank with
    ``bank_mask`` (B, N): None (all real) unless "concat" entries include padding."""
    c = mac.config
    if c.bank_mode != "concat" or bank_mask is None:
        return None
    task = bank_mask.new_ones(bank_mask.shape[0], c.task_len)
    return torch.cat([task, bank_mask.repeat_interleave(c.mem_len, 1)], 1)


def task_cache(mac: MAC | None, B: int, dtype: torch.dtype) -> tuple[DynamicCache | None, int]:
    """The shared task prompt alone as an LM cache, and its length (None, 0 without one)."""
    if mac is None or not mac.config.task_len:
        return None, 0
    pairs = mac.expansion.task_key_values(B)
    return DynamicCache([(k.to(dtype), v.to(dtype)) for k, v in pairs]), mac.config.task_len


# ----------------------------------------------------------------------------- decoding


@torch.no_grad()
def generate(
    lm,
    tokenizer,
    prompts: list[list[int]],
    cache=None,
    P: int = 0,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    prefix_mask: Tensor | None = None,
) -> list[str]:
    """Greedy continuations of left-padded prompts after an optional prefix cache, the
    prompt at positions P, P+1, ... as in training; with ``temperature`` > 0, sampled at
    that temperature instead. The cache may hold more than P tokens (concatenated
    entries); ``prefix_mask`` (B, cache length) marks its real ones (default: all)."""
    dev = lm.device
    B, L = len(prompts), max(len(p) for p in prompts)
    C = cache.get_seq_length() if cache is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((B, L), pad, dtype=torch.long)
    mask = torch.zeros(B, C + L, dtype=torch.long)
    mask[:, :C] = 1 if prefix_mask is None else prefix_mask.long().cpu()
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, C + L - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (P + mask[:, C:].cumsum(1) - 1).clamp(min=0)
    if cache is None:
        cache = DynamicCache()
    # Any special token ends an answer, not only the EOS (<|im_end|>): the model sometimes
    # skips it and opens the next chat turn (<|im_start|>assistant ...), whose text
    # skip_special_tokens would otherwise glue onto the answer.
    stops = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=dev)
    out = []
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        logits = lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            logits_to_keep=1,  # not (B, L, vocab) for the whole prompt
            **with_cache(lm, cache),
        ).logits[:, -1]
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.eos_token_id), nxt)
        out.append(nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], 1)
    toks = torch.stack(out, 1).tolist()
    texts = []
    stop_set = set(stops.tolist())
    for t in toks:
        t = t[: next((i for i, x in enumerate(t) if x in stop_set), len(t))]
        texts.append(tokenizer.decode(t, skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def answer(
    mac: MAC,
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoder: TextEncoder,
    question: str,
    bank: Tensor,
    max_new_tokens: int = 24,
) -> str:
    """Greedy answer of the frozen LM to ``question``, modulated by the bank.

    ``bank`` holds the retrieved entries for this question, (N, *entry_shape); N may
    be 0. The question goes to the LM through its chat template, after the
    prefix, exactly as in training (``models/train.py``) and evaluation.
    """
    param = next(mac.parameters())  # MAC's device and dtype
    q_states, q_mask = encoder.encode([question])
    q_states, q_mask = q_states.to(param.device, param.dtype), q_mask.to(param.device)
    summary = mac.aggregator(q_states, q_mask, bank.to(param.device, param.dtype)[None])
    cache = prefix_cache(mac, summary.to(lm.device), lm.dtype)
    prompts = chat_prompts(tokenizer, [question])
    return generate(lm, tokenizer, prompts, cache, mac.config.prefix_len, max_new_tokens)[0]


# ----------------------------------------------------------------------------- loading


def load_models(dev: str, lm_cache_dir: str = "", amp_dtype: str = "bfloat16", encoder=True):
    """Frozen LM (bf16 on CUDA, fp32 on CPU), its tokenizer, and the frozen encoder
    (None with ``encoder=False``)."""
    dtype = getattr(torch, amp_dtype) if torch.device(dev).type == "cuda" else torch.float32
    try:
        lm, tokenizer = load_lm(
            Path(lm_cache_dir) if lm_cache_dir else None, dtype=dtype, device=dev
        )
    except AttributeError:  # another transformers version than the cache writer knows
        g = gguf_path()
        with BUILD_LOCK:
            lm = AutoModelForCausalLM.from_pretrained(
                g.parent, gguf_file=g.name, dtype=dtype, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(
                g.parent, gguf_file=g.name, local_files_only=True
            )
        lm = lm.to(dev).eval().requires_grad_(False)  # type: ignore[arg-type]  # wrapped .to()
    if not encoder:
        return lm, tokenizer, None
    enc = TextEncoder(dev)
    enc.model.float()  # a carried fp16 copy of MiniLM runs in fp32 like the original
    return lm, tokenizer, enc


def bundled_checkpoint() -> Path:
    """The folder of the checkpoint that ships inside the ``knowstream.models`` package
    (models/checkpoints/mac-lm-squad: the LM reads documents, trained on SQuAD v1.1 train and
    the dev split's train articles, EVAL.md), so a fresh machine amortizes with trained
    weights and no training step."""
    import knowstream.models

    return Path(knowstream.models.__path__[0]) / "checkpoints" / "mac-lm-squad"


def is_registry_spec(spec: str) -> bool:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or "registry": an MLflow registry
    version, which the batch resolves to a local folder before the pipeline runs."""
    return spec == "registry" or spec.startswith("models:/")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {name!r}") from None


def load_amortizer(spec: str, device: str = "cpu", dtype: str = "float32") -> MAC:
    """The MAC networks named by ``spec`` on ``device`` in ``dtype``, loaded once per process
    (``load_amortizer(spec)`` and ``load_amortizer(spec, "cpu", "float32")`` are one load).

    ``spec`` is a checkpoint folder, "bundled" for the checkpoint that ships with
    knowstream, or "init" for the seeded untrained network. A registry spec
    (``models:/...``, "registry") is resolved to a folder first, once per batch, by
    ``connectors.mlflow._registry.resolve_amortizer``: workers never read the registry.
    """
    return _load_amortizer(spec, device, dtype)


@functools.lru_cache(maxsize=8)
def _load_amortizer(spec: str, device: str, dtype: str) -> MAC:
    if is_registry_spec(spec):
        raise ValueError(
            f"amortizer spec {spec!r} names a registry version: resolve it to a checkpoint "
            "folder first (knowstream.connectors.mlflow._registry.resolve_amortizer)"
        )
    with BUILD_LOCK:  # layers draw their initial weights from torch.nn.init (build_lock.py)
        if spec == "init":
            mac = MAC.init(MACConfig())
        else:
            mac = MAC.load(bundled_checkpoint() if spec == "bundled" else Path(spec))
    if device != "cpu" or dtype != "float32":
        # Its own cache entry: the float32 CPU model stays as it is for its other users
        # (model versions, serving).
        mac = mac.to(device=device, dtype=torch_dtype(dtype))
    return mac.eval()


@functools.lru_cache(maxsize=8)
def amortizer_version(spec: str) -> str:
    """The version of ``spec``'s weights: a hash of the float32 weights, whatever the
    compute placement, so it equals the one ``flows.batch.model_versions`` records.
    Computed once per spec and process, like ``load_amortizer``'s weights it hashes
    (sha256 over 19 MB: not for every batch or request)."""
    return load_amortizer(spec).version
