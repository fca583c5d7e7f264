"""A Ray Tune search over the learning rate and the batch size, each trial one ``distbp.fit``.

    pip install -e ".[tune]"
    python examples/tune_lr.py --out runs/tune      # 6 trials on the spirals, about a minute
    python examples/tune_lr.py --out runs/tune-check --lr 0.01 --batch-size 256 --epochs 1   # a check

Each trial is a Tune function trainable that calls ``distbp.fit`` on the spirals (20% held out
for validation) with a ``distbp.Callback`` reporting each evaluation to Tune (``tune.report``);
``fit`` reuses the Ray the trial runs in, and places its own workers and server there beside
the trial (2 + 1 CPUs a trial, 2 trials at a time: 8 logical CPUs).  Every trial writes its
own run directory under ``--out``; the script prints the trials as a Markdown table, best first.
It uses only distbp's public API (``distbp.fit``, ``distbp.Callback``, ``distbp.load_dataset``).
"""

from __future__ import annotations

import argparse
import os

# Before Ray is first imported: with multi-node support off, Ray keeps this example's local Ray
# on 127.0.0.1 instead of listening on every interface (cluster/README.md, "What Ray binds").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray import tune  # noqa: E402

import distbp  # noqa: E402

LRS, BATCH_SIZES, EPOCHS = "0.003,0.01,0.03", "64,256", 20  # the grid of README's table


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


def trial(params: dict, out: str, epochs: float) -> None:
    data = distbp.load_dataset("spirals")
    result = distbp.fit(data.X, data.y, layers=[2, 64, 64, 3], workers=2, batch_size=params["batch_size"],
                        micro_batch=32, epochs=epochs, val_fraction=0.2, lr=params["lr"],
                        out=os.path.join(out, f"lr{params['lr']}-b{params['batch_size']}"),
                        callbacks=[ReportToTune()])
    last = result.evaluations[-1]  # the last evaluation of the validation split
    tune.report({"step": result.summary["steps"], "epoch": result.summary["epochs"],
                 "loss": result.summary["last_batch_loss"], "validation_loss": last["validation_loss"],
                 "validation_accuracy": last["validation_accuracy"],
                 "train_accuracy": result.summary["train_accuracy"],
                 "seconds": result.summary["wall_time_s"], "weights_sha256": result.summary["weights_sha256"]})


def numbers(kind):
    """``0.01,0.03`` as a list of ``kind`` (an argparse type)."""
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tune", help="where the trials' run directories go")
    parser.add_argument("--cpus", type=int, default=8, help="logical CPUs of the local Ray (3 a trial, 1 for Tune)")
    parser.add_argument("--lr", type=numbers(float), default=numbers(float)(LRS), metavar="LR,...",
                        help=f"learning rates to try (default: {LRS})")
    parser.add_argument("--batch-size", type=numbers(int), default=numbers(int)(BATCH_SIZES), metavar="B,...",
                        help=f"batch sizes to try (default: {BATCH_SIZES})")
    parser.add_argument("--epochs", type=float, default=EPOCHS, help=f"epochs of each trial (default: {EPOCHS})")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")  # one line, status 2
    args = parser.parse_args()
    try:  # a bad value is one line now, not a failed trial for each
        for lr in args.lr:
            for batch_size in args.batch_size:
                distbp.Config(layers="2,64,64,3", batch_size=batch_size, micro_batch=32, epochs=args.epochs,
                              lr=lr, val_fraction=0.2).validate()
    except distbp.UsageError as exc:
        parser.error(str(exc))
    out = os.path.abspath(args.out)  # trials run in directories of their own
    ray.init(num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    tuner = tune.Tuner(
        tune.with_parameters(trial, out=out, epochs=args.epochs),
        param_space={"lr": tune.grid_search(args.lr), "batch_size": tune.grid_search(args.batch_size)},
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
