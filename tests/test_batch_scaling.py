"""scripts/batch_scaling.py: steps to a target against batch size, the fit of B_crit, the rate grid, --quick."""

import csv
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from distbp import Result

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "batch_scaling.py"


def load_script():
    spec = importlib.util.spec_from_file_location("batch_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["batch_scaling"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bs = load_script()

# A small teacher problem: 8 micro-batches of 8 at B = 64, so K = 4 workers get two each.
SMALL = bs.Problem("small", [8, 16, 16, 3], target=0.2, why="a test", lr0=0.1, max_steps=400,
                   teacher=(2048, 8, 16, 3), val_fraction=0.1, eval_samples=128)


def test_steps_to_target_are_the_same_number_for_one_and_four_workers(ray_session, tmp_path):
    X, y = bs.load(SMALL, None)
    one, four = (bs.run_trial(X, y, SMALL, 64, 0, 400, k, str(tmp_path / f"K{k}")) for k in (1, 4))
    assert one["reached"] and four["reached"], (one, four)
    assert one["steps_to_target"] == four["steps_to_target"]
    assert one["weights_sha256"] == four["weights_sha256"]
    # the target is not met at the first evaluation, and the run stopped where it was met
    assert one["steps_to_target"] > one["eval_every"] == 2
    assert one["steps_run"] == one["steps_to_target"]
    # the same step read from the run's own evaluation records, not from the callback
    evaluations = Result.from_path(one["run_dir"]).evaluations
    first = next(r["step"] for r in evaluations if 1 - r["validation_accuracy"] <= SMALL.target)
    assert first == one["steps_to_target"]
    assert one["samples_to_target"] == 64 * first


def test_the_fit_recovers_s_min_e_min_and_b_crit_from_exact_points():
    B = 2.0 ** np.arange(4, 14)
    for s_min, b_crit in ((50.0, 700.0), (12.0, 40.0), (300.0, 5000.0)):
        S = s_min * (1 + b_crit / B)
        fit = bs.fit_scaling(B, S)
        assert fit["s_min"] == pytest.approx(s_min, rel=1e-5)
        assert fit["b_crit"] == pytest.approx(b_crit, rel=1e-5)
        assert fit["e_min"] == pytest.approx(s_min * b_crit, rel=1e-5)
        assert fit["rms_log_error"] < 1e-5 and not fit["b_crit_at_bound"]
        # the same curve in its other form: (S/S_min - 1)(E/E_min - 1) = 1
        np.testing.assert_allclose((S / fit["s_min"] - 1) * (S * B / fit["e_min"] - 1), 1, rtol=1e-4)
    assert bs.fit_scaling([16, 32], [100, 50]) is None  # two points do not fix two parameters


def test_the_late_noise_scale_is_the_ratio_of_the_estimates_over_the_last_quarter():
    n, B, M = 10_000, 256, 32
    c_small, c_big = (n - M) / (M * (n - 1)), (n - B) / (B * (n - 1))

    def record(step, grad_sq, trace):  # what a step logs: E|G_b|^2 = |G|^2 + tr(Sigma) c(b), without noise
        return dict(step=step, grad_sq_micro=grad_sq + trace * c_small, grad_sq_batch=grad_sq + trace * c_big)

    early = [record(s, 2.0, 20.0) for s in range(1, 30)]  # B_simple 10
    late = [record(s, 1.0 + s / 100, 300.0 * (1.0 + s / 100)) for s in range(30, 40)]  # B_simple 300
    # step 40 ends the first epoch (ceil(10000 / 256) = 40 steps): its batch is the 16 samples left, unlike the others
    partial = [record(40, 5.0, 1.0)]
    after = [record(s, 1.0, 1e6) for s in range(41, 45)]  # after the target: left out
    assert bs.late_noise_scale(early + late + partial + after, 40, B, M, n) == pytest.approx(300.0, rel=1e-9)
    assert bs.late_noise_scale(early, 29, B, M, n) == pytest.approx(10.0, rel=1e-9)
    assert bs.late_noise_scale(early, 29, B, B, n) is None  # one micro-batch a step: no estimate
    assert bs.late_noise_scale([{"step": 1, "loss": 1.0}], 1, B, M, n) is None  # not logged


def test_samples_seen_count_the_short_last_batch_of_each_epoch():
    assert bs.samples_seen(74, 8192, 55000) == 10 * 55000 + 4 * 8192  # 7 steps an epoch, the 7th of 5848
    assert bs.samples_seen(30, 250, 1000) == 30 * 250  # B divides n: every batch is whole


@pytest.mark.parametrize("scores, expected", [
    ({-1: (100, 0.1), 0: (80, 0.1), 1: (120, 0.1)}, None),  # best inside
    ({-1: (90, 0.1), 0: (100, 0.1), 1: (130, 0.1)}, -2),  # best at the low edge
    ({-1: (130, 0.1), 0: (100, 0.1), 1: (math.inf, 0.2)}, None),
    ({-1: (130, 0.1), 0: (100, 0.1), 1: (90, 0.1)}, 2),  # best at the high edge
    ({-1: (100, 0.11), 0: (100, 0.09), 1: (110, 0.1)}, None),  # a tie in steps goes to the lower error
    ({-1: (math.inf, 0.3), 0: (math.inf, 0.2), 1: (math.inf, 0.25)}, None),  # none reached, best error inside
    ({-1: (math.inf, 0.4), 0: (math.inf, 0.3), 1: (math.inf, math.inf)}, None),
    ({-1: (math.inf, 0.4), 0: (math.inf, 0.3), 1: (math.inf, 0.2)}, 2),  # too slow everywhere: go up
    ({-1: (math.inf, math.inf), 0: (math.inf, math.inf)}, -2),  # all diverged: go down
])
def test_extension_steps_past_the_edge_where_the_best_is(scores, expected):
    assert bs.extension(scores) == expected


class FakeTrials:
    """Trials whose steps to target are a parabola in the lattice index, minimal at ``optimum(B)``."""

    def __init__(self, optimum):
        self.optimum, self.calls, self.log = optimum, [], print

    def run(self, batch_size, ks, cap):
        rows = []
        for k in ks:
            cap_k = min(cap, bs.fewest_steps(rows))
            steps = 100 + 10 * (k - self.optimum(batch_size)) ** 2
            self.calls.append((batch_size, k, cap_k))
            reached = steps <= cap_k
            rows.append(dict(batch_size=batch_size, lr_index=k, reached=reached, diverged=False,
                             steps_to_target=steps if reached else None, validation_error=0.1 if reached else 0.5))
        return rows


def test_the_grid_is_extended_at_an_edge_until_the_best_is_inside():
    problem = bs.Problem("fake", [2, 2], target=0.1, why="", lr0=1.0, max_steps=10_000, points=3, max_extra=6)
    trials = FakeTrials(lambda B: 5)
    rows, info = bs.search(problem, 64, 0, 10_000, trials)
    assert [k for _, k, _ in trials.calls] == [0, -1, 1, 2, 3, 4, 5, 6]
    assert info["best_index"] == 5 and info["extended"] == 5 and not info["lr_at_edge"]
    assert (info["grid_lr_lo"], info["grid_lr_hi"]) == (bs.lr_at(problem, -1), bs.lr_at(problem, 6))
    # each trial after the first is capped at the fewest steps so far
    assert [cap for _, _, cap in trials.calls] == [10_000, 350, 350, 260, 190, 140, 110, 100]
    # with fewer rates allowed the best stays at the edge, and the search says so
    short = bs.search(replace(problem, max_extra=2), 64, 0, 10_000, FakeTrials(lambda B: 5))[1]
    assert short["lr_at_edge"] and short["best_index"] == 3


def test_each_centre_follows_the_best_so_only_the_first_grid_is_searched_wide():
    # the best rate doubles with B (linear scaling): after the first B every grid is centred on it
    problem = bs.Problem("fake", [2, 2], target=0.1, why="", lr0=1.0, max_steps=10_000,
                         batch_sizes=[16, 32, 64, 128], points=5, per_octave=2)
    trials = FakeTrials(lambda B: 2 * int(math.log2(B // 16)) + 1)
    rows, best = bs.sweep(problem, trials)
    assert [r["lr_index"] for r in best] == [1, 3, 5, 7]
    assert all(r["extended"] == 0 and not r["lr_at_edge"] for r in best)
    assert [k for B, k, _ in trials.calls if B == 64][0] == 5  # the centre of B = 64's grid is its best
    # the cap of a B's first trial is twice the previous B's steps to target
    assert [cap for B, k, cap in trials.calls if B == 32][0] == 2 * 100


def test_quick_mode_writes_its_tables_json_and_plot(ray_session, tmp_path, capsys):
    out = tmp_path / "quick"
    assert bs.main(["--quick", "--out", str(out)]) == 0
    with open(out / "best.csv") as fh:
        header, *rows = list(csv.reader(fh))
    assert header[:6] == ["batch_size", "best_lr", "steps_to_target", "samples_to_target", "lr_at_edge", "b_simple"]
    best = [dict(zip(header, r)) for r in rows]
    with open(out / "trials.csv") as fh:
        trials = list(csv.DictReader(fh))
    assert {"batch_size", "lr", "reached", "steps_to_target", "seconds", "weights_sha256"} <= set(trials[0])
    assert len(best) >= 3 and [int(r["batch_size"]) for r in best] == sorted(int(r["batch_size"]) for r in best)
    samples = bs.QUICK.teacher[0]
    n_train = samples - round(samples * bs.QUICK.val_fraction)  # what fit trains on; the rest is validation
    for r in best:  # each B's best is the fewest steps among its trials, and its rate is one of them
        B = r["batch_size"]
        reached = [t for t in trials if t["batch_size"] == B and t["reached"] == "True"]
        assert int(r["steps_to_target"]) == min(int(t["steps_to_target"]) for t in reached)
        assert int(r["samples_to_target"]) == int(B) * int(r["steps_to_target"])
        run = next(t for t in reached if t["lr"] == r["best_lr"])
        records = [m for m in Result.from_path(run["run_dir"]).metrics if m["step"] <= int(r["steps_to_target"])]
        logged = [m["b_simple"] for m in records if m.get("b_simple") is not None]
        assert r["b_simple"] == (repr(logged[-1]) if logged else "")
        per_epoch = -(-n_train // int(B))
        whole = [m for m in records if m["step"] % per_epoch]  # an epoch's last batch may be short: left out
        window = whole[-max(10, len(whole) // 4):]
        if "grad_var_estimate" in window[-1]:  # distbp's own estimates of each step, summed over the same window
            late = sum(m["grad_var_estimate"] for m in window) / sum(m["grad_sq_estimate"] for m in window)
            assert float(r["b_simple_late"]) == pytest.approx(late, rel=1e-6)
    doc = json.loads((out / "batch_scaling.json").read_text())
    assert {"s_min", "e_min", "b_crit", "target", "machine", "command", "problems"} <= set(doc)
    assert doc["b_crit"] == pytest.approx(doc["e_min"] / doc["s_min"])
    assert {"cores", "load_average_start", "load_average_end", "ray_cpus"} <= set(doc["machine"])
    problem = doc["problems"]["synthetic-quick"]
    assert {"grid", "fit", "evaluation", "target", "why"} <= set(problem)
    assert (out / "batch_scaling-synthetic-quick.png").read_bytes()[:4] == b"\x89PNG"
    assert "B_crit" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--batch-sizes", "32,16"], "increasing positive integers"),
    (["--batch-sizes", "16,x"], "comma-separated integers"),
    (["--problems", "cifar"], "--problems: unknown cifar"),
    (["--problems", "fashion-mnist", "--data-dir", "/nonexistent/fashion"], "/nonexistent/fashion"),
    (["--problems", "synthetic", "--batch-sizes", "16,65536"], "larger than synthetic's training split"),
])
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, args, message):
    out = tmp_path / "never"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("batch_scaling.py: error: "), done.stderr
    assert message in done.stderr, done.stderr
    assert not out.exists()


def test_an_out_directory_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "kept.txt").write_text("mine")
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is not an empty directory" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
