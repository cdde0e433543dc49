"""Training stages on a very small config: each learns, checkpoints, resumes; DMD rolls out through the generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.checkpoint import read_checkpoint
from model.config import DiTConfig, GeneratorConfig, Preset, VAEConfig, get_preset
from model.dit import CausalWanDiT
from model.generator import AvatarModel, RenderSettings
from model.train.data import DataConfig, LatentDataset, encode_clip, training_clips
from model.train.distill import DistillConfig, DistillStage
from model.train.loop import run_stage
from model.train.recipe import RecipeConfig, run_recipe
from model.train.student import StudentStage, student_from_teacher
from model.train.teacher import DiTTrainConfig, TeacherStage
from model.vae import WanVAE

SIZE = 16


def small_preset() -> Preset:
    tiny = get_preset("tiny")
    dit = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=8,
                    audio_feature_dim=tiny.dit.audio_feature_dim, audio_window=tiny.dit.audio_window, audio_hidden=16)
    vae = VAEConfig(base_dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
    gen = GeneratorConfig(step_plan=(3, 2, 1), window_frames=3, horizon_frames=10)
    return tiny.model_copy(update={"dit": dit, "vae": vae, "generator": gen,
                                   "video": tiny.video.model_copy(update={"height": SIZE, "width": SIZE})})


DATA = DataConfig(num_clips=2, seconds=2.4, num_identities=2, num_speakers=2)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    preset = small_preset()
    clips = training_clips(DATA, SIZE)
    vae = WanVAE(preset.vae).eval()
    dataset = LatentDataset([encode_clip(c, vae, preset) for c in clips])
    return preset, clips, vae, dataset


def test_data_matches_the_generators_audio_and_shapes(setup):
    preset, clips, vae, dataset = setup
    clip, encoded = clips[0], dataset.clips[0]
    frames = len(clip.frames)
    assert encoded.latents.shape[1] == 1 + (frames - 1) // preset.vae.temporal_stride
    assert encoded.audio.shape == (encoded.latents.shape[1], preset.dit.audio_window, preset.dit.audio_feature_dim)
    # The generator's audio for its second block is the dataset's, row for row.
    model = AvatarModel(preset, CausalWanDiT(preset.dit), vae, description="test")
    session = model.open(clip.portrait, None, RenderSettings())
    session.feed_audio(clip.audio, final=True)
    n = preset.generator.frames_per_block
    assert torch.allclose(session._audio_features(n, n)[0], encoded.audio[n:2 * n])
    assert torch.allclose(encoded.reference, vae.encode(
        torch.from_numpy(clip.portrait).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1)[0])
    # Held-out seeds never overlap training seeds.
    assert DATA.eval_identity_base > DATA.identity_base + DATA.num_identities


def test_teacher_and_student_learn_and_resume(setup, tmp_path):
    preset, _, _, dataset = setup
    cfg = DiTTrainConfig(batch=4, lr=3e-3)
    torch.manual_seed(0)
    teacher = CausalWanDiT(preset.dit)
    summary = run_stage(TeacherStage(teacher, dataset, preset, cfg), tmp_path, max_steps=16, checkpoint_every=8,
                        log=lambda *_: None)
    history = torch.load(tmp_path / "teacher" / "checkpoint.pt", weights_only=False)["history"]
    first, last = np.mean([h["flow"] for h in history[:5]]), np.mean([h["flow"] for h in history[-5:]])
    assert summary["steps"] == 16 and last < first
    assert (tmp_path / "teacher" / "losses.png").stat().st_size > 1000

    # Resume: a stage stopped at 4 steps continues from its checkpoint to 6, not from 0.
    student = student_from_teacher(teacher)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    run_stage(StudentStage(student, dataset, preset, cfg), tmp_path, max_steps=4, checkpoint_every=2,
              log=lambda *_: None)
    (tmp_path / "student" / "done.json").unlink()
    fresh = student_from_teacher(teacher)
    summary = run_stage(StudentStage(fresh, dataset, preset, cfg), tmp_path, max_steps=6, log=lambda *_: None)
    history = torch.load(tmp_path / "student" / "checkpoint.pt", weights_only=False)["history"]
    assert summary["steps"] == 6 and [h["step"] for h in history] == list(range(1, 7))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), teacher.parameters()))


def test_distillation_rolls_out_through_the_generator_with_resets(setup, tmp_path):
    preset, clips, vae, _ = setup
    teacher = CausalWanDiT(preset.dit)
    student = student_from_teacher(teacher)
    stage = DistillStage(student, teacher, vae, clips, preset, DistillConfig(rollout_blocks=4, lr=1e-3))
    before = [p.detach().clone() for p in student.parameters()]
    calls = []
    original = student.forward

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attention"), torch.is_grad_enabled()))
        return original(*args, **kwargs)

    student.forward = spy
    try:
        losses = stage.step(0)
    finally:
        del student.forward
    assert losses["resets"] >= 1  # 4 blocks of 3 pass a horizon of 10: URCR inside the rollout
    assert {a for a, _ in calls} == {"streaming"}  # the student only ran through the generator's cache path
    assert sum(g for _, g in calls) == 4  # one exit step with gradients per block
    assert np.isfinite(losses["dmd"]) and np.isfinite(losses["critic"])
    # The critic starts as the teacher, so the first DMD gradient is zero; once the critic has learned, it is not.
    stage.step(1)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(not p.requires_grad for p in stage.teacher.parameters())


def test_recipe_ships_a_loadable_model(tmp_path):
    cfg = RecipeConfig(data=DATA, vae=dict(batch=1), dit=dict(batch=2), distill=dict(rollout_blocks=4),
                       max_steps={"vae": 2, "teacher": 2, "student": 2, "distill": 1})
    ship = tmp_path / "ship"
    run_recipe(tmp_path / "run", small_preset(), cfg, ship_to=ship, command="test", log=lambda *_: None)
    preset, modules, extra = read_checkpoint(ship)
    assert preset.generator.sampler == "renoise" and set(modules) == {"dit", "vae"}
    assert "| distill | 1 |" in (ship / "MODEL_CARD.md").read_text()
    model = AvatarModel.load(ship)
    session = model.open(np.zeros((SIZE, SIZE, 3), np.uint8))
    session.feed_audio(np.zeros(16000, np.float32), final=True)
    assert sum(len(b.frames) for b in session) == 25
    # Re-running resumes: every stage is already done and nothing is retrained.
    result = run_recipe(tmp_path / "run", small_preset(), cfg, ship_to=None, log=lambda *_: None)
    assert json.loads((tmp_path / "run" / "vae" / "done.json").read_text())["steps"] == 2
    assert result["stages"]["teacher"]["steps"] == 2


def test_teacher_step_under_ray_train_with_two_workers(ray_cluster, tmp_path):
    from model.train.ray_train import train_with_ray

    data = DataConfig(num_clips=1, seconds=1.2, num_identities=1, num_speakers=1)
    train_with_ray("teacher", small_preset(), data, DiTTrainConfig(batch=2), steps=2, num_workers=2, out=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    # Different batches on each worker, yet DDP keeps the weights identical.
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)
    assert ranks[0]["flow"] != ranks[1]["flow"]
    state = torch.load(tmp_path / "teacher_dit.pt", weights_only=True)
    assert set(state) == set(CausalWanDiT(small_preset().dit).state_dict())
