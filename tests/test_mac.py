"""The MAC networks on CPU with untrained (seeded) weights; the LM is in test_lm.py."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from knowstream.models.encoder import MAX_TOKENS, TextEncoder, load_encoder
from knowstream.models.mac import MAC, MACConfig

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier

C = MACConfig()
T, D = C.n_tokens, C.d_lm


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return load_encoder()


@pytest.fixture(scope="module")
def mac() -> MAC:
    return MAC.init().eval()


@pytest.fixture(scope="module")
def question(encoder):
    return encoder.encode(["Who built the bridge over the river?"])


def rand_bank(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, n, T, D, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_shapes(mac, encoder, question):
    states, mask = encoder.encode(["one document", "another, longer document about a bridge"])
    entries = mac.amortizer(states, mask)
    assert entries.shape == (2, T, D) == (2, 16, 576)
    summary = mac.aggregator(*question, entries[None])
    assert summary.shape == (1, T, D)
    pairs = mac.expansion.key_values(summary)
    assert len(pairs) == C.n_layers_lm == 30
    for k, v in pairs:
        assert k.shape == v.shape == (1, C.n_kv_heads, C.prefix_len, C.head_dim) == (1, 3, 2, 64)
    cache, P = mac(*question, entries[None])
    assert P == 2 and cache.get_seq_length() == 2 and len(cache.layers) == 30


@torch.no_grad()
def test_padding_entries_do_not_change_output(mac, question):
    bank = rand_bank(5)
    ref = mac.aggregator(*question, bank)
    padded = torch.cat([bank, 100 * rand_bank(3, seed=2)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    torch.testing.assert_close(mac.aggregator(*question, padded, mask), ref, atol=1e-5, rtol=0)
    # Padding in the middle of the bank is ignored just the same.
    middle = torch.cat([bank[:, :2], 100 * rand_bank(1, seed=3), bank[:, 2:]], dim=1)
    mask = torch.tensor([[True, True, False, True, True, True]])
    torch.testing.assert_close(mac.aggregator(*question, middle, mask), ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_batch_with_variable_bank_sizes(mac, encoder):
    q_states, q_mask = encoder.encode(["first question?", "a second, longer question here?"])
    small, large = rand_bank(2), rand_bank(6, seed=4)
    bank = torch.cat([torch.cat([small, torch.zeros(1, 4, T, D)], dim=1), large])
    mask = torch.tensor([[True] * 2 + [False] * 4, [True] * 6])
    out = mac.aggregator(q_states, q_mask, bank, mask)
    for i, b in enumerate([small, large]):
        n = int(q_mask[i].sum())  # the question alone, without its batch padding
        one = mac.aggregator(q_states[i : i + 1, :n], q_mask[i : i + 1, :n], b)
        torch.testing.assert_close(out[i : i + 1], one, atol=1e-5, rtol=0)


@torch.no_grad()
def test_empty_bank_is_finite(mac, question):
    out = mac.aggregator(*question, torch.zeros(1, 0, T, D))
    assert out.shape == (1, T, D) and torch.isfinite(out).all()
    all_padding = mac.aggregator(*question, rand_bank(3), torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(all_padding, out)


def test_no_gradient_reaches_padding(mac, question):
    bank = rand_bank(4).requires_grad_(True)
    mask = torch.tensor([[True, True, False, False]])
    mac.aggregator(*question, bank, mask).sum().backward()
    assert bank.grad[:, :2].abs().sum() > 0
    assert torch.equal(bank.grad[:, 2:], torch.zeros_like(bank.grad[:, 2:]))
    mac.zero_grad(set_to_none=True)


@torch.no_grad()
def test_hierarchical_aggregation_reads_every_entry(mac, question):
    agg = mac.aggregator
    q = agg.question(*question)
    bank = rand_bank(40)
    out = agg.aggregate_hierarchical(q, bank, window=8)
    assert out.shape == (1, T, D)
    # An entry far beyond the first window (and beyond the question's length,
    # which upstream's loop iterated over) still changes the result.
    changed = bank.clone()
    changed[:, 37] += 1.0
    assert not torch.allclose(agg.aggregate_hierarchical(q, changed, window=8), out)
    # A bank that fits one window is plain aggregation.
    fits = bank[:, :8]
    torch.testing.assert_close(
        agg.aggregate_hierarchical(q, fits, window=8), agg.aggregate(q, fits)
    )
    # Padding is ignored across windows as well.
    mask = torch.ones(1, 45, dtype=torch.bool)
    mask[:, 40:] = False
    padded = torch.cat([bank, 100 * rand_bank(5, seed=9)], dim=1)
    torch.testing.assert_close(agg.aggregate_hierarchical(q, padded, window=8, bank_mask=mask), out)


@torch.no_grad()
def test_long_text_amortizes_in_one_call(mac, encoder, monkeypatch):
    head = "The bridge was built in 1871 by the city engineers. " * 60
    n_tokens = len(encoder.tokenizer(head)["input_ids"])
    assert n_tokens > 2 * MAX_TOKENS
    calls = []
    forward = mac.amortizer.forward
    monkeypatch.setattr(
        mac.amortizer, "forward", lambda s, m: calls.append(s.shape) or forward(s, m)
    )
    entries = mac.amortizer.amortize_texts(encoder, [head + "It is made of iron.", "short"])
    assert entries.shape == (2, T, D)
    assert len(calls) == 1 and calls[0][1] >= n_tokens  # the whole document, in one pass
    # The tail, beyond the first windows, reaches the entry.
    other = mac.amortizer.amortize_texts(encoder, [head + "It is made of wood.", "short"])
    assert not torch.allclose(other[0], entries[0])
    torch.testing.assert_close(other[1], entries[1])
    assert mac.amortizer.amortize_texts(encoder, []).shape == (0, T, D)
    # A short text is the same whether amortized alone or next to a long one.
    alone = mac.amortizer.amortize_texts(encoder, ["short"])
    torch.testing.assert_close(alone[0], entries[1], atol=1e-5, rtol=0)


def test_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = MAC.init()
    assert torch.equal(torch.rand(3), expected)
    b = MAC(MACConfig())
    assert a.version == b.version
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert MAC(MACConfig(seed=1)).version != a.version
    assert a.version.startswith("mac-") and len(a.version) == 16


def test_version_is_the_same_in_another_process(mac):
    code = "from knowstream.models.mac import MAC; print(MAC.init().version)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == mac.version


def test_version_tracks_weights():
    m = MAC.init()
    before = m.version
    with torch.no_grad():
        m.expansion.mix.bias[0] += 1e-3
    assert m.version != before


@torch.no_grad()
def test_save_load_round_trip(mac, question, tmp_path):
    mac.save(tmp_path / "ckpt")
    loaded = MAC.load(tmp_path / "ckpt")
    assert loaded.config == mac.config and loaded.version == mac.version
    assert not loaded.training
    bank = rand_bank(4)
    assert torch.equal(loaded.aggregator(*question, bank), mac.aggregator(*question, bank))
    for (k1, v1), (k2, v2) in zip(
        mac.expansion.key_values(bank[:, 0]), loaded.expansion.key_values(bank[:, 0]), strict=True
    ):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # Weights changed after saving are caught on load.
    other = MAC(MACConfig(seed=5))
    save_file(
        other.trainable_state_dict(),
        tmp_path / "ckpt" / "model.safetensors",
        {"version": mac.version},
    )
    with pytest.raises(ValueError, match="hash"):
        MAC.load(tmp_path / "ckpt")


def test_checkpoint_is_at_most_20_mb(mac, tmp_path):
    n_params = sum(t.numel() for t in mac.trainable_state_dict().values())
    assert n_params * 4 <= 20e6  # float32 weights
    mac.save(tmp_path / "ckpt")
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir())
    assert size <= 20e6, f"checkpoint {size / 1e6:.1f} MB"
    # The frozen encoder and LM are not part of it.
    parts = {k.split(".")[0] for k in mac.trainable_state_dict()}
    assert parts == {"amortizer", "aggregator", "expansion"}
