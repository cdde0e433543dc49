"""Small models of the real classes, saved in their real formats, for tests that need a model or a whole directory."""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import DiTConfig, GeneratorConfig, PasteBackConfig, Preset, VAEConfig, get_preset

UMT5_WIDTH = 32


def small_preset(size: int = 16, vae_base_dim: int = 8, **generator) -> Preset:
    """The tiny preset shrunk so hundreds of blocks run in seconds: a 2-layer DiT of width 32 at `size` x `size`.

    Its VAE compresses time (stride 4, Wan2.1's), unlike the tiny preset's: it exercises the latent-frame
    bookkeeping a stride-1 VAE never needs. `generator` overrides GeneratorConfig fields."""
    tiny = get_preset("tiny")
    vae = VAEConfig(base_dim=vae_base_dim, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
    dit = DiTConfig(
        dim=32,
        ffn_dim=64,
        num_heads=2,
        num_layers=2,
        freq_dim=16,
        text_dim=8,
        audio_feature_dim=tiny.dit.audio_feature_dim,
        audio_window=vae.temporal_stride + tiny.audio.context_frames + tiny.audio.lookahead_frames,
        audio_hidden=16,
    )
    gen = GeneratorConfig(**{"step_plan": (3, 2, 1), "window_frames": 3, "horizon_frames": 10, **generator})
    return tiny.model_copy(update={"dit": dit, "vae": vae, "generator": gen}).with_resolution(size, size)


def save_small_checkpoint(directory: Path, size: int = 64, seed: int = 0) -> Path:
    """A seeded random `small_preset` model as an avatar-render checkpoint directory (config.json + safetensors)."""
    from model.checkpoint import save_checkpoint
    from model.generator import AvatarModel

    # Frame 0 pinned and the portrait pasted back, as the bundled model renders; a threshold nothing reaches, so every
    # frame pastes and a resumed row that lost its portrait would differ from an uninterrupted one.
    preset = small_preset(size, pin_first_frame=True, paste_back=PasteBackConfig(threshold=1000.0))
    model = AvatarModel.random(preset, seed=seed)
    return save_checkpoint(directory, preset, {"dit": model.dit, "vae": model.vae})


def save_tiny_tokenizer(path: Path):
    """A word-level tokenizer in transformers' format (T5-style: every sequence ends with </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["a person talks to the camera", "a woman smiles and speaks slowly", "an old man reads a story"]
    words.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    words.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", words.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return tokenizer


def save_tiny_umt5(path: Path, vocab_size: int, d_model: int = UMT5_WIDTH) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
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
    UMT5EncoderModel(config).save_pretrained(path)


def save_tiny_wav2vec2(path: Path, hidden_size: int = 32, layers: int = 2) -> int:
    """A random wav2vec2 in transformers' format; returns the width of its OmniAvatar features."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(path)
    return hidden_size * (layers + 2)
