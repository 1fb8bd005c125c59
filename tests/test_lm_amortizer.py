"""MAC with ``amortizer="lm"``: the frozen SmolLM2 (LoRA'd) reads documents, its memory
tokens' key/values are the entry, and ``EntrySelector`` weighs entries by MiniLM keys.
Real models on CPU, short texts; the LM loads once for the module."""

import json
import threading
from dataclasses import replace

import pytest
import torch

from knowstream.models.encoder import load_encoder
from knowstream.models.inference import (
    bundled_checkpoint,
    chat_prompts,
    load_models,
    memory_mask,
    prefix_cache,
)
from knowstream.models.mac import MAC, MACConfig
from knowstream.models.objectives import answer_ids, answer_nll

# The shipped checkpoint's shape: 4 task prompt tokens + 2 memory tokens per layer.
C = MACConfig(amortizer="lm", prefix_len=6, task_len=4)
DOCS = [
    "Paris is the capital and largest city of France.",
    "The bank vault was sealed behind a steel door.",
    "Bees make honey.",
]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def lm():
    model, tokenizer, _ = load_models("cpu", encoder=False)
    return model, tokenizer


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.fixture(scope="module")
def mac(lm):
    m = MAC.init(C).eval()
    m.bind_lm(*lm)
    return m


@pytest.fixture(scope="module")
def entries(mac, encoder):
    with torch.no_grad():
        return mac.amortizer.amortize_texts(encoder, DOCS)


def memory_kv(mac: MAC, entries: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value) of the memory tokens alone, as the answering LM gets them."""
    t = mac.config.task_len
    return [(k[:, :, t:], v[:, :, t:]) for k, v in mac.expansion.key_values(entries)]


@torch.no_grad()
def test_untrained_lora_entry_is_the_frozen_lm_cache_of_the_memory_tokens(mac, lm, entries):
    model, tokenizer = lm
    ids = torch.tensor([tokenizer(DOCS[0], add_special_tokens=False)["input_ids"]])
    n, m = ids.shape[1], C.mem_len
    x = torch.cat([model.model.embed_tokens(ids), mac.amortizer.memory[None]], 1)
    pos = (torch.arange(n + m) - n + C.task_len)[None]  # the memory at positions task_len...
    cache = model.model(inputs_embeds=x, position_ids=pos, use_cache=True).past_key_values
    pairs = memory_kv(mac, entries[:1, : C.n_prefix])
    assert len(pairs) == len(cache.layers) == C.n_layers_lm
    for (k, v), layer in zip(pairs, cache.layers, strict=True):
        assert k.shape == (1, C.n_kv_heads, m, C.head_dim)
        torch.testing.assert_close(k, layer.keys[:, :, -m:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, layer.values[:, :, -m:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_entry_shape_and_key_rows_are_the_minilm_embedding(entries, encoder):
    assert C.entry_shape == (2 * C.n_layers_lm * C.mem_len + C.key_rows, C.kv_width) == (122, 192)
    assert entries.shape == (len(DOCS), *C.entry_shape)
    keys = entries[:, C.n_prefix :].reshape(len(DOCS), C.d_enc)
    torch.testing.assert_close(keys, torch.from_numpy(encoder.embed(DOCS)), atol=1e-5, rtol=0)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(len(DOCS)))


@pytest.fixture(scope="module")
def trained(lm):
    mac = MAC.load(bundled_checkpoint())  # trained LoRA: not the identity
    mac.bind_lm(*lm)
    return mac


TEXTS = [DOCS[0] + " " + DOCS[1] * 3, DOCS[2], "", DOCS[1]]  # lengths differ, one empty


@torch.no_grad()
def test_a_padded_lm_pass_reads_each_document_as_alone(trained, lm):
    tokenizer = lm[1]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS if t]
    batched = trained.amortizer.read(ids)  # left-padded to the longest
    alone = torch.cat([trained.amortizer.read([x]) for x in ids])
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_threads_reading_with_one_amortizer_get_the_entries_of_reading_alone(trained, encoder):
    # A read swaps LoRA-merged weights into the shared LM; two at once must not mix.
    with torch.no_grad():
        alone = [trained.amortizer.amortize_texts(encoder, [t]) for t in TEXTS if t]
    got: dict[int, list[torch.Tensor]] = {}

    def read(k: int) -> None:
        with torch.no_grad():
            got[k] = [trained.amortizer.amortize_texts(encoder, [t]) for t in TEXTS if t] * 3

    threads = [threading.Thread(target=read, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for entries in got.values():
        for entry, expected in zip(entries, alone * 3, strict=True):
            assert torch.equal(entry, expected)


@torch.no_grad()
def test_on_cpu_an_entry_does_not_depend_on_its_batch(trained, encoder):
    together = trained.amortizer.amortize_texts(encoder, TEXTS, window_batch=4)
    apart = torch.cat([trained.amortizer.amortize_texts(encoder, [t]) for t in TEXTS])
    assert torch.equal(together.half(), apart.half())  # the stored bytes: a backfill's equal
    assert trained.amortizer.amortize_texts(encoder, []).shape == (0, *C.entry_shape)


@torch.no_grad()
def test_selector_with_one_entry_is_that_entry(mac, encoder, entries):
    out = mac.aggregator(*encoder.encode([QUESTION]), entries[None, 1:2])
    assert torch.equal(out, entries[None, 1, : C.n_prefix])


@torch.no_grad()
def test_selector_ignores_padding_entries(mac, encoder, entries):
    q = encoder.encode([QUESTION])
    ref = mac.aggregator(*q, entries[None, :2])
    padded = torch.cat([entries[None, :1], 1e3 * entries[None, 2:], entries[None, 1:2]], 1)
    mask = torch.tensor([[True, False, True]])
    torch.testing.assert_close(mac.aggregator(*q, padded, mask), ref)


@torch.no_grad()
def test_selector_with_no_entry_gives_zeros(mac, encoder, entries):
    q = encoder.encode([QUESTION])
    empty = mac.aggregator(*q, entries[None, :0])
    assert empty.shape == (1, C.n_prefix, C.kv_width)
    assert torch.equal(empty, torch.zeros_like(empty))
    all_padding = mac.aggregator(*q, entries[None], torch.zeros(1, len(DOCS), dtype=torch.bool))
    assert torch.equal(all_padding, torch.zeros_like(all_padding))


@torch.no_grad()
def test_untrained_selector_favours_the_document_the_question_is_about(mac, encoder, entries):
    # Key rows of the real documents; key/value rows 1 for Paris, 0 for the vault: the
    # summary is the Paris entry's weight.
    bank = entries[None, :2].clone()
    bank[0, 0, : C.n_prefix], bank[0, 1, : C.n_prefix] = 1.0, 0.0
    w_paris = mac.aggregator(*encoder.encode([QUESTION]), bank)
    assert (w_paris > 0.95).all()
    w_vault = mac.aggregator(*encoder.encode(["Who sealed the vault door?"]), bank)
    assert (w_vault < 0.05).all()


@torch.no_grad()
def test_select_top_one_is_the_best_scoring_entry_alone(encoder, entries):
    top1 = MAC.init(replace(C, select_top=1))  # seeded: the same weights as the fixture's
    q = encoder.encode([QUESTION])
    assert torch.equal(top1.aggregator(*q, entries[None, :2]), entries[None, 0, : C.n_prefix])
    mean = MAC.init(C).aggregator(*q, entries[None, :2])
    assert not torch.equal(mean, entries[None, 0, : C.n_prefix])  # a blend of both
    masked = top1.aggregator(*q, entries[None, :2], torch.tensor([[False, True]]))
    assert torch.equal(masked, entries[None, 1, : C.n_prefix])  # padding is never picked


@torch.no_grad()
def test_concat_prefix_holds_every_entry_after_the_task_prompt(mac, encoder, entries):
    concat = MAC.init(replace(C, bank_mode="concat"))
    summary = concat.aggregator(*encoder.encode([QUESTION]), entries[None, :2])
    pairs = concat.expansion.key_values(summary)
    t, m = C.task_len, C.mem_len
    alone = [memory_kv(mac, entries[i : i + 1, : C.n_prefix]) for i in range(2)]
    task = mac.expansion.key_values(entries[:1, : C.n_prefix])
    for layer, (k, v) in enumerate(pairs):
        assert k.shape == (1, C.n_kv_heads, t + 2 * m, C.head_dim)
        assert torch.equal(k[:, :, :t], task[layer][0][:, :, :t])
        for i in range(2):
            assert torch.equal(k[:, :, t + i * m : t + (i + 1) * m], alone[i][layer][0])
            assert torch.equal(v[:, :, t + i * m : t + (i + 1) * m], alone[i][layer][1])


@torch.no_grad()
def test_concat_padding_entry_is_masked_out_of_the_lm(lm, encoder, entries):
    model, tokenizer = lm
    concat = MAC.init(replace(C, bank_mode="concat"))
    q = encoder.encode([QUESTION])
    prompts = chat_prompts(tokenizer, [QUESTION])
    answer = answer_ids(tokenizer, ["Paris"], 8)

    def nll(bank: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cache = prefix_cache(concat, concat.aggregator(*q, bank, mask), model.dtype)
        real = memory_mask(concat, mask)
        return answer_nll(model, prompts, answer, cache, C.prefix_len, real)

    ref = nll(entries[None, :2], None)
    padded = torch.cat([entries[None, :1], 1e3 * entries[None, 2:], entries[None, 1:2]], 1)
    mask = torch.tensor([[True, False, True]])
    assert memory_mask(concat, mask).tolist() == [
        [True] * C.task_len + [True, True, False, False, True, True]
    ]
    torch.testing.assert_close(nll(padded, mask), ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(nll(padded, torch.ones_like(mask)), ref, atol=1e-3)


def test_selector_options_are_checked_and_part_of_the_version():
    bad_options = (
        replace(C, amortizer="reader", select_top=1),
        replace(C, bank_mode="sum"),
        replace(C, bank_select="best"),
    )
    for bad in bad_options:
        with pytest.raises(ValueError):
            MAC.init(bad)
    # Same weights (seeded), other answers: another version; the defaults change nothing.
    options = ({}, {"select_top": 1}, {"bank_mode": "concat"}, {"bank_select": "lm"})
    versions = {MAC.init(replace(C, **o)).version for o in options}
    assert len(versions) == 4
    assert MAC.init(replace(C, select_top=0)).version == MAC.init(C).version


def test_answer_nll_reaches_lora_memory_selector_and_task(lm, encoder):
    model, tokenizer = lm
    mac = MAC.init(C).train()
    mac.bind_lm(model, tokenizer)
    bank = mac.amortizer.amortize_texts(encoder, DOCS[:2])
    summary = mac.aggregator(*encoder.encode([QUESTION]), bank[None])
    cache = prefix_cache(mac, summary, model.dtype)
    prompts = chat_prompts(tokenizer, [QUESTION])
    answer_nll(model, prompts, answer_ids(tokenizer, ["Paris"], 8), cache, C.prefix_len).backward()
    # The last layer's query, output and MLP come after its keys/values: nothing of the
    # entry depends on them. Every other B gets a gradient (A gets none while B = 0).
    last = C.n_layers_lm - 1
    dead = {f"layers_{last}_{t}_weight" for t in ("self_attn_q_proj", "self_attn_o_proj")}
    dead |= {f"layers_{last}_mlp_{t}_proj_weight" for t in ("gate", "up", "down")}
    for name, b in mac.amortizer.lora.b.items():
        if name not in dead:
            assert b.grad is not None and b.grad.abs().sum() > 0, name
    for p in (mac.amortizer.memory, mac.aggregator.proj.weight, mac.aggregator.log_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert mac.expansion.task is not None and mac.expansion.task.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_save_load_round_trip_leaves_the_lm_out(mac, lm, encoder, tmp_path):
    changed = MAC.init(C)
    changed.bind_lm(*lm)
    with torch.no_grad():  # trained-looking weights: LoRA no longer the identity
        for b in changed.amortizer.lora.b.values():
            b.normal_(0, 1e-3)
    keys = set(changed.trainable_state_dict())
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in keys} == {
        "amortizer.memory", "amortizer.lora", "aggregator.proj", "aggregator.log_scale",
        "expansion.task",
    }  # fmt: skip
    assert not any(".layers." in k or k.endswith("embed_tokens.weight") for k in keys)
    changed.save(tmp_path / "ckpt")
    loaded = MAC.load(tmp_path / "ckpt")
    assert loaded.config == changed.config and loaded.version == changed.version != mac.version
    loaded.bind_lm(*lm)
    with torch.no_grad():
        a = changed.amortizer.amortize_texts(encoder, DOCS[:1])
        assert torch.equal(loaded.amortizer.amortize_texts(encoder, DOCS[:1]), a)
        assert not torch.allclose(mac.amortizer.amortize_texts(encoder, DOCS[:1]), a)


def test_bundled_checkpoint_is_a_small_evaluated_lm_mac():
    path = bundled_checkpoint()
    mac = MAC.load(path)
    assert mac.config.amortizer == "lm" and mac.config.mem_len >= 1
    assert any(b.abs().sum() > 0 for b in mac.amortizer.lora.b.values())  # trained
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 50e6, f"checkpoint {size / 1e6:.1f} MB"
    report = json.loads((path / "eval.json").read_text())
    assert report["rows"] and report["paired_f1"]
    assert all(row["n"] >= 1578 for row in report["rows"].values())
    # The report is of the checkpoint as it ships: its version and its bank selection.
    assert report["mac_version"] == mac.version
    assert report["bank_select"] == mac.config.bank_select
