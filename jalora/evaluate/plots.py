"""The loss curve of a run: pulled from the Trainer's log history, drawn to loss.png.

The curves are stored in the run record (not only in trainer_state.json, which lives in
checkpoint folders that get rotated away), so a plot or card can be redrawn from jalora.json.
"""

from __future__ import annotations

from pathlib import Path

LOSS_PLOT = "loss.png"


def loss_curves(log_history: list[dict], eval_loss_before: float | None = None) -> dict[str, list[list[float]]]:
    """{"train": [[step, loss], ...], "eval": [[step, loss], ...]} from `trainer.state.log_history`.

    Evaluations taken at the same step (e.g. the end-of-training one after a scheduled one)
    are kept once. The evaluation before training is not in the history (train() starts a
    fresh one), so it is passed in and drawn at step 0.
    """
    train = [[entry["step"], entry["loss"]] for entry in log_history if "loss" in entry]
    evals = {entry["step"]: entry["eval_loss"] for entry in log_history if "eval_loss" in entry}
    if eval_loss_before is not None:
        evals[0] = eval_loss_before
    return {"train": train, "eval": [[step, loss] for step, loss in sorted(evals.items())]}


def loss_figure(curves: dict[str, list[list[float]]], title: str = ""):
    """A matplotlib Figure of train and eval loss against step (for notebooks and loss.png)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4))
    ax = fig.add_subplot()
    for name, style in (("train", "-"), ("eval", "o--")):
        points = curves.get(name) or []
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, style, label=f"{name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return fig


def save_loss_plot(curves: dict[str, list[list[float]]], path: Path, title: str = "") -> bool:
    """Write the loss plot as PNG (no display needed: a bare Figure uses the Agg canvas).
    Returns False, writing nothing, when there is no loss to draw."""
    if not (curves.get("train") or curves.get("eval")):
        return False
    from io import BytesIO

    from jalora.outputs import write_atomic

    buffer = BytesIO()
    loss_figure(curves, title).savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())
    return True
