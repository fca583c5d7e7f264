"""The gradient noise scale (step/noise.py): exact across K, S and T, and right on average.

The estimator is checked against something computed differently: with ``lr 0`` the weights
never move, so every step samples the same population of per-sample gradients, whose ``|G|^2``
and ``tr(Sigma)`` ``Network.per_sample_gradients`` gives exactly.  The per-step estimates are
unbiased for them only with the finite-population correction (batches are drawn without
replacement within an epoch); on a training set of 240 samples in batches of 80 that correction
is large, and the uncorrected estimator is shown to miss.
"""

import math

import numpy as np
import pytest
from conftest import step_lines, train_config

import distbp
from distbp.loops.sync import train
from distbp.step import noise

FIELDS = ("grad_sq_micro", "grad_sq_batch", "grad_sq_estimate", "grad_var_estimate", "b_simple")


def expected(g2: float, trace: float, sizes: list[int], n: int) -> tuple[float, float]:
    """``E|G_m|^2`` summed over the micro-batches, and ``E|G_B|^2``: the model the estimator inverts."""
    return (math.fsum(g2 + trace * noise.spread(m, n) for m in sizes),
            g2 + trace * noise.spread(sum(sizes), n))


@pytest.mark.parametrize("sizes, n", [([8] * 8, 1000), ([8] * 7 + [4], 60), ([128, 128], 10**6), ([3, 2], 5)])
def test_the_estimates_invert_their_expectations(sizes, n):
    """Fed the expected squared norms, the estimates give back ``|G|^2`` and ``tr(Sigma)``: equal
    and unequal micro-batches, with and without a finite population to speak of."""
    micro, batch = expected(2.5, 40.0, sizes, n)
    est = noise.estimate(micro, sizes, batch, n)
    assert est.grad_sq == pytest.approx(2.5, rel=1e-9) and est.trace == pytest.approx(40.0, rel=1e-9)


def test_a_step_of_one_micro_batch_has_no_estimate_and_the_whole_set_is_g_itself():
    assert noise.estimate(1.0, [64], 1.0, 1000) is None
    assert noise.spread(10, 10) == 0.0  # a mean over the whole set is G: |G_B|^2 is |G|^2
    est = noise.estimate(3.0, [5, 5], 1.0, 10)
    assert est.grad_sq == 1.0 and est.trace == pytest.approx(0.5 / noise.spread(5, 10))


def test_b_simple_is_the_ratio_of_the_moving_averages():
    scale = noise.NoiseScale(decay=0.5)
    assert scale.value() is None
    assert scale.add(noise.Estimate(-1.0, 3.0)) is None  # the averaged |G|^2 is not positive yet
    assert scale.add(noise.Estimate(5.0, 6.0)) == pytest.approx((0.25 * 3 + 0.5 * 6) / (-0.25 + 2.5))


def noise_of(run_dir) -> list[tuple]:
    return [tuple(r[k] for k in FIELDS) for r in step_lines(run_dir)]


# Windows of one step (a callback on each step), of many (the default), the object store, two
# servers with --clip-norm (they swap their sums of squares), threads: every run the same noise bits.
RUNS = [dict(workers=1), dict(workers=3), dict(workers=3, servers=2), dict(workers=2, threads_per_worker=2),
        dict(workers=3, transport="object-store"), dict(workers=2, servers=2, clip_norm=0.5)]


def test_the_noise_scale_is_the_same_bits_for_any_k_s_and_t(ray_session, tmp_path):
    common = dict(steps=24, batch_size=60, micro_batch=8, optimizer="momentum", lr=0.05)  # 8 micro-batches, 4 rows last
    first = train(train_config(tmp_path, **common, **RUNS[0]))
    reference = noise_of(first["out"])
    assert all(b is not None for *_, b in reference[1:])
    assert first["b_simple"] == reference[-1][-1] > 0
    for options in RUNS[1:]:
        summary = train(train_config(tmp_path, **common, **options))
        assert noise_of(summary["out"]) == reference, options
        if "clip_norm" not in options:
            assert summary["weights_sha256"] == first["weights_sha256"], options


class EveryStep(distbp.Callback):
    """A callback on each step: a window of one step each."""

    def on_step(self, record):
        return False


def test_one_by_one_and_resumed_runs_have_the_noise_of_an_uninterrupted_run(ray_session, tmp_path):
    common = dict(steps=30, batch_size=60, micro_batch=8, workers=2)
    whole = train(train_config(tmp_path, **common))
    crew = train(train_config(tmp_path, **common), callbacks=[EveryStep()])
    assert crew["windows"]["windows"] == 30 and whole["windows"]["windows"] < 30
    assert noise_of(crew["out"]) == noise_of(whole["out"])
    half = train(train_config(tmp_path, **{**common, "steps": 13}))
    from distbp.run import checkpoint
    config = train_config(tmp_path, **common)
    config.out = half["out"]
    resumed = train(config, resumed=checkpoint.load(f"{half['out']}/checkpoint.npz"))
    assert noise_of(resumed["out"]) == noise_of(whole["out"])  # the moving averages replayed from its lines
    assert resumed["b_simple"] == whole["b_simple"]
    assert resumed["b_simple_trajectory"] == whole["b_simple_trajectory"]


def population(X, y, layers, seed) -> tuple[float, float]:
    """``|G|^2`` and ``tr(Sigma)`` of the per-sample gradients of the whole training set."""
    per_sample = distbp.Network(layers, seed=seed).per_sample_gradients(X, y)
    g = np.concatenate([p.reshape(len(X), -1) for p in per_sample], axis=1)
    G = g.mean(axis=0)
    return float(G @ G), float(((g - G) ** 2).sum(axis=1).mean())


def test_with_lr_zero_the_estimates_average_to_the_per_sample_truth(ray_session, tmp_path):
    """240 samples, B = 80 in 10 micro-batches of 8, 300 epochs at lr 0.

    The epochs are independent (a fresh permutation each), the steps within one are not (they
    partition the set), so the tolerance is 4 standard errors of the per-epoch means.
    """
    rng = np.random.default_rng(3)
    X = rng.standard_normal((240, 4))
    y = (X[:, 0] * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    layers, seed, B, M, epochs = [4, 12, 3], 7, 80, 8, 300
    result = distbp.fit(X, y, layers=layers, seed=seed, workers=2, batch_size=B, micro_batch=M, lr=0.0,
                        epochs=epochs, out=str(tmp_path / "lr0"))
    g2, trace = population(X, y, layers, seed)
    steps = step_lines(result.path)
    assert len(steps) == 3 * epochs and len({r["grad_xxh3"] for r in steps[:3]}) == 3

    def check(name: str, truth: float, values: np.ndarray) -> float:
        per_epoch = values.reshape(epochs, 3).mean(axis=1)
        se = per_epoch.std(ddof=1) / math.sqrt(epochs)
        assert abs(per_epoch.mean() - truth) < 4 * se, (name, per_epoch.mean(), truth, se)
        assert 4 * se < 0.15 * abs(truth), (name, se, truth)  # the test is sharp enough to mean something
        return se

    est_g2 = np.array([r["grad_sq_estimate"] for r in steps])
    est_trace = np.array([r["grad_var_estimate"] for r in steps])
    se_g2 = check("|G|^2", g2, est_g2)
    check("tr(Sigma)", trace, est_trace)
    assert est_trace.mean() / est_g2.mean() == pytest.approx(trace / g2, rel=0.3)
    # The same squared norms read as if the samples were drawn with replacement (c(b) = 1/b):
    # E|G_B|^2 carries tr(Sigma) (N - B) / (B (N - 1)), not tr(Sigma) / B, and |G|^2 comes out biased.
    small = np.array([r["grad_sq_micro"] for r in steps])
    big = np.array([r["grad_sq_batch"] for r in steps])
    naive_trace = (small - big) / (1 / M - 1 / B)
    naive_g2 = big - naive_trace / B
    assert abs(naive_g2.mean() - g2) > 6 * se_g2, (naive_g2.mean(), g2, se_g2)
