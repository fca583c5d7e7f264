"""Optimizers on the summed batch gradient, in place on flat buffers, in the buffer's dtype.

Every update is elementwise, so a parameter server that owns only a range of the flat
vector applies exactly the same arithmetic to its range as one server owning it all.
Hyperparameters are cast to the weights' dtype first: under NEP 50 a float64 numpy scalar
would silently promote a float32 update to float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam")
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # Adam's defaults (Kingma & Ba 2015)


@dataclass(frozen=True)
class Hyper:
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0


def init_state(optimizer: str, size: int, dtype) -> dict[str, np.ndarray]:
    """Zeroed optimizer buffers: ``v`` (velocity) for momentum, ``m`` and ``v`` for Adam."""
    names = {"sgd": (), "momentum": ("v",), "adam": ("m", "v")}[optimizer]
    return {name: np.zeros(size, dtype=dtype) for name in names}


def update(w: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], hyper: Hyper,
           lr: float, t: int, scale: float | None = None, decay_mask: np.ndarray | None = None) -> None:
    """One optimizer step ``w <- w - lr * direction(g)``, in place.

    ``g`` is the SUMMED gradient and is overwritten (it serves as scratch).  ``scale``, when
    given, is the global batch size ``B`` for ``--reduction mean``: the sum is divided by it
    once, here, and nowhere else.  ``t`` counts steps from 1 (Adam's bias correction).
    Weight decay adds ``weight_decay * w`` to the gradient on entries where ``decay_mask`` is 1
    (weights, not biases).
    """
    dt = w.dtype.type
    if scale is not None:
        g /= dt(scale)
    if hyper.weight_decay:
        decay = dt(hyper.weight_decay) * w
        if decay_mask is not None:
            decay *= decay_mask
        g += decay
    if hyper.optimizer == "sgd":
        g *= dt(lr)
        w -= g
    elif hyper.optimizer == "momentum":  # v <- mu v + g;  w <- w - lr v
        v = state["v"]
        v *= dt(hyper.momentum)
        v += g
        np.multiply(v, dt(lr), out=g)
        w -= g
    elif hyper.optimizer == "adam":
        m, v = state["m"], state["v"]
        m *= dt(BETA1)
        m += dt(1 - BETA1) * g
        g *= g
        v *= dt(BETA2)
        v += dt(1 - BETA2) * g
        # Kingma & Ba's efficient form: w <- w - lr_t m / (sqrt(v) + eps_t)
        c2 = float(np.sqrt(1 - BETA2 ** t))
        np.sqrt(v, out=g)
        g += dt(EPS * c2)
        np.divide(m, g, out=g)
        g *= dt(lr * c2 / (1 - BETA1 ** t))
        w -= g
    else:
        raise ValueError(f"unknown optimizer {hyper.optimizer!r}")
