"""--adam-betas, --adam-eps, --optimizer adamw and --clip-norm against PyTorch itself, in float64.

torch is a reference written differently (its own Adam, AdamW, clip_grad_norm_ and autograd),
not a dependency: these tests are skipped without it (``pip install -e ".[reference]"``; .ci/run
installs it).  Biases are not
decayed in distbp, so on the torch side they form a parameter group with weight_decay 0.
"""

import json
import math

import numpy as np
import pytest

from distbp import Network, fit
from distbp.data.datasets import spirals
from distbp.data.sampler import Sampler
from distbp.lecture import tree
from distbp.lecture.optim import Hyper, init_state, update
from distbp.step.server import ServerState

torch = pytest.importorskip("torch", reason='torch is not installed: pip install -e ".[reference]" '
                                        "(a CPU build is enough)")

P, B, STEPS = 40, 32, 8
TIGHT = dict(rtol=1e-13, atol=1e-15)  # what float64 gives after STEPS updates: a few ulps apart


def gradients(seed=0):
    """STEPS summed batch gradients, large enough to be clipped."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(P) * 10 * B for _ in range(STEPS)]


def torch_run(optimizer, hyper: dict, w0, mask, grads, clip_norm=None):
    """The same updates in torch: decayed entries and the others as two parameter groups.

    Returns the weights and the norms ``clip_grad_norm_`` reported.
    """
    decayed, kept = (torch.tensor(w0[mask == 1]), torch.tensor(w0[mask == 0]))
    params = [decayed.requires_grad_(), kept.requires_grad_()]
    wd = hyper.pop("weight_decay")
    opt = optimizer([{"params": [params[0]], "weight_decay": wd}, {"params": [params[1]], "weight_decay": 0.0}],
                    **hyper)
    norms = []
    for g in grads:
        params[0].grad, params[1].grad = torch.tensor(g[mask == 1] / B), torch.tensor(g[mask == 0] / B)
        if clip_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip_norm)))
        opt.step()
    w = np.empty_like(w0)
    w[mask == 1], w[mask == 0] = params[0].detach().numpy(), params[1].detach().numpy()
    return w, norms


def setup():
    rng = np.random.default_rng(1)
    return rng.standard_normal(P), (np.arange(P) % 5 != 0).astype(np.float64)  # every 5th entry a "bias"


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_betas_eps_and_decoupled_decay_match_torch(optimizer, wd):
    w0, mask = setup()
    hyper = Hyper(optimizer, weight_decay=wd, betas=(0.8, 0.95), eps=1e-3)  # an eps that matters here
    w, state = w0.copy(), init_state(optimizer, P, np.float64)
    for t, g in enumerate(gradients(), start=1):
        update(w, g.copy(), state, hyper, 0.05, t, B, mask)
    reference = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    want, _ = torch_run(reference, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=wd), w0, mask,
                        gradients())
    np.testing.assert_allclose(w, want, **TIGHT)
    if wd:  # the two kinds of decay are different updates: the test tells them apart
        other = torch.optim.AdamW if optimizer == "adam" else torch.optim.Adam
        away, _ = torch_run(other, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=wd), w0, mask,
                            gradients())
        assert np.abs(w - away).max() > 1e-6


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_clipping_matches_clip_grad_norm(optimizer):
    """The server's clipped step (norm from its blocks' sums of squares) against clip_grad_norm_
    then the torch optimizer, with a max norm between the gradients' norms: some steps clipped,
    some not."""
    w0, mask = setup()
    grads = gradients()
    norms = [float(np.linalg.norm(g / B)) for g in grads]
    clip_norm = float(np.median(norms))
    server = ServerState(w0.copy(), Hyper(optimizer, 0.9, 0.01, clip_norm=clip_norm), mask)
    node = tree.blocks(range(1), 1)
    for t, g in enumerate(grads, start=1):
        server.step(1, [node], [g[None, :]], 0.01, t, B)
    got_norms = [r["grad_norm"] for _, r in sorted(server.report().items())]
    reference = {"sgd": (torch.optim.SGD, {}), "momentum": (torch.optim.SGD, {"momentum": 0.9}),
                 "adam": (torch.optim.Adam, {}), "adamw": (torch.optim.AdamW, {})}[optimizer]
    want, want_norms = torch_run(reference[0], dict(lr=0.01, weight_decay=0.01, **reference[1]), w0, mask, grads,
                                 clip_norm)
    np.testing.assert_allclose(got_norms, want_norms, **TIGHT)
    assert 0 < sum(n > clip_norm for n in want_norms) < STEPS  # clipped, and not every time
    np.testing.assert_allclose(server.weights, want, **TIGHT)


def torch_training(X, y, layers, seed, steps, batch_size, lr, wd, betas, eps, clip_norm):
    """distbp's network trained by torch: autograd on the mean cross-entropy, clip_grad_norm_,
    AdamW; each W^l as its bias row (not decayed) and its weight rows."""
    net = Network(layers, "tanh", "cross-entropy", "float64", seed)
    biases = [torch.tensor(W[0]).requires_grad_() for W in net.weights]
    weights = [torch.tensor(W[1:]).requires_grad_() for W in net.weights]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": wd}, {"params": biases, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps)
    sampler, norms = Sampler(len(X), batch_size, seed), []
    for step in range(1, steps + 1):
        batch = sampler.batch(step)
        x = torch.tensor(X[batch])
        for layer, (b, W) in enumerate(zip(biases, weights)):
            s = x @ W + b
            x = torch.tanh(s) if layer < len(weights) - 1 else s
        opt.zero_grad()
        torch.nn.functional.cross_entropy(x, torch.tensor(y[batch])).backward()  # the mean over the batch
        norms.append(float(torch.nn.utils.clip_grad_norm_(weights + biases, clip_norm)))
        opt.step()
    return [torch.cat([b.detach()[None], W.detach()]).numpy() for b, W in zip(biases, weights)], norms


def test_a_distributed_run_with_the_new_options_matches_torch(ray_session, tmp_path):
    """fit() on 2 workers and 3 servers (the norm added up over the servers) against torch."""
    data = spirals(seed=0)
    layers, steps, batch_size, clip_norm = [2, 16, 3], 6, 60, 0.05
    options = dict(optimizer="adamw", lr=0.05, weight_decay=0.1, adam_betas=(0.8, 0.99), adam_eps=1e-6,
                   clip_norm=clip_norm)
    result = fit(data.X, data.y, layers=layers, workers=2, servers=3, batch_size=batch_size, micro_batch=8,
                 steps=steps, out=str(tmp_path / "run"), **options)
    want, norms = torch_training(data.X, data.y, layers, 0, steps, batch_size, 0.05, 0.1, (0.8, 0.99), 1e-6,
                                 clip_norm)
    for got, expected in zip(result.network.weights, want):
        np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-14)
    logged = [r["grad_norm"] for r in result.metrics if "loss" in r]
    np.testing.assert_allclose(logged, norms, rtol=1e-12)
    assert min(norms) > clip_norm  # every step was clipped
    with open(tmp_path / "run" / "summary.json") as fh:
        assert json.load(fh)["steps"] == steps
    assert not math.isnan(result.summary["final_loss"])
