"""LiveTalk-1.3B exactness: our network and engine against tensors LiveTalk's and OmniAvatar's own code produced.

Every directory `tests/fixtures/livetalk*/` is a case (its README says what the tensors are and how they were made);
a new case is dropped in without a code change. Tolerance: max |ours - reference| / max |reference| < 1e-4 in
float32, feeding the reference's own noise and re-noise draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import livetalk_key_hash, load_dit_weights, wan_to_livetalk
from model.config import TextConfig, VAEConfig, get_preset
from model.dit import CausalWanDiT
from model.generator import AvatarModel, RenderSettings
from model.livetalk import preset_from_livetalk
from model.vae import WanVAE

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(p for p in FIXTURES.glob("livetalk*") if p.is_dir())
TOLERANCE = 1e-4
LIVETALK_1_3B_KEY_HASH = "2bf9513c7a3e908015f11a800fc9b820"  # LiveTalk's loader's rule on its real checkpoint


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


class Case:
    """One fixture directory: the reference's config, weights and tensors, and our model built from them."""

    def __init__(self, root: Path):
        self.root = root
        self.config = json.loads((root / "config.json").read_text())
        self.weights = load_file(root / "weights.safetensors")
        self.tensors = load_file(root / "tensors.safetensors")
        h, w = self.config["latent_hw"]
        # The VAE only turns latents into pixels, which these checks never look at: a small random one.
        vae = VAEConfig(base_dim=8, z_dim=self.config["model"]["out_dim"], num_res_blocks=1)
        text = self.tensors["text_context"]
        self.preset = preset_from_livetalk(
            self.config["model"],
            frames_per_block=self.config["frames_per_block"],
            height=h * vae.spatial_stride,
            width=w * vae.spatial_stride,
            vae=vae,
            text=TextConfig(encoder="none", max_length=text.shape[1]),
            shift=float(self.config["scheduler"]["shift"]),
            steps=int(self.config["scheduler"]["num_inference_steps"]),
        )
        self.dit = CausalWanDiT(self.preset.dit)
        load_dit_weights(self.dit, self.weights, source=str(root / "weights.safetensors"))
        self.dit.eval()

    @property
    def batch(self) -> int:
        return self.tensors["ref_latent"].shape[0]

    def cond(self, frames: int) -> torch.Tensor:
        """y = [reference latent repeated | mask], mask 0 at latent frame 0 and 1 after."""
        ref = self.tensors["ref_latent"]
        mask = torch.ones(ref.shape[0], 1, frames, *ref.shape[3:])
        mask[:, :, 0] = 0
        return torch.cat([ref.expand(-1, -1, frames, -1, -1), mask], dim=1)

    def packed_audio(self, frames: int) -> torch.Tensor:
        """Raw features (B, 4F-3, D) with 3 copies of the first in front, in groups of 4 per latent frame."""
        feats = self.tensors["audio_features"]
        padded = torch.cat([feats[:, :1].expand(-1, 3, -1), feats], dim=1)
        return padded[:, : 4 * frames].unflatten(1, (frames, 4))

    def forward(self, timesteps: torch.Tensor, **attention) -> torch.Tensor:
        """One full-sequence forward on `train.x` with the fixture's conditioning (reference | mask, raw audio)."""
        x = self.tensors["train.x"]
        frames = x.shape[2]
        text = self.dit.embed_text(self.tensors["text_context"])
        with torch.no_grad():
            return self.dit(x, timesteps, text, torch.arange(frames), self.cond(frames), self.packed_audio(frames),
                            **attention)  # fmt: skip

    def model(self) -> AvatarModel:
        model = AvatarModel(self.preset, self.dit, WanVAE(self.preset.vae), description=f"fixture {self.root.name}")
        model.text_encoder = FixtureText(model.dit.cfg.text_dim, self.tensors["text_context"])
        return model


class FixtureText:
    """The text encoder's output the reference used (a prompt embedding), for every prompt of the session's row."""

    def __init__(self, text_dim: int, context: torch.Tensor):
        self.context, self.row = context, 0

    def encode(self, prompt: str) -> torch.Tensor:
        row, self.row = self.row, (self.row + 1) % self.context.shape[0]
        return self.context[row : row + 1]


class Draws:
    """The reference's noise in the order our block loop draws it: a block's input noise, then its re-noise after
    every step but the last."""

    def __init__(self, case: Case, row: int):
        noise = case.tensors["loop.noise"][row : row + 1]  # (1, F, C, h, w)
        renoise = case.tensors["loop.renoise"][row : row + 1]  # (1, blocks * (steps - 1), n, C, h, w)
        n, blocks = case.config["frames_per_block"], case.config["blocks"]
        renoise_per_block = renoise.shape[1] // blocks
        self.queue = []
        for block in range(blocks):
            self.queue.append(noise[:, block * n : (block + 1) * n].permute(0, 2, 1, 3, 4))
            for step in range(renoise_per_block):
                self.queue.append(renoise[:, block * renoise_per_block + step].permute(0, 2, 1, 3, 4))

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        if not self.queue:  # past the reference's blocks: fresh noise
            return torch.randn(shape)
        draw = self.queue.pop(0)
        assert tuple(draw.shape) == shape, f"the loop drew {shape}, the reference {tuple(draw.shape)}"
        return draw.contiguous()


@pytest.fixture(scope="module", params=CASES, ids=[p.name for p in CASES])
def case(request) -> Case:
    return Case(request.param)


def test_schedule_matches_the_reference_timesteps(case):
    model = case.model()
    sigmas = model.schedule.sigmas(int(case.config["scheduler"]["num_inference_steps"]))
    ours = model.schedule.timestep(sigmas[:-1])
    assert torch.allclose(ours, torch.tensor(case.config["timesteps"]), rtol=0, atol=1e-4)
    assert torch.allclose(ours, case.tensors["loop.timesteps"], rtol=0, atol=1e-4)


def test_training_forward_matches(case):
    """LiveTalk's training mode: block-causal over 3-frame blocks, each block seeing the last local_attn_size frames."""
    frames, n = case.tensors["train.x"].shape[2], case.config["frames_per_block"]
    window = case.config["model"].get("local_attn_size", -1)
    out = case.forward(case.tensors["train.timesteps"], attention="block_causal", frame_groups=[n] * (frames // n),
                       window_frames=None if window == -1 else window)  # fmt: skip
    assert relative_error(out, case.tensors["train.out"]) < TOLERANCE


def test_teacher_forward_matches(case):
    """The same weights as OmniAvatar's bidirectional teacher: full attention, one timestep for the whole sample."""
    path = case.root / "teacher_tensors.safetensors"
    if not path.exists():
        pytest.skip(f"{case.root.name} has no teacher tensors")
    teacher = load_file(path)
    batch, _, frames = case.tensors["train.x"].shape[:3]
    out = case.forward(teacher["teacher.timestep"].view(-1, 1).expand(batch, frames))
    assert relative_error(out, teacher["teacher.out"]) < TOLERANCE


def render_latents(case: Case, blocks: int, extra_features: int = 0) -> tuple[list[torch.Tensor], list]:
    """Every batch row rendered by our engine, all rows in one batch, with the reference's draws; per row the
    latents (1, C, blocks * n, h, w), and the sessions."""
    from model.engine import Engine

    model = case.model()
    n = case.config["frames_per_block"]
    sessions, outputs = [], []
    for row in range(case.batch):
        session = model.open_latent(
            case.tensors["ref_latent"][row : row + 1], None, RenderSettings(), noise=Draws(case, row)
        )
        feats = case.tensors["audio_features"][row]
        if extra_features:
            feats = torch.cat([feats, torch.randn(extra_features, feats.shape[1])])
        session.feed_features(feats, total_frames=1 + 4 * (blocks * n - 1))
        sessions.append(session)
        outputs.append([])
    engine = Engine(model)
    latents: dict = {s: [] for s in sessions}
    for session in sessions:
        engine.add(session)
    with torch.no_grad():
        while engine.active:
            for session, block in engine.step():
                latents[session].append(block.latents)
    assert not engine.failures, engine.failures
    return [torch.cat(latents[s], dim=2) for s in sessions], sessions


def test_streaming_loop_matches(case):
    """The 4-step causal loop: re-noise sampling, frame 0 pinned to the portrait, clean cache writes at t = 0,
    LiveTalk's cache eviction (first sink_size frames kept), absolute RoPE positions, audio sliced per block."""
    blocks = case.config["blocks"]
    ours, _ = render_latents(case, blocks)
    reference = case.tensors["loop.latents"]  # (B, F, C, h, w)
    for row, latents in enumerate(ours):
        assert relative_error(latents, reference[row : row + 1].permute(0, 2, 1, 3, 4)) < TOLERANCE
        assert torch.equal(latents[:, :, :1], case.tensors["ref_latent"][row : row + 1])  # the pinned first frame


def test_render_past_the_rope_table_at_constant_memory(case):
    """Past LiveTalk's RoPE table (1024 latent frames, where its own loop stops) URCR takes over: positions stay in
    the table, the cache and the journal stay bounded, and the first blocks are still the LiveTalk-exact loop.
    (Latents only: decoding them is the VAE's business, tested on its own.)"""
    n = case.config["frames_per_block"]
    table = case.preset.dit.rope_max_positions
    blocks = table // n + 4  # a few blocks past the table
    video_frames = 1 + 4 * (blocks * n - 1)
    feats = case.tensors["audio_features"][0]
    feats = torch.cat([feats, torch.randn(video_frames - feats.shape[0], feats.shape[1])])
    session = case.model().open_latent(case.tensors["ref_latent"][:1], None, RenderSettings(), noise=Draws(case, 0))
    session.feed_features(feats)
    cache_bytes = session.cache.keys.numel()
    latents, positions = [], []
    with torch.no_grad():
        for _ in range(blocks):
            latents.append(session.next_latents())
            positions.append(session.cache.next_position)  # one past the last position written
            assert session.cache.keys.numel() == cache_bytes
            assert len(session.journal) <= table // n + 2  # the writes since the last reset, plus the sink's
    assert session.cache.resets >= 1 and max(positions) <= table
    exact = case.config["blocks"]
    reference = case.tensors["loop.latents"][:1].permute(0, 2, 1, 3, 4)
    assert relative_error(torch.cat(latents[:exact], dim=2), reference) < TOLERANCE
    assert all(torch.isfinite(x).all() for x in latents[-4:])


def test_wav2vec2_feature_path_matches(case, tmp_path):
    """OmniAvatar's wav2vec2 features on the fixture's tiny Wav2Vec2Config, with this project's transformers."""
    if not (case.root / "wav2vec2_config.json").exists():
        pytest.skip(f"{case.root.name} has no wav2vec2 tensors")
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from model.audio_features import OmniAvatarFeaturizer

    spec = json.loads((case.root / "wav2vec2_config.json").read_text())
    # Attention outputs are not part of the features (and newer transformers refuse them with SDPA).
    config = Wav2Vec2Config(**{k: v for k, v in spec["config"].items() if k != "output_attentions"})
    wav2vec2 = Wav2Vec2Model(config)
    wav2vec2.load_state_dict(load_file(case.root / "wav2vec2_weights.safetensors"), strict=True)
    wav2vec2.save_pretrained(tmp_path)
    featurizer = OmniAvatarFeaturizer(tmp_path, case.preset.audio, spec["fps"])
    tensors = load_file(case.root / "wav2vec2_tensors.safetensors")
    waveform = tensors["waveform"].numpy()
    assert np.array_equal(featurizer.input_values(waveform), tensors["input_values"][0].numpy())
    features = featurizer.encode(waveform, spec["seq_len"])
    assert features.shape == (spec["seq_len"], spec["feature_dim"]) == (spec["seq_len"], featurizer.feature_dim)
    assert relative_error(features, tensors["features"][0]) < TOLERANCE


def test_checkpoint_layout_loads_strictly_and_saves_back_key_for_key(case):
    back = wan_to_livetalk(case.dit.state_dict(), case.dit.cfg)
    assert list(sorted(back)) == list(sorted(case.weights))
    assert all(torch.equal(back[k], case.weights[k]) for k in case.weights)
    assert livetalk_key_hash(back) == livetalk_key_hash(case.weights)


def test_real_config_hashes_to_the_livetalk_checkpoint():
    """Our model of the real 1.3B config, built on the meta device and written in LiveTalk's layout, is the state
    dict LiveTalk's loader recognises: 857 tensors, 1,421,187,232 parameters, its key hash."""
    preset = get_preset("livetalk-1.3b")
    with torch.device("meta"):
        dit = CausalWanDiT(preset.dit)
    state = wan_to_livetalk(dit.state_dict(), preset.dit)
    assert len(state) == 857
    assert sum(v.numel() for v in state.values()) == 1_421_187_232
    assert livetalk_key_hash(state) == LIVETALK_1_3B_KEY_HASH
    with torch.device("meta"):
        again = CausalWanDiT(preset.dit)
    load_dit_weights(again, state, source="meta LiveTalk layout")  # strict: every key, every shape
