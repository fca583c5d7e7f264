"""Optimizers on the summed batch gradient, in place on flat buffers, in the buffer's dtype.

Every update is elementwise, so a parameter server that owns only a range of the flat
vector applies exactly the same arithmetic to its range as one server owning it all.  The
one quantity of the whole vector, the gradient's norm for ``--clip-norm``, comes in as the
factor ``clip`` (step/server.py adds it up over the servers).
Hyperparameters are cast to the weights' dtype first: under NEP 50 a float64 numpy scalar
would silently promote a float32 update to float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # Adam's defaults (Kingma & Ba 2015), torch.optim.Adam's too
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6)


@dataclass(frozen=True)
class Hyper:
    """The optimizer's constants (the rate comes with each step: it follows a schedule).

    ``clip_norm`` (``--clip-norm``): the summed gradient (divided by ``B`` under ``--reduction
    mean``) is scaled by ``clip_coef(norm, clip_norm)`` before the update, as
    ``torch.nn.utils.clip_grad_norm_`` before ``optimizer.step()``; the norm is the whole
    vector's (step/server.py adds it up over the servers).
    """

    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (BETA1, BETA2)
    eps: float = EPS
    clip_norm: float | None = None

    @classmethod
    def of(cls, config) -> Hyper:
        """The constants of a ``distbp.Config`` (duck-typed: config.py imports this module)."""
        return cls(config.optimizer, config.momentum, config.weight_decay, parse_betas(config.adam_betas),
                   EPS if config.adam_eps is None else config.adam_eps, config.clip_norm)


def parse_betas(text: str | None) -> tuple[float, float]:
    """``"B1,B2"`` (``--adam-betas``) as two floats in [0, 1); None: Adam's defaults.  ValueError otherwise."""
    if text is None:
        return BETA1, BETA2
    betas = tuple(float(b) for b in str(text).split(","))
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):  # also refuses nan
        raise ValueError(text)
    return betas


def clip_coef(norm: float, clip_norm: float) -> float | None:
    """The factor ``clip_grad_norm_`` scales a gradient of ``norm`` by, None when it leaves it as
    is (torch multiplies by the clamped 1.0, which changes no bit)."""
    coef = clip_norm / (norm + CLIP_EPS)
    return coef if coef < 1.0 else None


def init_state(optimizer: str, size: int, dtype) -> dict[str, np.ndarray]:
    """Zeroed optimizer buffers: ``v`` (velocity) for momentum, ``m`` and ``v`` for Adam and AdamW."""
    names = {"sgd": (), "momentum": ("v",), "adam": ("m", "v"), "adamw": ("m", "v")}[optimizer]
    return {name: np.zeros(size, dtype=dtype) for name in names}


def update(w: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], hyper: Hyper,
           lr: float, t: int, scale: float | None = None, decay_mask: np.ndarray | None = None,
           clip: float | None = None) -> None:
    """One optimizer step ``w <- w - lr * direction(g)``, in place.

    ``g`` is the SUMMED gradient and is overwritten (it serves as scratch).  ``scale``, when
    given, is the global batch size ``B`` for ``--reduction mean``: the sum is divided by it
    once, here, and nowhere else.  ``clip`` (``clip_coef`` of the whole gradient's norm) then
    scales it.  ``t`` counts steps from 1 (Adam's bias correction).
    Weight decay adds ``weight_decay * w`` to the gradient on entries where ``decay_mask`` is 1
    (weights, not biases); AdamW instead first shrinks those entries, ``w <- w (1 - lr
    weight_decay)``, and the Adam step sees the gradient alone (Loshchilov & Hutter 2019, and
    ``torch.optim.AdamW``).
    """
    dt = w.dtype.type
    if scale is not None:
        g /= dt(scale)
    if clip is not None:
        g *= dt(clip)
    if hyper.weight_decay and hyper.optimizer == "adamw":
        if decay_mask is None:
            w *= dt(1 - lr * hyper.weight_decay)
        else:  # 1 - lr wd where the mask is 1, exactly 1 (no change) where it is 0
            shrink = decay_mask * dt(-lr * hyper.weight_decay)
            shrink += dt(1)
            w *= shrink
    elif hyper.weight_decay:
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
    elif hyper.optimizer in ("adam", "adamw"):
        (beta1, beta2), m, v = hyper.betas, state["m"], state["v"]
        m *= dt(beta1)
        m += dt(1 - beta1) * g
        g *= g
        v *= dt(beta2)
        v += dt(1 - beta2) * g
        # Kingma & Ba's efficient form: w <- w - lr_t m / (sqrt(v) + eps_t)
        c2 = float(np.sqrt(1 - beta2 ** t))
        np.sqrt(v, out=g)
        g += dt(hyper.eps * c2)
        np.divide(m, g, out=g)
        g *= dt(lr * c2 / (1 - beta1 ** t))
        w -= g
    else:
        raise ValueError(f"unknown optimizer {hyper.optimizer!r}")
