"""``distbp plot RUN_DIR...``: loss and accuracy curves of one or several runs, to one PNG.

Left panel: the training loss of every step (faint) and its moving average over a quarter
epoch, with the test (or validation) loss of each epoch's evaluation as dashed markers.
Middle panel: the test (or validation) accuracy of each evaluation.  Right panel, when a run
has it (sync runs with two micro-batches a step or more): the gradient noise scale ``b_simple``
of each step (step/noise.py), beside each run's batch size.  The x axis is epochs, so runs with
different batch sizes line up.  Everything is read from ``metrics.jsonl``; matplotlib is
an optional extra (``pip install -e ".[plot]"``) imported only here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from ..errors import DataError, UsageError, run_file
from ..run import metrics
from ..run.checkpoint import atomic_write

MISSING_MATPLOTLIB = "distbp plot needs matplotlib: pip install matplotlib (or the extra: pip install -e '.[plot]')"


@dataclass
class Curves:
    """What one run's ``metrics.jsonl`` says, on an epoch axis."""

    label: str
    step_epoch: list[float]  # x of each training step: step / steps_per_epoch
    loss: list[float]  # the step's mean batch loss
    eval_epoch: list[float]  # x of each evaluation
    eval_loss: list[float]
    eval_accuracy: list[float]
    eval_name: str  # "test" or "validation"
    steps_per_epoch: int
    b_simple: list[float]  # each step's gradient noise scale (nan where it has none)
    batch_size: int | None  # from summary.json, when the run has one


def read_run(run_dir: str) -> Curves:
    """Parse ``run_dir/metrics.jsonl``; a step logged twice (a resumed run) keeps its last line."""
    path = run_file(run_dir, metrics.NAME, "not a distbp run directory (no metrics.jsonl)", DataError)
    try:
        records = metrics.read(path)
    except RecursionError:
        raise DataError(f"{path}: not a metrics file (a line nested too deeply)") from None
    steps = {r["step"]: r for r in metrics.steps(records)}
    evals = {r["step"]: r for r in records if "loss" not in r and any(k.endswith("_accuracy") for k in r)}
    if not steps:
        raise DataError(f"{path}: no training steps recorded yet")
    if max(steps) > MAX_STEP:
        raise DataError(f"{path}: a step beyond any run's ({str(max(steps))[:20]}...; at most {MAX_STEP})")
    spe = _steps_per_epoch(run_dir, steps, path)
    order = sorted(steps)
    eval_steps = sorted(evals)
    name = next((k[:-len("_accuracy")] for e in evals.values() for k in e if k.endswith("_accuracy")), "test")
    return Curves(label=os.path.basename(os.path.normpath(run_dir)),
                  step_epoch=[s / spe for s in order], loss=[_number(steps[s]["loss"], path, s) for s in order],
                  eval_epoch=[s / spe for s in eval_steps],
                  eval_loss=[_number(evals[s].get(f"{name}_loss", math.nan), path, s) for s in eval_steps],
                  eval_accuracy=[_number(evals[s].get(f"{name}_accuracy", math.nan), path, s) for s in eval_steps],
                  eval_name=name, steps_per_epoch=spe,
                  b_simple=[_number(steps[s].get("b_simple") or math.nan, path, s) for s in order],
                  batch_size=_batch_size(run_dir))


MAX_STEP = 1 << 53  # steps a float counts exactly: the x axis is step / steps_per_epoch


def _number(value, path: str, step: int) -> float:
    """A record's loss or accuracy as a float: an integer past a float's range is +-inf, as JSON's
    1e400 reads; anything but a number is a DataError naming the step."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{path}: step {step} has a loss or accuracy that is not a number ({repr(value)[:40]})")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _steps_per_epoch(run_dir: str, steps: dict[int, dict], path: str) -> int:
    """From summary.json when the run has finished; else the first step of epoch 2 minus one."""
    summary = os.path.join(run_dir, "summary.json")
    try:  # only a regular file, and only its first MiB: a FIFO would block, /dev/zero never end
        if os.path.isfile(summary) and os.path.getsize(summary) < 1 << 20:
            with open(summary, encoding="utf-8") as fh:
                done = json.load(fh)
            spe = round(done["steps"] / done["epochs"])
            if 1 <= spe <= MAX_STEP:
                return spe
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        pass  # no summary, or one that does not say: from the records
    epochs = {s: e.get("epoch", 1) for s, e in steps.items()}
    for s, epoch in epochs.items():
        if isinstance(epoch, bool) or not isinstance(epoch, int | float):
            raise DataError(f"{path}: step {s} has an epoch that is not a number ({repr(epoch)[:40]})")
    later = [s for s, epoch in epochs.items() if epoch >= 2]
    return min(later) - 1 if later else max(steps)  # still in epoch 1: the x axis ends at 1


def _batch_size(run_dir: str) -> int | None:
    """The run's batch size from its summary.json, if it has a readable one."""
    summary = os.path.join(run_dir, "summary.json")
    try:
        if os.path.isfile(summary) and os.path.getsize(summary) < 1 << 20:
            with open(summary, encoding="utf-8") as fh:
                value = json.load(fh).get("batch_size")
            return value if type(value) is int and value > 0 else None
    except (OSError, ValueError, AttributeError, RecursionError):
        pass
    return None


def noise_panel(ax, runs: list[Curves], colors: list[str]) -> None:
    """Each run's ``b_simple`` per step, with its batch size as a dotted line: a batch well below
    B_simple still buys proportionally fewer steps, one well above it does not."""
    for run, color in zip(runs, colors):
        ax.plot(run.step_epoch, run.b_simple, color=color, linewidth=1.2, label=f"{run.label} B_simple")
        if run.batch_size:
            ax.axhline(run.batch_size, color=color, linestyle=":", linewidth=1, label=f"{run.label} B")
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="samples", title="gradient noise scale B_simple (per step)")


def smooth(values: list[float], span: float) -> list[float]:
    """Exponential moving average over about ``span`` points, bias-corrected at the start."""
    alpha = 1.0 / max(1.0, span)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def plot(run_dirs: list[str], out: str | None = None) -> str:
    """Draw the runs' curves side by side into ``out`` (default ``<first run>/curves.png``); return its path."""
    if out == "":
        raise UsageError("--out must not be empty: give the PNG's name, or leave --out out for curves.png")
    out = out or os.path.join(run_dirs[0], "curves.png")
    if not out.lower().endswith(".png"):
        raise UsageError(f"--out {out}: the plot is a PNG; give a name ending in .png")
    if os.path.lexists(out) and not os.path.isfile(out):  # a PNG is replaced; a FIFO or a directory is not
        raise UsageError(f"--out {out}: exists and is not a regular file; give another name")
    runs = [read_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):  # same basename twice: tell them apart by path
        for r, d in zip(runs, run_dirs):
            r.label = os.path.normpath(d)
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display, Agg to write PNG
    except ImportError:
        raise UsageError(MISSING_MATPLOTLIB) from None

    noisy = any(not math.isnan(v) for r in runs for v in r.b_simple)
    fig = Figure(figsize=(16 if noisy else 11, 4.2), layout="constrained")
    ax_loss, ax_acc, *ax_noise = fig.subplots(1, 3 if noisy else 2, sharex=True)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    if noisy:
        noise_panel(ax_noise[0], runs, colors)
    for run, color in zip(runs, colors):
        final = next((a for a in reversed(run.eval_accuracy) if not math.isnan(a)), None)
        label = run.label + (f" ({run.eval_name} {final:.4f})" if final is not None else "")
        ax_loss.plot(run.step_epoch, run.loss, color=color, alpha=0.2, linewidth=0.6)
        ax_loss.plot(run.step_epoch, smooth(run.loss, run.steps_per_epoch / 4), color=color,
                     linewidth=1.6, label=f"{run.label} train")
        if run.eval_epoch:
            ax_loss.plot(run.eval_epoch, run.eval_loss, color=color, linestyle="--", marker="o",
                         markersize=3, label=f"{run.label} {run.eval_name}")
            ax_acc.plot(run.eval_epoch, run.eval_accuracy, color=color, marker="o", markersize=3, label=label)
    if all(v > 0 for r in runs for v in r.loss + r.eval_loss if not math.isnan(v)):
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="epoch", ylabel="mean loss per sample", title="loss (train: per step and smoothed)")
    names = sorted({r.eval_name for r in runs if r.eval_epoch})
    ax_acc.set(xlabel="epoch", ylabel=" / ".join(names) + " accuracy" if names else "accuracy",
               title="accuracy after each epoch")
    if not names:
        ax_acc.text(0.5, 0.5, "no test or validation split", ha="center", va="center",
                    transform=ax_acc.transAxes, color="0.5")
    for ax in (ax_loss, ax_acc, *ax_noise):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    try:
        atomic_write(out, lambda fh: fig.savefig(fh, format="png", dpi=110))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out
