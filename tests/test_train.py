"""Training stages on a very small config: each learns, checkpoints, resumes; DMD rolls out through the generator."""

from __future__ import annotations

import functools
import json

import model_parts
import numpy as np
import pytest
import torch

from model.checkpoint import read_checkpoint
from model.config import DeflickerConfig, PasteBackConfig
from model.dit import CausalWanDiT
from model.engine import run_block
from model.eval import metrics
from model.eval.heldout import HELD_OUT, VALIDATION, drift_check, window_is_worse
from model.generator import AvatarModel, RenderSettings
from model.train.data import DataConfig, LatentDataset, clip_speech, encode_clip, training_clips
from model.train.distill import DistillConfig, DistillStage
from model.train.loop import run_stage
from model.train.recipe import RecipeConfig, run_recipe
from model.train.student import StudentStage, student_from_teacher
from model.train.teacher import DiTTrainConfig, TeacherStage, sample_teacher
from model.train.vae import VAEStage, VAETrainConfig, latent_statistics
from model.vae import WanVAE, residual_temporal_convs

SIZE = 16


# The suite's small model with a VAE of base_dim 4: a training step of each stage runs in a fraction of a second.
small_preset = functools.partial(model_parts.small_preset, SIZE, vae_base_dim=4)


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
    assert torch.allclose(session._audio_features(n, n)[0], encoded.audio[n : 2 * n])
    assert torch.allclose(
        encoded.reference,
        vae.encode(torch.from_numpy(clip.portrait).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1)[0],
    )
    # Held-out seeds never overlap training seeds.
    default = DataConfig()
    assert HELD_OUT.identity_base > default.identity_base + default.num_identities
    assert HELD_OUT.speaker_base > default.speaker_base + default.num_speakers
    assert HELD_OUT.content_base > default.data_seed * 100_000 + default.num_clips
    # ...nor the validation seeds (every choice made in training is made on those), and no training config reaches
    # either.
    for name in ("identity_base", "speaker_base", "content_base"):
        assert getattr(HELD_OUT, name) >= getattr(VALIDATION, name) + 100_000
    with pytest.raises(ValueError, match="training content seeds reach 10000000, into the evaluation seeds"):
        DataConfig(data_seed=100, num_clips=1)
    with pytest.raises(ValueError, match="identity seeds"):
        DataConfig(identity_base=VALIDATION.identity_base - 5, num_identities=10)


def test_training_data_mixes_espeak_speech_in_by_clip_seed():
    half = DataConfig(num_clips=64, espeak_fraction=0.5)
    kinds = [clip_speech(half, i) for i in range(half.num_clips)]
    assert 20 < kinds.count("espeak") < 44 and kinds == [clip_speech(half, i) for i in range(half.num_clips)]
    # A clip's speech is drawn from its own seed: more clips or another share keep the others' draws in order.
    assert kinds[:32] == [clip_speech(half.model_copy(update={"num_clips": 32}), i) for i in range(32)]
    assert {clip_speech(DataConfig(), i) for i in range(64)} == {"formant"}
    assert {clip_speech(DataConfig(espeak_fraction=1.0), i) for i in range(64)} == {"espeak"}
    # The clips made are what the draw says: espeak-ng's, with its phones driving the mouth.
    data = DataConfig(num_clips=2, seconds=1.2, num_identities=1, num_speakers=1, espeak_fraction=1.0)
    clips = training_clips(data, 32)
    assert [c.truth["speech"] for c in clips] == ["espeak", "espeak"]
    assert all(max(c.truth["frames"]["opening"]) > 0.2 for c in clips)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        DataConfig(espeak_fraction=1.5)


def test_teacher_and_student_learn_and_resume(setup, tmp_path):
    preset, _, _, dataset = setup
    cfg = DiTTrainConfig(batch=4, lr=3e-3)
    torch.manual_seed(0)
    teacher = CausalWanDiT(preset.dit)
    summary = run_stage(
        TeacherStage(teacher, dataset, preset, cfg), tmp_path, max_steps=16, checkpoint_every=8, log=lambda *_: None
    )
    history = torch.load(tmp_path / "teacher" / "checkpoint.pt", weights_only=True)["history"]
    first, last = np.mean([h["flow"] for h in history[:5]]), np.mean([h["flow"] for h in history[-5:]])
    assert summary["steps"] == 16 and last < first
    assert (tmp_path / "teacher" / "losses.png").stat().st_size > 1000

    # Resume: a stage stopped at 4 steps continues from its checkpoint to 6, not from 0.
    student = student_from_teacher(teacher)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    run_stage(
        StudentStage(student, dataset, preset, cfg), tmp_path, max_steps=4, checkpoint_every=2, log=lambda *_: None
    )
    (tmp_path / "student" / "done.json").unlink()
    fresh = student_from_teacher(teacher)
    summary = run_stage(StudentStage(fresh, dataset, preset, cfg), tmp_path, max_steps=6, log=lambda *_: None)
    history = torch.load(tmp_path / "student" / "checkpoint.pt", weights_only=True)["history"]
    assert summary["steps"] == 6 and [h["step"] for h in history] == list(range(1, 7))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), teacher.parameters()))
    # Finished at its cap: the same cap skips it, a higher one continues it.
    again = StudentStage(student_from_teacher(teacher), dataset, preset, cfg)
    assert run_stage(again, tmp_path, max_steps=6, log=lambda *_: None)["steps"] == 6
    summary = run_stage(again, tmp_path, max_steps=8, log=lambda *_: None)
    history = torch.load(tmp_path / "student" / "checkpoint.pt", weights_only=True)["history"]
    assert summary["steps"] == 8 and [h["step"] for h in history] == list(range(1, 9))


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


def test_training_sees_the_pinned_first_frame_as_the_generator_makes_it(setup):
    """pin_first_frame: block 0's latent frame 0 is the portrait's latent, clean, at the block's timestep, without
    loss, in the teacher's and student's windows and in DMD rollouts."""
    from model.train.common import SinkDenoiser, flow_matching_loss, pin_first_frames
    from model.train.teacher import sample_windows

    preset, clips, vae, dataset = setup
    pinned = preset.model_copy(update={"generator": preset.generator.model_copy(update={"pin_first_frame": True})})
    torch.manual_seed(0)
    dit = CausalWanDiT(pinned.dit)
    seen = []

    class Spy(SinkDenoiser):
        def forward(self, noisy, *args, **kwargs):
            seen.append(noisy.detach().clone())
            return super().forward(noisy, *args, **kwargs)

    denoiser = Spy(dit, pinned.text.max_length)
    stage = TeacherStage(dit, dataset, pinned, DiTTrainConfig(batch=2, first_block_fraction=1.0), model=denoiser)
    batch, first_position, starts = sample_windows(stage, 6)
    assert starts and first_position == pinned.generator.sink_frames
    assert torch.equal(batch.latents[:, :, 0], batch.reference[:, :, 0])  # the portrait's latent, not the clip's
    sigmas = torch.full((2, 6), 0.7)
    torch.manual_seed(1)
    loss = flow_matching_loss(denoiser, stage.schedule, batch.latents, sigmas, batch.reference, batch.audio, 1,
                              pinned_first=True)  # fmt: skip
    assert torch.equal(seen[-1][:, :, 0], batch.latents[:, :, 0])  # given clean...
    assert not torch.allclose(seen[-1][:, :, 1], batch.latents[:, :, 1])  # ...the others noised
    # No loss on the pinned frame: whatever the data says there, the loss is the same.
    other = batch.latents.clone()
    other[:, :, 0] += 5.0
    torch.manual_seed(1)
    again = flow_matching_loss(
        lambda noisy, *a: denoiser(torch.cat([batch.latents[:, :, :1], noisy[:, :, 1:]], dim=2), *a),
        stage.schedule, other, sigmas, batch.reference, batch.audio, 1, pinned_first=True,
    )  # fmt: skip
    assert again.item() == pytest.approx(loss.item(), rel=1e-5)
    assert torch.equal(pin_first_frames(batch.latents, batch.reference), batch.latents)

    # DMD: the rollout's block 0 starts with the portrait's latent; the step trains on the other frames.
    teacher = CausalWanDiT(pinned.dit)
    distill = DistillStage(student_from_teacher(teacher), teacher, vae, clips, pinned, DistillConfig(rollout_blocks=2))
    latents, reference, _ = distill.rollout()
    assert torch.allclose(latents[:, :, 0], reference[:, :, 0])
    assert distill.pinned(slice(0, 6)) and not distill.pinned(slice(6, 12))
    assert np.isfinite(distill.step(0)["dmd"])


def test_the_generator_pins_the_latent_that_training_pins(setup):
    """pin_first_frame at inference: every denoising pass of block 0 sees, at latent frame 0, exactly the latent that
    training puts there for the same portrait (the dataset's reference), and block 0 comes out with it; block 1's
    passes do not (spied on the session's passes)."""
    preset, clips, vae, dataset = setup
    pinned = preset.model_copy(update={"generator": preset.generator.model_copy(update={"pin_first_frame": True})})
    model = AvatarModel(pinned, CausalWanDiT(pinned.dit), vae, description="test")
    session = model.open(clips[0].portrait, None, RenderSettings())
    session.feed_audio(clips[0].audio, final=True)
    inputs = []  # (block, latent frame 0 of a denoising pass)
    run_pass = session._pass

    def spy(x, *args, write: bool, **kwargs):
        if not write:
            inputs.append((session.blocks_done, x[:, :, 0].clone()))
        return run_pass(x, *args, write=write, **kwargs)

    session._pass = spy
    training_latent = dataset.clips[0].reference[None, :, 0]  # (1, C, h, w)
    with torch.no_grad():
        blocks = [run_block(model.dit, session.block_passes()) for _ in range(2)]
    block0 = [frame for block, frame in inputs if block == 0]
    assert len(block0) == pinned.generator.step_plan[0]
    assert all(torch.allclose(frame, training_latent, atol=1e-6) for frame in block0)
    assert torch.allclose(blocks[0].latents[:, :, 0], training_latent, atol=1e-6)  # and block 0 comes out with it
    assert not any(torch.allclose(frame, training_latent, atol=1e-3) for block, frame in inputs if block == 1)


def test_recipe_ships_a_loadable_model(tmp_path):
    cfg = RecipeConfig(
        data=DATA,
        vae=dict(batch=1),
        dit=dict(batch=2),
        distill=dict(rollout_blocks=4),
        max_steps={"vae": 2, "teacher": 2, "student": 2, "distill": 1},
        vae_gate_lipsync_r=None,
        vae_gate_psnr_over_still_db=None,
        deflicker_calibration_clips=1,
        deflicker_calibration_seconds=1.2,
        deflicker_thresholds=(1.0, 1000.0),
        paste_back_calibration_clips=1,
        paste_back_calibration_seconds=1.2,
        paste_back_thresholds=(8.0, 1000.0),
    )
    base = small_preset(pin_first_frame=True, paste_back=PasteBackConfig(threshold=50.0))
    with_deflicker = base.model_copy(
        update={"generator": base.generator.model_copy(update={"deflicker": DeflickerConfig(frames=3)})}
    )
    ship = tmp_path / "ship"
    run_recipe(tmp_path / "run", with_deflicker, cfg, ship_to=ship, command="test", log=lambda *_: None)
    preset, modules, extra = read_checkpoint(ship)
    assert preset.generator.sampler == "renoise" and set(modules) == {"dit", "vae"}
    card = (ship / "MODEL_CARD.md").read_text()
    assert "| distill | 1 |" in card
    # The shipped deflicker threshold is the one the calibration chose on training clips.
    chosen = extra["training"]["deflicker_calibration"]["chosen_threshold"]
    assert chosen in (1.0, 1000.0) and preset.generator.deflicker.threshold == chosen
    assert f"threshold {chosen:g} (chosen on training clips by the recipe)" in card
    # So is the paste-back's, chosen on validation clips against the steady truth (0: off, when nothing beats it).
    pasted = extra["training"]["paste_back_calibration"]
    assert pasted["heldout"] == VALIDATION.model_dump() and set(pasted["by_threshold"]) == {"0.0", "8.0", "1000.0"}
    assert (
        pasted["chosen_threshold"] in (0.0, 8.0, 1000.0)
        and preset.generator.paste_back.threshold == (pasted["chosen_threshold"])
    )
    assert ("no paste-back" if not pasted["chosen_threshold"] else "(chosen on validation clips by the recipe)") in card
    model = AvatarModel.load(ship)
    session = model.open(np.zeros((SIZE, SIZE, 3), np.uint8))
    session.feed_audio(np.zeros(16000, np.float32), final=True)
    assert sum(len(b.frames) for b in session) == 25
    # The training clips are kept with the run (here the VAE's and the DiT stages' are the same config: one set), and a
    # resumed run reads them back.
    assert len(list((tmp_path / "run" / "data").glob("clips-*.frames.npy"))) == 1
    # Re-running resumes: every stage is already done and nothing is retrained (nor recalibrated).
    kept = {name: (tmp_path / "run" / f"{name}.json").stat().st_mtime_ns for name in ("deflicker", "paste_back")}
    result = run_recipe(tmp_path / "run", with_deflicker, cfg, ship_to=None, log=lambda *_: None)
    assert kept == {name: (tmp_path / "run" / f"{name}.json").stat().st_mtime_ns for name in kept}
    assert json.loads((tmp_path / "run" / "vae" / "done.json").read_text())["steps"] == 2
    assert result["stages"]["teacher"]["steps"] == 2
    assert result["deflicker_calibration"]["chosen_threshold"] == chosen
    assert result["paste_back_calibration"] == pasted
    # A calibration is kept only for what it was measured on: other thresholds are measured again.
    others = cfg.model_copy(update={"paste_back_thresholds": (16.0,)})
    result = run_recipe(tmp_path / "run", with_deflicker, others, ship_to=None, log=lambda *_: None)
    assert set(result["paste_back_calibration"]["by_threshold"]) == {"0.0", "16.0"}
    # Training the VAE further changes its latent space: the DiT stages begun on the old one are refused, not resumed
    # on latents they were never trained on, and the new VAE gets latents of its own.
    from model.train.recipe import StaleStageError

    longer = cfg.model_copy(update={"max_steps": {**cfg.max_steps, "vae": 3}})
    with pytest.raises(StaleStageError, match="teacher was trained in another latent space"):
        run_recipe(tmp_path / "run", with_deflicker, longer, ship_to=None, log=lambda *_: None)
    assert len(list((tmp_path / "run" / "data").glob("latents-*.pt"))) == 2


@pytest.mark.parametrize("stage", ["teacher", "vae", "distill"])
def test_stage_steps_under_ray_train_with_two_workers(ray_cluster, tmp_path, stage):
    from model.train.ray_train import train_with_ray
    from model.train.vae import VAETrainConfig

    data = DataConfig(num_clips=1, seconds=1.2, num_identities=1, num_speakers=1)
    states = {}
    if stage == "distill":
        torch.manual_seed(0)
        teacher = CausalWanDiT(small_preset().dit)
        states = {"teacher_state": str(tmp_path / "teacher.pt"), "dit_state": str(tmp_path / "student.pt")}
        torch.save(teacher.state_dict(), states["teacher_state"])
        torch.save(student_from_teacher(teacher).state_dict(), states["dit_state"])
    cfg = {
        "vae": VAETrainConfig(batch=1, image_batch=1, image_steps=1, causal_steps=0, latent_frames=2),
        "teacher": DiTTrainConfig(batch=2),
        "distill": DistillConfig(rollout_blocks=2, lr=1e-3),
    }[stage]
    # Distillation: the critic starts as the teacher (zero DMD gradient), so the student first moves at step 2.
    train_with_ray(
        stage, small_preset(), data, cfg, steps=3 if stage == "distill" else 2, num_workers=2, out=tmp_path, **states
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    # Different batches (rollouts) on each worker, yet the averaged gradients keep the weights identical.
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-6)
    loss = {"teacher": "flow", "vae": "l1", "distill": "critic"}[stage]
    assert ranks[0][loss] != ranks[1][loss]
    module = WanVAE(small_preset().vae) if stage == "vae" else CausalWanDiT(small_preset().dit)
    state = torch.load(tmp_path / f"{stage}_{'vae' if stage == 'vae' else 'dit'}.pt", weights_only=True)
    assert set(state) == set(module.state_dict())
    if stage == "distill":
        start = torch.load(states["dit_state"], weights_only=True)
        assert any(not torch.equal(state[k], start[k]) for k in start)  # the student was trained


def test_vae_stage_trains_on_frames_then_on_windows_and_fixes_its_normalisation(setup, tmp_path):
    preset, clips, _, _ = setup
    vae = WanVAE(preset.vae)
    cfg = VAETrainConfig(batch=1, image_batch=2, image_steps=2, causal_steps=1, causal_latent_frames=3, latent_frames=4)
    stage = VAEStage(vae, clips, cfg, seed=0)
    shapes = []
    original = stage.sample
    stage.sample = lambda batch, window: shapes.append((batch, window)) or original(batch, window)
    summary = run_stage(stage, tmp_path, max_steps=4, log=lambda *_: None)
    assert summary["steps"] == 4
    # Two single-frame steps, a causal window, then a window of 4 latent frames with frame-local residual blocks.
    assert shapes == [(2, 1), (2, 1), (1, 9), (1, 13)]
    # Windows also learn the frame-to-frame differences (the temporal term); a single frame has none.
    history = torch.load(tmp_path / "vae" / "checkpoint.pt", weights_only=True)["history"]
    assert ["temporal" in row for row in history] == [False, False, True, True]
    convs = residual_temporal_convs(vae)
    assert convs and all(c.weight[:, :, :-1].abs().max() == 0 for c in convs)
    assert all(c.weight[:, :, -1].abs().max() > 0 for c in convs)
    # Frame-local residual blocks bound the temporal reach: the encoder looks 1 latent frame back, the decoder 3
    # (the training window of 4 latent frames covers them), where full causal convs reach ~30.
    video = torch.rand(1, 3, 29, SIZE, SIZE) * 2 - 1
    changed = video.clone()
    changed[:, :, 1:5] = 0.0  # the video frames of latent frame 1
    with torch.no_grad():
        z, z_changed = vae.encode(video), vae.encode(changed)
        assert not torch.allclose(z[:, :, 2], z_changed[:, :, 2]) and torch.equal(z[:, :, 3:], z_changed[:, :, 3:])
        z_changed = z.clone()
        z_changed[:, :, 1] = 0.0
        a, b = vae.decode(z), vae.decode(z_changed)
    last_reached = 4 * 4  # video frames of latent frames 1..4
    assert not torch.allclose(a[:, :, last_reached], b[:, :, last_reached])
    assert torch.equal(a[:, :, last_reached + 1 :], b[:, :, last_reached + 1 :])
    # The latent normalisation makes the training latents zero-mean, unit-variance per channel, and travels in
    # the config, so a checkpoint reproduces it.
    config = vae.set_latent_normalization(*latent_statistics(vae, clips, preset.vae.temporal_stride))
    with torch.no_grad():
        z = torch.cat(
            [vae.encode(torch.from_numpy(c.frames[:9]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1) for c in clips],
            dim=2,
        )
    assert config.latents_std is not None and WanVAE(config).latents_std.flatten().tolist() == pytest.approx(
        config.latents_std
    )
    assert z.mean().abs() < 0.5 and 0.5 < z.std() < 2.0


def test_temporal_term_sees_shimmer_that_per_frame_error_does_not():
    from model.train.vae import temporal_l1

    truth = torch.zeros(1, 3, 8, 4, 4)
    steady = truth + 0.1  # off by a constant: per-frame error, no shimmer
    shimmer = truth + 0.1 * torch.tensor([1.0, -1.0] * 4).view(1, 1, 8, 1, 1)  # the same per-frame error, alternating
    assert temporal_l1(steady, truth) == 0
    assert temporal_l1(shimmer, truth) == pytest.approx(0.2)
    assert (steady - truth).abs().mean() == pytest.approx((shimmer - truth).abs().mean())
    assert temporal_l1(shimmer[:, :, :1], truth[:, :, :1]) == 0


def test_latent_seam_jitter_sees_only_the_seams_inside_blocks():
    from model.eval.metrics import block_boundaries, block_layout, boundary_jitter, frame_changes, latent_seam_jitter

    n = 9 + 12 * 4
    index = np.arange(n)
    # A jump of 10 at every block start, on top of a flicker of 1 between all frames.
    level = 10 * np.searchsorted(block_boundaries(n), index, side="right") + index % 2
    frames = (level[:, None, None, None] * np.ones((1, 4, 4, 3))).astype(np.uint8)
    layout = block_layout(4, 3)
    assert layout == {"first_block_frames": 9, "block_frames": 12}  # model.eval.metrics' defaults for this layout
    assert boundary_jitter(frame_changes(frames), block_boundaries(n)) > 5
    assert latent_seam_jitter(frames, 4, **layout) == pytest.approx(1.0)  # the block seams do not leak into it
    level += 3 * np.searchsorted(1 + 4 * np.arange(n // 4), index, side="right")  # a jump at every latent frame too
    frames = (level[:, None, None, None] * np.ones((1, 4, 4, 3))).astype(np.uint8)
    assert latent_seam_jitter(frames, 4, **layout) > 2


def test_startup_excess_error_splits_the_start_of_a_render_by_latent_frame_and_block():
    from model.eval.heldout import startup_excess_error
    from model.eval.metrics import absolute_errors

    truth = np.full((40, 4, 4, 3), 100, np.uint8)
    recon = truth + 2  # the VAE's own error: 2 everywhere
    frames = truth + 3  # the render: 1 worse than the VAE...
    frames[0] += 8  # ...and 9 worse on frame 0, 5 worse on latent frame 1's four frames
    frames[1:5] += 4
    errors = absolute_errors(frames, truth), absolute_errors(recon, truth)
    excess = startup_excess_error(*errors, temporal_stride=4, first_block_frames=9, block_frames=12)
    assert excess == pytest.approx(
        {"frame 0": 9.0, "latent frame 1": 5.0, "rest of block 0": 1.0, "block 1": 1.0, "later": 1.0}
    )


def test_drift_check_compares_every_window_with_the_first():
    base = {"lipsync_r": 0.8, "av_offset_frames": 0, "identity_error": 0.02, "boundary_jitter": 1.0, "start_s": 0.0}
    ok = dict(base, lipsync_r=0.75, identity_error=0.0215, start_s=30.0)
    bad = dict(base, lipsync_r=0.70, boundary_jitter=1.2, av_offset_frames=2, start_s=60.0)
    result = drift_check([base, ok, bad])
    assert result["passed"] is False
    assert result["lipsync_r"]["failing_windows_start_s"] == [60.0]
    assert result["boundary_jitter"]["failing_windows_start_s"] == [60.0]
    assert result["av_offset_frames"]["failing_windows_start_s"] == [60.0]
    assert result["identity_error"]["failing_windows_start_s"] == []
    assert drift_check([base, ok])["passed"] is True
    assert drift_check([base])["passed"] is None  # nothing to compare with
    assert not window_is_worse("av_offset_frames", 0, -1) and window_is_worse("identity_error", 0.02, 0.023)
    # A PSNR is worse when its squared error grew by more than 10% (0.41 dB), not when it lost 10% of its dB.
    assert window_is_worse("truth_psnr", 30.0, 29.5) and not window_is_worse("truth_psnr", 30.0, 29.7)


def test_targets_without_a_truth_are_unknown_not_met():
    from model.eval.heldout import target_check

    result = target_check([{"lipsync_r": 0.9, "av_offset_frames": 0}], [])
    assert result["per_clip"][0]["truth_psnr"] is None and result["met"]["truth_psnr"] is None
    assert result["met"]["lipsync_r"] is True


def test_teacher_samples_independent_windows_of_the_whole_clip(setup):
    preset, clips, vae, _ = setup
    model = AvatarModel(preset, CausalWanDiT(preset.dit), vae, description="test teacher")
    calls = []
    original = model.dit.forward

    def spy(*args, **kwargs):
        calls.append((args[0].shape[2], kwargs.get("attention")))
        return original(*args, **kwargs)

    model.dit.forward = spy
    try:
        frames = sample_teacher(model, clips[0], steps=3, window_frames=6, seed=0)
    finally:
        del model.dit.forward
    stride = preset.vae.temporal_stride
    latent_frames = 1 + (len(clips[0].frames) - 1) // stride
    assert frames.shape == (1 + stride * (latent_frames - 1), SIZE, SIZE, 3)
    windows = -(-latent_frames // 6)
    assert len(calls) == 3 * windows and {a for _, a in calls} == {"bidirectional"}
    assert sum(f - 1 for f, _ in calls) == 3 * latent_frames  # each window once per step, after its sink


def test_heldout_evaluation_with_urcr_off_and_a_teacher_checkpoint(setup, tmp_path):
    from model.checkpoint import save_checkpoint
    from model.eval.heldout import evaluate_checkpoint
    from model.train.teacher import main as teacher_main

    preset, _, vae, _ = setup
    save_checkpoint(tmp_path / "m", preset, {"dit": CausalWanDiT(preset.dit), "vae": vae}, {})
    result = evaluate_checkpoint(
        str(tmp_path / "m"), clips=1, seconds=2.4, urcr=False, window_seconds=0.8, progress=lambda *_: None
    )
    assert result["urcr"] is False and len(result["windows"][0]) == 3
    assert [set(row) for row in result["portrait_reconstruction"]] == [{"psnr", "mouth_psnr"}]  # one per clip
    assert isinstance(result["drift_passed"], bool)
    assert set(result["model_metrics"]) == {
        "lipsync_r",
        "av_offset_frames",
        "identity_error",
        "portrait_psnr",
        "boundary_jitter",
        "latent_seam_jitter",
        "truth_psnr",
        "truth_psnr_frame0",
        "steady_psnr",
    }
    # The still portrait against the same truth, and the per-clip targets that compare the two.
    still, clip = result["still_portrait"], result["per_clip"][0]
    assert 5 < still["truth_psnr"] < 100 and still["portrait_psnr"] == 100.0
    assert "truth_psnr" in result["windows"][0][0] and "truth_psnr" in result["drift_check"][0]
    check = result["targets"]["per_clip"][0]
    assert check["psnr_over_still_db"] == pytest.approx(clip["truth_psnr"] - still["truth_psnr"], abs=1e-3)
    assert check["truth_psnr"] == (check["psnr_over_still_db"] >= 0.5)
    # Beside them the ceiling: the truth without its head sway, which shares the mouth the still lacks.
    steady = result["per_clip_steady_truth"][0]
    assert check["ceiling_over_still_db"] == pytest.approx(steady["truth_psnr"] - still["truth_psnr"], abs=1e-3)
    assert check["ceiling_over_still_db"] > 0
    assert check["steady_psnr_over_still_db"] == pytest.approx(clip["steady_psnr"] - still["steady_psnr"], abs=1e-3)
    assert set(result["targets"]["met"]) == {"lipsync_r", "av_offset_frames", "truth_psnr", "truth_psnr_frame0"}
    assert list(result["startup_excess_error"]) == ["frame 0", "latent frame 1", "rest of block 0", "block 1", "later"]
    out = tmp_path / "teacher.json"
    teacher_main(
        ["--checkpoint", str(tmp_path / "m"), "--steps", "2", "--clips", "1", "--seconds", "2.4"]
        + ["--no-references", "--out", str(out)]
    )
    teacher = json.loads(out.read_text())
    assert teacher["sampler"] == "teacher, 2 Euler steps" and teacher["vae_reconstruction"] is None
    # Without the references the still portrait's PSNR is still beside the render's (it needs no render), and so is
    # the ceiling.
    assert 5 < teacher["still_portrait"]["truth_psnr"] < 100
    assert teacher["steady_truth"]["truth_psnr"] > teacher["still_portrait"]["truth_psnr"]
    assert isinstance(teacher["targets"]["met"]["truth_psnr"], bool)
    assert teacher["command"].startswith("python -m model.train.teacher --checkpoint")


def test_a_real_photo_is_scored_against_itself_with_the_face_mesh(tmp_path):
    """--photo: the astronaut driven by a held-out voice; here a "render" that keeps the photo and opens its mouth
    with the speech stands in for a model, so the numbers are known: high portrait_psnr, lip-sync read by the mesh."""
    from test_eval import warp_mouth_open

    from model.checkpoint import save_checkpoint
    from model.eval.heldout import evaluate_checkpoint, psnr_summary
    from model.media.image import load_portrait
    from model.synth import load_truth_phones, mouth_track

    preset = small_preset().with_resolution(128, 128)
    save_checkpoint(tmp_path / "m", preset, {"dit": CausalWanDiT(preset.dit), "vae": WanVAE(preset.vae)}, {})
    photo = load_portrait("examples/astronaut.jpg", 128, 128)

    def speaking_photo(model, clip, index):
        opening = mouth_track(load_truth_phones(clip.truth), len(clip.audio) * 25 // 16000, 25)[:, 0]
        return warp_mouth_open(photo, opening)

    result = evaluate_checkpoint(
        str(tmp_path / "m"), clips=1, seconds=4.0, render=speaking_photo, photo="examples/astronaut.jpg"
    )
    row, check = result["per_clip"][0], result["targets"]["per_clip"][0]
    assert result["vae_reconstruction"] is None and "truth_psnr" not in row  # no ground-truth video
    assert result["photo_framing"] == "fit"
    # The VAE's reconstruction of the photo, once (every clip has the same portrait), over it and at its mouth.
    (recon,) = result["portrait_reconstruction"]
    assert 5 < recon["psnr"] < 100 and 5 < recon["mouth_psnr"] < 100 and recon["mouth_psnr"] != recon["psnr"]
    assert "inside the mouth box" in psnr_summary(result)
    assert row["portrait_psnr"] > 30 and check["portrait_psnr"]
    assert row["lipsync_r"] > 0.6 and abs(row["av_offset_frames"]) <= 1
    assert set(result["targets"]["met"]) == {"lipsync_r", "av_offset_frames", "portrait_psnr"}


def test_recipe_stops_after_a_vae_that_cannot_draw_the_mouth_or_beat_the_still(tmp_path):
    from model.train.recipe import VAEGateError

    preset = small_preset().model_copy(
        update={"video": small_preset().video.model_copy(update={"height": 64, "width": 64})}
    )
    cfg = RecipeConfig(
        data=DATA, vae=dict(batch=1, image_batch=1), max_steps={"vae": 1, "teacher": 1, "student": 1, "distill": 1}
    )
    with pytest.raises(VAEGateError, match="cannot draw the mouth"):
        run_recipe(tmp_path / "run", preset, cfg, log=lambda *_: None)
    # Without the lip-sync gate, the same VAE is stopped by its PSNR under the still portrait's.
    cfg = cfg.model_copy(update={"vae_gate_lipsync_r": None})
    with pytest.raises(VAEGateError, match="could beat not animating"):
        run_recipe(tmp_path / "run", preset, cfg, log=lambda *_: None)
    assert (tmp_path / "run" / "vae" / "done.json").exists() and not (tmp_path / "run" / "teacher").exists()


def test_vae_report_locates_seams_at_latent_frame_boundaries(setup):
    """The truth has no seams; an untrained VAE's reconstruction is scored with the same per-position changes."""
    from model.eval.vae_report import vae_report

    preset, _, vae, _ = setup
    report = vae_report(vae, [HELD_OUT.clip(0, 2.4, SIZE)])
    stride = preset.vae.temporal_stride
    row = report["clips"][0]
    assert len(row["mae_by_latent_frame"]) > 1
    changes = row["change_by_pair_position"]
    assert len(changes["recon"]) == len(changes["truth"]) == stride
    assert max(changes["truth"]) < 3 * min(changes["truth"]) + 1e-6  # motion spreads evenly over the pairs
    assert set(report) == {"clips", "mae", "recon_psnr", "still_psnr", "recon_lipsync_r", "recon_boundary_jitter"}
    # The still portrait's PSNR is that of the truth against the portrait, whatever the VAE: the baseline.
    clip = HELD_OUT.clip(0, 2.4, SIZE)
    frames = 1 + stride * (len(row["mae_by_latent_frame"]) - 1)  # the frames the reconstruction has
    still = metrics.psnr(metrics.squared_errors(clip.frames[:frames], clip.portrait).mean())
    assert abs(row["still_psnr"] - still) < 1e-9 and row["recon_psnr"] < row["still_psnr"]  # untrained: worse


def test_deflicker_calibration_renders_training_clips_and_picks_the_threshold_nearest_seamless():
    from model.train.calibrate_deflicker import calibrate

    preset = small_preset()
    model = AvatarModel.random(preset, seed=0)
    result = calibrate(model, [1.0, 1000.0], clips=1, seconds=1.2, progress=lambda *_: None)
    table = result["by_threshold"]
    assert result["frames"] == preset.vae.temporal_stride - 1  # the preset's deflicker is off: calibrate the full fade
    assert result["chosen_threshold"] == min(table, key=lambda t: abs(table[t]["latent_seam_jitter"] - 1.0))
    # A threshold nothing reaches blends every crossing: the seams shrink against one that blends nothing.
    assert table[1000.0]["latent_seam_jitter"] < table[1.0]["latent_seam_jitter"]
    assert model.preset == preset  # the model is handed back as it was
