#!/usr/bin/env python3
"""Scaling experiments: strong and weak scaling, sharded servers, consistency modes, a cost model.

    python scripts/scaling.py --quick --out /tmp/scaling          # about a minute on 2 cores
    python scripts/scaling.py --out /tmp/scaling                  # the sweeps of docs/scaling.md
    python scripts/scaling.py --address auto --workers 1,2,4,8 --out /tmp/scaling   # on a cluster

Every run is the real ``distbp.loops.sync.train`` (random data, SGD); its per-step times come
from ``metrics.jsonl`` (``time`` for the step period, ``worker_compute``, ``server_sum``,
``update``; ``other`` is what is left of the period: transfers, Ray, the driver), each the
median over the steps after ``--warmup``.

- strong scaling: global batch B fixed, K = each of --workers;
- weak scaling: per-worker batch b fixed, B = b * K;
- servers: K = the largest --workers, S = each of --servers: bytes each server receives per step;
- modes: sync, async and ssp on the same data, loss against wall-clock time and samples seen;
- the cost model (distbp/tools/costmodel.py) fitted to the strong, weak and servers runs, plotted
  against them, and extrapolated to 8-64 nodes at --bandwidth-gbit (an assumed network).

Writes to --out: ``results.csv`` and ``results.json`` (one row per run), ``modes.csv``,
``costmodel.json``, and ``throughput.png``, ``speedup.png``, ``efficiency.png``,
``breakdown.png``, ``servers.png``, ``modes.png``, ``costmodel.png``; each run's own
directory under ``runs/``.  On a shared or loaded machine only the ratios measured side by
side mean much, and K workers beyond the cores share them.
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
from dataclasses import dataclass, field

import numpy as np

# Options of the full sweep and of --quick; any flag given overrides both.
FULL = dict(workers="1,2,3,4", batch_sizes="256,1024", per_worker="128", models="32,128,128,10;128,512,512,10",
            servers="1,2,4", steps=30, warmup=5, mode_steps=300)
QUICK = dict(workers="1,2", batch_sizes="512", per_worker="256", models="64,256,256,10", servers="1,2",
             steps=10, warmup=3, mode_steps=60)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="a small sweep that finishes in about a minute on 2 cores")
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


def execute(run: Run, out_dir: str, warmup: int) -> tuple[dict, list[dict]]:
    """Train ``run``; return its row and its metrics lines."""
    from distbp.lecture.network import Layout
    from distbp.loops.sync import train
    from distbp.run import metrics

    config = config_for(run, os.path.join(out_dir, "runs", run.name))
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's epoch lines would break the sweep's bar
        summary = train(config)
    lines = metrics.steps(metrics.read(os.path.join(config.out, metrics.NAME)))
    row = {"sweep": run.sweep, "layers": run.layers, "params": Layout(tuple(ints(run.layers))).size,
           "workers": run.workers, "servers": run.servers, "batch_size": run.batch_size,
           "per_worker_batch": run.extra.get("per_worker_batch", run.batch_size / run.workers),
           "micro_batch": MICRO_BATCH, "steps": run.steps, "mode": run.mode, "exact": summary["exact"],
           "nodes": len(set(summary["worker_nodes"]) | set(summary["server_nodes"])),
           "wall_time_s": summary["wall_time_s"], "final_loss": summary["final_loss"],
           "mean_staleness": summary.get("mean_staleness")}
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


def add_ratios(rows: list[dict]) -> None:
    """Speedup and parallel efficiency against the smallest K of the same model and batch."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["sweep"] in ("strong", "weak"):
            key = (row["sweep"], row["layers"], row["batch_size"] if row["sweep"] == "strong" else
                   row["per_worker_batch"])
            groups.setdefault(key, []).append(row)
    for (sweep, _, _), group in groups.items():
        base = min(group, key=lambda r: r["workers"])
        for row in group:
            ratio = base["step_s"] / row["step_s"]
            if sweep == "strong":  # the same work in less time
                row["speedup"] = ratio * base["workers"]
                row["efficiency"] = row["speedup"] / row["workers"]
            else:  # K times the work in the same time, ideally: scaled speedup
                row["speedup"] = ratio * row["workers"]
                row["efficiency"] = ratio


def write_table(path: str, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def fit_cost_model(rows: list[dict], bandwidth_gbit: float) -> dict | None:
    """The cost model fitted to the timed runs, with its predictions; None if too few runs."""
    from distbp.tools import costmodel

    timed = [r for r in rows if "step_s" in r]
    X = np.array([costmodel.features(r["workers"], r["servers"], r["params"], r["batch_size"], r["micro_batch"])
                  for r in timed])
    if len(timed) < 3 or np.linalg.matrix_rank(X) < 3:
        return None
    model = costmodel.fit(X, np.array([r["step_s"] for r in timed]))
    for r in timed:
        r["predicted_step_s"] = costmodel.predict(model, r["workers"], r["servers"], r["params"], r["batch_size"],
                                                  r["micro_batch"])
    P = max(r["params"] for r in timed)
    B = max(r["batch_size"] for r in timed if r["sweep"] == "strong")
    b = max(r["per_worker_batch"] for r in timed if r["sweep"] == "weak")
    nodes = [1, 2, 4, 8, 16, 32, 64]
    bps = bandwidth_gbit * 1e9

    def throughput(batch_of, servers_of):
        return [batch_of(N) / costmodel.predict(model, N, servers_of(N), P, batch_of(N), MICRO_BATCH, network_bps=bps)
                for N in nodes]

    servers = {"S=1": lambda N: 1, "S=4": lambda N: 4, "S=N/4": lambda N: max(1, N // 4)}
    extrapolation = {
        "assumed_bandwidth_gbit_per_s": bandwidth_gbit, "params": P, "micro_batch": MICRO_BATCH, "nodes": nodes,
        "strong": {"batch_size": B, "samples_per_s": {k: throughput(lambda N: B, f) for k, f in servers.items()}},
        "weak": {"per_worker_batch": b,
                 "samples_per_s": {k: throughput(lambda N: b * N, f) for k, f in servers.items()}},
    }
    return {"fit": model.to_dict(), "extrapolation": extrapolation}


# -- plots ----------------------------------------------------------------------------------------

def plots(out: str, rows: list[dict], mode_lines: dict[str, list[dict]], model: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def series(sweep):
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["sweep"] == sweep:
                key = (r["layers"], r["batch_size"] if sweep == "strong" else r["per_worker_batch"])
                groups.setdefault(key, []).append(r)
        return {k: sorted(v, key=lambda r: r["workers"]) for k, v in groups.items()}

    def label(sweep, key):
        return f"{key[0]} ({'B' if sweep == 'strong' else 'b'}={key[1]:g})"

    ks = sorted({r["workers"] for r in rows if r["sweep"] in ("strong", "weak")})
    for name, column, ylabel, ideal in (("throughput.png", "samples_per_s", "samples / s", None),
                                        ("speedup.png", "speedup", "speedup", "linear"),
                                        ("efficiency.png", "efficiency", "parallel efficiency", "one")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=name != "throughput.png")
        for ax, sweep in zip(axes, ("strong", "weak")):
            for key, group in series(sweep).items():
                ax.plot([r["workers"] for r in group], [r[column] for r in group], "o-", label=label(sweep, key))
            if ideal == "linear":
                ax.plot(ks, ks, "k:", label="ideal")
            elif ideal == "one":
                ax.axhline(1.0, color="k", ls=":", label="ideal")
            ax.set(xlabel="workers K", ylabel=ylabel, xticks=ks,
                   title=f"{sweep} scaling ({'fixed global B' if sweep == 'strong' else 'fixed per-worker b'})")
            ax.legend(fontsize=7)
        save(fig, name)

    parts = ("worker_compute_s", "server_sum_s", "update_s", "other_s")
    timed = [r for r in rows if r["sweep"] in ("strong", "weak")]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(timed) + 2), 4))
    bottom = np.zeros(len(timed))
    for part in parts:
        vals = np.array([r[part] * 1e3 for r in timed])
        ax.bar(range(len(timed)), vals, bottom=bottom, label=part[:-2])
        bottom += vals
    ax.set_xticks(range(len(timed)), [f"{r['sweep'][0]} K{r['workers']} B{r['batch_size']} P{r['params'] // 1000}k"
                                      for r in timed], fontsize=7, rotation=90)
    ax.set(ylabel="ms per step (medians)", title="per-step breakdown (s = strong, w = weak)")
    ax.legend(fontsize=7)
    save(fig, "breakdown.png")

    srv = sorted((r for r in rows if r["sweep"] == "servers"), key=lambda r: r["servers"])
    if srv:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        S = [r["servers"] for r in srv]
        axes[0].plot(S, [r["bytes_per_server"] / 1e6 for r in srv], "o-", label="busiest server")
        axes[0].plot(S, [srv[0]["bytes_per_server"] / 1e6 / s for s in S], "k:", label="1/S")
        axes[0].set(xlabel="servers S", ylabel="MB received per server per step", xticks=S,
                    title=f"K={srv[0]['workers']}, P={srv[0]['params']}, B={srv[0]['batch_size']}")
        axes[0].legend(fontsize=7)
        axes[1].plot(S, [r["step_s"] * 1e3 for r in srv], "o-")
        axes[1].set(xlabel="servers S", ylabel="ms per step", xticks=S, title="step time", ylim=(0, None))
        save(fig, "servers.png")

    if mode_lines:
        mode_batch = next(r["batch_size"] for r in rows if r["sweep"] == "mode")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
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
                    title="loss against time")
        axes[1].set(xlabel="samples seen", title="loss against samples (same data, same seed)")
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "modes.png")

    if model is not None:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        pts = [r for r in rows if "predicted_step_s" in r]
        meas = np.array([r["step_s"] for r in pts]) * 1e3
        pred = np.array([r["predicted_step_s"] for r in pts]) * 1e3
        for sweep, marker in (("strong", "o"), ("weak", "s"), ("servers", "^")):
            sel = [i for i, r in enumerate(pts) if r["sweep"] == sweep]
            axes[0].scatter(meas[sel], pred[sel], marker=marker, label=sweep)
        lo, hi = min(meas.min(), pred.min()) * 0.8, max(meas.max(), pred.max()) * 1.25
        axes[0].plot([lo, hi], [lo, hi], "k:")
        axes[0].set(xscale="log", yscale="log", xlabel="measured ms per step", ylabel="predicted ms per step",
                    title=f"cost model fit (median error {model['fit']['median_rel_error']:.0%})")
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
            ax.set(xscale="log", yscale="log", xlabel="nodes N (one worker each)", ylabel="predicted samples / s",
                   title=f"{kind}: P={ex['params']}, {what},\nASSUMED {ex['assumed_bandwidth_gbit_per_s']:g} "
                         "Gbit/s network")
            ax.set_xticks(N, [str(n) for n in N])
            ax.legend(fontsize=7)
        save(fig, "costmodel.png")
    return written


def smoothed(lines: list[dict], batch_size: int) -> tuple[list[int], list[float]]:
    """Samples seen after each metrics line, and the loss averaged over the last ``SMOOTH`` batches of samples.

    A sync line is one step of ``batch_size`` samples; an async/ssp line is one push (about B/K).
    """
    samples = [m.get("samples", m["step"] * batch_size) for m in lines]
    window = max(1, round(SMOOTH * batch_size * len(lines) / samples[-1])) if lines else 1
    loss = np.array([m["loss"] for m in lines])
    return samples, [float(loss[max(0, i - window + 1):i + 1].mean()) for i in range(len(loss))]


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"scaling.py: error: --out {args.out} exists and is not empty", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    from distbp.distributed.loopback import keep_local_ray_on_loopback

    keep_local_ray_on_loopback(args.address)
    import ray
    from tqdm import tqdm

    from distbp.distributed.runtime import connect
    from distbp.errors import UsageError

    try:
        started = connect(args.address, cpus_wanted=max(args.workers) + max(args.servers))
    except UsageError as exc:
        print(f"scaling.py: error: {exc}", file=sys.stderr)
        return 2
    rows, mode_lines, skipped, measured = [], {}, [], {}
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        runs = plan(args, cpus)
        # A bar on a terminal; in a log (stderr redirected, CI) one plain line per run instead,
        # since a bar's \r-joined redraws make one unreadable line of the whole sweep.
        tty = sys.stderr.isatty()
        for i, run in enumerate(tqdm(runs, desc="scaling runs", unit="run", file=sys.stderr, disable=not tty), 1):
            if run.workers + run.servers > cpus:  # would wait for a placement that never comes
                skipped.append(f"{run.name}: needs {run.workers + run.servers} CPUs, the cluster has {cpus:g}")
                if not tty:
                    print(f"scaling run {i}/{len(runs)} {run.name}: skipped", file=sys.stderr, flush=True)
                continue
            if run.key in measured:
                row, lines = dict(measured[run.key][0]), measured[run.key][1]
                row.update(sweep=run.sweep, per_worker_batch=run.extra.get("per_worker_batch", row["per_worker_batch"]))
            else:
                row, lines = measured[run.key] = execute(run, args.out, args.warmup)
            rows.append(row)
            if not tty:
                print(f"scaling run {i}/{len(runs)} {run.name}: {outcome(row)}", file=sys.stderr, flush=True)
            if run.sweep == "mode":
                mode_lines[run.mode + (f" s={run.staleness}" if run.staleness is not None else "")] = lines
    finally:
        if started:
            ray.shutdown()
    add_ratios(rows)
    model = fit_cost_model(rows, args.bandwidth_gbit)
    write_table(os.path.join(args.out, "results.csv"), rows)
    with open(os.path.join(args.out, "modes.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mode", "step", "time", "samples", "loss", "staleness"])
        for label, lines in mode_lines.items():
            samples, _ = smoothed(lines, runs[-1].batch_size)
            for m, n in zip(lines, samples):
                writer.writerow([label, m["step"], m["time"], n, m["loss"], m.get("staleness", 0)])
    host = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "ray_cpus": cpus,
            "address": args.address or os.environ.get("RAY_ADDRESS") or "local"}
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"host": host, "args": {k: v for k, v in vars(args).items()}, "rows": rows,
                   "skipped": skipped}, fh, indent=1)
    if model is not None:
        with open(os.path.join(args.out, "costmodel.json"), "w") as fh:
            json.dump(model, fh, indent=1)
    written = plots(args.out, rows, mode_lines, model)
    summarize(rows, model, skipped, written)
    return 0


def outcome(row: dict) -> str:
    """One run's result in a few words, for the log line of a sweep without a terminal."""
    if "step_s" in row:
        return f"{row['step_s'] * 1e3:.2f} ms per step, {row['samples_per_s']:.0f} samples/s"
    return f"final loss {row['final_loss']:.4f}, wall {row['wall_time_s']:.1f} s"


def summarize(rows: list[dict], model: dict | None, skipped: list[str], written: list[str]) -> None:
    print(f"{'sweep':8} {'layers':18} {'K':>2} {'S':>2} {'B':>5} {'ms/step':>8} {'samples/s':>10} "
          f"{'speedup':>7} {'eff':>5} {'MB/server':>9}")
    for r in rows:
        if "step_s" not in r:
            continue
        print(f"{r['sweep']:8} {r['layers']:18} {r['workers']:>2} {r['servers']:>2} {r['batch_size']:>5} "
              f"{r['step_s'] * 1e3:8.2f} {r['samples_per_s']:10.0f} {r.get('speedup', math.nan):7.2f} "
              f"{r.get('efficiency', math.nan):5.2f} {r['bytes_per_server'] / 1e6:9.3f}")
    for r in rows:
        if r["sweep"] == "mode":
            print(f"mode {r['mode']:5}: final loss {r['final_loss']:.4f}, wall {r['wall_time_s']:.1f} s, "
                  f"exact {r['exact']}")
    if model is not None:
        f = model["fit"]
        def rate(value, unit):
            return "no cost" if value is None else f"{value:.2f} {unit}"

        print(f"cost model: alpha {f['alpha'] * 1e3:.2f} ms, compute {rate(f['gflops_per_worker'], 'GFLOP/s')} "
              f"per worker, server {rate(f['server_gbytes_per_s'], 'GB/s')} effective; "
              f"median error {f['median_rel_error']:.0%}, max {f['max_rel_error']:.0%} over {f['points']} runs")
    for line in skipped:
        print("skipped " + line)
    print("wrote " + ", ".join(os.path.basename(p) for p in written))


if __name__ == "__main__":
    sys.exit(main())
