#!/usr/bin/env python3
"""Scaling experiments: strong and weak scaling, sharded servers, consistency modes, a cost model.

    python scripts/scaling.py --quick --out /tmp/scaling          # 1-2 minutes on 2 cores
    python scripts/scaling.py --out /tmp/scaling                  # the sweeps of docs/scaling.md
    python scripts/scaling.py --address auto --workers 1,2,4,8 --out /tmp/scaling   # on a cluster

Every run is the real ``distbp.loops.sync.train`` (random data, SGD); its per-step times come
from ``metrics.jsonl`` (``time`` for the step period, ``worker_compute``, ``server_sum``,
``update``; ``other`` is what is left of the period: transfers, Ray, the driver), each the
median over the steps after ``--warmup``.  Each configuration runs ``--repeats`` times, in
rounds (every configuration once, then again), and its row is the median of those runs with
their min and max (the error bars of every plot).

- strong scaling: global batch B fixed, K = each of --workers;
- weak scaling: per-worker batch b fixed, B = b * K;
- servers: K = the largest --workers, S = each of --servers: bytes each server receives per step;
- modes: sync, async and ssp on the same data, loss against wall-clock time and samples seen;
- the cost model (distbp/tools/costmodel.py) fitted to the distinct strong, weak and servers
  configurations (a run reused by two sweeps is one point), plotted against them, and extrapolated
  to 1-64 nodes at --bandwidth-gbit (an assumed network).  It refuses with fewer distinct
  configurations than its constants + 2, and names the constants it cannot determine.

A step has ceil(B / M) micro-batches: a run with more workers than that leaves some idle
(``idle_workers`` in results.csv, hollow markers in the plots), and the extrapolation gives N
nodes past it the step of ceil(B / M) nodes.

Writes to --out: ``results.csv`` and ``results.json`` (one row per run), ``modes.csv``,
``costmodel.json``, and ``throughput.png``, ``speedup.png``, ``efficiency.png``,
``breakdown.png``, ``servers.png``, ``modes.png``, ``costmodel.png``, each with the machine
(cores, load average, Ray's CPUs) written on it; each run's own directory under ``runs/``.  On a
shared or loaded machine only the ratios measured side by side mean much, and K workers beyond
the cores share them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field

import numpy as np

# Options of the full sweep and of --quick; any flag given overrides both.
FULL = dict(workers="1,2,3,4", batch_sizes="256,1024", per_worker="128", models="32,128,128,10;128,512,512,10",
            servers="1,2,4", steps=30, warmup=5, mode_steps=300, repeats=3)
# five distinct timed configurations: the fewest the cost model's three constants (+ 2) accept
QUICK = dict(workers="1,2", batch_sizes="512", per_worker="128", models="64,256,256,10", servers="1,2",
             steps=10, warmup=3, mode_steps=60, repeats=2)
MICRO_BATCH = 64
SMOOTH = 4  # the mode comparison's loss curves: a moving mean over this many batches of samples
LR = 0.05


@dataclass
class Run:
    """One training run of the sweep."""

    sweep: str  # strong | weak | servers | mode
    layers: str
    workers: int
    batch_size: int
    servers: int = 1
    mode: str = "sync"
    staleness: int | None = None
    steps: int = 10
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        """What the measurement depends on: a weak or servers run equal to a strong one is not run twice."""
        return self.layers, self.workers, self.batch_size, self.servers, self.mode, self.staleness, self.steps

    @property
    def name(self) -> str:
        tail = f"-{self.mode}" + (f"{self.staleness}" if self.staleness is not None else "")
        return f"{self.sweep}-L{self.layers.replace(',', '_')}-K{self.workers}-B{self.batch_size}-S{self.servers}{tail}"


class Parser(argparse.ArgumentParser):
    """A usage error is one line (``scaling.py: error: ...``) and status 2."""

    def error(self, message: str):
        print(f"scaling.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="a small sweep: 1-2 minutes on 2 cores")
    p.add_argument("--out", required=True, metavar="DIR", help="where results and plots go (created; must be empty)")
    p.add_argument("--address", metavar="ADDR", help="Ray to join ('auto', host:port); default: a new local Ray")
    p.add_argument("--workers", metavar="K1,K2,...", help=f"worker counts (default {FULL['workers']})")
    p.add_argument("--batch-sizes", metavar="B1,...", help=f"strong scaling global batches ({FULL['batch_sizes']})")
    p.add_argument("--per-worker", metavar="b1,...", help=f"weak scaling per-worker batches ({FULL['per_worker']})")
    p.add_argument("--models", metavar="D0,..,DL;...", help=f"layer sizes, ';' between models ({FULL['models']})")
    p.add_argument("--servers", metavar="S1,...", help=f"server counts of the servers sweep ({FULL['servers']})")
    p.add_argument("--steps", type=int, help=f"steps per run ({FULL['steps']})")
    p.add_argument("--warmup", type=int, help=f"steps left out of each median ({FULL['warmup']})")
    p.add_argument("--mode-steps", type=int, help=f"steps of each sync/async/ssp run ({FULL['mode_steps']})")
    p.add_argument("--repeats", type=int, help=f"runs of each timed configuration (full {FULL['repeats']}, "
                   f"--quick {QUICK['repeats']}): the median, with min-max error bars")
    p.add_argument("--staleness", type=int, default=2, help="the ssp run's --staleness (default 2)")
    p.add_argument("--bandwidth-gbit", type=float, default=10.0,
                   help="ASSUMED network bandwidth for the extrapolation, Gbit/s (default 10)")
    args = p.parse_args(argv)
    try:  # the plots come last: say so before minutes of sweeps, not after
        import matplotlib  # noqa: F401
    except ImportError:
        print("scaling.py: error: the plots need matplotlib: pip install -e '.[plot]' (or '.[dev]')", file=sys.stderr)
        sys.exit(2)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.workers, args.servers = ints(args.workers), ints(args.servers)
        args.batch_sizes, args.per_worker = ints(args.batch_sizes), ints(args.per_worker)
        args.models = [m.strip() for m in args.models.split(";") if m.strip()]
        for m in args.models:
            if len(ints(m)) < 2:
                raise ValueError(m)
    except ValueError as exc:
        p.error(f"cannot read a list of positive integers: {exc}")
    if args.warmup >= args.steps - 1:
        p.error("--warmup must leave at least two steps of --steps to time")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def ints(text: str) -> list[int]:
    values = [int(v) for v in str(text).split(",") if v.strip()]
    if not values or min(values) < 1:
        raise ValueError(text)
    return values


def plan(args, cpus: float) -> list[Run]:
    """Every run of the sweep, in the order they run; ``cpus``: what the Ray cluster has."""
    runs = []
    for layers in args.models:
        for B in args.batch_sizes:
            runs += [Run("strong", layers, K, B, steps=args.steps) for K in args.workers]
        for b in args.per_worker:
            runs += [Run("weak", layers, K, b * K, steps=args.steps, extra={"per_worker_batch": b})
                     for K in args.workers]
    # the largest K with which every S of the servers sweep fits on the cluster
    K = max([k for k in args.workers if k + max(args.servers) <= cpus] or [min(args.workers)])
    layers, B = args.models[-1], max(args.batch_sizes)
    runs += [Run("servers", layers, K, B, servers=S, steps=args.steps) for S in args.servers]
    small = args.models[0]
    for mode, staleness in (("sync", None), ("async", None), ("ssp", args.staleness)):
        runs.append(Run("mode", small, K, min(args.batch_sizes), mode=mode, staleness=staleness,
                        steps=args.mode_steps))
    return runs


def config_for(run: Run, out: str):
    from distbp import Config

    sizes = ints(run.layers)
    if run.sweep == "mode":  # a few epochs over a fixed set: the loss curves are comparable
        n = 8 * run.batch_size
    else:  # one epoch holds every step: no evaluation or checkpoint falls inside the timed steps
        n = run.batch_size * run.steps
    config = Config(dataset=f"random:{n},{sizes[0]},{sizes[-1]}", layers=run.layers, workers=run.workers,
                    batch_size=run.batch_size, micro_batch=MICRO_BATCH, steps=run.steps, optimizer="sgd", lr=LR,
                    servers=run.servers, mode=run.mode, staleness=run.staleness, seed=0, out=out)
    config.validate()
    return config


def execute(run: Run, out_dir: str, warmup: int, repeat: int = 0) -> tuple[dict, list[dict]]:
    """Train ``run`` (its ``repeat``-th time); return its row and its metrics lines."""
    from distbp.lecture.network import Layout
    from distbp.loops.sync import train
    from distbp.run import metrics

    load = os.getloadavg()[0]
    config = config_for(run, os.path.join(out_dir, "runs", f"{run.name}-r{repeat + 1}"))
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's epoch lines would break the sweep's bar
        summary = train(config)
    lines = metrics.steps(metrics.read(os.path.join(config.out, metrics.NAME)))
    shares = math.ceil(run.batch_size / MICRO_BATCH)
    row = {"sweep": run.sweep, "name": run.name, "layers": run.layers, "params": Layout(tuple(ints(run.layers))).size,
           "workers": run.workers, "servers": run.servers, "batch_size": run.batch_size,
           "per_worker_batch": run.extra.get("per_worker_batch", run.batch_size / run.workers),
           "micro_batch": MICRO_BATCH, "micro_batches": shares, "idle_workers": max(0, run.workers - shares),
           "steps": run.steps, "mode": run.mode, "exact": summary["exact"],
           "nodes": len(set(summary["worker_nodes"]) | set(summary["server_nodes"])),
           "wall_time_s": summary["wall_time_s"], "final_loss": summary["final_loss"],
           "mean_staleness": summary.get("mean_staleness"), "load_1m": load}
    if run.sweep != "mode":
        timed = lines[warmup:]
        period = np.diff([m["time"] for m in lines])[warmup:]
        row["step_s"] = float(np.median(period))
        for key in ("worker_compute", "server_sum", "update"):
            row[key + "_s"] = float(np.median([m[key] for m in timed]))
        row["other_s"] = max(0.0, row["step_s"] - row["worker_compute_s"] - row["server_sum_s"] - row["update_s"])
        row["samples_per_s"] = run.batch_size / row["step_s"]
        per_server = np.array([m["server_bytes_in"] for m in timed])
        row["bytes_per_server"] = float(per_server.max(axis=1).mean())  # the busiest server's
        row["bytes_all_servers"] = float(per_server.sum(axis=1).mean())
    return row, lines


TIMES = ("step_s", "worker_compute_s", "server_sum_s", "update_s", "other_s", "bytes_per_server", "bytes_all_servers")


def combine(repeats: list[dict]) -> dict:
    """One configuration's row from its repeated runs: the median of each time, the min and max of
    the step time (and so of samples/s), each run's step time, the highest load any began under."""
    row = dict(repeats[0])
    row.update(repeats=len(repeats), load_1m=max(r["load_1m"] for r in repeats),
               wall_time_s=float(np.median([r["wall_time_s"] for r in repeats])))
    if "step_s" in row:
        for key in TIMES:
            row[key] = float(np.median([r[key] for r in repeats]))
        each = [r["step_s"] for r in repeats]
        row.update(step_s_min=min(each), step_s_max=max(each), step_ms_each=";".join(f"{t * 1e3:.3f}" for t in each))
        B = row["batch_size"]
        row.update(samples_per_s=B / row["step_s"], samples_per_s_min=B / row["step_s_max"],
                   samples_per_s_max=B / row["step_s_min"])
    return row


def add_ratios(rows: list[dict]) -> None:
    """Speedup and parallel efficiency against the smallest K of the same model and batch, with
    their ranges from the step times' min and max (``speedup_min``, ``speedup_max``, ...)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["sweep"] in ("strong", "weak"):
            key = (row["sweep"], row["layers"], row["batch_size"] if row["sweep"] == "strong" else
                   row["per_worker_batch"])
            groups.setdefault(key, []).append(row)
    for (sweep, _, _), group in groups.items():
        base = min(group, key=lambda r: r["workers"])
        for row in group:
            for tail, num, den in (("", "step_s", "step_s"), ("_min", "step_s_min", "step_s_max"),
                                   ("_max", "step_s_max", "step_s_min")):
                ratio = base[num] / row[den]
                if sweep == "strong":  # the same work in less time
                    row["speedup" + tail] = ratio * base["workers"]
                    row["efficiency" + tail] = row["speedup" + tail] / row["workers"]
                else:  # K times the work in the same time, ideally: scaled speedup
                    row["speedup" + tail] = ratio * row["workers"]
                    row["efficiency" + tail] = ratio


def write_table(path: str, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def fit_points(rows: list[dict]) -> list[dict]:
    """The rows the cost model is fitted to: each timed configuration once (a row another sweep
    reused, ``measured_as``, is not a second measurement)."""
    points, seen = [], set()
    for r in rows:
        key = (r["layers"], r["workers"], r["batch_size"], r["servers"])
        if "step_s" in r and "measured_as" not in r and key not in seen:
            seen.add(key)
            points.append(r)
    return points


def fit_cost_model(rows: list[dict], bandwidth_gbit: float) -> dict:
    """The cost model fitted to the distinct timed configurations, with its predictions and its
    extrapolation; ``{"fit": None, "refused": why}`` when they cannot determine it."""
    from distbp.tools import costmodel

    points = fit_points(rows)
    for r in rows:
        r["fit_point"] = any(r is p for p in points)
    X = np.array([costmodel.features(r["workers"], r["servers"], r["params"], r["batch_size"], r["micro_batch"])
                  for r in points]).reshape(-1, 3)
    try:
        model = costmodel.fit(X, np.array([r["step_s"] for r in points]))
    except costmodel.Underdetermined as exc:
        return {"fit": None, "refused": str(exc), "points": [r["name"] for r in points]}
    for r in rows:
        if "step_s" in r:
            r["predicted_step_s"] = costmodel.predict(model, r["workers"], r["servers"], r["params"], r["batch_size"],
                                                      r["micro_batch"])
    return {"fit": model.to_dict(), "points": [r["name"] for r in points],
            "extrapolation": extrapolate(model, points, bandwidth_gbit)}


def extrapolate(model, points: list[dict], bandwidth_gbit: float) -> dict:
    """Predicted samples/s on N = 1..64 nodes (one worker each) at an ASSUMED network, strong (the
    largest B) and weak (the largest b).  N past ceil(B / M) micro-batches gets the step of
    ceil(B / M) nodes (the others idle), and their servers as many: more nodes cannot speed it up."""
    from distbp.tools import costmodel

    P = max(r["params"] for r in points)
    strong = [r["batch_size"] for r in points if r["sweep"] == "strong"] or [r["batch_size"] for r in points]
    weak = [r["per_worker_batch"] for r in points if r["sweep"] == "weak"] or [max(strong)]
    B, b = int(max(strong)), int(max(weak))
    nodes = [1, 2, 4, 8, 16, 32, 64]
    bps = bandwidth_gbit * 1e9

    def throughput(batch_of, servers_of):
        out = []
        for N in nodes:
            busy = min(N, math.ceil(batch_of(N) / MICRO_BATCH))
            out.append(batch_of(N) / costmodel.predict(model, busy, servers_of(busy), P, batch_of(N), MICRO_BATCH,
                                                       network_bps=bps))
        return out

    servers = {"S=1": lambda N: 1, "S=4": lambda N: 4, "S=N/4": lambda N: max(1, N // 4)}
    return {
        "assumed_bandwidth_gbit_per_s": bandwidth_gbit, "params": P, "micro_batch": MICRO_BATCH, "nodes": nodes,
        "measured_workers": sorted({r["workers"] for r in points}),
        "strong": {"batch_size": B, "micro_batches": math.ceil(B / MICRO_BATCH),
                   "samples_per_s": {k: throughput(lambda N: B, f) for k, f in servers.items()}},
        "weak": {"per_worker_batch": b, "micro_batches_per_worker": b / MICRO_BATCH,
                 "samples_per_s": {k: throughput(lambda N: b * N, f) for k, f in servers.items()}},
    }


def machine(host: dict) -> str:
    """One line naming the machine a figure was measured on: cores, Ray's CPUs, load averages."""
    def load(key):
        return "/".join(f"{v:.1f}" for v in host[key])

    return (f"{host['cpus']} cores, Ray {host['ray_cpus']:g} CPUs ({host['address']}); load average (1/5/15 min) "
            f"{load('load_average_start')} at start, {load('load_average_end')} at end; "
            f"{host['repeats']} run(s) per configuration: median, bars min-max")


# -- plots ----------------------------------------------------------------------------------------

class Figures:
    """Where the plots go; each is saved with the machine written under it and in its PNG metadata."""

    def __init__(self, out: str, host: dict):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.out, self.note, self.plt, self.written = out, "machine: " + machine(host), plt, []

    def save(self, fig, name: str) -> None:
        path = os.path.join(self.out, name)
        lines = textwrap.wrap(self.note, int(fig.get_figwidth() * 17))  # about 17 characters an inch at 7 pt
        fig.tight_layout(rect=(0, (0.14 * len(lines) + 0.05) / fig.get_figheight(), 1, 1))
        fig.text(0.01, 0.02 / fig.get_figheight(), "\n".join(lines), fontsize=7, color="0.3", va="bottom")
        fig.savefig(path, dpi=110, metadata={"Description": self.note})
        self.plt.close(fig)
        self.written.append(path)


def plots(out: str, host: dict, rows: list[dict], mode_lines: dict[str, list[dict]], model: dict) -> list[str]:
    figs = Figures(out, host)
    plot_scaling(figs, rows)
    plot_breakdown(figs, rows)
    plot_servers(figs, rows)
    if mode_lines:
        plot_modes(figs, rows, mode_lines)
    plot_costmodel(figs, rows, model)
    return figs.written


def bars(rows: list[dict], column: str, scale: float = 1.0) -> np.ndarray:
    """``yerr`` of matplotlib's errorbar: the distance from each median to its min and max."""
    mid = np.array([r[column] for r in rows]) * scale
    lo = np.array([r.get(column + "_min", r[column]) for r in rows]) * scale
    hi = np.array([r.get(column + "_max", r[column]) for r in rows]) * scale
    return np.array([mid - np.minimum(lo, hi), np.maximum(lo, hi) - mid])


def plot_scaling(figs: Figures, rows: list[dict]) -> None:
    """throughput.png, speedup.png, efficiency.png: strong and weak side by side, against K;
    hollow markers where K > ceil(B / M) leaves workers idle."""
    def series(sweep):
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["sweep"] == sweep:
                key = (r["layers"], r["batch_size"] if sweep == "strong" else r["per_worker_batch"])
                groups.setdefault(key, []).append(r)
        return {k: sorted(v, key=lambda r: r["workers"]) for k, v in groups.items()}

    ks = sorted({r["workers"] for r in rows if r["sweep"] in ("strong", "weak")})
    for name, column, ylabel, ideal in (("throughput.png", "samples_per_s", "samples / s", None),
                                        ("speedup.png", "speedup", "speedup", "linear"),
                                        ("efficiency.png", "efficiency", "parallel efficiency", "one")):
        fig, axes = figs.plt.subplots(1, 2, figsize=(11, 4.3), sharey=name != "throughput.png")
        for ax, sweep in zip(axes, ("strong", "weak")):
            for key, group in series(sweep).items():
                label = f"{key[0]} ({'B' if sweep == 'strong' else 'b'}={key[1]:g})"
                line = ax.errorbar([r["workers"] for r in group], [r[column] for r in group], bars(group, column),
                                   fmt="-", capsize=3, label=label)
                color = line.lines[0].get_color()
                for r in group:
                    ax.plot(r["workers"], r[column], "o", color=color, mfc="none" if r["idle_workers"] else color)
            if ideal == "linear":
                ax.plot(ks, ks, "k:", label="ideal")
            elif ideal == "one":
                ax.axhline(1.0, color="k", ls=":", label="ideal")
            ax.set(xlabel="workers K", ylabel=ylabel, xticks=ks,
                   title=f"{sweep} scaling ({'fixed global B' if sweep == 'strong' else 'fixed per-worker b'})")
            idle = any(r["idle_workers"] for r in rows if r["sweep"] == sweep)
            ax.legend(fontsize=7, title="hollow: K > ceil(B/M), workers idle" if idle else None, title_fontsize=6)
        figs.save(fig, name)


def plot_breakdown(figs: Figures, rows: list[dict]) -> None:
    """breakdown.png: each strong and weak run's step split into its medians, the step's min-max on top."""
    parts = ("worker_compute_s", "server_sum_s", "update_s", "other_s")
    timed = [r for r in rows if r["sweep"] in ("strong", "weak")]
    fig, ax = figs.plt.subplots(figsize=(max(6, 0.45 * len(timed) + 2), 4.5))
    bottom = np.zeros(len(timed))
    for part in parts:
        vals = np.array([r[part] * 1e3 for r in timed])
        ax.bar(range(len(timed)), vals, bottom=bottom, label=part[:-2])
        bottom += vals
    ax.errorbar(range(len(timed)), [r["step_s"] * 1e3 for r in timed], bars(timed, "step_s", 1e3), fmt="k_",
                capsize=3, label="step (median, min-max)")
    ax.set_xticks(range(len(timed)), [f"{r['sweep'][0]} K{r['workers']} B{r['batch_size']} P{r['params'] // 1000}k"
                                      + (" idle" if r["idle_workers"] else "") for r in timed],
                  fontsize=7, rotation=90)
    ax.set(ylabel="ms per step (medians)", title="per-step breakdown (s = strong, w = weak)")
    ax.legend(fontsize=7)
    figs.save(fig, "breakdown.png")


def plot_servers(figs: Figures, rows: list[dict]) -> None:
    srv = sorted((r for r in rows if r["sweep"] == "servers"), key=lambda r: r["servers"])
    if not srv:
        return
    fig, axes = figs.plt.subplots(1, 2, figsize=(10, 4.3))
    S = [r["servers"] for r in srv]
    axes[0].plot(S, [r["bytes_per_server"] / 1e6 for r in srv], "o-", label="busiest server")
    axes[0].plot(S, [srv[0]["bytes_per_server"] / 1e6 / s for s in S], "k:", label="1/S")
    axes[0].set(xlabel="servers S", ylabel="MB received per server per step", xticks=S,
                title=f"K={srv[0]['workers']}, P={srv[0]['params']}, B={srv[0]['batch_size']}")
    axes[0].legend(fontsize=7)
    axes[1].errorbar(S, [r["step_s"] * 1e3 for r in srv], bars(srv, "step_s", 1e3), fmt="o-", capsize=3)
    axes[1].set(xlabel="servers S", ylabel="ms per step (median, min-max)", xticks=S, title="step time",
                ylim=(0, None))
    figs.save(fig, "servers.png")


def plot_modes(figs: Figures, rows: list[dict], mode_lines: dict[str, list[dict]]) -> None:
    mode_batch = next(r["batch_size"] for r in rows if r["sweep"] == "mode")
    fig, axes = figs.plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    staleness = {r["mode"]: r.get("mean_staleness") for r in rows if r["sweep"] == "mode"}
    for name, lines in mode_lines.items():
        samples, loss = smoothed(lines, mode_batch)
        # from the first update: actor start-up is not part of the comparison
        times = [m["time"] - lines[0]["time"] for m in lines]
        mean = staleness.get(name.split()[0])
        label = name + (f" (mean staleness {mean:.1f})" if mean is not None else "")
        axes[0].plot(times, loss, label=label)
        axes[1].plot(samples, loss, label=label)
    axes[0].set(xlabel="wall-clock s after the first update",
                ylabel=f"training loss (mean over {SMOOTH} batches of samples)",
                title="loss against time (one run each)")
    axes[1].set(xlabel="samples seen", title="loss against samples (same data, same seed)")
    for ax in axes:
        ax.legend(fontsize=7)
    figs.save(fig, "modes.png")


def plot_costmodel(figs: Figures, rows: list[dict], model: dict) -> None:
    """costmodel.png: predicted against measured (the points fitted), and the extrapolation; when the
    fit was refused, the measured step times and why."""
    import matplotlib

    fig, axes = figs.plt.subplots(1, 3, figsize=(15, 4.5))
    pts = [r for r in rows if r.get("fit_point")]
    if model["fit"] is None:
        for ax in axes[1:]:
            ax.axis("off")
        axes[0].errorbar(range(len(pts)), [r["step_s"] * 1e3 for r in pts], bars(pts, "step_s", 1e3), fmt="o")
        axes[0].set_xticks(range(len(pts)), [r["name"] for r in pts], fontsize=6, rotation=90)
        axes[0].set(ylabel="measured ms per step", title="cost model not fitted")
        axes[1].text(0, 0.5, "\n".join(textwrap.wrap(model["refused"], 60)), fontsize=9, va="center")
        figs.save(fig, "costmodel.png")
        return
    meas = np.array([r["step_s"] for r in pts]) * 1e3
    pred = np.array([r["predicted_step_s"] for r in pts]) * 1e3
    for sweep, marker in (("strong", "o"), ("weak", "s"), ("servers", "^")):
        sel = [i for i, r in enumerate(pts) if r["sweep"] == sweep]
        axes[0].errorbar(meas[sel], pred[sel], xerr=bars([pts[i] for i in sel], "step_s", 1e3), fmt=marker,
                         capsize=2, label=sweep)
    lo, hi = min(meas.min(), pred.min()) * 0.8, max(meas.max(), pred.max()) * 1.25
    axes[0].plot([lo, hi], [lo, hi], "k:")
    f = model["fit"]
    axes[0].set(xscale="log", yscale="log", xlabel="measured ms per step (median, min-max)",
                ylabel="predicted ms per step", title=f"fit to {f['points']} distinct runs: median error "
                f"{f['median_rel_error']:.0%},\nleft-one-out {f['loo_median_rel_error']:.0%}"
                + (f"; {', '.join(f['at_zero'])} at the bound 0" if f["at_zero"] else ""))
    for axis in (axes[0].xaxis, axes[0].yaxis):
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].legend(fontsize=7)
    ex = model["extrapolation"]
    N = ex["nodes"]
    for ax, kind, what in ((axes[1], "strong", f"B={ex['strong']['batch_size']}"),
                           (axes[2], "weak", f"b={ex['weak']['per_worker_batch']:g} per worker")):
        for key, values in ex[kind]["samples_per_s"].items():
            ax.plot(N, values, "o-", label=key)
        ax.axvspan(min(ex["measured_workers"]), max(ex["measured_workers"]), color="0.9", label="K measured")
        if kind == "strong":
            ax.axvline(ex["strong"]["micro_batches"], color="r", ls=":",
                       label=f"ceil(B/M) = {ex['strong']['micro_batches']}: more nodes idle")
        ax.set(xscale="log", yscale="log", xlabel="nodes N (one worker each)", ylabel="predicted samples / s",
               title=f"{kind}: P={ex['params']}, {what}, EXTRAPOLATED\n(left-one-out error "
                     f"{f['loo_median_rel_error']:.0%}), ASSUMED {ex['assumed_bandwidth_gbit_per_s']:g} Gbit/s network")
        ax.set_xticks(N, [str(n) for n in N])
        ax.legend(fontsize=7)
    figs.save(fig, "costmodel.png")


def smoothed(lines: list[dict], batch_size: int) -> tuple[list[int], list[float]]:
    """Samples seen after each metrics line, and the loss averaged over the last ``SMOOTH`` batches of samples.

    A sync line is one step of ``batch_size`` samples; an async/ssp line is one push (about B/K).
    """
    samples = [m.get("samples", m["step"] * batch_size) for m in lines]
    window = max(1, round(SMOOTH * batch_size * len(lines) / samples[-1])) if lines else 1
    loss = np.array([m["loss"] for m in lines])
    return samples, [float(loss[max(0, i - window + 1):i + 1].mean()) for i in range(len(loss))]


# -- main ------------------------------------------------------------------------------------------

def sweep(args, cpus: float) -> tuple[list[dict], dict[str, list[dict]], list[str]]:
    """Run the plan: each timed configuration ``--repeats`` times, in rounds, then the modes once.
    Returns one row per planned run (a run equal to one measured before is that one's row, with
    ``measured_as`` naming it), the modes' metrics lines, and the runs skipped."""
    from tqdm import tqdm

    skipped, order, first = [], [], {}
    for run in plan(args, cpus):
        if run.workers + run.servers > cpus:  # would wait for a placement that never comes
            skipped.append(f"{run.name}: needs {run.workers + run.servers} CPUs, the cluster has {cpus:g}")
            continue
        order.append(run)
        first.setdefault(run.key, run)
    jobs = [(run, i) for i in range(args.repeats) for run in first.values() if run.sweep != "mode"]
    jobs += [(run, 0) for run in first.values() if run.sweep == "mode"]
    done: dict[tuple, list[tuple[dict, list[dict]]]] = {}
    # A bar on a terminal; in a log (stderr redirected, CI) one plain line per run instead,
    # since a bar's \r-joined redraws make one unreadable line of the whole sweep.
    tty = sys.stderr.isatty()
    for j, (run, i) in enumerate(tqdm(jobs, desc="scaling runs", unit="run", file=sys.stderr, disable=not tty), 1):
        row, lines = execute(run, args.out, args.warmup, i)
        done.setdefault(run.key, []).append((row, lines))
        if not tty:
            print(f"scaling run {j}/{len(jobs)} {run.name} r{i + 1}: {outcome(row)}", file=sys.stderr, flush=True)
    rows, mode_lines = [], {}
    for run in order:
        row = combine([r for r, _ in done[run.key]])
        if first[run.key] is not run:  # the same measurement, listed under this sweep too
            row.update(sweep=run.sweep, name=run.name, measured_as=first[run.key].name,
                       per_worker_batch=run.extra.get("per_worker_batch", row["per_worker_batch"]))
        rows.append(row)
        if run.sweep == "mode":
            mode_lines[run.mode + (f" s={run.staleness}" if run.staleness is not None else "")] = done[run.key][0][1]
    return rows, mode_lines, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"scaling.py: error: --out {args.out} exists and is not empty", file=sys.stderr)
        return 2
    from distbp.distributed.loopback import keep_local_ray_on_loopback

    keep_local_ray_on_loopback(args.address)
    import ray

    from distbp.distributed.runtime import connect
    from distbp.errors import UsageError

    try:
        started = connect(args.address, cpus_wanted=max(args.workers) + max(args.servers))
    except UsageError as exc:
        print(f"scaling.py: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        host = {"cpus": os.cpu_count(), "ray_cpus": cpus, "address": args.address or os.environ.get("RAY_ADDRESS")
                or "local", "load_average_start": os.getloadavg(), "repeats": args.repeats}
        rows, mode_lines, skipped = sweep(args, cpus)
        host["load_average_end"] = os.getloadavg()
    finally:
        if started:
            ray.shutdown()
    add_ratios(rows)
    model = fit_cost_model(rows, args.bandwidth_gbit)
    write_results(args, host, rows, mode_lines, skipped, model)
    written = plots(args.out, host, rows, mode_lines, model)
    summarize(host, rows, model, skipped, written)
    return 0


def write_results(args, host: dict, rows: list[dict], mode_lines: dict, skipped: list[str], model: dict) -> None:
    """results.csv, results.json, modes.csv and costmodel.json; the JSON files name the machine."""
    write_table(os.path.join(args.out, "results.csv"), rows)
    with open(os.path.join(args.out, "modes.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mode", "step", "time", "samples", "loss", "staleness"])
        batch = next((r["batch_size"] for r in rows if r["sweep"] == "mode"), 1)
        for label, lines in mode_lines.items():
            samples, _ = smoothed(lines, batch)
            for m, n in zip(lines, samples):
                writer.writerow([label, m["step"], m["time"], n, m["loss"], m.get("staleness", 0)])
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"host": host, "machine": machine(host), "args": dict(vars(args)), "rows": rows,
                   "skipped": skipped}, fh, indent=1)
    with open(os.path.join(args.out, "costmodel.json"), "w") as fh:
        json.dump({"host": host, "machine": machine(host), **model}, fh, indent=1)


def outcome(row: dict) -> str:
    """One run's result in a few words, for the log line of a sweep without a terminal."""
    if "step_s" in row:
        return f"{row['step_s'] * 1e3:.2f} ms per step, {row['samples_per_s']:.0f} samples/s"
    return f"final loss {row['final_loss']:.4f}, wall {row['wall_time_s']:.1f} s"


def summarize(host: dict, rows: list[dict], model: dict, skipped: list[str], written: list[str]) -> None:
    print(f"{'sweep':8} {'layers':18} {'K':>2} {'S':>2} {'B':>5} {'ms/step':>8} {'(min-max)':>15} {'samples/s':>10} "
          f"{'speedup':>7} {'eff':>5} {'MB/server':>9}")
    for r in rows:
        if "step_s" not in r:
            continue
        spread = f"({r['step_s_min'] * 1e3:.2f}-{r['step_s_max'] * 1e3:.2f})"
        notes = ([f"{r['idle_workers']} idle: K > ceil(B/M) = {r['micro_batches']}"] if r["idle_workers"] else []) + \
            ([f"= {r['measured_as']}"] if "measured_as" in r else [])
        print(f"{r['sweep']:8} {r['layers']:18} {r['workers']:>2} {r['servers']:>2} {r['batch_size']:>5} "
              f"{r['step_s'] * 1e3:8.2f} {spread:>15} {r['samples_per_s']:10.0f} {r.get('speedup', math.nan):7.2f} "
              f"{r.get('efficiency', math.nan):5.2f} {r['bytes_per_server'] / 1e6:9.3f}"
              + (f"  ({'; '.join(notes)})" if notes else ""))
    for r in rows:
        if r["sweep"] == "mode":
            print(f"mode {r['mode']:5}: final loss {r['final_loss']:.4f}, wall {r['wall_time_s']:.1f} s, "
                  f"exact {r['exact']}")
    f = model["fit"]
    if f is None:
        print(model["refused"])
    else:
        def rate(value, unit):
            return "no cost" if value is None else f"{value:.2f} {unit}"

        print(f"cost model: alpha {f['alpha'] * 1e3:.2f} ms, compute {rate(f['gflops_per_worker'], 'GFLOP/s')} "
              f"per worker, server {rate(f['server_gbytes_per_s'], 'GB/s')} effective; median error "
              f"{f['median_rel_error']:.0%} (left-one-out {f['loo_median_rel_error']:.0%}), max "
              f"{f['max_rel_error']:.0%} over {len(model['points'])} runs"
              + (f" ({f['points']} distinct in the model's terms)" if f["points"] < len(model["points"]) else "")
              + (f"; at the bound 0: {', '.join(f['at_zero'])}" if f["at_zero"] else ""))
    for line in skipped:
        print("skipped " + line)
    print("machine: " + machine(host))
    print("wrote " + ", ".join(os.path.basename(p) for p in written))


if __name__ == "__main__":
    sys.exit(main())
