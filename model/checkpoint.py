"""Checkpoints: our own format, Wan2.1's original layout and the diffusers layout.

- Ours: a directory with `config.json` (the whole `Preset`) and `model.safetensors` (keys `dit.*`, `vae.*`).
- Wan2.1 original: `blocks.N.self_attn.q.weight` ...; one .safetensors, sharded .safetensors with an
  `*.index.json`, or a .pth/.pt read with `torch.load(weights_only=True)`.
- diffusers (`WanTransformer3DModel`): `blocks.N.attn1.to_q.weight` ...; converted through `DIFFUSERS_TO_WAN`.
- LiveTalk / OmniAvatar (`CausalWanModel`, `OmniAvatarWanModel`): Wan2.1's names, one 33-channel `patch_embedding`
  (noisy latent | reference latent | mask), `audio_proj.{proj,norm_out}` (AudioPack) and `audio_cond_projs.i` (the
  projection before layer `audio_layers[0] + i`); converted by `livetalk_to_wan` / `wan_to_livetalk`.

Loading is strict: missing, unexpected and mis-shaped keys raise one `CheckpointError` listing them all.
Conditioning modules absent from a plain Wan2.1 checkpoint are the one allowed gap: they stay zero (so the model is
exactly Wan2.1) and the returned `LoadReport` lists them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import DiTConfig, Preset
from model.errors import ModelComponentError

# (diffusers pattern, Wan2.1 original replacement); applied to the part of the key after "blocks.N." or at the top.
_BLOCK_MAP = [
    ("attn1.to_q.", "self_attn.q."),
    ("attn1.to_k.", "self_attn.k."),
    ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn1.norm_q.", "self_attn.norm_q."),
    ("attn1.norm_k.", "self_attn.norm_k."),
    ("attn2.to_q.", "cross_attn.q."),
    ("attn2.to_k.", "cross_attn.k."),
    ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."),
    ("attn2.norm_q.", "cross_attn.norm_q."),
    ("attn2.norm_k.", "cross_attn.norm_k."),
    ("norm2.", "norm3."),  # diffusers' norm2 is the cross-attention norm, Wan's norm3
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
]
_TOP_MAP = [
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
    ("patch_embedding.", "patch_embedding."),
]
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")


class CheckpointError(ValueError):
    pass


@dataclass
class LoadReport:
    source: str
    layout: str  # "avatar-render" | "wan" | "diffusers" | "livetalk"
    absent_conditioning: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"loaded {self.layout} checkpoint {self.source}"
        if self.absent_conditioning:
            text += (
                f"; {len(self.absent_conditioning)} conditioning tensors absent, left at zero init "
                f"(the model behaves as plain Wan2.1 until trained)"
            )
        return text


def _convert_key(key: str, table_block: list[tuple[str, str]], table_top: list[tuple[str, str]]) -> str:
    m = _BLOCK_KEY.match(key)
    if m:
        index, rest = m.groups()
        for src, dst in table_block:
            if rest.startswith(src):
                return f"blocks.{index}.{dst}{rest[len(src) :]}"
        return key
    for src, dst in table_top:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def diffusers_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_convert_key(k, _BLOCK_MAP, _TOP_MAP): v for k, v in state.items()}


def wan_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    block = [(dst, src) for src, dst in _BLOCK_MAP]
    top = [(dst, src) for src, dst in _TOP_MAP]
    # "head.modulation" must map before any shorter prefix; the table order already guarantees it.
    return {_convert_key(k, block, top): v for k, v in state.items()}


# -- LiveTalk / OmniAvatar ----------------------------------------------------------------------------------------

_LIVETALK_AUDIO_NAMES = [("audio_proj.proj.", "audio_encoder.proj."), ("audio_proj.norm_out.", "audio_encoder.norm.")]
_AUDIO_COND = re.compile(r"^audio_cond_projs\.(\d+)\.(.*)$")
_BLOCK_AUDIO = re.compile(r"^blocks\.(\d+)\.audio_proj\.(.*)$")


def livetalk_to_wan(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """LiveTalk's layout -> ours: the 33-channel patch embedding split into the latent's and the conditioning's
    (`cond_embedding`, no bias: the one bias stays with `patch_embedding`), the audio modules renamed."""
    first_audio_layer = cfg.audio_layer_range.start
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _AUDIO_COND.match(key)
        if key == "patch_embedding.weight":
            out["patch_embedding.weight"] = value[:, : cfg.latent_channels]
            out["cond_embedding.weight"] = value[:, cfg.latent_channels :]
        elif m:
            out[f"blocks.{first_audio_layer + int(m.group(1))}.audio_proj.{m.group(2)}"] = value
        else:
            out[_convert_key(key, [], _LIVETALK_AUDIO_NAMES)] = value
    return out


def wan_to_livetalk(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Ours -> LiveTalk's layout (the inverse of `livetalk_to_wan`, key for key)."""
    first_audio_layer = cfg.audio_layer_range.start
    renames = [(ours, theirs) for theirs, ours in _LIVETALK_AUDIO_NAMES]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_AUDIO.match(key)
        if key == "cond_embedding.weight":
            continue
        if key == "patch_embedding.weight":
            out[key] = torch.cat([value, state["cond_embedding.weight"].to(value.dtype)], dim=1)
        elif m:
            out[f"audio_cond_projs.{int(m.group(1)) - first_audio_layer}.{m.group(2)}"] = value
        else:
            out[_convert_key(key, [], renames)] = value
    return out


def livetalk_key_hash(state: dict[str, torch.Tensor]) -> str:
    """The rule LiveTalk's loader uses to recognise its checkpoint: md5 of the sorted keys and `key:shape` strings."""
    keys = list(state)
    shapes = [f"{k}:{'_'.join(str(d) for d in state[k].shape)}" for k in keys]
    return hashlib.md5(",".join(sorted(keys + shapes)).encode()).hexdigest()


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in state):
        return "diffusers"
    if any(k.startswith(("audio_cond_projs.", "audio_proj.")) for k in state):
        return "livetalk"
    return "wan"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read raw tensors from a .safetensors file, a sharded index, a directory holding either, or a .pth."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if indexes:
            path = indexes[0]
        elif len(files) == 1:
            path = files[0]
        else:
            raise CheckpointError(
                f"{path}: expected one .safetensors file or an *.index.json, found {[f.name for f in files]}"
            )
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(path.parent / shard))
        missing = set(weight_map) - set(state)
        if missing:
            raise CheckpointError(f"{path}: shards lack keys listed in the index: {sorted(missing)}")
        return state
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise CheckpointError(f"{path}: unknown checkpoint format (want .safetensors, *.index.json, .pth or a directory)")


def load_dit_weights(
    dit: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str = "<state dict>", strict: bool = True
) -> LoadReport:
    """Load Wan2.1-original or diffusers-layout tensors into a CausalWanDiT, strictly."""
    layout = detect_layout(state)
    if layout == "diffusers":
        state = diffusers_to_wan(state)
    elif layout == "livetalk":
        state = livetalk_to_wan(state, dit.cfg)
    own = dit.state_dict()
    missing = [k for k in own if k not in state]
    absent_conditioning = [k for k in missing if dit.is_conditioning_param(k)]
    missing = [k for k in missing if not dit.is_conditioning_param(k)]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): {misshaped}")
    if problems and strict:
        raise CheckpointError(f"{source}: cannot load into {type(dit).__name__}: " + "; ".join(problems))
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    dit.load_state_dict(loadable, strict=False)
    return LoadReport(source=source, layout=layout, absent_conditioning=absent_conditioning)


def load_wan_checkpoint(dit: torch.nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    return load_dit_weights(dit, read_state_dict(path), source=str(path), strict=strict)


# -- our own format -------------------------------------------------------------------------------------------

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_CONFIG_BYTES = 1024 * 1024  # config.json and MANIFEST.json: a few KB each; anything larger is not ours


def save_checkpoint(
    directory: str | Path, preset: Preset, modules: dict[str, torch.nn.Module], extra: dict | None = None
) -> Path:
    """Write `config.json` + `model.safetensors` with keys `<module name>.<param>` (e.g. `dit.`, `vae.`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{k}": v.detach().contiguous().cpu() for name, m in modules.items() for k, v in m.state_dict().items()
    }
    save_file(tensors, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(
        json.dumps({"preset": preset.model_dump(mode="json"), **(extra or {})}, indent=2)
    )
    return directory


def read_checkpoint(directory: str | Path) -> tuple[Preset, dict[str, dict[str, torch.Tensor]], dict]:
    """Our format -> (preset, {module name: state dict}, the rest of config.json)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: not an avatar-render checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(read_small_file(config_path))
        preset = Preset.model_validate(config.pop("preset"))
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"{config_path}: not a valid avatar-render config ({err}); re-import the checkpoint"
        ) from None
    if not (directory / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: missing; re-import the checkpoint")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(directory / WEIGHTS_FILE).items():
        name, _, param = key.partition(".")
        modules.setdefault(name, {})[param] = value
    return preset, modules, config


def read_preset(directory: str | Path) -> Preset:
    """The preset a checkpoint was saved with, from its config.json alone: no weights are read."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.exists():
        raise ModelComponentError(f"{directory}: not an avatar-render checkpoint directory (no {CONFIG_FILE})")
    return preset_from_config(read_small_file(config_path), str(config_path))


def preset_from_config(text: str | bytes, source: str) -> Preset:
    """The Preset inside a checkpoint's config.json text; a clear error naming `source` if it is not one."""
    try:
        return Preset.model_validate(json.loads(text)["preset"])
    except (ValueError, KeyError, TypeError) as err:
        raise ModelComponentError(
            f"{source}: not a valid avatar-render config ({err}); re-import the checkpoint"
        ) from None


def read_small_file(path: str | Path) -> bytes:
    """A checkpoint's own JSON file (config.json, MANIFEST.json): a regular file of at most MAX_CONFIG_BYTES, opened
    without blocking, so a FIFO or a device in its place is refused instead of waited on or read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ModelComponentError(f"{path}: cannot open ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelComponentError(f"{path}: not a regular file")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelComponentError(f"{path}: larger than the limit of {MAX_CONFIG_BYTES} bytes; not a checkpoint's file")
    return data


def check_files_inside(directory: str | Path) -> None:
    """Every entry of a local checkpoint directory resolves inside it and every file is a regular one: a symbolic
    link out of the directory (to another tenant's file, to /dev/zero) or a FIFO is one `ModelComponentError`
    naming it, before anything of the checkpoint is read."""
    root = os.path.realpath(directory)
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(parent, name)
            real = os.path.realpath(path)
            if real != root and not real.startswith(root + os.sep):
                raise ModelComponentError(f"{path}: leads out of the checkpoint directory {root} (a symbolic link)")
            if name in files and not os.path.isfile(real):
                raise ModelComponentError(f"{path}: not a regular file (a FIFO, a device or a broken link)")


def load_module_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {keys}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source}: cannot load into {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state)


# -- self-contained checkpoint directories ------------------------------------------------------------------------
#
#   config.json, model.safetensors   ours: the Preset, and the DiT (`dit.*`) and VAE (`vae.*`) weights
#   text_encoder/, tokenizer/        umT5 and its tokenizer, transformers' format (presets that encode prompts)
#   wav2vec2/                        wav2vec2, transformers' format (presets whose audio encoder is wav2vec2)
#   MANIFEST.json                    every file of the directory with its size in bytes and sha256

TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
AUDIO_ENCODER_DIR = "wav2vec2"
MANIFEST_FILE = "MANIFEST.json"
_HASH_CHUNK = 16 * 1024 * 1024


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> dict:
    """List every file under `directory` (but the manifest) with its size and sha256, in MANIFEST.json."""
    directory = Path(directory)
    files = {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    manifest = {"files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        return json.loads(read_small_file(path))
    except ValueError as err:
        raise ModelComponentError(f"{path}: not valid JSON ({err}); re-import the checkpoint") from None


def verify_checkpoint(directory: str | Path, *, hashes: bool = False) -> None:
    """Every file the manifest lists is there with its size (and with `hashes`, its sha256); one error naming the
    first file that is not. A directory without a manifest (trained here, not imported) is not checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ModelComponentError(f"{path}: missing from the checkpoint (listed in {MANIFEST_FILE}); re-import it")
        if path.stat().st_size != entry["bytes"]:
            raise ModelComponentError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or replaced); "
                "re-import or re-download the checkpoint"
            )
        if hashes and sha256_file(path) != entry["sha256"]:
            raise ModelComponentError(f"{path}: sha256 differs from {MANIFEST_FILE} (corrupt); re-download it")


@dataclass
class Components:
    """Where a checkpoint directory keeps the encoders its preset needs (None: not there, or not needed)."""

    audio_dir: Path | None
    text_dir: Path | None
    tokenizer_dir: Path | None


def checkpoint_components(directory: str | Path, preset: Preset) -> Components:
    """The encoder directories a checkpoint holds for its preset."""
    directory = Path(directory)

    def present(name: str) -> Path | None:
        return directory / name if (directory / name / "config.json").exists() else None

    audio = present(AUDIO_ENCODER_DIR) if preset.audio.encoder != "logmel" else None
    text = present(TEXT_ENCODER_DIR) if preset.text.encoder == "umt5" else None
    tokenizer = directory / TOKENIZER_DIR if text and (directory / TOKENIZER_DIR).is_dir() else text
    return Components(audio, text, tokenizer)


def missing_encoder(where: str, preset: Preset, *, audio: bool, text: bool) -> ModelComponentError | None:
    """The error for a model without the encoders its preset needs (`audio` / `text`: whether each is there)."""
    advice = "build a checkpoint with `avatar-render import livetalk ...` (docs/models.md)"
    if preset.audio.encoder != "logmel" and not audio:
        return ModelComponentError(f"{where}: no wav2vec2 audio encoder ({AUDIO_ENCODER_DIR}/), which preset "
                                   f"{preset.name!r} reads speech with; {advice}")  # fmt: skip
    if preset.text.encoder == "umt5" and not text:
        return ModelComponentError(f"{where}: no umT5 text encoder ({TEXT_ENCODER_DIR}/), which preset "
                                   f"{preset.name!r} encodes prompts with; {advice}")  # fmt: skip
    return None


def require_components(directory: str | Path | None, preset: Preset) -> None:
    """Raise one `ModelComponentError` if the encoders `preset` needs are not in the checkpoint `directory` (None: a
    model with no checkpoint, which has none)."""
    parts = checkpoint_components(directory, preset) if directory is not None else Components(None, None, None)
    where = str(directory) if directory is not None else f"preset {preset.name!r} (no checkpoint)"
    error = missing_encoder(where, preset, audio=parts.audio_dir is not None, text=parts.text_dir is not None)
    if error is not None:
        raise error
