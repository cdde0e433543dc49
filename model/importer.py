"""Import open weights into one self-contained checkpoint directory (docs/models.md).

    avatar-render import livetalk --dit LiveTalk-1.3B-V0.1/model.safetensors \\
        --wan Wan2.1-T2V-1.3B-Diffusers --wav2vec2 wav2vec2-base-960h --out checkpoints/livetalk-1.3b

The directory holds everything a render needs (model/checkpoint.py): the DiT in our layout with its Preset, the VAE
(diffusers' `AutoencoderKLWan` from the Wan2.1 Diffusers directory, or Wan2.1's original `Wan2.1_VAE.pth` through
diffusers' name map), umT5 and its tokenizer, wav2vec2, and a manifest of every file with its size and sha256. It is
built next to `out` and renamed into place when complete, so a failed import leaves nothing half-written.

`import omniavatar` does the same for a LoRA-merged OmniAvatar-1.3B (the same key layout, bidirectional): the
teacher of model/train/ when distilling at this size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from model.checkpoint import (
    AUDIO_ENCODER_DIR,
    TEXT_ENCODER_DIR,
    TOKENIZER_DIR,
    CheckpointError,
    detect_layout,
    livetalk_key_hash,
    load_dit_weights,
    read_state_dict,
    save_checkpoint,
    write_manifest,
)
from model.config import Preset, get_preset
from model.dit import CausalWanDiT
from model.errors import ModelComponentError
from model.livetalk import preset_from_livetalk
from model.vae import WanVAE

WAN_HEAD_DIM = 128  # every Wan2.1 size uses 128-wide heads (1.3B: 1536 / 12, 14B: 5120 / 40)
LIVETALK_CHECKPOINT_HASH = "2bf9513c7a3e908015f11a800fc9b820"  # LiveTalk-1.3B-V0.1 / OmniAvatar-1.3B, key rule

Log = Callable[[str], None]


def livetalk_kwargs(state: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """LiveTalk's `CausalWanModel` constructor arguments, read off a state dict's shapes (heads: 128 wide unless
    given). The cache policy (local_attn_size 15, sink 9) is LiveTalk's inference setting, not in the weights."""
    try:
        patch = state["patch_embedding.weight"]
        dim, in_dim, *patch_size = patch.shape
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out_dim = state["head.head.weight"].shape[0] // (patch_size[0] * patch_size[1] * patch_size[2])
        kwargs = {
            "dim": dim,
            "in_dim": in_dim,
            "ffn_dim": state["blocks.0.ffn.0.weight"].shape[0],
            "out_dim": out_dim,
            "text_dim": state["text_embedding.0.weight"].shape[1],
            "freq_dim": state["time_embedding.0.weight"].shape[1],
            "eps": 1e-6,
            "patch_size": patch_size,
            "num_heads": num_heads or dim // WAN_HEAD_DIM,
            "num_layers": layers,
            "has_image_input": False,
            "use_audio": True,
            "audio_hidden_size": state["audio_proj.proj.weight"].shape[0],
            # AudioPack reads 4 video frames' features per latent frame (10752 wide for wav2vec2-base)
            "audio_feature_dim": state["audio_proj.proj.weight"].shape[1] // 4,
            "local_attn_size": 15,
            "sink_size": 9,
        }
    except KeyError as err:
        raise CheckpointError(f"not LiveTalk's / OmniAvatar's layout: no tensor {err}") from None
    if num_heads is None and dim % WAN_HEAD_DIM:
        raise CheckpointError(f"dim {dim} is not a multiple of {WAN_HEAD_DIM}: give the number of heads (--num-heads)")
    return kwargs


def livetalk_preset(
    state: dict[str, torch.Tensor], num_heads: int | None = None, height: int | None = None, width: int | None = None
) -> Preset:
    """The shipped `livetalk-1.3b` preset for the real checkpoint; the same mapping for any other size. The video
    size defaults to LiveTalk's 512x512."""
    shipped = get_preset("livetalk-1.3b")
    height, width = height or shipped.video.height, width or shipped.video.width
    if livetalk_key_hash(state) == LIVETALK_CHECKPOINT_HASH and num_heads in (None, 12):
        return shipped.with_resolution(height, width)
    return preset_from_livetalk(
        livetalk_kwargs(state, num_heads),
        frames_per_block=shipped.generator.frames_per_block,
        height=height,
        width=width,
        fps=shipped.video.fps,
    )


def teacher_preset(student: Preset) -> Preset:
    """OmniAvatar, the bidirectional teacher: the same network sampled with many Euler steps (its default 50)."""
    generator = student.generator.model_copy(update={"sampler": "euler", "step_plan": (50,)})
    name = "omniavatar-1.3b" if student.name == "livetalk-1.3b" else f"{student.name}-teacher"
    return student.model_copy(update={"name": name, "generator": generator})


def load_wan_vae(preset: Preset, wan_dir: Path | None, vae_pth: Path | None) -> WanVAE:
    """Wan2.1's VAE from the Diffusers directory's `vae/`, or from the original `Wan2.1_VAE.pth`."""
    if vae_pth is not None:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = read_state_dict(vae_pth)
        vae = WanVAE(preset.vae)
        converted = convert_wan_vae_to_diffusers(state)
        missing, unexpected = vae.model.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{vae_pth}: not Wan2.1's VAE layout "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        return vae
    path = Path(wan_dir) / "vae"
    if not (path / "config.json").exists():
        raise ModelComponentError(f"{path}: missing; --wan must be the Wan2.1-T2V-1.3B-Diffusers directory")
    vae = WanVAE.from_pretrained(path)
    if vae.config.z_dim != preset.vae.z_dim or vae.config.spatial_stride != preset.vae.spatial_stride:
        raise CheckpointError(f"{path}: a VAE of {vae.config.z_dim} channels / stride {vae.config.spatial_stride}, "
                              f"the DiT needs {preset.vae.z_dim} / {preset.vae.spatial_stride}")  # fmt: skip
    return vae.float()


def _place(source: Path, target: Path) -> None:
    """Hard-link a file (same filesystem, no copy of gigabytes), or copy it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _place_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file():
            _place(path, target / path.relative_to(source))


def _check_encoder_dir(path: Path, what: str, flag: str) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelComponentError(f"{path}: no config.json there; {flag} must be a transformers directory of {what}")
    return path


def import_livetalk(
    dit: str | os.PathLike,
    wan: str | os.PathLike | None,
    wav2vec2: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vae_pth: str | os.PathLike | None = None,
    teacher: bool = False,
    num_heads: int | None = None,
    height: int | None = None,
    width: int | None = None,
    force: bool = False,
    log: Log = print,
) -> Path:
    """Build the checkpoint directory `out` from LiveTalk's (or, `teacher`, OmniAvatar's) DiT, Wan2.1's VAE and
    umT5 (the Diffusers directory), and wav2vec2. Returns `out`."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists; pass --force to replace it")
    dit_path = Path(dit)
    log(f"reading {dit_path}")
    state = read_state_dict(dit_path)
    if detect_layout(state) != "livetalk":
        raise CheckpointError(f"{dit_path}: not LiveTalk's / OmniAvatar's layout (no audio_proj / audio_cond_projs)")
    student = livetalk_preset(state, num_heads, height, width)
    preset = teacher_preset(student) if teacher else student
    dtype = next(iter(state.values())).dtype
    network = CausalWanDiT(preset.dit).to(dtype)
    report = load_dit_weights(network, state, source=str(dit_path))  # strict: every key, every shape
    log(f"{report}: {sum(p.numel() for p in network.parameters()):,} parameters, preset {preset.name}")
    del state

    wan_dir = Path(wan) if wan is not None else None
    vae = load_wan_vae(preset, wan_dir, Path(vae_pth) if vae_pth else None)
    preset = preset.model_copy(update={"vae": vae.config})
    audio_dir = _check_encoder_dir(wav2vec2, "wav2vec2 (e.g. wav2vec2-base-960h)", "--wav2vec2")
    _check_audio_width(audio_dir, preset)
    if wan_dir is None:
        raise ModelComponentError("--wan is required: umT5 and its tokenizer come from the Wan2.1 Diffusers directory")
    text_dir = _check_encoder_dir(wan_dir / "text_encoder", "umT5", "--wan")
    _check_text_width(text_dir, preset)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log(f"writing {out}")
        source = {"dit": str(dit_path), "wan": str(wan_dir), "vae": str(vae_pth or wan_dir / "vae"),
                  "wav2vec2": str(audio_dir)}  # fmt: skip
        stage = "bidirectional teacher" if teacher else "causal student"
        save_checkpoint(staging, preset, {"dit": network, "vae": vae}, {"stage": stage, "source": source})
        _place_tree(text_dir, staging / TEXT_ENCODER_DIR)
        if (wan_dir / "tokenizer").is_dir():
            _place_tree(wan_dir / "tokenizer", staging / TOKENIZER_DIR)
        _place_tree(audio_dir, staging / AUDIO_ENCODER_DIR)
        manifest = write_manifest(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    total = sum(f["bytes"] for f in manifest["files"].values())
    log(f"imported {len(manifest['files'])} files, {total / 2**30:.2f} GiB, into {out}")
    return out


def _check_audio_width(audio_dir: Path, preset: Preset) -> None:
    config = json.loads((audio_dir / "config.json").read_text())
    width = config["hidden_size"] * (config["num_hidden_layers"] + 2)  # last hidden state + every hidden state
    if width != preset.dit.audio_feature_dim:
        raise ModelComponentError(
            f"{audio_dir}: its features are {width} wide, the DiT's AudioPack reads {preset.dit.audio_feature_dim} "
            "(wav2vec2-base: 14 x 768 = 10752)"
        )


def _check_text_width(text_dir: Path, preset: Preset) -> None:
    width = json.loads((text_dir / "config.json").read_text()).get("d_model")
    if width != preset.dit.text_dim:
        raise ModelComponentError(f"{text_dir}: umT5 of width {width}, the DiT reads {preset.dit.text_dim}")
