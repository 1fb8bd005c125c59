"""Memory of Amortized Contexts (MAC, Tack et al. 2024) for a frozen SmolLM2-135M.

MAC keeps a frozen LM's knowledge current without touching its weights:

1. Amortize. Each new document is read once into a memory entry; entries are
   stored in a bank and never recomputed. Two readers (``MACConfig.amortizer``):
   - "lm" (the shipped checkpoint): the frozen LM itself, with LoRA deltas used
     only for this pass, reads the document and mem_len memory tokens; their keys
     and values at every layer are the entry (``LMAmortizer``).
   - "reader": the frozen text encoder (all-MiniLM-L6-v2, models/encoder.py) and
     the ``Amortizer``'s learned queries compress the document into (T, d_lm).
2. Aggregate. For a question, the aggregator merges the retrieved entries into one
   summary: "lm" weighs whole entries by question/document similarity
   (``EntrySelector``); "reader" cross-attends from the question's T query vectors
   over all entries (``Aggregator``).
3. Modulate. The ``Expansion`` turns that summary into P key/value prefix tokens
   for every layer of the frozen LM (prefix tuning, generated per question), after
   the shared task prompt, and the LM answers with the prefix as its cache.

Only these networks (and LoRA deltas) are trained (see ``MAC.trainable_state_dict``):
the encoder and the LM stay frozen and are not part of this module, so a
checkpoint holds a few MB, not the 22M + 135M frozen parameters.

Conventions: every mask is boolean with True = real token/entry; the LM sees the
prompt at positions P, P+1, ... after its P prefix tokens, in training and in
``answer`` alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import DynamicCache

from knowstream.models.encoder import MAX_TOKENS, TextEncoder, sentence_embedding
from knowstream.models.lm import output_cache


@dataclass
class MACConfig:
    # --- the memory entry ---
    n_tokens: int = 16  # T: vectors per memory entry (upstream: 12 for distilgpt2, 24 above)
    # --- the frozen models (must match them; the defaults are SmolLM2-135M and MiniLM-L6) ---
    d_lm: int = 576  # hidden width of the frozen LM
    d_enc: int = 384  # hidden width of the frozen text encoder
    n_layers_lm: int = 30  # decoder layers of the LM: each gets its own prefix
    n_kv_heads: int = 3  # key/value heads of the LM (GQA: its 9 query heads share these 3)
    head_dim: int = 64  # width of one key/value head of the LM
    # --- the trainable networks ---
    prefix_len: int = 2  # P: prefix tokens per LM layer, task prompt included (upstream: 2)
    task_len: int = 0  # the first task_len of the P are the shared task prompt (no entry in them)
    d_model: int = 192  # width of the amortizer's and the question reader's layers
    n_heads: int = 8  # attention heads; d_model must be divisible by it
    amortizer_layers: int = 2  # amortizer layers: self-attn, cross-attn to the document, MLP
    question_layers: int = 1  # layers of the same kind reading the question in the aggregator
    aggregator_blocks: int = 2  # cross-attention blocks from the question's queries over the bank
    mlp_hidden: int = 384  # hidden width of the MLP in every attention layer and block
    token_hidden: int = 16  # hidden width of each per-token MLP (T per reader, 2LP in expansion)
    dropout: float = 0.0  # dropout on attention weights and residual branches (upstream: none)
    encoder_lora_rank: int = (
        0  # LoRA rank on every linear layer of the document encoder (0: frozen)
    )
    encoder_lora_alpha: float = 16.0  # LoRA scale alpha / rank
    # --- the reader of documents: "reader" (MiniLM states read by learned queries, then
    # aggregator and expansion) or "lm" (the LM itself reads the document; see LMAmortizer) ---
    amortizer: str = "reader"
    lm_lora_rank: int = 16  # "lm": LoRA rank on every linear layer of the LM's reading pass
    lm_lora_alpha: float = 32.0  # "lm": LoRA scale alpha / rank
    lm_ffn: int = 1536  # "lm": the LM's MLP width (LoRA shapes)
    max_doc_tokens: int = 1024  # "lm": a longer document is read up to this many LM tokens
    select_top: int = 0  # "lm", "mean": the selector weighs only its top entries (0 = all)
    bank_mode: str = "mean"  # "lm": "mean" of the entries by the selector, or "concat" them
    # "all": every retrieved document's entry is banked; "lm": only the one after which the
    # frozen LM finds the question likeliest (models/rerank.py; EVAL.md, eighth run)
    bank_select: str = "all"
    seed: int = 0  # seed of the initial weights: untrained models are identical across processes

    @property
    def mem_len(self) -> int:
        """Prefix tokens per layer made from the memory (the rest is the task prompt)."""
        return self.prefix_len - self.task_len

    @property
    def n_prefix(self) -> int:
        """Prefix tokens the expansion makes: a key and a value, mem_len each, per LM layer."""
        return 2 * self.n_layers_lm * self.mem_len

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def key_rows(self) -> int:
        """ "lm" entries: rows of width kv_width that hold the document's MiniLM embedding."""
        return self.d_enc // self.kv_width

    @property
    def entry_shape(self) -> tuple[int, int]:
        """One memory entry: (T, d_lm) for "reader"; for "lm", the n_prefix key/value rows
        of the memory tokens and ``key_rows`` rows of the document's embedding."""
        if self.amortizer == "lm":
            return (self.n_prefix + self.key_rows, self.kv_width)
        return (self.n_tokens, self.d_lm)


class Attention(nn.Module):
    """Multi-head attention from ``x`` (width d_q) to ``ctx`` (width d_kv) through
    an inner width d_attn; the output has x's width, so it can be a residual branch."""

    def __init__(self, d_q: int, d_kv: int, d_attn: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        assert d_attn % n_heads == 0, "attention width must be divisible by the number of heads"
        self.n_heads = n_heads
        self.dropout = dropout
        self.q = nn.Linear(d_q, d_attn)
        self.kv = nn.Linear(d_kv, 2 * d_attn)
        self.out = nn.Linear(d_attn, d_q)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None = None) -> Tensor:
        B, Tq, _ = x.shape
        L = ctx.shape[1]
        q = self.q(x).view(B, Tq, self.n_heads, -1).transpose(1, 2)  # (B, h, Tq, dh)
        k, v = self.kv(ctx).view(B, L, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, L, dh)
        attn_mask = None
        if ctx_mask is not None:
            # A row whose context is all padding (a question with no retrieved
            # entry, a bank window past the end) would softmax over nothing and
            # give NaN, in the backward pass too. Such rows attend to everything
            # and their output is zeroed: the residual stream passes unchanged,
            # and no gradient reaches the padding.
            empty = ~ctx_mask.any(-1)  # (B,)
            attn_mask = (ctx_mask | empty[:, None])[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        y = self.out(y.transpose(1, 2).reshape(B, Tq, -1))
        if ctx_mask is not None:
            y = y.masked_fill(empty[:, None, None], 0.0)
        return y


class MLP(nn.Module):
    """Linear -> GELU -> Linear -> dropout (the transformer MLP)."""

    def __init__(self, d: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TokenMLP(nn.Module):
    """n separate maps, one per token position: LayerNorm -> Linear -> Tanh -> Linear,
    plus a skip (identity if d_in == d_out, else linear). (B, n, d_in) -> (B, n, d_out).

    This is upstream's per-token output head, with two economies. The LayerNorm's
    affine is shared, since a per-token scale is absorbed by the per-token first
    Linear anyway. The skip is shared too: a per-token linear skip costs
    n*d_in*d_out parameters (1.8M for the amortizer's head alone), while the
    per-token nonlinear branch already lets every position specialize.
    """

    def __init__(self, n: int, d_in: int, d_out: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.w1 = nn.Parameter(torch.randn(n, d_in, hidden) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.zeros(n, hidden))
        self.w2 = nn.Parameter(torch.randn(n, hidden, d_out) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(n, d_out))
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(torch.einsum("bni,nih->bnh", self.norm(x), self.w1) + self.b1)
        return self.skip(x) + torch.einsum("bnh,nho->bno", h, self.w2) + self.b2


class ReaderLayer(nn.Module):
    """Pre-LayerNorm transformer decoder layer: self-attention among the queries,
    cross-attention to the encoder's token states, MLP."""

    def __init__(self, c: MACConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.d_model)
        self.self_attn = Attention(c.d_model, c.d_model, c.d_model, c.n_heads, c.dropout)
        self.norm2 = nn.LayerNorm(c.d_model)
        self.cross_attn = Attention(c.d_model, c.d_enc, c.d_model, c.n_heads, c.dropout)
        self.norm3 = nn.LayerNorm(c.d_model)
        self.mlp = MLP(c.d_model, c.mlp_hidden, c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h))
        # The encoder's last layer ends in a LayerNorm: its states need no other.
        x = x + self.drop(self.cross_attn(self.norm2(x), states, mask))
        return x + self.mlp(self.norm3(x))


class Amortizer(nn.Module):
    """Encoder token states (B, L, d_enc) + mask -> T vectors of the LM's width (B, T, d_lm).

    T learned queries read the text through ``n_layers`` ReaderLayers; T per-token
    MLPs map them to the LM's width. For documents this output is the memory
    entry; the aggregator reads questions with a second, separate instance
    (upstream likewise uses a second T5 for questions).
    """

    def __init__(self, c: MACConfig, n_layers: int, encoder_lora: bool = False) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(c.n_tokens, c.d_model) * 0.02)
        self.layers = nn.ModuleList(ReaderLayer(c) for _ in range(n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.head = TokenMLP(c.n_tokens, c.d_model, c.d_lm, c.token_hidden)
        # LoRA deltas for the document encoder's linear layers, created on first use
        # (their shapes come from the encoder): see ``EncoderLoRA``.
        self.lora = EncoderLoRA(c) if encoder_lora and c.encoder_lora_rank > 0 else None

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        x = self.queries.expand(states.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, states, mask)
        return self.head(self.norm(x))

    def amortize_texts(
        self,
        encoder: TextEncoder,
        texts: list[str],
        window_batch: int = 32,
        sort_by_length: bool = True,
    ) -> Tensor:
        """Memory entries (B, T, d_lm) of texts of any length, one amortizer pass.

        The encoder sees at most MAX_TOKENS tokens at a time, so each text is cut
        into windows of MAX_TOKENS - 2 tokens (plus [CLS] and [SEP]), the windows
        of all texts are encoded ``window_batch`` at a time, and each text's
        window states are concatenated back along L: the amortizer's queries then
        cross-attend over the whole document at once.

        With ``sort_by_length`` (the default) the windows are encoded in order of
        length, so an encoder batch pads to a length close to its own windows'
        instead of the longest of any text (on SQuAD passages, unsorted batches
        were ~96% padding tokens). The states go back to their windows, and the
        windows to their texts in order, so the result equals the unsorted one up
        to float rounding (padding is masked out of the encoder's attention).
        """
        if not texts:
            return self.queries.new_zeros(0, *self.head.b2.shape)  # (0, T, d_lm)
        tok = encoder.tokenizer
        step = MAX_TOKENS - 2
        ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        windows: list[list[int]] = []
        owner: list[int] = []  # which text each window comes from
        for i, x in enumerate(ids):
            for start in range(0, max(len(x), 1), step):
                windows.append([tok.cls_token_id, *x[start : start + step], tok.sep_token_id])
                owner.append(i)
        param = self.queries
        # Each text's length in encoder states, copied to the device before the encoder runs
        # (a copy after it would wait for it).
        text_lengths = [0] * len(texts)
        for i, n_tokens in zip(owner, map(len, windows), strict=True):
            text_lengths[i] += n_tokens
        lengths = torch.tensor(text_lengths, device=param.device)
        order = list(range(len(windows)))
        if sort_by_length:
            order.sort(key=lambda w: len(windows[w]))  # stable: equal lengths keep their order
        window_states: list[Tensor | None] = [None] * len(windows)
        for start in range(0, len(order), window_batch):
            idx = order[start : start + window_batch]
            if self.lora is None:
                states, _ = encoder.encode_ids([windows[w] for w in idx])
            else:  # the trained encoder, with gradients when they are enabled
                states, _ = self.lora.encode_ids(encoder, [windows[w] for w in idx])
            for j, w in enumerate(idx):
                # Without padding: windows are right-padded, so a slice (a view; a boolean
                # mask here would wait for the device once per window) drops it.
                window_states[w] = states[j, : len(windows[w])]
        per_text: list[list[Tensor]] = [[] for _ in texts]
        for w, window in enumerate(window_states):  # window order: a text's windows in order
            assert window is not None  # every window was encoded above
            per_text[owner[w]].append(window)
        docs = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in per_text]
        doc_states = nn.utils.rnn.pad_sequence(docs, batch_first=True).to(param.device, param.dtype)
        doc_mask = torch.arange(doc_states.shape[1], device=param.device) < lengths[:, None]
        return self(doc_states, doc_mask)


class LoRA(nn.Module):
    """Low-rank deltas for named linear weights of a frozen model: W' = W + (alpha / r) B A,
    A (r, in), B (out, r), B = 0 at init, so an untrained delta is the frozen model
    exactly. The model's own weights are never changed (it has other users: the same
    encoder embeds chunks, the same LM answers): a forward pass swaps the merged weights
    in with ``torch.func.functional_call``."""

    def __init__(
        self, names: list[str], shapes: list[tuple[int, int]], rank: int, alpha: float
    ) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.names = names
        # ParameterDict keys may not contain dots.
        self.a = nn.ParameterDict(
            {
                n.replace(".", "_"): nn.Parameter(torch.randn(rank, i) / math.sqrt(i))
                for n, (_, i) in zip(names, shapes, strict=True)
            }
        )
        self.b = nn.ParameterDict(
            {
                n.replace(".", "_"): nn.Parameter(torch.zeros(o, rank))
                for n, (o, _) in zip(names, shapes, strict=True)
            }
        )

    def merged(self, model: nn.Module) -> dict[str, Tensor]:
        """Model parameter name -> W + scale * B A, for every target."""
        params = dict(model.named_parameters())
        out = {}
        for n in self.names:
            w = params[n]
            key = n.replace(".", "_")
            out[n] = w + (self.scale * (self.b[key] @ self.a[key])).to(w.dtype)
        return out


class EncoderLoRA(LoRA):
    """LoRA deltas for every linear layer of the document encoder, listed in the order
    of the encoder's parameter names (``*.weight`` of 2-d linear layers inside
    ``encoder.layer``); their shapes are fixed for all-MiniLM-L6-v2 (6 layers x q, k,
    v, attention out, FFN in, FFN out)."""

    # (name suffix, (out, in)) per encoder layer of all-MiniLM-L6-v2
    TARGETS = (
        ("attention.self.query.weight", (384, 384)),
        ("attention.self.key.weight", (384, 384)),
        ("attention.self.value.weight", (384, 384)),
        ("attention.output.dense.weight", (384, 384)),
        ("intermediate.dense.weight", (1536, 384)),
        ("output.dense.weight", (384, 1536)),
    )
    N_LAYERS = 6

    def __init__(self, c: MACConfig) -> None:
        names = [
            f"encoder.layer.{i}.{suffix}"
            for i in range(self.N_LAYERS)
            for suffix, _ in self.TARGETS
        ]
        shapes = [shape for _ in range(self.N_LAYERS) for _, shape in self.TARGETS]
        super().__init__(names, shapes, c.encoder_lora_rank, c.encoder_lora_alpha)

    def encode_ids(self, encoder: TextEncoder, ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        """``TextEncoder.encode_ids`` through the adapted encoder (differentiable)."""
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), encoder.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.bool)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = True
        input_ids, mask = input_ids.to(encoder.device), mask.to(encoder.device)
        out = torch.func.functional_call(
            encoder.model,
            self.merged(encoder.model),
            args=(),
            kwargs={"input_ids": input_ids, "attention_mask": mask.long()},
            strict=False,
        )
        return out.last_hidden_state, mask


class LMLoRA(LoRA):
    """LoRA deltas for every linear layer of the LM (q, k, v, o, gate, up, down of each
    decoder layer), used only when the LM reads a document for its entry."""

    def __init__(self, c: MACConfig) -> None:
        d, kv, ffn = c.d_lm, c.kv_width, c.lm_ffn
        targets = (
            ("self_attn.q_proj.weight", (d, d)),
            ("self_attn.k_proj.weight", (kv, d)),
            ("self_attn.v_proj.weight", (kv, d)),
            ("self_attn.o_proj.weight", (d, d)),
            ("mlp.gate_proj.weight", (ffn, d)),
            ("mlp.up_proj.weight", (ffn, d)),
            ("mlp.down_proj.weight", (d, ffn)),
        )
        names = [f"layers.{i}.{t}" for i in range(c.n_layers_lm) for t, _ in targets]
        shapes = [shape for _ in range(c.n_layers_lm) for _, shape in targets]
        super().__init__(names, shapes, c.lm_lora_rank, c.lm_lora_alpha)


class LMAmortizer(nn.Module):
    """Document -> memory entry, read by the LM itself (``MACConfig.amortizer = "lm"``).

    The frozen LM, with LoRA deltas that only this pass uses, reads the document followed
    by mem_len learned memory embeddings. The keys and values the memory tokens get at
    every layer are the entry: they are already what the answering LM reads as a prefix,
    and the LM's own reading of the text does the compression (a learned map from
    another encoder's states into the LM's key/value space did not carry SQuAD content:
    EVAL.md). Rotary positions put the document just before position task_len and the
    memory tokens at the positions the memory has in the prefix, so the cached keys fit
    the answering LM as they are. ``key_rows`` more rows hold the document's MiniLM
    embedding: the key by which the aggregator (``EntrySelector``) weighs entries.

    Entry: (2 * L * mem_len + key_rows, kv_width), rows in (layer, key|value, token) order.
    """

    def __init__(self, c: MACConfig) -> None:
        super().__init__()
        assert c.d_enc % c.kv_width == 0, "the document key must fill whole rows"
        self.c = c
        # The scale of the LM's token embeddings (std 0.136): the LM reads these like tokens.
        self.memory = nn.Parameter(torch.randn(c.mem_len, c.d_lm) * 0.136)
        self.lora = LMLoRA(c)
        # A read puts LoRA-merged weights into the LM for its pass (functional_call): one
        # read at a time, so threads sharing this amortizer (serve --ingest) each get theirs.
        self.reading = threading.Lock()

    def bind_lm(self, lm: nn.Module, tokenizer) -> None:
        """Read with this (frozen) LM; kept out of the module tree, so it is neither saved
        nor moved with the MAC weights. Unbound, the first read loads one."""
        self.__dict__["_lm"] = (lm, tokenizer)

    def frozen_lm(self):
        if "_lm" not in self.__dict__:
            from knowstream.models.lm import load_lm

            p = self.memory
            self.bind_lm(*load_lm(dtype=p.dtype, device=p.device))
        return self.__dict__["_lm"]

    def docs_per_pass(self, window_batch: int) -> int:
        """Documents per LM pass. On the CPU each document is read alone: it is faster there
        (no padding), and an entry's bytes then do not depend on which documents shared its
        batch (padding changes the float rounding, and float16 storage can show it), so a
        backfill rebuilds the same memory."""
        return 1 if self.memory.device.type == "cpu" else window_batch

    def read(self, ids: list[list[int]]) -> Tensor:
        """Token ids of b documents -> their memory key/values (b, 2 * L * mem_len, kv_width)."""
        with self.reading:
            return self._read(ids)

    def _read(self, ids: list[list[int]]) -> Tensor:
        c, m = self.c, self.c.mem_len
        lm, tokenizer = self.frozen_lm()
        dev = self.memory.device
        B, L = len(ids), max(len(x) for x in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros(B, L + m, dtype=torch.long)
        mask[:, L:] = 1
        for i, x in enumerate(ids):  # left-padded: every document ends at column L - 1
            input_ids[i, L - len(x) :] = torch.tensor(x)
            mask[i, L - len(x) : L] = 1
        emb = lm.model.embed_tokens(input_ids.to(dev))  # (B, L, d_lm)
        embeds = torch.cat([emb, self.memory.to(emb.dtype).expand(B, -1, -1)], 1)  # (B, L+m, d_lm)
        pos = (torch.arange(L + m, device=dev) - L + c.task_len).expand(B, -1)
        out = torch.func.functional_call(
            lm.model,
            self.lora.merged(lm.model),
            args=(),
            kwargs={
                "inputs_embeds": embeds,
                "attention_mask": mask.to(dev),
                "position_ids": pos,
                "use_cache": True,
            },
            strict=False,
        )
        kv = torch.stack(
            [
                torch.stack([layer.keys[:, :, -m:], layer.values[:, :, -m:]], 1)
                for layer in output_cache(out).layers
            ],
            1,
        )  # (B, L_lm, 2, heads, m, head_dim)
        return kv.permute(0, 1, 2, 4, 3, 5).reshape(B, c.n_prefix, c.kv_width)

    def amortize_texts(
        self,
        encoder: TextEncoder,
        texts: list[str],
        window_batch: int = 32,
        sort_by_length: bool = True,
    ) -> Tensor:
        """Memory entries (B, *entry_shape) of ``texts``, ``docs_per_pass(window_batch)``
        documents per LM pass (in order of length with ``sort_by_length``: less padding)."""
        c = self.c
        if not texts:
            return self.memory.new_zeros(0, *c.entry_shape)
        _, tokenizer = self.frozen_lm()
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        ids = [x[: c.max_doc_tokens] or [tokenizer.eos_token_id] for x in ids]
        order = list(range(len(texts)))
        if sort_by_length:
            order.sort(key=lambda i: len(ids[i]))
        rows: list[Tensor | None] = [None] * len(texts)
        per_pass = self.docs_per_pass(window_batch)
        for start in range(0, len(order), per_pass):
            idx = order[start : start + per_pass]
            kv = self.read([ids[i] for i in idx])
            states, mask = encoder.encode([texts[i] for i in idx])
            key = sentence_embedding(states, mask).view(len(idx), c.key_rows, c.kv_width).to(kv)
            for i, entry in zip(idx, torch.cat([kv, key], 1), strict=True):
                rows[i] = entry
        return torch.stack(rows)  # type: ignore[arg-type]  # every text was read above


class EntrySelector(nn.Module):
    """Question + bank of "lm" entries -> the question's weighted mean of its entries'
    key/values (B, n_prefix, kv_width), the aggregator of ``MACConfig.amortizer = "lm"``.

    The weights are a softmax over the entries of a learned bilinear similarity between
    the question's and each document's MiniLM embedding, which starts as their cosine
    similarity (the retriever's ranking) at temperature 1/20. With one entry it is that
    entry exactly, so own vs wrong entry measures what an entry carries, nothing else.
    With ``select_top`` = m > 0 only the m best-scoring entries get weight: a mean of
    several documents' key/values is not any one document's memory.

    ``bank_mode = "concat"`` weighs nothing: every entry's memory tokens go into the prefix
    side by side, (B, N, n_prefix, kv_width) with padding entries zeroed, and the frozen
    LM's own attention reads among them as it reads among passages in its prompt.
    """

    def __init__(self, c: MACConfig) -> None:
        super().__init__()
        self.c = c
        self.proj = nn.Linear(c.d_enc, c.d_enc)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    def scores(self, q: Tensor, keys: Tensor) -> Tensor:
        """Selection logits (B, N) of questions' sentence embeddings q (B, d_enc) over
        their banks' L2-normalized document embeddings ``keys`` (B, N, d_enc), in float32."""
        q = F.normalize(self.proj(q.to(self.proj.weight.dtype)).float(), dim=-1)
        return self.log_scale.exp().float() * torch.einsum("bd,bnd->bn", q, keys.float())

    def forward(
        self, q_states: Tensor, q_mask: Tensor, bank: Tensor, bank_mask: Tensor | None = None
    ) -> Tensor:
        """Question states (B, Lq, d_enc) + mask, bank (B, N, *entry_shape) + mask (B, N)."""
        B, N, R, W = bank.shape
        k = self.c.key_rows
        if self.c.bank_mode == "concat":
            if bank_mask is None:
                return bank[:, :, : R - k]
            return bank[:, :, : R - k] * bank_mask[:, :, None, None].to(bank.dtype)
        with torch.autocast(bank.device.type, enabled=False):  # the weights in float32
            q = sentence_embedding(q_states.float(), q_mask)
            keys = F.normalize(bank[:, :, R - k :].reshape(B, N, k * W).float(), dim=-1)
            scores = self.scores(q, keys)
            if bank_mask is not None:
                scores = scores.masked_fill(~bank_mask, float("-inf"))
            if 0 < self.c.select_top < N:
                kept = scores.topk(self.c.select_top, -1).indices
                top = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, kept, True)
                scores = scores.masked_fill(~top, float("-inf"))
            weights = torch.softmax(scores, -1).nan_to_num(0.0)  # no entry at all: zeros
        return torch.einsum("bn,bnrw->brw", weights.to(bank.dtype), bank[:, :, : R - k])


class BankBlock(nn.Module):
    """Pre-LayerNorm cross-attention block from the question's T vectors over the
    bank's flattened entries, both of the LM's width, then an MLP."""

    def __init__(self, c: MACConfig) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(c.d_lm)
        # The bank is normalized per block: entries are raw amortizer outputs (or,
        # in hierarchical aggregation, aggregator outputs) of arbitrary scale.
        self.norm_bank = nn.LayerNorm(c.d_lm)
        self.attn = Attention(c.d_lm, c.d_lm, c.d_model, c.n_heads, c.dropout)
        self.norm_mlp = nn.LayerNorm(c.d_lm)
        self.mlp = MLP(c.d_lm, c.mlp_hidden, c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, bank: Tensor, bank_mask: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm_q(x), self.norm_bank(bank), bank_mask))
        return x + self.mlp(self.norm_mlp(x))


class Aggregator(nn.Module):
    """Question + bank of entries -> one (B, T, d_lm) summary for the expansion."""

    def __init__(self, c: MACConfig) -> None:
        super().__init__()
        self.question = Amortizer(c, c.question_layers)
        self.blocks = nn.ModuleList(BankBlock(c) for _ in range(c.aggregator_blocks))

    def forward(
        self, q_states: Tensor, q_mask: Tensor, bank: Tensor, bank_mask: Tensor | None = None
    ) -> Tensor:
        """Question states (B, Lq, d_enc) + mask, bank (B, N, T, d_lm) + mask (B, N)."""
        return self.aggregate(self.question(q_states, q_mask), bank, bank_mask)

    def aggregate(self, q: Tensor, bank: Tensor, bank_mask: Tensor | None = None) -> Tensor:
        """Question vectors q (B, T, d_lm) attend over all T tokens of all N entries
        of the bank (B, N, T, d_lm); bank_mask (B, N) marks real entries, so
        questions with different numbers of retrieved entries share a batch."""
        B, N, T, D = bank.shape
        if bank_mask is None:
            bank_mask = torch.ones(B, N, dtype=torch.bool, device=bank.device)
        if N == 0:
            # No entry at all is the same as one padding entry: attention to an
            # all-padding bank contributes nothing (see Attention).
            bank, bank_mask, N = bank.new_zeros(B, 1, T, D), bank_mask.new_zeros(B, 1), 1
        flat_mask = bank_mask[:, :, None].expand(B, N, T).reshape(B, N * T)
        x = q
        for block in self.blocks:
            x = block(x, bank.reshape(B, N * T, D), flat_mask)
        return x

    def aggregate_hierarchical(
        self, q: Tensor, bank: Tensor, window: int, bank_mask: Tensor | None = None
    ) -> Tensor:
        """``aggregate`` for banks too large to attend over at once.

        The bank is cut into windows of ``window`` entries, each window is
        aggregated with the question into one entry-shaped (T, d_lm) summary, and
        the summaries form the next, smaller bank, until it fits in one window.
        Every entry is read: the windows run over the bank's N axis (upstream's
        loop ran over the question's length and skipped most of a large bank).
        Summaries are aggregator outputs, not amortizer outputs, so this only
        works well if the aggregator is also trained on its own outputs.
        """
        assert window >= 2, "a window of one entry never shrinks the bank"
        B, N, T, D = bank.shape
        if bank_mask is None:
            bank_mask = torch.ones(B, N, dtype=torch.bool, device=bank.device)
        while bank.shape[1] > window:
            N = bank.shape[1]
            n_win = -(-N // window)
            pad = n_win * window - N
            bank = F.pad(bank, (0, 0, 0, 0, 0, pad))
            mask = F.pad(bank_mask, (0, pad), value=False).view(B * n_win, window)
            q_rep = q.repeat_interleave(n_win, dim=0)
            bank = self.aggregate(q_rep, bank.view(B * n_win, window, T, D), mask)
            bank = bank.view(B, n_win, T, D)
            bank_mask = mask.view(B, n_win, window).any(-1)  # an all-padding window stays padding
        return self.aggregate(q, bank, bank_mask)


class Expansion(nn.Module):
    """(B, T, d_lm) summary -> P key and P value prefix tokens for each LM layer.

    The T tokens are projected to the LM's key/value width, n_kv_heads * head_dim
    = 192 (the LM uses grouped-query attention: 9 query heads share 3 key/value
    heads, so the prefix is built with 3 heads, not 9). A learned linear mixing
    of the T tokens then gives 2*L*P tokens (upstream repeats the T tokens
    instead; mixing lets every prefix token draw on all of them), and each goes
    through its own residual MLP. Projecting first keeps the 120 per-token MLPs
    small: at the LM's width 576 they alone would exceed the checkpoint budget.
    """

    def __init__(self, c: MACConfig) -> None:
        super().__init__()
        self.c = c
        kv_width = c.kv_width
        # "lm" entries are key/value rows already (LMAmortizer): nothing to learn here.
        if c.amortizer != "lm":
            self.proj = nn.Linear(c.d_lm, kv_width)
            self.mix = nn.Linear(c.n_tokens, c.n_prefix)
            self.head = TokenMLP(c.n_prefix, kv_width, kv_width, c.token_hidden)
        # The shared task prompt: task_len free key/value tokens per layer, the same
        # for every question and entry (and used alone by the modes without memory).
        self.task = (
            nn.Parameter(torch.randn(c.n_layers_lm, 2, c.n_kv_heads, c.task_len, c.head_dim) * 0.02)
            if c.task_len
            else None
        )

    def task_key_values(self, B: int) -> list[tuple[Tensor, Tensor]]:
        """The task prompt alone: per layer (key, value), each (B, heads, task_len, head_dim)."""
        assert self.task is not None, "this checkpoint has no task prompt (task_len = 0)"
        t = self.task.unsqueeze(2).expand(-1, -1, B, -1, -1, -1)  # (L, 2, B, heads, task_len, hd)
        return [(layer[0], layer[1]) for layer in t]

    def key_values(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """One (key, value) pair per LM layer, each (B, n_kv_heads, P, head_dim): the
        task prompt's task_len tokens, then mem_len tokens made from ``x``; for "concat"
        entries x (B, N, n_prefix, kv_width), N * mem_len tokens, entry after entry."""
        c = self.c
        B = x.shape[0]
        if c.amortizer != "lm":
            z = self.mix(self.proj(x).transpose(1, 2)).transpose(1, 2)  # (B, 2L*mem_len, kv_width)
            x = self.head(z)
        N = x.shape[1] if x.dim() == 4 else 1
        kv = x.reshape(B, N, c.n_layers_lm, 2, c.mem_len, c.n_kv_heads, c.head_dim)
        kv = kv.permute(2, 3, 0, 5, 1, 4, 6)  # (L, 2, B, heads, N, mem_len, head_dim)
        kv = kv.reshape(c.n_layers_lm, 2, B, c.n_kv_heads, N * c.mem_len, c.head_dim)
        if self.task is None:
            return [(layer[0], layer[1]) for layer in kv]
        task = self.task_key_values(B)
        return [
            (
                torch.cat([tk.to(layer[0].dtype), layer[0]], 2),
                torch.cat([tv.to(layer[1].dtype), layer[1]], 2),
            )
            for (tk, tv), layer in zip(task, kv, strict=True)
        ]

    def forward(self, x: Tensor) -> tuple[DynamicCache, int]:
        """The prefix as a fresh transformers cache, and its length P per layer.

        A cache is filled in place by every LM forward, so build a new one per
        generation or training step; gradients flow through it to this module.
        """
        return DynamicCache(self.key_values(x)), self.c.prefix_len


class MAC(nn.Module):
    """The trainable part of MAC: amortizer, aggregator, expansion."""

    def __init__(self, config: MACConfig) -> None:
        super().__init__()
        self.config = config
        # Initialize from the config's seed without touching the global RNG, so
        # that every process builds identical untrained weights (and version).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.amortizer: Amortizer | LMAmortizer
            self.aggregator: Aggregator | EntrySelector
            if config.bank_select not in ("all", "lm"):
                raise ValueError(f"bank_select: 'all' or 'lm', not {config.bank_select!r}")
            if config.amortizer == "lm":
                if config.bank_mode not in ("mean", "concat"):
                    raise ValueError(f"bank_mode: 'mean' or 'concat', not {config.bank_mode!r}")
                self.amortizer, self.aggregator = LMAmortizer(config), EntrySelector(config)
            elif config.amortizer == "reader":
                if config.select_top or config.bank_mode != "mean":
                    raise ValueError("select_top and bank_mode are options of the 'lm' amortizer")
                self.amortizer = Amortizer(config, config.amortizer_layers, encoder_lora=True)
                self.aggregator = Aggregator(config)
            else:
                raise ValueError(f"amortizer must be 'reader' or 'lm', not {config.amortizer!r}")
            self.expansion = Expansion(config)

    @classmethod
    def init(cls, config: MACConfig | None = None) -> MAC:
        """Untrained MAC for ``config`` (default ``MACConfig()``), seeded by ``config.seed``."""
        return cls(config or MACConfig())

    def bind_lm(self, lm: nn.Module, tokenizer) -> None:
        """Give an "lm" amortizer the already loaded frozen LM (no-op for "reader")."""
        if isinstance(self.amortizer, LMAmortizer):
            self.amortizer.bind_lm(lm, tokenizer)

    def forward(
        self, q_states: Tensor, q_mask: Tensor, bank: Tensor, bank_mask: Tensor | None = None
    ) -> tuple[DynamicCache, int]:
        """Question states + bank of entries -> the LM prefix cache and P."""
        return self.expansion(self.aggregator(q_states, q_mask, bank, bank_mask))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Every weight MAC trains. The frozen encoder and LM are deliberately not
        submodules, so this is the whole state dict, and optimizers and
        checkpoints never see their 157M parameters."""
        return self.state_dict()

    @property
    def version(self) -> str:
        """``mac-`` + 12 hex digits of sha256 over the weights (keys sorted) and the
        options that change answers without changing weights: equal weights and options
        give equal versions in any process."""
        h = hashlib.sha256()
        for name, t in sorted(self.trainable_state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        # An option at its default adds nothing: checkpoints saved before it keep their version.
        for option, default in (
            ("select_top", 0),
            ("bank_mode", "mean"),
            ("bank_select", "all"),
        ):
            if (value := getattr(self.config, option)) != default:
                h.update(f"{option}={value}".encode())
        return "mac-" + h.hexdigest()[:12]

    def save(self, path: str | Path) -> None:
        """Write ``path/model.safetensors`` and ``path/config.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(weights, path / "model.safetensors", metadata={"version": self.version})
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> MAC:
        """A MAC saved by ``save``, in eval mode on ``device``; its version is checked
        against the one recorded at save time."""
        path = Path(path)
        mac = cls(MACConfig(**json.loads((path / "config.json").read_text())))
        mac.load_state_dict(load_file(path / "model.safetensors"))
        with safe_open(path / "model.safetensors", framework="pt") as f:
            saved = f.metadata()["version"]
        if mac.version != saved:
            raise ValueError(f"{path}: weights hash to {mac.version}, saved as {saved}")
        return mac.to(device).eval()
