"""umT5 text encoder from a local directory (a tiny random model and a tokenizer built here), and its cache."""

from __future__ import annotations

import pytest
import torch

from model.config import get_preset
from model.text_encoder import NullTextEncoder, TextEncoder, build_text_encoder

MAX_LENGTH = 16
D_MODEL = 32


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["a person talks to the camera", "a woman smiles and speaks slowly", "an old man reads a story"]
    words.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    # T5 tokenizers end every sequence with </s>.
    words.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", words.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = UMT5Config(
        vocab_size=tokenizer.vocab_size,
        d_model=D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("umt5")
    tokenizer.save_pretrained(path)
    UMT5EncoderModel(config).save_pretrained(path)
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
