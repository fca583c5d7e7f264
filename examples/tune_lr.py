"""A Ray Tune search over the learning rate and the batch size, each trial one ``distbp.fit``.

    pip install -e ".[tune]"
    python examples/tune_lr.py --out runs/tune      # 6 trials on the spirals, about a minute

Each trial is a Tune function trainable that calls ``distbp.fit`` on the spirals (20% held out
for validation) with a ``distbp.Callback`` reporting each evaluation to Tune (``tune.report``);
``fit`` reuses the Ray the trial runs in, and places its own workers and server there beside
the trial (2 + 1 CPUs a trial, 2 trials at a time: 8 logical CPUs).  Every trial writes its
own run directory under ``--out``; the script prints the trials as a Markdown table, best first.
"""

from __future__ import annotations

import argparse
import os

from distbp.distributed.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback("local")  # before Ray is imported: this example's Ray stays on 127.0.0.1

import ray  # noqa: E402
from ray import tune  # noqa: E402

import distbp  # noqa: E402
from distbp.data.datasets import spirals  # noqa: E402

GRID = {"lr": [0.003, 0.01, 0.03], "batch_size": [64, 256]}
EPOCHS = 20


class ReportToTune(distbp.Callback):
    """Each evaluation of the validation split, with the step and the last batch's loss, to Tune."""

    def __init__(self):
        self.loss = float("nan")

    def on_step(self, record):
        self.loss = record["loss"]

    def on_evaluation(self, record):
        tune.report({"step": record["step"], "epoch": record["epoch"], "loss": self.loss,
                     "validation_loss": record["validation_loss"],
                     "validation_accuracy": record["validation_accuracy"]})


def trial(params: dict, out: str) -> None:
    data = spirals()
    result = distbp.fit(data.X, data.y, layers=[2, 64, 64, 3], workers=2, batch_size=params["batch_size"],
                        micro_batch=32, epochs=EPOCHS, val_fraction=0.2, lr=params["lr"],
                        out=os.path.join(out, f"lr{params['lr']}-b{params['batch_size']}"),
                        callbacks=[ReportToTune()])
    last = [r for r in result.metrics if "validation_accuracy" in r][-1]
    tune.report({"step": result.summary["steps"], "epoch": result.summary["epochs"],
                 "loss": result.summary["last_batch_loss"], "validation_loss": last["validation_loss"],
                 "validation_accuracy": last["validation_accuracy"],
                 "train_accuracy": result.summary["train_accuracy"],
                 "seconds": result.summary["wall_time_s"], "weights_sha256": result.summary["weights_sha256"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tune", help="where the trials' run directories go")
    parser.add_argument("--cpus", type=int, default=8, help="logical CPUs of the local Ray (3 a trial, 1 for Tune)")
    args = parser.parse_args()
    out = os.path.abspath(args.out)  # trials run in directories of their own
    ray.init(num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    tuner = tune.Tuner(
        tune.with_parameters(trial, out=out),
        param_space={name: tune.grid_search(values) for name, values in GRID.items()},
        tune_config=tune.TuneConfig(metric="validation_accuracy", mode="max", max_concurrent_trials=2),
        run_config=tune.RunConfig(name="distbp-tune", storage_path=os.path.join(out, "tune"), verbose=0),
    )
    results = tuner.fit()
    rows = sorted((r for r in results if r.error is None), key=lambda r: -r.metrics["validation_accuracy"])
    print("| lr | batch | steps | validation accuracy | validation loss | train accuracy | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = r.metrics
        print(f"| {r.config['lr']} | {r.config['batch_size']} | {m['step']} | {m['validation_accuracy']:.4f} | "
              f"{m['validation_loss']:.4f} | {m['train_accuracy']:.4f} | {m['seconds']:.1f} |")
    for r in results:
        if r.error is not None:
            print(f"trial {r.config} failed: {r.error}")
    ray.shutdown()


if __name__ == "__main__":
    main()
