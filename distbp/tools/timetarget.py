"""``python -m distbp.tools.costmodel``: the tables of the N-nodes model (nodemodel.py).

    python -m distbp.tools.costmodel                      # distbp's step beside a ring, N = 1..64
    python -m distbp.tools.costmodel time-to-accuracy --steps DIR/best.csv --out DIR

``time-to-accuracy`` reads the steps each batch size B needed to reach the target
(scripts/batch_scaling.py's ``best.csv``: columns ``batch_size`` and ``steps_to_target``; a B
that never reached it, an empty or non-finite value, is left out and listed), multiplies them by
the modelled step time of B on N nodes for each network, prints a Markdown table of the best B
and its time for each N, and with ``--out`` writes ``time_to_accuracy.csv`` (every network, N
and B), ``time_to_accuracy.json`` (the same, the best B per N, where more nodes stop paying, the
model and its constants) and ``time_to_accuracy.png``.  Bad input: one line, status 2, nothing
written.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import textwrap
from dataclasses import asdict

from .nodemodel import NODES, Constants, compare, markdown, time_to_accuracy

FILES = ("time_to_accuracy.csv", "time_to_accuracy.json", "time_to_accuracy.png")


class Parser(argparse.ArgumentParser):
    """A usage error is a ValueError: ``main`` prints it as one line, status 2."""

    def error(self, message: str):
        raise ValueError(message)


def sizes(text: str, what: str, low: float = 1) -> list:
    """A comma-separated list of numbers >= ``low`` (ints where they are whole)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: not a list of numbers: {text!r}") from None
    if not values or min(values) < low or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: need numbers >= {low:g}, got {text!r}")
    return [int(v) if v == int(v) else v for v in values]


def layers_beside(path: str, table: list[dict]) -> str | None:
    """The layers of best.csv's problem from the batch_scaling.json beside it, if there is one."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "batch_scaling.json")) as fh:
            problems = json.load(fh)["problems"]
        return ",".join(map(str, problems[table[0]["problem"]]["layers"]))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def integers(text: str, what: str, count: int | None = None) -> list[int]:
    """``sizes`` that must be integers (``count`` of them, if given)."""
    values = sizes(text, what)
    if any(not isinstance(v, int) for v in values) or (count is not None and len(values) != count):
        raise ValueError(f"{what}: need {'one integer' if count == 1 else 'integers'}, got {text!r}")
    return values


def read_steps(path: str) -> tuple[dict[int, float], list[int], list[dict]]:
    """``steps_to_target`` by ``batch_size`` from a best.csv, the batch sizes that did not reach it,
    and the table's rows."""
    try:
        with open(path, newline="") as fh:
            table = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    missing = {"batch_size", "steps_to_target"} - set(table[0] if table else ())
    if missing:
        raise ValueError(f"{path} has no column {', '.join(sorted(missing))} (a best.csv of scripts/batch_scaling.py)")
    steps, unreached = {}, []
    for line, row in enumerate(table, start=2):
        try:
            B = int(row["batch_size"])
            value = float(row["steps_to_target"]) if (row["steps_to_target"] or "").strip() else math.nan
        except ValueError:
            raise ValueError(f"{path} line {line}: batch_size {row['batch_size']!r}, steps_to_target "
                             f"{row['steps_to_target']!r} are not numbers") from None
        if B < 1 or B in steps or B in unreached:
            raise ValueError(f"{path} line {line}: batch_size {B} is not a new positive integer")
        if math.isfinite(value) and value > 0:
            steps[B] = value
        else:
            unreached.append(B)
    if not steps:
        raise ValueError(f"{path}: no batch size reached the target")
    return steps, unreached, table


def tta_markdown(result: dict) -> str:
    """The best B and its time to target for each N (rows) and network (columns), then where more
    nodes stop paying."""
    gbits = list(dict.fromkeys(r["gbit"] for r in result["best"]))
    lines = ["| N | " + " | ".join(f"{g:g} Gbit/s: best B, time to target" for g in gbits) + " |",
             "|---:|" + "---|" * len(gbits)]
    for N in dict.fromkeys(r["nodes"] for r in result["best"]):
        cells = []
        for g in gbits:
            r = next(r for r in result["best"] if r["gbit"] == g and r["nodes"] == N)
            idle = f", {r['nodes'] - r['busy_nodes']} idle" if r["busy_nodes"] < r["nodes"] else ""
            cells.append(f"B = {r['batch_size']}: {r['time_s']:.3g} s ({r['step_s'] * 1e3:.3g} ms x "
                         f"{r['steps_to_target']:g} steps{idle})")
        lines.append(f"| {N} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in result["stops_paying"]:
        saves = s["next_saves"]
        tail = (f"every further N of the list saves at least {result['gain']:.0%}" if saves is None else
                f"the next N saves only {saves:.0%}" if saves >= 0 else f"the next N takes {-saves:.0%} longer")
        lines.append(f"- {s['gbit']:g} Gbit/s: more nodes pay up to N = {s['worth_nodes']} (B = "
                     f"{s['worth_batch_size']}, {s['worth_time_s']:.3g} s); {tail}. Fastest: N = "
                     f"{s['fastest_nodes']}, B = {s['fastest_batch_size']}, {s['fastest_time_s']:.3g} s.")
    return "\n".join(lines)


def plot(path: str, result: dict, title: str) -> None:
    """Time to target against N, one line per network, each point labelled with its best B
    (a hollow marker where some of the N nodes idle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, g in enumerate(dict.fromkeys(r["gbit"] for r in result["best"])):
        line = [r for r in result["best"] if r["gbit"] == g]
        drawn = ax.plot([r["nodes"] for r in line], [r["time_s"] for r in line], ("-", "--", ":", "-.")[i % 4],
                        lw=2.5 - 0.5 * (i % 3), label=f"{g:g} Gbit/s")[0]  # lines that coincide stay visible
        for r in line:
            full = r["busy_nodes"] == r["nodes"]
            ax.plot(r["nodes"], r["time_s"], "o", color=drawn.get_color(), mfc=drawn.get_color() if full else "none")
            ax.annotate(f"{r['batch_size']}", (r["nodes"], r["time_s"]), textcoords="offset points", xytext=(3, 4),
                        fontsize=7, color=drawn.get_color())
    nodes = sorted({r["nodes"] for r in result["best"]})
    ax.set(xscale="log", yscale="log", xlabel="nodes N", ylabel="modelled time to target (s)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.set_xticks(nodes, [str(n) for n in nodes])
    ax.legend(fontsize=8, title="labels: best B; hollow: nodes idle", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Description": title})
    plt.close(fig)


def tta_parser() -> Parser:
    ap = Parser(prog="costmodel time-to-accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", required=True, metavar="BEST_CSV", help="scripts/batch_scaling.py's best.csv")
    ap.add_argument("--layers", help="the model of the steps (default: its problem's in the batch_scaling.json "
                    "beside BEST_CSV, else 784,256,256,10)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--cores", default="16", help="cores of a node, one worker of that many threads (default 16)")
    ap.add_argument("--micro-batch", default="64", help="the deployment's micro-batch M, at most B (default 64)")
    ap.add_argument("--gbits", default="1,10,100", help="networks, Gbit/s (default 1,10,100)")
    ap.add_argument("--nodes", default=",".join(map(str, NODES)), help="node counts, ascending (default 1,...,64)")
    ap.add_argument("--gain", default="0.1", help="more nodes pay while the next N cuts the time by this (0.1)")
    ap.add_argument("--out", metavar="DIR", help="write " + ", ".join(FILES) + " here (created; must be empty)")
    return ap


def tta_main(argv: list[str]) -> int:
    args = tta_parser().parse_args(argv)
    steps, unreached, table = read_steps(args.steps)
    args.layers = args.layers or layers_beside(args.steps, table) or "784,256,256,10"
    layers, nodes = integers(args.layers, "--layers"), integers(args.nodes, "--nodes")
    (cores,), (M,) = integers(args.cores, "--cores", 1), integers(args.micro_batch, "--micro-batch", 1)
    gbits, gain = sizes(args.gbits, "--gbits", 1e-6), sizes(args.gain, "--gain", 0)
    for bad, why in ((len(layers) < 2, f"--layers: at least two sizes, got {args.layers!r}"),
                     (nodes != sorted(set(nodes)), f"--nodes: ascending, got {args.nodes!r}"),
                     (len(gain) != 1 or not gain[0] < 1, f"--gain: one number below 1, got {args.gain!r}")):
        if bad:
            raise ValueError(why)
    if args.out:
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ValueError(f"--out {args.out} exists and is not an empty directory")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("the plot needs matplotlib: pip install -e '.[plot]'") from None
    P = sum((a + 1) * b for a, b in zip(layers[:-1], layers[1:]))
    itemsize = 4 if args.dtype == "float32" else 8
    c = Constants()
    result = time_to_accuracy(steps, P, itemsize, nodes, gbits, c, cores, M, gain[0])
    model = {"layers": args.layers, "params": P, "dtype": args.dtype, "cores_per_node": cores,
             "micro_batch": M, "topology": "parameter server, S = N servers co-located (one per node), "
             "one worker of C threads a node (nodemodel.ps_step)", "constants": asdict(c)}
    title = (f"{args.layers} {args.dtype} (P = {P:,}), {cores} core{'s' if cores > 1 else ''} a node, M = {M}, "
             f"S = N servers; steps from {args.steps}")
    print(f"Modelled time to target, {title}" + (f"; never reached the target: B = {unreached}" if unreached else ""))
    print()
    print(tta_markdown(result))
    if args.out:
        write(args.out, result, {"source": os.path.abspath(args.steps), "unreached": unreached, "model": model},
              title)
    return 0


def write(out: str, result: dict, head: dict, title: str) -> None:
    os.makedirs(out, exist_ok=True)
    best = {(r["gbit"], r["nodes"], r["batch_size"]) for r in result["best"]}
    with open(os.path.join(out, FILES[0]), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*result["rows"][0], "best"])
        writer.writeheader()
        writer.writerows({**r, "best": (r["gbit"], r["nodes"], r["batch_size"]) in best} for r in result["rows"])
    with open(os.path.join(out, FILES[1]), "w") as fh:
        json.dump({**head, **result}, fh, indent=1)
    plot(os.path.join(out, FILES[2]), result, title)
    print("wrote " + ", ".join(os.path.join(out, f) for f in FILES))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    tta = argv[:1] == ["time-to-accuracy"]
    try:
        return tta_main(argv[1:]) if tta else nodes_main(argv)
    except ValueError as exc:
        print(f"costmodel{' time-to-accuracy' if tta else ''}: error: {exc}", file=sys.stderr)
        return 2


def nodes_main(argv: list[str]) -> int:
    """The N-nodes table: distbp's step beside a ring, weak scaling, N = 1..64."""
    ap = Parser(prog="python -m distbp.tools.costmodel",
                description="distbp's step beside ring all-reduce on N nodes x C cores; "
                            "'time-to-accuracy --help' for the time to a target")
    ap.add_argument("--layers", default="784,1024,1024,10")
    ap.add_argument("--batch-per-node", default="1024")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--cores", default="16")
    args = ap.parse_args(argv)
    layers = integers(args.layers, "--layers")
    (batch,), (cores,) = integers(args.batch_per_node, "--batch-per-node", 1), integers(args.cores, "--cores", 1)
    P = sum((a + 1) * b for a, b in zip(layers[:-1], layers[1:]))
    print(markdown(compare(P, batch, 4 if args.dtype == "float32" else 8, cores, layers=tuple(layers))))
    return 0
