"""The frozen text encoder: shapes, normalization, and agreement with sentence-transformers."""

import numpy as np
import pytest
import torch

from knowstream.models.encoder import TextEncoder, encoder_version, load_encoder

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return load_encoder()


def test_load_is_cached_per_process(encoder):
    assert load_encoder() is encoder
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder_version().startswith("all-MiniLM-L6-v2@gt-")


def test_encode_shapes(encoder):
    states, mask = encoder.encode(["short", "a somewhat longer sentence than the first"])
    assert states.shape[0] == 2 and states.shape[2] == TextEncoder.dim == 384
    assert mask.dtype == torch.bool and mask.shape == states.shape[:2]
    assert mask[1].all() and not mask[0].all()  # the short text is padded


def test_encode_truncates_to_max_tokens(encoder):
    states, mask = encoder.encode(["word " * 1000], max_tokens=256)
    assert states.shape[1] == 256


def test_encode_ids_matches_encode(encoder):
    text = "The river flows north through the old city."
    states, mask = encoder.encode([text])
    ids = encoder.tokenizer(text)["input_ids"]
    states_ids, mask_ids = encoder.encode_ids([ids, ids + ids[1:]])  # second one pads the first
    assert torch.equal(mask_ids[0, : len(ids)], mask[0])
    torch.testing.assert_close(states_ids[0, : len(ids)], states[0], atol=1e-5, rtol=0)


def test_embed_is_normalized_float32(encoder):
    v = encoder.embed(["one", "two words", "", "a third, longer text"])
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_embed_matches_sentence_transformers(encoder):
    # The similarity matrix printed in the sentence-transformers quickstart for
    # this model (https://sbert.net/docs/sentence_transformer/usage/usage.html):
    # equal values mean our mean pooling + normalization is theirs.
    v = encoder.embed(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    expected = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    np.testing.assert_allclose(v @ v.T, expected, atol=1e-3)


def test_paraphrase_closer_than_unrelated(encoder):
    a, b, c = encoder.embed(
        [
            "The new movie is awesome",
            "The new movie is so great",
            "The central bank raised interest rates again.",
        ]
    )
    assert a @ b > 0.8 > 0.2 > a @ c


def test_batch_equals_single(encoder):
    texts = [
        "Short.",
        "A medium length sentence about rivers and mountains.",
        "A considerably longer text that goes on for a while, so that the batch has "
        "real padding in it when it is encoded together with the short ones.",
    ]
    batched = encoder.embed(texts, batch_size=3)
    single = np.stack([encoder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
