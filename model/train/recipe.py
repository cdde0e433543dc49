"""The whole training recipe (DESIGN 3.4): data -> VAE -> teacher -> causal student -> DMD distillation -> ship.

    python -m model.train.recipe --out runs/tiny [--budget-minutes 60]

After distillation the thresholds of the post-processing the preset has on are chosen for the trained model and
shipped in its preset: the deflicker's on training clips (`model.train.calibrate_deflicker`), the paste-back's on
validation clips (`model.train.calibrate_paste_back`, about 4 minutes on 2 cores for the tiny model).

Every stage checkpoints into `<out>/<stage>/` and a re-run resumes where it stopped (finished stages are loaded, not
re-trained). The time budget is split between the stages by `STAGE_SHARE`; each stage stops at its step cap or its
share of the time, whichever comes first, and `done.json` records which. The result is written with
`save_checkpoint` to `--ship-to` (default: the bundled model directory) with a MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_jsonable_python

from model.audio_features import build_featurizer
from model.checkpoint import save_checkpoint
from model.config import DeflickerConfig, PasteBackConfig, Preset, get_preset
from model.dit import CausalWanDiT
from model.eval.heldout import HELD_OUT, VALIDATION
from model.eval.vae_report import vae_report
from model.generator import BUNDLED_MODEL, AvatarModel
from model.train import calibrate_deflicker, calibrate_paste_back
from model.train.data import DataConfig, LatentDataset, cached_training_clips, encode_clip
from model.train.distill import DistillConfig, DistillStage, distilled_preset
from model.train.loop import run_stage
from model.train.student import StudentStage, student_from_teacher
from model.train.teacher import DiTTrainConfig, TeacherStage
from model.train.vae import VAEStage, VAETrainConfig, latent_statistics
from model.vae import WanVAE


class VAEGateError(RuntimeError):
    """The trained VAE is not good enough for the DiT stages to be worth running."""


class StaleStageError(RuntimeError):
    """A stage directory holds training begun on another VAE or other data than this run's."""


STAGE_SHARE = {"vae": 0.25, "teacher": 0.4, "student": 0.15, "distill": 0.2}


class RecipeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The DiT stages learn from steady heads (see docs/results.md: a sway the inputs cannot predict only moves a
    # render away from the truth), half of them framed as photos are; the VAE learns from the full SynthTalk motion
    # (`vae_head_motion`).
    data: DataConfig = Field(default_factory=lambda: DataConfig(head_motion=0.0, framed_fraction=0.5))
    vae_head_motion: float = 1.0
    vae: VAETrainConfig = Field(default_factory=VAETrainConfig)
    dit: DiTTrainConfig = Field(default_factory=DiTTrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    # The step counts of `make train-tiny`, the run in progress for the 128x128 model (the bundled 64x64 one predates
    # them; its model card has its own).
    max_steps: dict[str, int] = Field(
        default_factory=lambda: {"vae": 12_000, "teacher": 3800, "student": 1200, "distill": 480}
    )
    checkpoint_every: int = 50
    seed: int = 0
    # The VAE must draw the mouth before anything downstream can move it in sync: below this lip-sync of its own
    # reconstruction (validation clips), the recipe stops after the VAE instead of spending hours on the DiT stages.
    vae_gate_lipsync_r: float | None = 0.8
    # ... and a render cannot be closer to the truth than the VAE's reconstruction: below the still portrait's PSNR
    # plus this margin (dB, validation clips) nothing downstream can beat not animating at all (issue 18's target
    # is +0.5 dB for the render), so the recipe stops there too.
    vae_gate_psnr_over_still_db: float | None = 1.0
    # The deflicker threshold of the shipped model (when its preset has the deflicker on) is chosen on this many
    # training clips of this length among these thresholds (`model.train.calibrate_deflicker`); 0 clips: keep the
    # preset's.
    deflicker_calibration_clips: int = 8
    deflicker_calibration_seconds: float = 8.0
    deflicker_thresholds: tuple[float, ...] = calibrate_deflicker.THRESHOLDS
    # The paste-back threshold (when the preset has the paste-back on) is chosen on this many validation clips
    # (`model.train.calibrate_paste_back`: the best PSNR over the still against the steady truth); 0 clips: keep the
    # preset's.
    paste_back_calibration_clips: int = 4
    paste_back_calibration_seconds: float = 12.0
    paste_back_thresholds: tuple[float, ...] = calibrate_paste_back.THRESHOLDS


def run_recipe(
    out: str | Path,
    preset: Preset,
    cfg: RecipeConfig,
    budget_minutes: float | None = None,
    ship_to: str | Path | None = None,
    command: str = "",
    log=print,
    stop_after: str | None = None,
) -> dict:
    """Train every stage (resuming what `out` holds) and ship; `stop_after` ("vae", "data", "teacher", "student")
    returns early with the summaries so far, nothing shipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(
        json.dumps(
            {"preset": preset.name, "recipe": cfg.model_dump(mode="json"), "budget_minutes": budget_minutes}, indent=2
        )
    )
    started = time.monotonic()
    budget = {k: None if budget_minutes is None else share * budget_minutes * 60 for k, share in STAGE_SHARE.items()}
    torch.manual_seed(cfg.seed)
    summaries: dict[str, dict] = {}

    size = preset.video.height
    log(f"data: {cfg.data.num_clips} SynthTalk clips of {cfg.data.seconds} s (data seed {cfg.data.data_seed})")
    vae = WanVAE(preset.vae)
    vae_data = cfg.data.model_copy(update={"head_motion": cfg.vae_head_motion})  # framed as the DiT's clips are
    vae_clips = cached_training_clips(vae_data, size, out / "data")
    vae_stage = VAEStage(vae, vae_clips, cfg.vae, cfg.seed, total_steps=cfg.max_steps["vae"])
    summaries["vae"] = run_stage(vae_stage, out, cfg.max_steps["vae"], budget["vae"], cfg.checkpoint_every, log)
    del vae_stage, vae_clips
    vae.eval().requires_grad_(False)
    clips = cached_training_clips(cfg.data, size, out / "data")
    # Fix the latent normalisation from the training clips (deterministic, so a resumed run gets the same numbers).
    vae_config = vae.set_latent_normalization(*latent_statistics(vae, clips, preset.vae.temporal_stride))
    preset = preset.model_copy(update={"vae": vae_config})
    log(f"latent normalisation: std {[round(v, 2) for v in vae_config.latents_std]}")
    if cfg.vae_gate_lipsync_r is not None or cfg.vae_gate_psnr_over_still_db is not None:
        report = vae_report(vae, [VALIDATION.clip(i, 8.0, size) for i in range(2)])
        log(
            f"VAE on validation clips: MAE {report['mae']:.1f}/255, lipsync_r of its reconstruction "
            f"{report['recon_lipsync_r']:.3f}, PSNR {report['recon_psnr']:.2f} dB (the still portrait: "
            f"{report['still_psnr']:.2f} dB)"
        )
        longer = (
            f"Train it longer (e.g. --max-steps vae={2 * summaries['vae']['steps']}; delete "
            f"{out / 'vae' / 'done.json'} to resume it)."
        )
        if cfg.vae_gate_lipsync_r is not None and report["recon_lipsync_r"] < cfg.vae_gate_lipsync_r:
            raise VAEGateError(
                f"the VAE reconstructs validation clips with lipsync_r {report['recon_lipsync_r']:.3f} < "
                f"{cfg.vae_gate_lipsync_r}: it cannot draw the mouth yet. {longer}"
            )
        margin = report["recon_psnr"] - report["still_psnr"]
        if cfg.vae_gate_psnr_over_still_db is not None and margin < cfg.vae_gate_psnr_over_still_db:
            raise VAEGateError(
                f"the VAE's reconstruction of validation clips is {margin:+.2f} dB against the still portrait's "
                f"PSNR (< +{cfg.vae_gate_psnr_over_still_db} dB): no render on it could beat not animating. {longer}"
            )

    if stop_after == "vae":
        return {"stages": summaries}
    latent_space = latent_space_fingerprint(vae, cfg.data)
    latents_path = out / "data" / f"latents-{latent_space}.pt"  # this VAE's latents of these clips, no other's
    if latents_path.exists():
        dataset = LatentDataset.load(latents_path)
    else:
        latents_path.parent.mkdir(parents=True, exist_ok=True)
        featurizer = build_featurizer(preset)
        dataset = LatentDataset([encode_clip(c, vae, preset, featurizer) for c in clips])
        dataset.save(latents_path)

    if stop_after == "data":
        return {"stages": summaries}
    teacher = CausalWanDiT(preset.dit)
    check_lineage(out, "teacher", latent_space)
    summaries["teacher"] = run_stage(
        TeacherStage(teacher, dataset, preset, cfg.dit, cfg.seed),
        out,
        cfg.max_steps["teacher"],
        budget["teacher"],
        cfg.checkpoint_every,
        log,
    )
    teacher.eval().requires_grad_(False)
    # The bidirectional teacher as a checkpoint of its own: the many-step reference row of docs/results.md.
    save_checkpoint(out / "teacher_model", preset, {"dit": teacher, "vae": vae}, {"stage": "bidirectional teacher"})

    if stop_after == "teacher":
        return {"stages": summaries}
    student = student_from_teacher(teacher)
    check_lineage(out, "student", latent_space)
    summaries["student"] = run_stage(
        StudentStage(student, dataset, preset, cfg.dit, cfg.seed),
        out,
        cfg.max_steps["student"],
        budget["student"],
        cfg.checkpoint_every,
        log,
    )
    # The causal student before distillation, sampled with many Euler steps: the "no distillation" reference.
    save_checkpoint(out / "student_model", preset, {"dit": student, "vae": vae}, {"stage": "causal student"})

    if stop_after == "student":
        return {"stages": summaries}
    check_lineage(out, "distill", latent_space)
    summaries["distill"] = run_stage(
        DistillStage(student, teacher, vae, clips, preset, cfg.distill, cfg.seed),
        out,
        cfg.max_steps["distill"],
        budget["distill"],
        cfg.checkpoint_every,
        log,
    )
    shipped = distilled_preset(preset)
    result = {"stages": summaries, "seconds": round(time.monotonic() - started, 1)}
    shipped = calibrate_thresholds(out, shipped, cfg, summaries["distill"]["steps"], student, vae, result, log)
    save_checkpoint(out / "final_model", shipped, {"dit": student, "vae": vae}, {"training": result})
    if ship_to is not None:
        save_checkpoint(ship_to, shipped, {"dit": student, "vae": vae}, {"training": result})
        write_model_card(Path(ship_to), shipped, cfg, result, command, budget_minutes)
        log(f"shipped to {ship_to}")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def latent_space_fingerprint(vae: WanVAE, data: DataConfig) -> str:
    """What the DiT stages learn from: the VAE's weights and latent normalisation, and the clips it encodes."""
    digest = hashlib.sha256(json.dumps(data.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(vae.config.model_dump_json().encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def check_lineage(out: Path, stage: str, latent_space: str) -> None:
    """A DiT stage learns in one latent space: refuse to resume a stage begun on another VAE or other clips (a VAE
    trained further since, a changed data config), and record the latent space of a stage that starts now."""
    directory = out / stage
    record = directory / "latent_space.json"
    if record.exists():
        begun_on = json.loads(record.read_text())["latent_space"]
        if begun_on == latent_space:
            return
        problem = f"was trained in another latent space ({begun_on}) than this run's ({latent_space})"
    elif directory.exists() and any(directory.iterdir()):
        problem = "has no record of the latent space it was trained in (a run directory from older code)"
    else:
        directory.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"latent_space": latent_space}))
        return
    raise StaleStageError(
        f"{directory} {problem}: the VAE or the training clips changed. Remove it and the stages after it to train "
        "them again."
    )


def calibrate_thresholds(
    out: Path,
    preset: Preset,
    cfg: RecipeConfig,
    distill_steps: int,
    student: CausalWanDiT,
    vae: WanVAE,
    result: dict,
    log=print,
) -> Preset:
    """The trained model's post-processing thresholds, for what its preset has on, chosen in order: the deflicker's on
    training clips, then the paste-back's on validation clips (rendered with that deflicker). Each calibration goes
    into `result["<name>_calibration"]`; returns the preset with the chosen thresholds."""
    calibrations = (
        (
            "deflicker",
            preset.generator.deflicker.frames,
            (cfg.deflicker_thresholds, cfg.deflicker_calibration_clips, cfg.deflicker_calibration_seconds),
            functools.partial(calibrate_deflicker.calibrate, data=cfg.data),
            {"data": cfg.data},
        ),
        (
            "paste_back",
            preset.generator.paste_back.threshold,
            (cfg.paste_back_thresholds, cfg.paste_back_calibration_clips, cfg.paste_back_calibration_seconds),
            calibrate_paste_back.calibrate,
            {},
        ),
    )
    for name, on, (thresholds, clips, seconds), calibrate, inputs in calibrations:
        if not (clips and on):
            continue
        # What the calibration depends on, its generator included (the render applies the rest of the post-processing).
        measured_on = {
            "distill_steps": distill_steps,
            "thresholds": list(thresholds),
            "clips": clips,
            "seconds": seconds,
        }
        model = AvatarModel(preset, student, vae, description=f"{name} calibration")
        run = functools.partial(calibrate, model, list(thresholds), clips, seconds, progress=log)
        calibration = calibrated(out / f"{name}.json", measured_on | inputs | {"generator": preset.generator}, run, log)
        chosen = getattr(preset.generator, name).model_copy(update={"threshold": calibration["chosen_threshold"]})
        preset = preset.with_generator(**{name: chosen})
        result[f"{name}_calibration"] = calibration
    return preset


def calibrated(path: Path, measured_on: dict, run, log=print) -> dict:
    """A threshold calibration: `run()`'s result (with `chosen_threshold` and `by_threshold`), kept in `path` with
    what it was measured on and reused only for the same. Both go through JSON, so a fresh result and a kept one read
    alike (threshold keys are text in both)."""
    measured_on = json.loads(json.dumps(measured_on, default=to_jsonable_python))
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("measured_on") == measured_on:
            return kept
    calibration = json.loads(json.dumps(run() | {"measured_on": measured_on}, default=to_jsonable_python))
    by_threshold = ", ".join(
        f"{float(t):g}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
        for t, row in calibration["by_threshold"].items()
    )
    log(f"{path.stem}: threshold {calibration['chosen_threshold']:g} chosen ({by_threshold})")
    path.write_text(json.dumps(calibration, indent=2))
    return calibration


def reuse_stages(source: Path, out: Path, stages: tuple[str, ...]) -> None:
    """Copy finished stage directories of another run, so this run resumes after them."""
    import shutil

    for stage in stages:
        if stage != "data" and not (source / stage / "done.json").exists():
            raise SystemExit(f"--reuse: {source / stage} is not a finished stage")
        if not (out / stage).exists():
            shutil.copytree(source / stage, out / stage)


def _deflicker_line(deflicker: DeflickerConfig, result: dict) -> str:
    if not deflicker.frames:
        return "no deflicker"
    chosen = " (chosen on training clips by the recipe)" if "deflicker_calibration" in result else ""
    return (
        f"deflicker at latent-frame crossings over {deflicker.frames} frames, threshold {deflicker.threshold:g}"
        + chosen
    )


def _paste_back_line(paste_back: PasteBackConfig, result: dict) -> str:
    chosen = (
        "chosen on validation clips by the recipe" if "paste_back_calibration" in result else "the preset's threshold"
    )
    if not paste_back.threshold:
        return "no paste-back" + (f" ({chosen})" if "paste_back_calibration" in result else "")
    moved = f"the portrait pasted back where a frame moved less than {paste_back.threshold:g} grey levels from it"
    return f"{moved} ({chosen})"


def write_model_card(
    directory: Path, preset: Preset, cfg: RecipeConfig, result: dict, command: str, budget_minutes: float | None
) -> None:
    dit = CausalWanDiT(preset.dit)
    vae = WanVAE(preset.vae)
    gen = preset.generator
    anchoring = "block 0's latent frame 0 pinned to the portrait's latent" if gen.pin_first_frame else "no pinning"
    rows = "\n".join(
        f"| {name} | {s['steps']} | {s['seconds'] / 60:.1f} | {s['stopped_by']} | "
        + ", ".join(f"{k} {v:.4g}" for k, v in s["final_losses"].items())
        + " |"
        for name, s in result["stages"].items()
    )
    text = f"""# Model card: avatar-render `tiny` (SynthTalk)

Trained from scratch on this machine by the recipe in `model/train/` (DESIGN 3.4).

- Command: `{command}`
- Video: {preset.video.height}x{preset.video.width} at {preset.video.fps} fps.
- Data: {cfg.data.num_clips} SynthTalk clips of {cfg.data.seconds} s (natural-image textures), data seed
  {cfg.data.data_seed}; training identity seeds {cfg.data.identity_base}..{
        cfg.data.identity_base + cfg.data.num_identities - 1
    }, speaker seeds {cfg.data.speaker_base}..{
        cfg.data.speaker_base + cfg.data.num_speakers - 1
    }. The VAE learns with head motion x{cfg.vae_head_motion}, the DiT stages with
  x{cfg.data.head_motion} and {cfg.data.framed_fraction:.0%} of the clips framed otherwise (docs/results.md says why).
  Speech: {cfg.data.espeak_fraction:.0%} of the clips espeak-ng's phonetic English, the rest SynthTalk's formant voices.
  Held-out evaluation uses identity seeds from {HELD_OUT.identity_base}, speaker seeds from {HELD_OUT.speaker_base}
  and content seeds from {HELD_OUT.content_base} (never used for training, tuning or calibration).
- DiT: {sum(p.numel() for p in dit.parameters()):,} parameters; VAE: {sum(p.numel() for p in vae.parameters()):,}
  parameters, a Wan2.1-style causal 3D VAE (base_dim {preset.vae.base_dim}, temporal stride
  {preset.vae.temporal_stride}, frame-local residual convs) trained here.
- Generator: step plan {list(gen.step_plan)} (PSB), sampler `{gen.sampler}`, t_mci {gen.t_mci} (MCI), horizon
  {gen.horizon_frames} latent frames with URCR resets, the portrait's latent as the cache sink, {anchoring};
  {_deflicker_line(gen.deflicker, result)}; {_paste_back_line(gen.paste_back, result)}.
- Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, CPU only; {
        "no time budget" if budget_minutes is None else f"a budget of {budget_minutes} minutes"
    }; {sum(s["seconds"] for s in result["stages"].values()) / 60:.1f} minutes of stage time in all (wall time of each
  stage, summed over the runs that resumed it).

| stage | steps | minutes | stopped by | final losses (mean of last 20 steps) |
|---|---|---|---|---|
{rows}

## Quality

See `docs/results.md` for held-out metrics and the commands that produced them. This is a short CPU training run:
read those numbers before relying on the model.
"""
    (directory / "MODEL_CARD.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory (checkpoints, logs, loss curves)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--budget-minutes", type=float, default=None, help="total training time, split by stage")
    parser.add_argument("--clips", type=int, default=None, help="training clips (default: the recipe's)")
    parser.add_argument("--data-seed", type=int, default=None)
    parser.add_argument(
        "--espeak-fraction",
        type=float,
        default=None,
        help="share of the training clips spoken by espeak-ng instead of formant voices (default: the recipe's)",
    )
    parser.add_argument("--ship-to", default=str(BUNDLED_MODEL), help="where the final model goes ('' = nowhere)")
    parser.add_argument(
        "--max-steps", default=None, help="step caps per stage, e.g. vae=1600,teacher=5000 (default: the recipe's)"
    )
    parser.add_argument(
        "--reuse",
        default=None,
        help="start from another run's finished VAE and teacher (ablations of the later stages)",
    )
    parser.add_argument(
        "--mci-off",
        action="store_true",
        help="ablation: clean context in training (t_mci_max = 0) and t_mci = 0 at inference",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--stop-after",
        choices=["vae", "data", "teacher", "student"],
        default=None,
        help="stop after this stage (resume later without it); nothing is shipped",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    cfg = RecipeConfig()
    data = cfg.data.model_copy(
        update={
            k: v
            for k, v in {
                "num_clips": args.clips,
                "data_seed": args.data_seed,
                "espeak_fraction": args.espeak_fraction,
            }.items()
            if v is not None
        }
    )
    try:  # model_copy does not validate: check the command line's values as the config's
        data = DataConfig.model_validate(data.model_dump())
    except ValidationError as err:
        parser.error(str(err))
    caps = dict(cfg.max_steps)
    for item in filter(None, (args.max_steps or "").split(",")):
        name, _, value = item.partition("=")
        if name not in caps or not value.isdigit():
            parser.error(f"--max-steps: expected stage=steps with a stage in {sorted(caps)}, got {item!r}")
        caps[name] = int(value)
    cfg = cfg.model_copy(update={"data": data, "max_steps": caps})
    if args.mci_off:
        cfg = cfg.model_copy(update={"dit": cfg.dit.model_copy(update={"t_mci_max": 0.0})})
        preset = preset.with_generator(t_mci=0.0)
    if args.reuse:
        reuse_stages(Path(args.reuse), Path(args.out), ("vae", "teacher", "data"))
    command = "python -m model.train.recipe " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        run_recipe(
            args.out, preset, cfg, args.budget_minutes, args.ship_to or None, command, stop_after=args.stop_after
        )
    except VAEGateError as err:
        raise SystemExit(f"stopped after the VAE stage: {err}") from None
    except StaleStageError as err:
        raise SystemExit(f"stopped: {err}") from None


if __name__ == "__main__":
    main()
