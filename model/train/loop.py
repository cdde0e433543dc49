"""The loop every stage runs in: progress bar, periodic checkpoints, resume, a time budget, loss curves as PNG.

A stage is any object with `name`, `state_modules()` ({name: nn.Module} to checkpoint), `optimizers()`
({name: Optimizer}) and `step(index) -> {loss name: float}`. Its directory holds `checkpoint.pt` (rewritten every
`checkpoint_every` steps and at the end), `losses.png`, and `done.json` once finished; a finished stage is skipped,
unless it stopped at its step cap and is now given a higher one: then it continues.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm


class Stage(Protocol):
    name: str

    def state_modules(self) -> dict[str, torch.nn.Module]: ...

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def step(self, index: int) -> dict[str, float]: ...


def save_stage(path: Path, stage: Stage, step: int, history: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "step": step,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "modules": {k: m.state_dict() for k, m in stage.state_modules().items()},
            "optimizers": {k: o.state_dict() for k, o in stage.optimizers().items()},
        },
        tmp,
    )
    tmp.replace(path)  # atomic: a crash mid-save leaves the previous checkpoint


def load_stage(path: Path, stage: Stage) -> tuple[int, list[dict]]:
    state = torch.load(path, weights_only=True)
    for k, m in stage.state_modules().items():
        m.load_state_dict(state["modules"][k])
    for k, o in stage.optimizers().items():
        o.load_state_dict(state["optimizers"][k])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["history"]


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for row in history for k in row if k not in ("step", "seconds")})
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * max(1, len(names))), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rows = [(r["step"], r[name]) for r in history if name in r]
        ax.plot([s for s, _ in rows], [v for _, v in rows], lw=0.8)
        ax.set_ylabel(name)
        ax.set_yscale("log" if all(v > 0 for _, v in rows) else "linear")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_stage(
    stage: Stage,
    out_dir: str | Path,
    max_steps: int,
    budget_s: float | None = None,
    checkpoint_every: int = 50,
    log=print,
) -> dict:
    """Train `stage` until `max_steps` or the time budget; resumable. Returns the summary written to done.json."""
    directory = Path(out_dir) / stage.name
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "done.json"
    ckpt = directory / "checkpoint.pt"
    if done.exists():
        summary = json.loads(done.read_text())
        if not (summary["stopped_by"] == "steps" and summary["steps"] < max_steps):
            load_stage(ckpt, stage)
            log(f"[{stage.name}] already done ({summary['steps']} steps): skipped")
            return summary
        # A raised step cap continues the stage. Later stages were trained on the earlier result and are not redone.
        log(
            f"[{stage.name}] continuing from {summary['steps']} to {max_steps} steps (later stages already done are "
            "kept: remove their directories to retrain them)"
        )
        done.unlink()
    step, history = load_stage(ckpt, stage) if ckpt.exists() else (0, [])
    if step:
        log(f"[{stage.name}] resumed at step {step}")
    started = time.monotonic()
    spent_before = history[-1]["seconds"] if history else 0.0
    bar = tqdm(total=max_steps, initial=step, desc=stage.name, mininterval=5.0, dynamic_ncols=True)
    stopped_by = "steps"
    while step < max_steps:
        if budget_s is not None and time.monotonic() - started > budget_s:
            stopped_by = "time budget"
            break
        losses = stage.step(step)
        step += 1
        history.append({"step": step, "seconds": spent_before + time.monotonic() - started, **losses})
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
        if step % checkpoint_every == 0:
            save_stage(ckpt, stage, step, history)
    bar.close()
    save_stage(ckpt, stage, step, history)
    plot_losses(history, directory / "losses.png", stage.name)
    tail = history[-min(len(history), 20) :]
    summary = {
        "steps": step,
        "seconds": round(spent_before + time.monotonic() - started, 1),
        "stopped_by": stopped_by,
        "final_losses": {k: sum(r[k] for r in tail) / len(tail) for k in tail[0] if k not in ("step", "seconds")}
        if tail
        else {},
    }
    done.write_text(json.dumps(summary, indent=2))
    log(f"[{stage.name}] {summary}")
    return summary
