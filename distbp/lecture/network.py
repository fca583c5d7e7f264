"""The network of the lecture in numpy: forward pass, backpropagation, the batch gradient.

Notation (Learning From Data, lecture 10):

- layers ``l = 1..L``; layer ``l`` has ``d^l`` units, the input has ``d^0`` features;
- ``W^l`` has shape ``(d^{l-1}+1, d^l)``; row 0 is the bias, because ``x_0^{l-1} = 1``;
- forward: ``s^l = [1, x^{l-1}] W^l`` and ``x^l = theta(s^l)``; the output layer applies
  the loss's own output function (identity for squared error, softmax for cross-entropy);
- backward: ``delta^L = de/ds^L`` and
  ``delta_i^{l-1} = theta'(s_i^{l-1}) * sum_j w_ij^l delta_j^l`` (the bias row is not propagated);
- ``de/dw_ij^l = x_i^{l-1} delta_j^l``.  For a batch the gradient is the SUM over samples,
  and ``[1, X^{l-1}]^T Delta^l`` forms that sum of per-sample outer products in one GEMM.

The weights of all layers live in one contiguous vector (``Layout``) with a view per layer,
so a worker can receive them and send gradients back as one buffer.  No Ray in this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _sigmoid(s, out):
    # 1/(1+e^-s) written as (1 + tanh(s/2))/2: no overflow warnings for very negative s.
    np.tanh(np.multiply(s, 0.5, out=out), out=out)
    out += 1
    out *= 0.5
    return out


# name -> (theta, theta'): theta(s, out) writes x = theta(s) into out; theta'(s, x, tmp)
# returns theta'(s) computed into the scratch buffer tmp (None means theta' = 1).
ACTIVATIONS = {
    "tanh": (lambda s, out: np.tanh(s, out=out),
             lambda s, x, tmp: np.subtract(1, np.multiply(x, x, out=tmp), out=tmp)),
    "relu": (lambda s, out: np.maximum(s, 0, out=out),
             lambda s, x, tmp: np.greater(s, 0, out=tmp, casting="unsafe")),
    "sigmoid": (_sigmoid,
                lambda s, x, tmp: np.multiply(np.subtract(1, x, out=tmp), x, out=tmp)),
    "identity": (lambda s, out: np.copyto(out, s), None),
}

LOSSES = ("cross-entropy", "squared")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Layout:
    """Where each ``W^l`` sits in the flat parameter vector, in layer order."""

    layers: tuple[int, ...]  # (d^0, d^1, ..., d^L)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(a + 1, b) for a, b in zip(self.layers[:-1], self.layers[1:])]

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for r, c in self.shapes:
            out.append(out[-1] + r * c)
        return out

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def views(self, flat: np.ndarray) -> list[np.ndarray]:
        """Per-layer views ``W^l`` (shape ``(d^{l-1}+1, d^l)``) into ``flat``; no copy."""
        o = self.offsets
        return [flat[o[i]:o[i + 1]].reshape(shape) for i, shape in enumerate(self.shapes)]

    def bias_mask(self, dtype) -> np.ndarray:
        """1 on weights, 0 on bias rows: weight decay applies to weights only."""
        mask = np.ones(self.size, dtype=dtype)
        for W in self.views(mask):
            W[0] = 0
        return mask


def init_weights(layout: Layout, activation: str, dtype, seed: int) -> np.ndarray:
    """Flat initial weights: N(0, 1/d^{l-1}) (He's 2/d^{l-1} for relu), biases 0.

    Drawn in float64 and then cast, so float32 and float64 runs start from the same point.
    """
    rng = np.random.default_rng(seed)
    flat = np.zeros(layout.size, dtype=np.float64)
    gain = 2.0 if activation == "relu" else 1.0
    for W in layout.views(flat):
        fan_in = W.shape[0] - 1
        W[1:] = rng.standard_normal(W[1:].shape) * np.sqrt(gain / fan_in)
    return flat.astype(dtype)


def encode_targets(y: np.ndarray, loss: str, d_out: int, dtype) -> np.ndarray:
    """Labels as backprop wants them: class ids for cross-entropy, ``(N, d^L)`` targets for squared."""
    y = np.asarray(y)
    if loss == "cross-entropy":
        return y.astype(np.int64, copy=False)
    if y.ndim == 1:
        onehot = np.zeros((len(y), d_out), dtype=dtype)
        onehot[np.arange(len(y)), y.astype(np.int64)] = 1
        return onehot
    return y.astype(dtype, copy=False)


class Workspace:
    """Preallocated buffers for one micro-batch of ``rows`` samples, so a step allocates nothing large.

    ``x[l]`` is ``[1, x^l]`` (shape ``(rows, d^l + 1)``, column 0 fixed at 1), ``s[l]`` and
    ``delta[l]`` are ``(rows, d^l)``; index 0 of ``s`` and ``delta`` is unused.
    """

    def __init__(self, layers: tuple[int, ...], rows: int, dtype):
        self.x = [np.empty((rows, d + 1), dtype=dtype) for d in layers]
        for xa in self.x:
            xa[:, 0] = 1
        self.s = [None] + [np.empty((rows, d), dtype=dtype) for d in layers[1:]]
        self.delta = [None] + [np.empty((rows, d), dtype=dtype) for d in layers[1:]]
        self.tmp = [None] + [np.empty((rows, d), dtype=dtype) for d in layers[1:]]
        self.e = np.empty(rows, dtype=dtype)


def forward(W: list[np.ndarray], X: np.ndarray | None, activation: str, ws: Workspace,
            layers: range | None = None) -> np.ndarray:
    """Fill ``ws.s[l]`` and ``ws.x[l]`` for ``l = 1..L`` (or ``layers``, those below in ``ws`` already)
    from inputs ``X`` (rows, d^0); returns ``s^L``.  ``X=None``: the inputs are in ``ws.x[0][:, 1:]``."""
    theta = ACTIVATIONS[activation][0]
    L = len(W)
    if X is not None:
        ws.x[0][:, 1:] = X
    for l in range(1, L + 1) if layers is None else layers:
        np.matmul(ws.x[l - 1], W[l - 1], out=ws.s[l])  # s^l = [1, x^{l-1}] W^l
        if l < L:
            theta(ws.s[l], ws.x[l][:, 1:])  # x^l = theta(s^l)
    return ws.s[L]


def output_delta(sL: np.ndarray, Y: np.ndarray, loss: str, delta: np.ndarray, e: np.ndarray) -> None:
    """``delta^L = de/ds^L`` into ``delta`` and the per-sample errors ``e_n`` into ``e``."""
    if loss == "squared":  # e = sum_j (s_j - y_j)^2, no 1/2
        np.subtract(sL, Y, out=delta)
        np.einsum("nj,nj->n", delta, delta, out=e)
        delta *= 2
    else:  # e = -ln softmax(s)_y = logsumexp(s) - s_y, shifted by max(s) for stability
        np.subtract(sL, sL.max(axis=1, keepdims=True), out=delta)
        rows = np.arange(len(Y))
        e[:] = -delta[rows, Y]
        np.exp(delta, out=delta)
        total = delta.sum(axis=1)
        e += np.log(total)
        delta /= total[:, None]
        delta[rows, Y] -= 1  # softmax(s) - onehot(y)


def backprop(W: list[np.ndarray], X: np.ndarray | None, Y: np.ndarray, activation: str, loss: str,
             ws: Workspace, G: list[np.ndarray]) -> float:
    """Sum over the rows of ``X`` of ``de_n/dW^l``, written into ``G`` (shaped like ``W``);
    ``X=None``: the inputs are already in ``ws.x[0][:, 1:]`` (see ``forward``).  Returns the
    summed error ``sum_n e_n`` as a Python float.  All arithmetic stays in the dtype of ``W``;
    the shapes of every GEMM depend only on ``len(X)``, which is what makes a micro-batch's
    gradient the same bits on whichever worker computes it."""
    L = len(W)
    output_delta(forward(W, X, activation, ws), Y, loss, ws.delta[L], ws.e)
    for l in range(L, 0, -1):
        backward_layer(W, l, activation, ws, G[l - 1])
    return float(ws.e.sum(dtype=np.float64))


def backward_layer(W: list[np.ndarray], l: int, activation: str, ws: Workspace, G: np.ndarray) -> None:
    """Layer ``l`` of the backward pass, from ``ws.delta[l]``: ``de/dW^l`` summed over the rows
    into ``G`` (shaped like ``W^l``), and ``delta^{l-1}`` into ``ws.delta[l-1]`` (for ``l > 1``);
    ``backprop`` and the worker's layer-by-layer pass (step/worker.py) run it for ``l = L..1``."""
    np.matmul(ws.x[l - 1].T, ws.delta[l], out=G)  # [1, x^{l-1}]^T delta^l
    if l > 1:
        np.matmul(ws.delta[l], W[l - 1][1:].T, out=ws.delta[l - 1])  # bias row not propagated
        dtheta = ACTIVATIONS[activation][1]
        if dtheta is not None:
            ws.delta[l - 1] *= dtheta(ws.s[l - 1], ws.x[l - 1][:, 1:], ws.tmp[l - 1])


def output(sL: np.ndarray, loss: str) -> np.ndarray:
    """``h(x)``: softmax probabilities for cross-entropy, ``s^L`` itself for squared error."""
    if loss == "squared":
        return sL.copy()
    z = sL - sL.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Network:
    """An MLP with the lecture's weights ``W^l`` and the batch gradient as a sum over samples.

    ``weights[l-1]`` is ``W^l``, a view into the contiguous vector ``flat``.
    """

    def __init__(self, layers, activation: str = "tanh", loss: str = "cross-entropy",
                 dtype="float64", seed: int = 0):
        layers = tuple(int(d) for d in layers)
        if len(layers) < 2 or min(layers) < 1:
            raise ValueError(f"layers must be at least two positive sizes, got {layers}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if str(np.dtype(dtype)) not in DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.layout = Layout(layers)
        self.activation = activation
        self.loss_name = loss
        self.dtype = np.dtype(dtype)
        self.flat = init_weights(self.layout, activation, self.dtype, seed)
        self._workspaces: dict[int, Workspace] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return self.layout.layers

    @property
    def weights(self) -> list[np.ndarray]:
        return self.layout.views(self.flat)

    def workspace(self, rows: int) -> Workspace:
        if rows not in self._workspaces:
            self._workspaces[rows] = Workspace(self.layers, rows, self.dtype)
        return self._workspaces[rows]

    def _inputs(self, X, y=None):
        """The public boundary: ``X`` as ``(N, d^0)`` in the network's dtype, and ``y`` checked and
        encoded the way ``backprop`` wants it.  ``backprop`` and ``encode_targets`` trust their
        inputs (the trainer validates its data once); a bad label must stop here, as a ValueError
        that names it, not as an IndexError deep in ``output_delta`` or a silently wrong error."""
        X = np.asarray(X, dtype=self.dtype)
        if X.ndim != 2 or X.shape[1] != self.layers[0]:
            raise ValueError(f"X must have shape (N, {self.layers[0]}), got {X.shape}")
        if y is None:
            return X
        return X, targets(y, len(X), self.loss_name, self.layers[-1], self.dtype)

    @classmethod
    def from_checkpoint(cls, path: str) -> Network:
        """The network in a distbp checkpoint (a run's ``checkpoint.npz``, or ``save``'s file).  A damaged
        file is a DataError; one whose config or weights describe no network here, a ValueError."""
        from ..run import checkpoint  # here, not at the top: the math module needs no file format to import

        return checkpoint.network(path)

    def save(self, path: str) -> None:
        """Write the network to ``path`` in the checkpoint format (``from_checkpoint`` reads it back,
        ``--init-from`` starts a run from it); the file is written whole or not at all."""
        from ..run import checkpoint

        checkpoint.save_network(self, path)

    def forward(self, X) -> np.ndarray:
        """``h(x_n)`` for each row of ``X``: shape ``(N, d^L)``."""
        X = self._inputs(X)
        return output(forward(self.weights, X, self.activation, self.workspace(len(X))), self.loss_name)

    def predict(self, X) -> np.ndarray:
        """What the network says for each row of ``X``: the class id (``argmax`` of the output) under
        cross-entropy, the output values ``(N, d^L)`` under squared error."""
        out = self.forward(X)
        return out.argmax(axis=1) if self.loss_name == "cross-entropy" else out

    def loss(self, X, y) -> float:
        """The summed error ``sum_n e(h(x_n), y_n)``."""
        X, Y = self._inputs(X, y)
        ws = self.workspace(len(X))
        output_delta(forward(self.weights, X, self.activation, ws), Y, self.loss_name,
                     ws.delta[-1], ws.e)
        return float(ws.e.sum(dtype=np.float64))

    def gradient(self, X, y) -> list[np.ndarray]:
        """``sum_n de_n/dW^l`` for every layer: a list shaped like ``weights``."""
        X, Y = self._inputs(X, y)
        G = self.layout.views(np.empty(self.layout.size, dtype=self.dtype))
        backprop(self.weights, X, Y, self.activation, self.loss_name, self.workspace(len(X)), G)
        return G

    def per_sample_gradients(self, X, y) -> list[np.ndarray]:
        """``de_n/dW^l`` for each sample: arrays of shape ``(N, d^{l-1}+1, d^l)``.

        The outer products ``[1, x_n^{l-1}] (delta_n^l)^T`` one sample at a time, the way the
        lecture's equations read before they are summed over a batch.
        """
        X, Y = self._inputs(X, y)
        ws = self.workspace(len(X))
        backprop(self.weights, X, Y, self.activation, self.loss_name, ws,
                 self.layout.views(np.empty(self.layout.size, dtype=self.dtype)))
        return [np.einsum("ni,nj->nij", ws.x[l - 1], ws.delta[l]) for l in range(1, len(self.layers))]


def targets(y, rows: int, loss_name: str, d_out: int, dtype) -> np.ndarray:
    """``y`` for ``rows`` samples: class ids in ``0..d^L-1`` (shape ``(N,)``) for either loss, or
    for squared error also real targets of shape ``(N, d^L)``."""
    y = np.asarray(y)
    if y.ndim not in (1, 2):
        raise ValueError(f"y must be class ids of shape (N,) or targets of shape (N, {d_out}), "
                         f"got shape {y.shape}")
    if len(y) != rows:
        raise ValueError(f"y has {len(y)} labels but X has {rows} rows; they must match")
    if y.ndim == 2:
        if loss_name == "cross-entropy":
            raise ValueError(f"cross-entropy wants integer class ids of shape (N,), got y of shape {y.shape}; "
                             "for one-hot rows pass y.argmax(axis=1)")
        if y.shape[1] != d_out:
            raise ValueError(f"squared-error targets must have shape (N, {d_out}) = (N, d^L), got {y.shape}")
        if y.dtype.kind not in "biuf":
            raise ValueError(f"squared-error targets must be numbers, got dtype {y.dtype}")
        return y.astype(dtype, copy=False)
    # 1-D: class ids.  Floats holding whole numbers (2.0, as from a float npz) are ids too;
    # anything else (1.5, nan, strings) is not, and would be truncated or crash in the cast.
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            bad = y[~np.isfinite(y) | (y != np.round(y))][0]
            raise ValueError(f"class ids must be integers, got non-integer value {bad} in y"
                             + ("; for real-valued targets pass shape (N, d^L)"
                                if loss_name == "squared" else ""))
    elif y.dtype.kind not in "biu":
        raise ValueError(f"class ids must be integers, got y of dtype {y.dtype}")
    # Range checks on the values themselves, before the int64 cast could wrap a huge float.
    if y.size and y.min() < 0:
        raise ValueError(f"class ids must be >= 0, got negative class id {y.min()}")
    if y.size and y.max() >= d_out:
        raise ValueError(f"class ids must be < d^L = {d_out} (the number of outputs), got class id {y.max()}")
    return encode_targets(y.astype(np.int64, copy=False), loss_name, d_out, dtype)


def evaluate(net: Network, X: np.ndarray, y: np.ndarray, chunk: int = 4096) -> tuple[float, float]:
    """Mean error and accuracy of ``net`` on ``(X, y)`` (class ids or one-hot targets), in chunks
    to bound memory.  ``X`` may be anything that slices into row arrays (memory-mapped rows too)."""
    X = X if hasattr(X, "__len__") and hasattr(X, "shape") else np.asarray(X)
    y = np.asarray(y)
    if y.ndim == 0:
        raise ValueError("y must be class ids of shape (N,) or targets of shape (N, d^L), got a scalar")
    if len(y) != len(X):  # each chunk's check would miss surplus labels after X's last row
        raise ValueError(f"y has {len(y)} labels but X has {len(X)} rows; they must match")
    total, correct = 0.0, 0
    for lo in range(0, len(X), chunk):
        Xc, yc = X[lo:lo + chunk], y[lo:lo + chunk]
        total += net.loss(Xc, yc)
        pred = net.forward(Xc).argmax(axis=1)
        correct += int(np.sum(pred == (yc.argmax(axis=1) if yc.ndim == 2 else yc)))
    return total / len(X), correct / len(X)
