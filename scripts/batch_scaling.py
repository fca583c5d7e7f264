#!/usr/bin/env python3
"""Steps to a target against batch size: perfect scaling, diminishing returns, no gain.

    python scripts/batch_scaling.py --quick --out /tmp/bscale-quick   # synthetic problem, B = 16..256, about a minute
    python scripts/batch_scaling.py --out /tmp/bscale                 # Fashion-MNIST and synthetic, B = 16..8192
    python scripts/batch_scaling.py --address auto --out /tmp/bscale  # each B's grid a Ray Tune grid on a cluster

For each batch size B (powers of 2), a search over the learning rate of SGD with momentum 0.9
(Shallue et al. 2019, "Measuring the Effects of Data Parallelism on Neural Network Training"):
each trial is one ``distbp.fit`` that stops at the first evaluation whose validation error is at
or below the problem's target; its step is the trial's steps to target.  The best rate of a B is
the one with the fewest steps.  Rates lie on a log lattice, ``lr0 * 2**(k / per_octave)``; a B's
grid is ``points`` neighbouring rates around a centre (the previous B's best, moved up the
lattice as much as the best moved between the two Bs before, by an octave at first: the linear
scaling rule while it holds), and is extended one rate at a time on the side where the best
lies until the best is inside.  The curve S(B) of the best trials is fitted with McCandlish et
al. 2018, S = S_min (1 + B_crit / B), E = S B = E_min (1 + B / B_crit), i.e.
(S/S_min - 1)(E/E_min - 1) = 1 with B_crit = E_min / S_min, and drawn beside the gradient noise
scale B_simple that distbp logs per step (``b_simple`` in metrics.jsonl), read from each B's
best run at the step the target was reached.

Weights, and so steps to target, are the same bits for any worker count K (a test checks it), so
each trial runs at the K that is fastest here (``--workers``); they do depend on the micro-batch
size M (it fixes the summation tree), which is a fixed function of B: M = max(8, B // 8).

Writes to --out: ``trials.csv`` (every trial), ``best.csv`` (per B the best trial of the first
problem; ``best-<problem>.csv`` for each), ``batch_scaling.json`` (targets, grids, fits, the
machine, the command), ``batch_scaling-<problem>.png``, and each trial's run directory under
``runs/``.  Steps are counts, not timings: the load of the machine does not change them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

# Before Ray is first imported: a local Ray of this script listens on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import distbp  # noqa: E402
from distbp.lecture import cuts  # noqa: E402
from distbp.step import noise  # noqa: E402  (the estimator each step's line was made with)


@dataclass
class Problem:
    """One curve: the data, the network, the target and the learning-rate lattice of its sweep."""

    name: str
    layers: list[int]
    target: float  # validation error (1 - validation accuracy) to reach
    why: str  # why this target
    lr0: float  # the centre of the first batch size's grid
    max_steps: int  # a trial's step budget at the first B; later: 2x the previous B's steps to target
    batch_sizes: list[int] = field(default_factory=lambda: [2**i for i in range(4, 14)])  # 16..8192
    teacher: tuple[int, int, int, int] | None = None  # synthetic data: (samples, features, hidden, classes)
    val_fraction: float = 1 / 12  # Fashion-MNIST: 5000 of the 60000 training images
    points: int = 5  # rates in a B's first grid
    per_octave: int = 2  # rates per doubling: neighbours differ by 2**(1/2)
    max_extra: int = 4  # rates added at an edge of a B's grid at most
    eval_samples: int = 1024  # evaluate every max(1, eval_samples // B) steps (and at each epoch's end)


FASHION = Problem(
    "fashion-mnist", [784, 256, 256, 10], target=0.12, lr0=0.01, max_steps=20000,
    why="0.12 validation error (88% accuracy) is reached at every B from 16 to 8192 within the step budgets, "
        "near the end of the MLP's fast phase (the README's Adam example reaches 0.10 test error in 12 epochs); "
        "a lower target would measure the slow late phase and the noise of a 5000-image validation split")
SYNTHETIC = Problem(
    "synthetic", [16, 64, 64, 4], target=0.15, lr0=0.02, max_steps=20000, teacher=(32768, 16, 32, 4),
    val_fraction=0.1,
    why="four balanced classes (0.75 error by chance) cut at the quantiles of a teacher network's output, so many "
        "samples lie near a boundary: 0.15 takes about 2000 steps at B = 16 and about 60 at B = 8192 (0.10 took "
        "more than 8000 at B = 16), enough to show all three regimes")
QUICK = replace(SYNTHETIC, name="synthetic-quick", layers=[8, 32, 32, 3], teacher=(8192, 8, 16, 3), target=0.06,
                lr0=0.04, max_steps=3000, batch_sizes=[16, 32, 64, 128, 256], points=3, per_octave=1, max_extra=2,
                eval_samples=128,
                why="the quick check: a small synthetic problem whose target every B of 16..256 reaches in seconds")
PROBLEMS = {p.name: p for p in (FASHION, SYNTHETIC)}

# Measured here (2 cores): Fashion-MNIST, 784-256-256-10 float32, K = 1 against K = 2 (same steps,
# evaluating as the sweep does): 1750 against 1200 samples/s at B = 16, 34700 against 33700 at
# B = 4096.  A second worker only shares the cores with the server and the driver.
WORKERS = 1


def micro_batch(batch_size: int) -> int:
    """M as a fixed function of B: at least 2 micro-batches a step (8 from B = 64), which the
    gradient noise scale needs, and never fewer than 8 rows."""
    return max(8, batch_size // 8)


def eval_every(batch_size: int, eval_samples: int) -> int:
    """Steps between evaluations: about every ``eval_samples`` samples, every step at large B."""
    return max(1, eval_samples // batch_size)


def lr_at(problem: Problem, k: int) -> float:
    """The k-th rate of the problem's lattice."""
    return problem.lr0 * 2 ** (k / problem.per_octave)


def teacher_data(samples: int, features: int, hidden: int, classes: int, seed: int = 0):
    """A teacher-network classification: x ~ N(0, I), a random tanh network's scalar output
    f(x) = v . tanh(W x + b), cut at its quantiles into ``classes`` balanced classes."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((features, hidden)) / math.sqrt(features)
    b = 0.5 * rng.standard_normal(hidden)
    v = rng.standard_normal(hidden) / math.sqrt(hidden)
    X = rng.standard_normal((samples, features))
    f = np.tanh(X @ W + b) @ v
    y = np.searchsorted(np.quantile(f, np.arange(1, classes) / classes), f)
    return X.astype(np.float32), y.astype(np.int64)


def load(problem: Problem, data_dir: str | None):
    """The training arrays (X, y) of a problem; the validation split is held out of them by fit."""
    if problem.teacher is not None:
        return teacher_data(*problem.teacher)
    data = distbp.load_dataset(problem.name, data_dir=data_dir)  # DataError if the files are missing
    return data.X.astype(np.float32), data.y


# -- one trial ------------------------------------------------------------------------------------

class StopAtTarget(distbp.Callback):
    """Stops the run at the first evaluation whose validation error is at or below ``target``."""

    def __init__(self, target: float):
        self.target, self.step, self.error = target, None, math.nan

    def on_evaluation(self, record: dict) -> bool:
        self.error = 1.0 - record["validation_accuracy"]
        if self.error <= self.target:
            self.step = record["step"]
            return True
        return False


def run_trial(X, y, problem: Problem, batch_size: int, k: int, cap: int, workers: int, out: str) -> dict:
    """One ``distbp.fit`` at B = ``batch_size`` and the k-th rate, for at most ``cap`` steps: its row of trials.csv."""
    lr, stop = lr_at(problem, k), StopAtTarget(problem.target)
    row = dict(problem=problem.name, batch_size=batch_size, lr=lr, lr_index=k, micro_batch=micro_batch(batch_size),
               workers=workers, eval_every=eval_every(batch_size, problem.eval_samples), step_cap=cap,
               reached=False, steps_to_target=None, samples_to_target=None, samples_seen=None, steps_run=None,
               validation_error=None, diverged=False, seconds=None, weights_sha256=None, b_simple=None,
               b_simple_median=None, b_simple_late=None, run_dir=out)
    start, said_by_fit = time.perf_counter(), io.StringIO()  # its evaluation lines: metrics.jsonl has them
    try:
        with contextlib.redirect_stderr(said_by_fit):
            result = distbp.fit(X, y, layers=problem.layers, activation="relu", loss="cross-entropy",
                                dtype="float32", optimizer="momentum", momentum=0.9, lr=lr, reduction="mean",
                                batch_size=batch_size, micro_batch=row["micro_batch"], workers=workers, steps=cap,
                                val_fraction=problem.val_fraction, eval_every=row["eval_every"], seed=0, out=out,
                                callbacks=[stop])
    except distbp.RunFailed as exc:
        if "diverged" not in str(exc):  # a real failure is not a data point
            sys.stderr.write(said_by_fit.getvalue())
            raise
        return row | dict(diverged=True, seconds=time.perf_counter() - start)
    row.update(seconds=time.perf_counter() - start, steps_run=result.summary["steps"],
               validation_error=stop.error, weights_sha256=result.summary["weights_sha256"])
    n_train = len(X) - int(round(len(X) * problem.val_fraction))
    if stop.step is not None:
        row.update(reached=True, steps_to_target=stop.step, samples_to_target=stop.step * batch_size,
                   samples_seen=samples_seen(stop.step, batch_size, n_train))
    last = stop.step or row["steps_run"]
    row["b_simple"], row["b_simple_median"] = noise_scale(result.metrics, last)
    row["b_simple_late"] = late_noise_scale(result.metrics, last, batch_size, row["micro_batch"], n_train)
    return row


def samples_seen(step: int, batch_size: int, n: int) -> int:
    """The samples steps 1..``step`` drew: each epoch of ``n`` is ``ceil(n / B)`` batches, the last
    one holding what is left (E = S B, ``samples_to_target``, counts that one as a whole batch)."""
    epochs, rest = divmod(step, -(-n // batch_size))
    return epochs * n + rest * batch_size


def noise_scale(metrics: list[dict], step: int) -> tuple[float | None, float | None]:
    """B_simple of a run: the smoothed value logged at ``step`` (the last one logged at or before
    it), and the median over the run; None where the run's records have none (before the noise
    scale was logged, or with one micro-batch a step)."""
    logged = [(r["step"], r["b_simple"]) for r in metrics if r.get("b_simple") is not None]
    if not logged:
        return None, None
    at = [value for s, value in logged if s <= step]
    return (float(at[-1]) if at else None), float(np.median([value for _, value in logged]))


def late_noise_scale(metrics: list[dict], step: int, batch_size: int, micro: int, n: int) -> float | None:
    """B_simple = tr(Sigma) / |G|^2 over the last quarter of the steps up to ``step`` (at least 10):
    the ratio of the sums of each step's unbiased estimates, from ``grad_sq_micro`` (the mean
    |G_M|^2 of its micro-batches) and ``grad_sq_batch`` (|G_B|^2) by ``noise.estimate``, distbp's
    own (McCandlish et al. 2018, appendix A.1, with E|G_b|^2 = |G|^2 + tr(Sigma) (n - b) / (b (n - 1))
    for b of the ``n`` training samples drawn without replacement).  Unlike the logged ``b_simple`` (a moving average
    over about 100 steps) it does not reach back to the start of a run of a few dozen steps.  The
    last step of an epoch is left out when B does not divide n: its batch is the n mod B left."""
    per_epoch = -(-n // batch_size)
    records = [r for r in metrics if r["step"] <= step and r.get("grad_sq_micro") is not None
               and r.get("grad_sq_batch") is not None and not (n % batch_size and r["step"] % per_epoch == 0)]
    if not records or batch_size // micro < 2:
        return None
    sizes = [len(part) for part in cuts.fixed(batch_size, micro)]
    window = [noise.estimate(r["grad_sq_micro"] * len(sizes), sizes, r["grad_sq_batch"], n)
              for r in records[-max(10, len(records) // 4):]]
    grad_sq, trace = sum(e.grad_sq for e in window), sum(e.trace for e in window)
    return trace / grad_sq if grad_sq > 0 else None


# -- the learning-rate search of one batch size ---------------------------------------------------

def score(row: dict) -> tuple[float, float]:
    """What a trial is ranked by: fewest steps to target, then lowest validation error (a trial
    that diverged is last)."""
    if row["diverged"]:
        return math.inf, math.inf
    steps = row["steps_to_target"] if row["reached"] else math.inf
    return float(steps), float(row["validation_error"])


def extension(scores: dict[int, tuple[float, float]]) -> int | None:
    """The lattice index to try next: one past the edge of the grid where the best lies (also
    when no rate reached the target: then the best is the lowest error, or the lowest rate if all
    diverged), or None when the best is inside the grid."""
    best = min(scores, key=lambda k: (scores[k], k))
    if all(math.isinf(s[1]) for s in scores.values()):  # every rate diverged: go lower
        return min(scores) - 1
    if best == min(scores):
        return best - 1
    if best == max(scores):
        return best + 1
    return None


def grid(centre: int, points: int) -> list[int]:
    """``points`` lattice indices around ``centre``, centre first, then outwards (below first)."""
    order = [centre]
    for d in range(1, points):
        order.append(centre - (d + 1) // 2 if d % 2 else centre + d // 2)
    return order


def search(problem: Problem, batch_size: int, centre: int, cap: int, trials) -> tuple[list[dict], dict]:
    """The trials of one B: its grid around ``centre``, then one rate at a time past the edge where
    the best lies, until the best is inside (or ``max_extra`` rates were added)."""
    ks = grid(centre, problem.points)
    rows = dict(zip(ks, trials.run(batch_size, ks, cap)))
    extra = 0
    while extra < problem.max_extra and (k := extension(scores(rows))) is not None:
        rows[k] = trials.run(batch_size, [k], min(cap, fewest_steps(rows.values())))[0]
        extra += 1
    best = min(scores(rows).items(), key=lambda item: (item[1], item[0]))[0]
    info = dict(best_index=best, lr_at_edge=extension(scores(rows)) is not None, extended=extra, trials=len(rows),
                grid_lr_lo=lr_at(problem, min(rows)), grid_lr_hi=lr_at(problem, max(rows)))
    return [rows[k] for k in sorted(rows)], info


def scores(rows: dict[int, dict]) -> dict[int, tuple[float, float]]:
    return {k: score(row) for k, row in rows.items()}


def fewest_steps(rows) -> int | float:
    """The best steps to target among ``rows`` (inf if none reached)."""
    return min((r["steps_to_target"] for r in rows if r["reached"]), default=math.inf)


class Trials:
    """Runs a B's trials one after another in this process (fit reuses this process's Ray): each
    trial after the first is capped at the fewest steps to target so far, which it cannot beat."""

    def __init__(self, X, y, problem: Problem, workers: int, out: str, log=print):
        self.X, self.y, self.problem, self.workers, self.out, self.log = X, y, problem, workers, out, log

    def run(self, batch_size: int, ks: list[int], cap: int) -> list[dict]:
        rows = []
        for k in ks:
            limit = int(min(cap, fewest_steps(rows)))
            rows.append(run_trial(self.X, self.y, self.problem, batch_size, k, limit, self.workers,
                                  trial_dir(self.out, self.problem, batch_size, k)))
            self.log(said(rows[-1]))
        return rows


class TuneTrials(Trials):
    """Runs a B's trials as a Ray Tune grid over the rates, as many at a time as the cluster's
    CPUs allow (each trial: 1 CPU for itself, K workers and a server); all with the same cap."""

    def __init__(self, *args, concurrent: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.concurrent = concurrent

    def run(self, batch_size: int, ks: list[int], cap: int) -> list[dict]:
        from ray import tune

        trainable = tune.with_parameters(tune_trial, X=self.X, y=self.y, problem=self.problem, batch_size=batch_size,
                                         cap=int(cap), workers=self.workers, out=self.out)
        name = f"{self.problem.name}-B{batch_size}-k{'_'.join(map(str, ks))}"
        tuner = tune.Tuner(trainable, param_space={"k": tune.grid_search(ks)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=self.concurrent),
                           run_config=tune.RunConfig(name=name, storage_path=os.path.join(self.out, "tune"), verbose=0))
        results = tuner.fit()
        failed = [f"k={r.config['k']}: {r.error}" for r in results if r.error is not None]
        if failed:
            raise distbp.RunFailed(f"Tune trials failed: {'; '.join(failed)}")
        rows = {r.config["k"]: {c: r.metrics.get(c) for c in TRIAL_COLUMNS} for r in results}
        for k in ks:
            self.log(said(rows[k]))
        return [rows[k] for k in ks]


def tune_trial(params: dict, X, y, problem: Problem, batch_size: int, cap: int, workers: int, out: str) -> None:
    """One trial inside Ray Tune: ``distbp.fit`` reuses the Ray the trial runs in."""
    from ray import tune

    k = params["k"]
    tune.report(run_trial(X, y, problem, batch_size, k, cap, workers, trial_dir(out, problem, batch_size, k)))


def trial_dir(out: str, problem: Problem, batch_size: int, k: int) -> str:
    return os.path.join(out, "runs", problem.name, f"B{batch_size}-lr{lr_at(problem, k):.6g}")


def said(row: dict) -> str:
    """A trial in one line of the log."""
    head = f"{row['problem']} B={row['batch_size']} lr={row['lr']:.4g}: "
    if row["diverged"]:
        return head + "diverged"
    if row["reached"]:
        return head + f"target at step {row['steps_to_target']} ({row['seconds']:.1f} s)"
    return head + (f"not reached in {row['steps_run']} steps, error {row['validation_error']:.4f} "
                   f"({row['seconds']:.1f} s)")


# -- the sweep over batch sizes -------------------------------------------------------------------

def sweep(problem: Problem, trials: Trials) -> tuple[list[dict], list[dict]]:
    """Every B of the problem, smallest first: (all trials' rows, each B's best row with its search).

    A B's grid is centred on the previous B's best index plus ``shift``: as far up the lattice as
    the best moved between the two Bs before (an octave at first, the linear scaling rule; never
    down, at most an octave).  Its cap is twice the previous B's steps to target (steps to target
    do not grow with B at the best rate), the problem's ``max_steps`` at the first B."""
    all_rows, best_rows = [], []
    centre, shift, cap, previous = 0, problem.per_octave, problem.max_steps, None
    for batch_size in problem.batch_sizes:
        rows, info = search(problem, batch_size, centre, cap, trials)
        all_rows += rows
        best = next(r for r in rows if r["lr_index"] == info["best_index"])
        if not best["reached"]:  # no rate reached the target within the cap: no point for this B
            trials.log(f"{problem.name} B={batch_size}: no rate reached {problem.target} within {cap} steps")
            centre += shift
            continue
        best_rows.append(best | info)
        if previous is not None:
            shift = min(max(info["best_index"] - previous, 0), problem.per_octave)
        previous = info["best_index"]
        centre, cap = previous + shift, 2 * best["steps_to_target"]
    return all_rows, best_rows


# -- the fit: S = S_min (1 + B_crit / B) ----------------------------------------------------------

def fit_scaling(batch_sizes, steps) -> dict | None:
    """Least squares of log S against log(S_min (1 + B_crit / B)) over the points (B, S): for each
    B_crit on a log grid (B_min / 1000 to 1000 B_max, then finer around the best) log S_min is the
    mean residual in closed form.  Returns s_min, e_min = s_min * b_crit, b_crit and the fit's rms
    error in log S, or None with fewer than 3 points."""
    B, log_s = np.asarray(batch_sizes, dtype=float), np.log(np.asarray(steps, dtype=float))
    if len(B) < 3:
        return None

    def residuals(b_crit: float) -> tuple[float, float]:
        shape = np.log1p(b_crit / B)
        log_s_min = float(np.mean(log_s - shape))
        r = log_s - log_s_min - shape
        return float(r @ r), log_s_min

    lo, hi = B.min() / 1e3, B.max() * 1e3
    candidates = np.geomspace(lo, hi, 2001)
    for _ in range(3):  # refine around the best: each pass 1000x finer
        i = int(np.argmin([residuals(b)[0] for b in candidates]))
        best = candidates[i]
        candidates = np.geomspace(candidates[max(i - 1, 0)], candidates[min(i + 1, len(candidates) - 1)], 2001)
    sse, log_s_min = residuals(best)
    s_min = math.exp(log_s_min)
    return dict(s_min=s_min, e_min=s_min * best, b_crit=float(best), rms_log_error=math.sqrt(sse / len(B)),
                points=len(B), b_crit_at_bound=bool(best <= lo * 1.01 or best >= hi / 1.01))


def regimes(b_crit: float) -> dict:
    """Where the three regimes are drawn: perfect scaling below B_crit/4 (E within 25% of E_min:
    at least 80% of the ideal speedup), no gain above 4 B_crit (S within 25% of S_min),
    diminishing returns between."""
    return {"perfect_scaling": [None, b_crit / 4], "diminishing_returns": [b_crit / 4, 4 * b_crit],
            "no_gain": [4 * b_crit, None]}


# -- the plot -------------------------------------------------------------------------------------

def plot(path: str, problem: Problem, best: list[dict], fit: dict | None, machine: str) -> None:
    """Steps to target against B, log-log: the measured best points, the perfect-scaling line through
    the smallest B, the fitted curve with S_min and B_crit, the regimes shaded, and B_simple on a
    right-hand axis whose scale is the batch-size axis's, with B_crit drawn on it to compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    B = np.array([r["batch_size"] for r in best], dtype=float)
    S = np.array([r["steps_to_target"] for r in best], dtype=float)
    span = np.geomspace(B.min() / 1.5, B.max() * 1.5, 200)
    ax.loglog(B, S, "o", color="C0", ms=7, label="steps to target, best rate of each B", zorder=3)
    ax.loglog(span, S[0] * B[0] / span, "--", color="grey", lw=1, label="perfect scaling (slope -1)")
    if fit is not None:
        shade(ax, fit, span)
        ax.loglog(span, fit["s_min"] * (1 + fit["b_crit"] / span), "-", color="C1",
                  label=f"fit S_min (1 + B_crit/B): S_min {fit['s_min']:.0f}, B_crit {fit['b_crit']:.0f}")
        ax.axhline(fit["s_min"], color="C1", ls=":", lw=1)
    ax.set_xlim(span[0], span[-1])
    ax.set_xticks(B, [f"{b:.0f}" for b in B])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    plain_ticks(matplotlib, ax.yaxis)
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"steps to validation error {problem.target}")
    handles, labels = ax.get_legend_handles_labels()
    simple = {key: [(r["batch_size"], r[key]) for r in best if r.get(key) is not None]
              for key in ("b_simple", "b_simple_late")}
    if simple["b_simple"] or simple["b_simple_late"]:
        right = ax.twinx()
        right.set_yscale("log")
        values = [v for points in simple.values() for _, v in points] + ([fit["b_crit"]] if fit else [])
        right.set_ylim(min(span[0], min(values) / 1.5), max(span[-1], max(values) * 1.5))  # the x axis's scale
        for key, style, label in (("b_simple", "s", "B_simple logged at the target (moving average)"),
                                  ("b_simple_late", "^", "B_simple over the last quarter of the steps")):
            if simple[key]:
                fill = "none" if key == "b_simple" else "C2"
                handles += right.plot(*zip(*simple[key]), style, color="C2", mfc=fill, ms=7)
                labels.append(label + ", best run (right axis)")
        if fit is not None:
            handles.append(right.axhline(fit["b_crit"], color="C2", ls="-.", lw=1))
            labels.append("B_crit of the fit (right axis)")
        right.set_ylabel("gradient noise scale B_simple (samples)", color="C2")
        plain_ticks(matplotlib, right.yaxis)
    ax.legend(handles, labels, loc="lower left", fontsize=8)
    ax.set_title(f"{problem.name}, {'-'.join(map(str, problem.layers))} relu float32, SGD momentum 0.9: steps to "
                 f"validation error {problem.target}", fontsize=9)
    fig.text(0.01, 0.01, machine, fontsize=7, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plain_ticks(matplotlib, axis) -> None:
    """Log-axis labels at 1, 2, 5 times the powers of ten, as plain numbers (``200``, not ``2 x 10^2``)."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def shade(ax, fit: dict, span) -> None:
    """The three regimes as bands, B_crit as a vertical line."""
    edges = regimes(fit["b_crit"])
    colours = {"perfect_scaling": "C2", "diminishing_returns": "C1", "no_gain": "C3"}
    for name, (lo, hi) in edges.items():
        lo, hi = lo or span[0] / 10, hi or span[-1] * 10
        ax.axvspan(lo, hi, color=colours[name], alpha=0.08, lw=0)
        mid = math.sqrt(max(lo, span[0]) * min(hi, span[-1]))
        if span[0] < mid < span[-1]:
            ax.text(mid, 0.97, name.replace("_", " "), transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=8, color=colours[name])
    ax.axvline(fit["b_crit"], color="C1", ls=":", lw=1)


# -- the files ------------------------------------------------------------------------------------

TRIAL_COLUMNS = ["problem", "batch_size", "lr", "lr_index", "micro_batch", "workers", "eval_every", "step_cap",
                 "reached", "steps_to_target", "samples_to_target", "samples_seen", "steps_run", "validation_error",
                 "diverged", "seconds", "weights_sha256", "b_simple", "b_simple_median", "b_simple_late", "run_dir"]
# best.csv's first six columns are read by other tools: keep them, and their order.
BEST_COLUMNS = ["batch_size", "best_lr", "steps_to_target", "samples_to_target", "lr_at_edge", "b_simple",
                "problem", "samples_seen", "b_simple_median", "b_simple_late", "validation_error", "micro_batch",
                "eval_every", "resolution", "grid_lr_lo", "grid_lr_hi", "trials", "extended", "weights_sha256"]


def best_row(row: dict) -> dict:
    """A B's best trial as a row of best.csv; ``resolution``: the evaluation interval as a fraction
    of the steps to target."""
    return {c: row.get(c) for c in BEST_COLUMNS} | dict(best_lr=row["lr"],
                                                         resolution=row["eval_every"] / row["steps_to_target"])


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})


def machine(ray_cpus: float, mode: str) -> dict:
    """Where the sweep ran (the load average is read again at the end)."""
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    import ray

    return dict(cores=os.cpu_count(), cpu=model, load_average_start=list(os.getloadavg()), ray_cpus=ray_cpus,
                trials=mode, python=platform.python_version(), numpy=np.__version__, ray=ray.__version__,
                distbp=distbp.__version__)


def report(problem: Problem, best: list[dict], fit: dict | None, missed: list[int]) -> None:
    """The problem's table and fit on stdout."""
    print(f"\n{problem.name}: steps to validation error {problem.target}")
    print(f"{'B':>6} {'best lr':>9} {'steps':>7} {'samples':>9} {'b_simple':>9} {'trials':>6}")
    for r in best:
        simple = "" if r.get("b_simple") is None else f"{r['b_simple']:.0f}"
        print(f"{r['batch_size']:>6} {r['lr']:>9.4g} {r['steps_to_target']:>7} {r['samples_to_target']:>9} "
              f"{simple:>9} {r['trials']:>6}{'  (best rate at an edge)' if r['lr_at_edge'] else ''}")
    if missed:
        print(f"no rate reached the target at B = {', '.join(map(str, missed))}")
    if fit is not None:
        print(f"fit: S_min {fit['s_min']:.1f} steps, E_min {fit['e_min']:.0f} samples, B_crit {fit['b_crit']:.0f} "
              f"(rms error of log S {fit['rms_log_error']:.3f} over {fit['points']} points)")


def write(out: str, results: dict, host: dict, args: argparse.Namespace, started: float) -> list[str]:
    """trials.csv, best.csv (the first problem's), best-<problem>.csv, batch_scaling.json and the plots."""
    problems = list(results)
    host = host | dict(load_average_end=list(os.getloadavg()))
    write_csv(os.path.join(out, "trials.csv"), [r for p in problems for r in results[p]["trials"]], TRIAL_COLUMNS)
    written = ["trials.csv"]
    for i, name in enumerate(problems):
        rows = [best_row(r) for r in results[name]["best"]]
        for file in (["best.csv"] if i == 0 else []) + [f"best-{name}.csv"]:
            write_csv(os.path.join(out, file), rows, BEST_COLUMNS)
            written.append(file)
        if results[name]["best"]:
            plot(os.path.join(out, f"batch_scaling-{name}.png"), results[name]["problem"], results[name]["best"],
                 results[name]["fit"], f"{host['cores']} cores ({host['cpu']}), load average at start "
                 f"{host['load_average_start'][0]:.1f}; {' '.join(host['command'])}")
            written.append(f"batch_scaling-{name}.png")
    first = results[problems[0]]
    doc = dict(command=host.pop("command"), machine=host, wall_s=time.time() - started,
               target=first["problem"].target, **{k: (first["fit"] or {}).get(k) for k in ("s_min", "e_min", "b_crit")},
               micro_batch="max(8, B // 8)", workers=args.workers,
               b_simple="b_simple of metrics.jsonl in each B's best run at the step the target was reached (the last "
                        "value logged at or before it); b_simple_median: its median over the run; b_simple_late: "
                        "sum of tr(Sigma) over sum of |G|^2, each step's unbiased estimates from grad_sq_micro and "
                        "grad_sq_batch, over the last quarter (at least 10) of the steps to the target; null when "
                        "not logged",
               problems={name: problem_json(r) for name, r in results.items()})
    with open(os.path.join(out, "batch_scaling.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    return written + ["batch_scaling.json"]


def problem_json(result: dict) -> dict:
    """A problem's part of batch_scaling.json."""
    p: Problem = result["problem"]
    width = 2 ** ((p.points - 1) / p.per_octave)
    fit = result["fit"]
    return dict(
        target=p.target, why=p.why, layers=p.layers, data=asdict(p)["teacher"] or p.name,
        val_fraction=p.val_fraction, batch_sizes=p.batch_sizes, fit=fit,
        regimes=regimes(fit["b_crit"]) if fit else None,
        grid=dict(lattice=f"lr = {p.lr0} * 2**(k / {p.per_octave})", spacing=2 ** (1 / p.per_octave),
                  points=p.points, width=width, max_extra=p.max_extra,
                  centre="the previous B's best k plus the shift of the best between the two Bs before, clipped to "
                         f"[0, {p.per_octave}] ({p.per_octave} at first: lr x2 per doubling of B); at the first B, "
                         "k = 0",
                  extension="while the best is at an edge of the rates tried, one more rate past that edge"),
        step_cap=f"{p.max_steps} at the first B, then 2x the previous B's steps to target; a trial after a B's "
                 "first is capped at the fewest steps to target so far",
        evaluation=dict(every=f"max(1, {p.eval_samples} // B) steps, and at each epoch's end",
                        eval_every={r["batch_size"]: r["eval_every"] for r in result["best"]},
                        resolution={r["batch_size"]: r["eval_every"] / r["steps_to_target"] for r in result["best"]}),
        best=[best_row(r) for r in result["best"]], not_reached=result["missed"],
        seconds=sum(r["seconds"] or 0 for r in result["trials"]), trials=len(result["trials"]))


# -- the command ----------------------------------------------------------------------------------

def positive_ints(text: str) -> list[int]:
    """``16,32,64`` as increasing positive integers (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1 or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected increasing positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="batch_scaling.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="a small synthetic problem at B = 16..256, about a minute")
    p.add_argument("--out", required=True, metavar="DIR", help="where results go (created; must be new or empty)")
    p.add_argument("--problems", default="fashion-mnist,synthetic", metavar="NAME,...",
                   help=f"which curves to measure: {', '.join(PROBLEMS)} (default: both; --quick: its own)")
    p.add_argument("--batch-sizes", type=positive_ints, metavar="B1,B2,...",
                   help="batch sizes, increasing (default 16,32,...,8192; --quick 16..256)")
    p.add_argument("--workers", type=int, default=WORKERS, metavar="K",
                   help=f"worker actors of each trial (default {WORKERS}, the fastest measured on 2 cores)")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray to join ('auto', host:port; 'local' starts one): each B's grid runs as a Ray Tune grid "
                        "(pip install -e '.[tune]'); default: a new local Ray, trials one after another")
    p.add_argument("--data-dir", metavar="DIR", help="where the Fashion-MNIST IDX files are")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, status 2
    args = p.parse_args(argv)
    args.problems = [n.strip() for n in args.problems.split(",") if n.strip()]
    unknown = [n for n in args.problems if n not in PROBLEMS]
    if unknown or not args.problems:
        p.error(f"--problems: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(PROBLEMS)}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        p.error(f"--out {args.out} exists and is not an empty directory")
    for module, extra in (("matplotlib", "plot"),) + ((("ray.tune", "tune"),) if args.address else ()):
        try:  # say so now, not after an hour of trials
            __import__(module)
        except ImportError:
            p.error(f"{module} is missing: pip install -e '.[{extra}]'")
    return args


def problems_of(args: argparse.Namespace) -> list[Problem]:
    chosen = [QUICK] if args.quick else [PROBLEMS[n] for n in args.problems]
    return [replace(p, batch_sizes=args.batch_sizes) if args.batch_sizes else p for p in chosen]


def start_ray(address: str | None, workers: int) -> tuple[bool, float]:
    """Join ``address`` or start a local Ray (unless this process has one); (whether we started it, its CPUs)."""
    import ray

    started = not ray.is_initialized()
    if started and address in (None, "local"):
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers + 2), include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    elif started:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    return started, ray.cluster_resources().get("CPU", 0.0)


def trials_for(args: argparse.Namespace, problem: Problem, data: tuple, cpus: float) -> Trials:
    """One after another in this process, or as Tune grids with ``--address``."""
    out, log = os.path.abspath(args.out), lambda line: print(line, file=sys.stderr, flush=True)
    if args.address:  # each trial takes a CPU for itself, K for its workers and one for its server
        concurrent = max(1, int(cpus // (args.workers + 2)))
        return TuneTrials(*data, problem, args.workers, out, log=log, concurrent=concurrent)
    return Trials(*data, problem, args.workers, out, log=log)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems, started_at = problems_of(args), time.time()
    try:  # bad data is one line, before anything is created
        data = {p.name: load(p, args.data_dir) for p in problems}
        for p in problems:
            if p.batch_sizes[-1] > round(len(data[p.name][0]) * (1 - p.val_fraction)) - 1:
                raise distbp.UsageError(f"B = {p.batch_sizes[-1]} is larger than {p.name}'s training split")
    except distbp.DistbpError as exc:
        print(f"batch_scaling.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        started, cpus = start_ray(args.address, args.workers)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print(f"batch_scaling.py: error: --address {args.address}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    host = machine(cpus, "ray tune grid" if args.address else "one after another")
    host["command"] = ["scripts/batch_scaling.py", *(sys.argv[1:] if argv is None else argv)]
    results = {}
    try:
        for p in problems:
            rows, best = sweep(p, trials_for(args, p, data[p.name], cpus))
            missed = [b for b in p.batch_sizes if b not in {r["batch_size"] for r in best}]
            fit = fit_scaling([r["batch_size"] for r in best], [r["steps_to_target"] for r in best])
            results[p.name] = dict(problem=p, trials=rows, best=best, fit=fit, missed=missed)
            report(p, best, fit, missed)
    except distbp.DistbpError as exc:  # a trial that failed (not diverged): its run directory says more
        print(f"batch_scaling.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if started:
            import ray

            ray.shutdown()
    written = write(args.out, results, host, args, started_at)
    print(f"wrote {', '.join(written)} to {args.out} in {time.time() - started_at:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
