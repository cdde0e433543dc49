"""Text prompt -> umT5 embeddings (DESIGN 3.2), computed once per prompt and cached.

As Wan2.1 does, the real tokens' embeddings are kept and every position past the prompt's length is
zero, so the (1, max_length, d_model) context does not depend on what the pad token embeds to.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import NamedTuple

import torch

from model.config import Preset


class CacheInfo(NamedTuple):
    """Same fields as functools.lru_cache's cache_info()."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class _PromptCache:
    """A small LRU map prompt -> embedding with functools-style hit/miss statistics."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, prompt: str) -> torch.Tensor | None:
        if prompt in self._items:
            self.hits += 1
            self._items.move_to_end(prompt)
            return self._items[prompt]
        self.misses += 1
        return None

    def put(self, prompt: str, value: torch.Tensor) -> None:
        self._items[prompt] = value
        self._items.move_to_end(prompt)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, self.maxsize, len(self._items))

    def clear(self) -> None:
        self._items.clear()
        self.hits = self.misses = 0


class TextEncoder:
    """umT5 encoder + tokenizer loaded from local directories (transformers format; never the hub). The tokenizer
    lives beside the weights, or in its own directory (diffusers' `text_encoder/` + `tokenizer/`)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        max_length: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 64,
        tokenizer_dir: str | os.PathLike | None = None,
    ):
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_dir = os.fspath(model_dir)
        tokenizer_dir = os.fspath(tokenizer_dir) if tokenizer_dir is not None else model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.max_length = max_length
        self.text_dim = self.model.config.d_model
        self._cache = _PromptCache(cache_size)

    @torch.no_grad()
    def _encode_uncached(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Zero every position past the prompt's real tokens (Wan2.1's `[u[:len] ...]` then zero-pad).
        return (hidden * mask[..., None].to(hidden.dtype)).to(self.dtype)

    def encode(self, prompt: str) -> torch.Tensor:
        """(1, max_length, d_model) embeddings of `prompt`; positions past its tokens are exactly zero."""
        cached = self._cache.get(prompt)
        if cached is None:
            cached = self._encode_uncached(prompt)
            self._cache.put(prompt, cached)
        return cached.clone()  # callers may edit their copy without corrupting the cache

    __call__ = encode

    def cache_info(self) -> CacheInfo:
        return self._cache.info()

    def cache_clear(self) -> None:
        self._cache.clear()


class NullTextEncoder:
    """For presets without a text encoder: every prompt embeds to zeros of the expected shape."""

    def __init__(
        self, text_dim: int, max_length: int = 1, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        self.text_dim, self.max_length = text_dim, max_length
        self.device, self.dtype = torch.device(device), dtype
        self._calls = 0

    def encode(self, prompt: str) -> torch.Tensor:
        self._calls += 1
        return torch.zeros(1, self.max_length, self.text_dim, device=self.device, dtype=self.dtype)

    __call__ = encode

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._calls, 0, 0, 0)  # nothing to compute, so every call is a hit

    def cache_clear(self) -> None:
        self._calls = 0


def build_text_encoder(
    preset: Preset,
    model_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder | NullTextEncoder:
    """The text encoder a preset asks for; umT5 needs the local directory of its weights and tokenizer."""
    if preset.text.encoder == "none":
        return NullTextEncoder(preset.dit.text_dim, preset.text.max_length, device, dtype)
    if model_dir is None:
        raise ValueError(f"preset {preset.name!r} uses umT5: pass the directory of its weights and tokenizer")
    encoder = TextEncoder(model_dir, preset.text.max_length, device, dtype)
    if encoder.text_dim != preset.dit.text_dim:
        raise ValueError(f"umT5 d_model {encoder.text_dim} != preset {preset.name!r} text_dim {preset.dit.text_dim}")
    return encoder
