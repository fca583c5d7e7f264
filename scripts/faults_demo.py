"""Inject each kind of fault into one run and compare it with the fault-free run, step by step.

    python scripts/faults_demo.py [--steps 40] [--workers 2]

For each run: the final weights_sha256, whether every step's summed-gradient hash equals the
fault-free run's (the same samples, each counted once), the longest and the median step time
(from metrics.jsonl), and what the crew did.  "delay, no stealing" is the same delayed run
with backups switched off (``distbp.step.plan.LATE_FACTOR`` raised), for the cost of
waiting for a straggler.  The figures in docs/reliability.md come from this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from distbp import Config
from distbp.distributed.loopback import keep_local_ray_on_loopback
from distbp.run import metrics, resume

keep_local_ray_on_loopback("local")  # before Ray is imported: its local Ray listens on 127.0.0.1 only
import ray  # noqa: E402

from distbp.loops.sync import train  # noqa: E402  (imports Ray)
from distbp.step import plan  # noqa: E402


def step_lines(out: str) -> list[dict]:
    return metrics.steps(metrics.read(os.path.join(out, metrics.NAME)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds worker 1 stalls at step 10")
    args = parser.parse_args()
    K, S = args.workers, args.steps
    base = dict(dataset="random:20000,784,10", layers="784,256,128,10", batch_size=512, micro_batch=32,
                steps=S, workers=K, optimizer="adam")
    runs = [
        ("fault-free", {}),
        (f"fault-free, K={K + 1}", {"workers": K + 1}),
        ("kill worker 1 at step 10", {"fault_injection": "kill-worker:1@10"}),
        ("kill the server at step 15", {"fault_injection": "kill-server@15", "checkpoint_every": 10}),
        (f"delay worker 1 {args.delay:g} s at step 10", {"fault_injection": f"delay-worker:1@10:{args.delay:g}"}),
        ("  the same, no stealing", {"fault_injection": f"delay-worker:1@10:{args.delay:g}", "no_stealing": True}),
        ("stop at step 20, --resume to the end", {"stop_at": 20}),
    ]
    ray.init(num_cpus=max(os.cpu_count() or 1, K + 2), include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    root = tempfile.mkdtemp(prefix="distbp-faults-")
    clean = None
    print(f"{'run':36} {'steps':>5} {'weights_sha256':16} {'same':>5} {'grads':>5} {'longest':>8} "
          f"{'median':>7}  crew")
    for name, extra in runs:
        out = os.path.join(root, f"run-{len(os.listdir(root))}")
        no_stealing = extra.pop("no_stealing", False)
        stop_at = extra.pop("stop_at", None)
        if stop_at:  # a run of stop_at steps, continued with --resume to all S steps
            first = Config(**{**base, "steps": stop_at, "out": out})
            first.validate()
            train(first)
            summary = train(*resume.load(out, {"steps": S}))
        else:
            config = Config(**{**base, **extra, "out": out})
            config.validate()
            late = plan.LATE_FACTOR
            plan.LATE_FACTOR = 1e9 if no_stealing else late
            try:
                summary = train(config)
            finally:
                plan.LATE_FACTOR = late
        lines = step_lines(out)
        times = [e["time"] for e in lines]
        steps = [b - a for a, b in zip(times, times[1:])]
        clean = clean or (summary, [e["grad_xxh3"] for e in lines])
        same = summary["weights_sha256"] == clean[0]["weights_sha256"]
        grads = [e["grad_xxh3"] for e in lines] == clean[1]
        stats = {k: v for k, v in summary["faults"].items() if k != "injected" and v}
        print(f"{name:36} {len(lines):5d} {summary['weights_sha256'][:16]} {str(same):>5} {str(grads):>5} "
              f"{max(steps):7.3f}s {statistics.median(steps):6.3f}s  {stats}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
