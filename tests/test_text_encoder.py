"""umT5 text encoder from a local directory (a tiny random model and a tokenizer built here), and its cache."""

from __future__ import annotations

import pytest
import torch
from model_parts import save_tiny_tokenizer, save_tiny_umt5

from model.config import get_preset
from model.text_encoder import NullTextEncoder, TextEncoder, build_text_encoder

MAX_LENGTH = 16
D_MODEL = 32


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("umt5")
    tokenizer = save_tiny_tokenizer(path)
    save_tiny_umt5(path, tokenizer.vocab_size, D_MODEL)
    return str(path)


def test_umt5_embeddings_keep_prompt_tokens_and_zero_the_rest(umt5_dir):
    encoder = TextEncoder(umt5_dir, max_length=MAX_LENGTH)
    assert encoder.text_dim == D_MODEL
    emb = encoder.encode("a person talks")  # 3 words + </s>
    assert emb.shape == (1, MAX_LENGTH, D_MODEL) and emb.dtype == torch.float32
    assert (emb[0, :4].abs().sum(-1) > 0).all()
    assert emb[0, 4:].abs().max() == 0
    other = encoder.encode("a woman smiles and speaks slowly")
    assert (other[0, :7].abs().sum(-1) > 0).all() and other[0, 7:].abs().max() == 0
    assert not torch.allclose(emb[0, :4], other[0, :4])
    long = encoder.encode(" ".join(["story"] * 40))  # truncated to max_length: no padding left
    assert long.shape == (1, MAX_LENGTH, D_MODEL) and (long[0].abs().sum(-1) > 0).all()


def test_umt5_cache_hits_and_evicts_least_recent(umt5_dir):
    encoder = TextEncoder(umt5_dir, max_length=MAX_LENGTH, cache_size=2)
    first = encoder.encode("a person talks")
    first[0, 0] = 123.0  # editing the returned copy must not corrupt the cache
    again = encoder.encode("a person talks")
    assert encoder.cache_info()[:2] == (1, 1)
    assert torch.equal(again, encoder._encode_uncached("a person talks"))
    encoder.encode("a woman smiles")
    encoder.encode("an old man")  # evicts "a person talks"
    assert encoder.cache_info().currsize == 2
    encoder.encode("a person talks")
    assert encoder.cache_info()[:2] == (1, 4)


def test_null_text_encoder_for_presets_without_text():
    tiny = get_preset("tiny")
    encoder = build_text_encoder(tiny)
    assert isinstance(encoder, NullTextEncoder)
    emb = encoder.encode("anything at all")
    assert emb.shape == (1, tiny.text.max_length, tiny.dit.text_dim) and emb.abs().max() == 0
    with pytest.raises(ValueError, match="umT5"):
        build_text_encoder(get_preset("wan2.1-1.3b"))
