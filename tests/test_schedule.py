"""Learning-rate schedules: the pure ``lr(t)`` functions, and that the trainer applies them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import train_config

from distbp.config import Config
from distbp.errors import UsageError
from distbp.lecture.network import Network
from distbp.lecture.optim import Hyper, update
from distbp.lecture.schedule import Schedule, from_config, parse_milestones, scaled_lr
from distbp.run import checkpoint

PEAK = 0.4


def test_constant_is_the_peak_at_every_step() -> None:
    lr = Schedule(PEAK, total_steps=50, steps_per_epoch=10)
    assert [lr(t) for t in range(1, 51)] == [PEAK] * 50


def test_warmup_ramps_linearly_to_the_peak_then_holds() -> None:
    W = 8
    lr = Schedule(PEAK, total_steps=30, steps_per_epoch=10, warmup_steps=W)
    ramp = [lr(t) for t in range(1, W + 1)]
    # Equal increments of peak / W, starting at one increment (step 1 is not wasted on lr 0).
    np.testing.assert_allclose(np.diff([0.0] + ramp), PEAK / W, rtol=1e-12)
    assert ramp[-1] == PEAK
    assert all(lr(t) == PEAK for t in range(W + 1, 31))


def test_step_decays_at_the_listed_epochs() -> None:
    spe, milestones, decay = 10, (2.0, 3.0), 0.1
    lr = Schedule(PEAK, total_steps=50, steps_per_epoch=spe, kind="step", decay=decay, milestones=milestones)
    for t in range(1, 51):
        epoch = (t - 1) // spe  # 0-based epoch that step t belongs to
        expected = PEAK if epoch < 2 else PEAK * 0.1 if epoch < 3 else PEAK * 0.01
        assert lr(t) == pytest.approx(expected, rel=1e-12), t


def test_step_milestones_may_fall_inside_an_epoch() -> None:
    lr = Schedule(PEAK, total_steps=20, steps_per_epoch=10, kind="step", decay=0.5, milestones=(0.5,))
    assert [lr(t) for t in (5, 6)] == [PEAK, PEAK * 0.5]  # 5 steps done = half an epoch


def test_cosine_falls_from_peak_and_is_symmetric_about_its_midpoint() -> None:
    T, W = 41, 5
    lr = Schedule(PEAK, total_steps=T, steps_per_epoch=7, kind="cosine", warmup_steps=W)
    after = np.array([lr(t) for t in range(W + 1, T + 1)])
    assert after[0] == PEAK
    assert np.all(np.diff(after) < 0)
    assert 0 < after[-1] < PEAK / 100
    # cos(pi p) = -cos(pi (1 - p)): lr at progress p and at 1 - p add up to the peak.
    span = T - W
    for k in range(1, span):
        assert lr(W + 1 + k) + lr(W + 1 + span - k) == pytest.approx(PEAK, rel=1e-12)
    assert lr(W + 1 + span // 2) == pytest.approx(PEAK / 2, rel=1e-12)  # span is even


def test_warmup_longer_than_the_run_never_reaches_the_peak() -> None:
    lr = Schedule(PEAK, total_steps=5, steps_per_epoch=5, kind="cosine", warmup_steps=10)
    assert [lr(t) for t in range(1, 6)] == pytest.approx([PEAK * t / 10 for t in range(1, 6)])


def test_linear_scaling_rule() -> None:
    # Goyal et al.: multiply the batch by k, multiply the learning rate by k.
    assert scaled_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert scaled_lr(0.1, 64, 256) == pytest.approx(0.025)
    assert scaled_lr(0.1, 1024, None) == 0.1
    config = Config(lr=0.1, batch_size=512, base_batch=128, warmup_steps=4)
    lr = from_config(config, total_steps=20, steps_per_epoch=10)
    assert lr(4) == pytest.approx(0.4) and lr(2) == pytest.approx(0.2)


@pytest.mark.parametrize("text", ["", None])
def test_no_milestones(text) -> None:
    assert parse_milestones(text) == ()


def test_milestones_parse() -> None:
    assert parse_milestones("3,6.5,9") == (3.0, 6.5, 9.0)


@pytest.mark.parametrize("text", ["a", "3,2", "2,2", "0,1", "-1", "1,,2", "inf"])
def test_bad_milestones(text) -> None:
    with pytest.raises(ValueError):
        parse_milestones(text)


@pytest.mark.parametrize("options, words", [
    (dict(lr_schedule="step"), "--lr-step-epochs"),
    (dict(lr_step_epochs="3,6"), "--lr-schedule step"),
    (dict(lr_schedule="step", lr_step_epochs="6,3"), "--lr-step-epochs"),
    (dict(lr_schedule="linear"), "--lr-schedule"),
    (dict(warmup_steps=-1), "--warmup-steps"),
    (dict(base_batch=0), "--base-batch"),
    (dict(lr_decay=0.0), "--lr-decay"),
    (dict(lr_decay=1.5), "--lr-decay"),
])
def test_bad_schedule_options(options, words) -> None:
    with pytest.raises(UsageError, match=words):
        Config(**options).validate()


def reference_weights(config: Config, lrs: list[float]) -> np.ndarray:
    """A single-process SGD loop, written without actors, tree or trainer: the same batches."""
    from distbp.data.problem import prepare

    problem = prepare(config)
    net = Network(problem.layers, config.activation, config.loss, config.dtype, config.seed)
    for step, lr in enumerate(lrs, start=1):
        batch = problem.sampler.batch(step)
        g = np.concatenate([G.ravel() for G in net.gradient(problem.X[batch], problem.data.y[batch])])
        update(net.flat, g, {}, Hyper("sgd"), lr, step, scale=len(batch))
    return net.flat


def test_trainer_applies_and_records_the_scheduled_rate(ray_session, tmp_path) -> None:
    from distbp.loops.sync import train

    config = train_config(tmp_path, optimizer="sgd", lr=2.0, steps=12, batch_size=300,
                          lr_schedule="cosine", warmup_steps=4, base_batch=600)
    summary = train(config)
    lr = from_config(config, total_steps=12, steps_per_epoch=5)
    expected = [lr(t) for t in range(1, 13)]
    assert expected[3] == pytest.approx(1.0)  # warmed up to 2.0 * 300 / 600

    lines = [json.loads(s) for s in open(f"{summary['out']}/metrics.jsonl")]
    recorded = {d["step"]: d["lr"] for d in lines if "loss" in d}
    assert [recorded[t] for t in range(1, 13)] == expected

    final = checkpoint.load(f"{summary['out']}/checkpoint.npz")["weights"]
    np.testing.assert_allclose(final, reference_weights(config, expected), rtol=1e-9, atol=1e-12)
    unscheduled = reference_weights(config, [config.lr] * 12)
    assert not np.allclose(final, unscheduled, rtol=1e-3)
    assert math.isfinite(summary["final_loss"])
