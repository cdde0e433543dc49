"""Checkpoints: our own format, Wan2.1's original layout and the diffusers layout.

- Ours: a directory with `config.json` (the whole `Preset`) and `model.safetensors` (keys `dit.*`, `vae.*`).
- Wan2.1 original: `blocks.N.self_attn.q.weight` ...; one .safetensors, sharded .safetensors with an
  `*.index.json`, or a .pth/.pt read with `torch.load(weights_only=True)`.
- diffusers (`WanTransformer3DModel`): `blocks.N.attn1.to_q.weight` ...; converted through `DIFFUSERS_TO_WAN`.

Loading is strict: missing, unexpected and mis-shaped keys raise one `CheckpointError` listing them all.
Conditioning modules absent from a plain Wan2.1 checkpoint are the one allowed gap: they stay zero (so the model is
exactly Wan2.1) and the returned `LoadReport` lists them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import Preset

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
    layout: str  # "avatar-render" | "wan" | "diffusers"
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


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in state):
        return "diffusers"
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
    config = json.loads(config_path.read_text())
    preset = Preset.model_validate(config.pop("preset"))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(directory / WEIGHTS_FILE).items():
        name, _, param = key.partition(".")
        modules.setdefault(name, {})[param] = value
    return preset, modules, config


def read_preset(directory: str | Path) -> Preset:
    """The preset a checkpoint was saved with, from its config.json alone: no weights are read."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: not an avatar-render checkpoint (no {CONFIG_FILE})")
    return Preset.model_validate(json.loads(config_path.read_text())["preset"])


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
