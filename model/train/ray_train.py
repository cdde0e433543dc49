"""Every training stage's step under Ray Train (`TorchTrainer`; gloo on CPU, NCCL on GPUs).

Every worker builds the same data and model (same seed) and runs the very `VAEStage`/`TeacherStage`/`StudentStage`/
`DistillStage` step that the single-process recipe runs, each worker drawing its own batches (distillation: its own
rollouts). The teacher and student stages wrap the `SinkDenoiser` with `prepare_model` (DDP averages the gradients at
each step). The VAE's step (an encode and a decode) and distillation's (the student runs inside the generator's
rollout, the critic in its own loss) are not one forward call DDP could wrap, so their gradients are averaged by a
hook on each parameter as soon as backward has accumulated it: the same arithmetic. Rank 0 writes the trained module
to `out/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STAGES = ("vae", "teacher", "student", "distill")


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce every parameter's gradient right after backward accumulates it, divided by the world size."""
    import torch.distributed as dist

    world = dist.get_world_size()

    def hook(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad)
        param.grad.div_(world)

    for param in module.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(hook)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from model.config import Preset
    from model.dit import CausalWanDiT
    from model.train.common import SinkDenoiser
    from model.train.data import DataConfig, LatentDataset, encode_clip, training_clips
    from model.train.distill import DistillConfig, DistillStage
    from model.train.student import StudentStage
    from model.train.teacher import DiTTrainConfig, TeacherStage
    from model.train.vae import VAEStage, VAETrainConfig
    from model.vae import WanVAE

    torch.set_num_threads(config.get("threads_per_worker", 1))
    rank = ray.train.get_context().get_world_rank()
    preset = Preset.model_validate(config["preset"])
    torch.manual_seed(config["seed"])  # identical data and initial weights on every worker
    vae = WanVAE(preset.vae).eval()
    if config.get("vae_state"):
        vae.load_state_dict(torch.load(config["vae_state"], weights_only=True))
    clips = training_clips(DataConfig.model_validate(config["data"]), preset.video.height)
    if config["stage"] == "vae":
        stage = VAEStage(vae, clips, VAETrainConfig.model_validate(config["vae"]), seed=config["seed"] + rank)
        average_gradients(vae)
        trained = vae
    elif config["stage"] == "distill":
        teacher = CausalWanDiT(preset.dit)
        teacher.load_state_dict(torch.load(config["teacher_state"], weights_only=True))
        student = CausalWanDiT(preset.dit)
        student.load_state_dict(torch.load(config["dit_state"], weights_only=True))
        stage = DistillStage(
            student,
            teacher,
            vae,
            clips,
            preset,
            DistillConfig.model_validate(config["distill"]),
            seed=config["seed"] + rank,
        )
        average_gradients(stage.student)
        average_gradients(stage.critic_dit)
        trained = stage.student
    else:
        dataset = LatentDataset([encode_clip(c, vae, preset) for c in clips])
        dit = CausalWanDiT(preset.dit)
        if config.get("dit_state"):
            dit.load_state_dict(torch.load(config["dit_state"], weights_only=True))
        model = ray.train.torch.prepare_model(SinkDenoiser(dit, preset.text.max_length))
        dit = model.module.dit if hasattr(model, "module") else model.dit
        stage_cls = {"teacher": TeacherStage, "student": StudentStage}[config["stage"]]
        stage = stage_cls(
            dit, dataset, preset, DiTTrainConfig.model_validate(config["dit"]), seed=config["seed"] + rank, model=model
        )
        trained = dit
    for step in range(config["steps"]):
        losses = stage.step(step)
        ray.train.report({"step": step + 1, "rank": rank, **losses})
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    checksum = float(sum(p.detach().double().sum() for p in trained.parameters()))
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "param_checksum": checksum, **losses}))
    if rank == 0:
        name = "vae" if config["stage"] == "vae" else "dit"  # distill: the student
        torch.save(trained.state_dict(), out / f"{config['stage']}_{name}.pt")


def train_with_ray(
    stage: str,
    preset,
    data,
    stage_cfg,
    steps: int,
    num_workers: int,
    out: str | Path,
    *,
    seed: int = 0,
    dit_state: str | None = None,
    vae_state: str | None = None,
    teacher_state: str | None = None,
    use_gpu: bool = False,
):
    """Run `steps` of a stage on `num_workers` Ray Train workers; returns the Ray Train result.

    `stage_cfg` is the stage's config: a VAETrainConfig for "vae", a DiTTrainConfig for "teacher" and "student", a
    DistillConfig for "distill". The states are `torch.save`d state dicts: `dit_state` the DiT to go on training (for
    "distill" the causal student, required, with `teacher_state` the frozen teacher), `vae_state` the VAE.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "distill" and not (dit_state and teacher_state):
        raise ValueError("distillation needs the causal student (dit_state) and the teacher (teacher_state)")
    cfg_key = {"vae": "vae", "distill": "distill"}.get(stage, "dit")
    config = {
        "stage": stage,
        "preset": preset.model_dump(mode="json"),
        "data": data.model_dump(mode="json"),
        cfg_key: stage_cfg.model_dump(mode="json"),
        "steps": steps,
        "seed": seed,
        "out": str(Path(out).resolve()),
        "dit_state": dit_state,
        "vae_state": vae_state,
        "teacher_state": teacher_state,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"train-{stage}", storage_path=str(Path(out).resolve() / "ray")),
    )
    return trainer.fit()
