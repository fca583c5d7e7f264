"""Checkpoints and result files, written atomically and read without pickle.

A checkpoint is an ``.npz`` of plain arrays: the flat weights, the optimizer buffers, the
step counter, the config as JSON text and a fingerprint of the training data.  Files are
written to a temporary name in the same directory, flushed, fsynced and renamed over the old
one, so a crash mid-write leaves the previous file whole (and a ``.tmp-*`` file, which the
next run to lock the directory sweeps: outdir.py).  Loading uses ``allow_pickle=False``: a
checkpoint can never run code.

``load`` trusts nothing in the file: every ``.npy`` header is read (npzfile.py: what it
declares checked against the bytes of its member) and their total against the memory there
is before any array is allocated, and every array is checked for its shape, dtype and
finiteness, so a damaged or hostile checkpoint is one DataError naming the file, never a
MemoryError or a run that starts from NaN weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..data import npzfile
from ..data.datasets import check_memory
from ..errors import DataError, one_line

FORMAT = 1
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
TMP_PREFIX = ".tmp-"  # atomic_write's temporary files: what a writer killed mid-write leaves
KEPT = re.compile(r"checkpoint-(\d+)\.npz")  # --keep-checkpoints: checkpoint-<step>.npz (outdir.py)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call ``write(fh)`` on a temporary file beside ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def link_or_copy(source: str, path: str) -> None:
    """``path`` becomes the file ``source`` is: a hard link, or a copy where the file system has
    none; made under a temporary name and renamed into place, so ``path`` is never half there."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f"{TMP_PREFIX}{secrets.token_hex(8)}-{os.path.basename(path)}")
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (some network and FUSE file systems): a copy, as atomic
        with open(source, "rb") as src:
            atomic_write(path, lambda fh: shutil.copyfileobj(src, fh))
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def sha256_le(flat: np.ndarray) -> str:
    """sha256 of a flat buffer's bytes, little-endian: ``weights_sha256`` (a step's gradient has a
    faster fingerprint, ``grad_xxh3``: step/server.py)."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("<")).tobytes()).hexdigest()


CHUNK = 1 << 23  # bytes hashed per task: fixed, so the fingerprint does not depend on the thread count


def fingerprint(X: np.ndarray, Y: np.ndarray) -> str:
    """A fingerprint of the training data as the run uses it (features and encoded targets):
    64 hex digits.  A resumed run must train on the same data to end with the same weights.

    sha256 (hardware-accelerated on most CPUs, and hashlib releases the GIL) over fixed 8 MiB
    chunks on a thread pool, then over the chunks' digests with the arrays' shapes and dtypes:
    ~0.3 s for Fashion-MNIST's 376 MB of float64 on one core, a fraction of that on several.
    """
    top = hashlib.sha256(b"distbp-data-1")
    views = []
    for a in (X, Y):
        if hasattr(a, "signature"):  # memory-mapped rows (data/npydir.py): the files' identity, not their bytes
            top.update(f"rows:{a.signature()};".encode())
            continue
        a = np.ascontiguousarray(a)
        top.update(f"{a.dtype.str}{a.shape};".encode())
        views.append(memoryview(a.reshape(-1).view(np.uint8)))
    chunks = [v[i:i + CHUNK] for v in views for i in range(0, len(v), CHUNK)]
    digest = lambda chunk: hashlib.sha256(chunk).digest()
    if len(chunks) > 1:
        with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
            digests = list(pool.map(digest, chunks))
    else:
        digests = [digest(c) for c in chunks]
    for d in digests:
        top.update(d)
    return top.hexdigest()


def save(path: str, weights: np.ndarray, optimizer_state: dict[str, np.ndarray], step: int,
         config: dict, data_fingerprint: str | None = None) -> None:
    arrays = {"weights": weights, "step": np.int64(step), "format": np.int64(FORMAT),
              "config_json": np.array(json.dumps(config))}
    if data_fingerprint is not None:
        arrays["data_fingerprint"] = np.array(data_fingerprint)
    arrays.update({f"opt_{name}": buf for name, buf in optimizer_state.items()})
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def network_config(net) -> dict:
    """What a checkpoint's config needs to rebuild ``net`` (a ``lecture.network.Network``)."""
    return {"layers": ",".join(str(d) for d in net.layers), "activation": net.activation, "loss": net.loss_name,
            "dtype": str(net.dtype)}


def save_network(net, path: str) -> None:
    """``Network.save``: the weights and what rebuilds the network, at step 0 (no training state)."""
    save(path, net.flat, {}, 0, network_config(net))


def network(path: str):
    """``Network.from_checkpoint``: the network a checkpoint holds.  ValueError where its config or
    weights describe no network; a run from before checkpoints recorded derived layers (config
    ``layers`` null) takes them from the ``summary.json`` beside it."""
    from ..lecture.network import Network

    saved = load(path)
    config = saved["config"]
    missing = [k for k in ("layers", "activation", "loss", "dtype") if k not in config]
    if missing:
        raise ValueError(f"{path}: the checkpoint's config lacks {', '.join(missing)}")
    text = config["layers"] if config["layers"] is not None else _summary_layers(path)
    try:
        layers = tuple(int(d) for d in str(text).split(","))
    except ValueError:
        raise ValueError(f"{path}: the checkpoint's config has layers {text!r}; "
                         "expected comma-separated sizes like 2,64,64,3") from None
    net = Network(layers, config["activation"], config["loss"], config["dtype"])
    weights = saved["weights"]
    if weights.size != net.layout.size:
        raise ValueError(f"{path}: the checkpoint holds {weights.size} weights but layers {layers} "
                         f"need {net.layout.size}")
    if weights.dtype.newbyteorder("=") != net.dtype:
        # A cast would change the bits; a run writes its weights in the dtype it trains in.
        raise ValueError(f"{path}: the checkpoint's weights are {weights.dtype} but its config says {net.dtype}")
    net.flat = np.array(weights, dtype=net.dtype)  # own, contiguous, native byte order
    return net


def _summary_layers(path: str) -> str:
    """The layers in the summary.json beside an older checkpoint whose config left them to the data."""
    summary = os.path.join(os.path.dirname(os.path.abspath(path)), "summary.json")
    try:
        with open(summary, encoding="utf-8") as fh:
            layers = json.load(fh)["layers"]
        return ",".join(str(int(d)) for d in layers)
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: the checkpoint's config does not name its layers (a run from before they were "
                         "recorded) and no summary.json beside it does") from None


def load(path: str) -> dict:
    """``{"weights", "optimizer", "step", "config", "data"}`` (``data``: the training data's
    fingerprint, None in checkpoints from before it was kept); any damage is a DataError
    naming the file and the problem."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no checkpoint here")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if magic != b"PK\x03\x04":  # np.load would take anything else for .npy or pickle data
        raise DataError(f"{path}: corrupt checkpoint (not an .npz file)")
    # every header read and checked (npzfile.py) before np.load allocates what they declare
    members = npzfile.read_headers(path, f"{path}: corrupt checkpoint", wanted=_wanted)
    check_memory(sum(m.nbytes for m in members), f"{path}: reading its arrays")
    try:
        with np.load(path, allow_pickle=False, max_header_size=npzfile.MAX_HEADER) as f:
            arrays = {m.name: f[m.info.filename] for m in members}  # by file name: a member "weights" is not read
    except (*npzfile.ERRORS, KeyError) as exc:  # zipfile: unsupported compression, encryption
        raise DataError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {one_line(exc)})") from None
    return _check_arrays(path, arrays)


def _wanted(name: str) -> bool:
    return name in ("weights", "step", "format", "config_json", "data_fingerprint") or name.startswith("opt_")


def _check_arrays(path: str, arrays: dict[str, np.ndarray]) -> dict:
    """The checkpoint's contents once each array is what distbp writes; DataError otherwise."""
    def bad(problem: str):
        return DataError(f"{path}: corrupt checkpoint ({problem})")

    missing = [k for k in ("weights", "step", "config_json") if k not in arrays]
    if missing:
        raise bad(f"no {', '.join(missing)} in it")
    weights = arrays["weights"]
    if weights.dtype not in FLOATS or weights.ndim != 1 or weights.size == 0:
        raise bad(f"the weights are {weights.dtype} of shape {weights.shape}, not a flat float32 or float64 vector")
    _finite(path, "weights", weights)
    optimizer = {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")}
    for name, buf in optimizer.items():
        if buf.dtype != weights.dtype or buf.shape != weights.shape:
            raise bad(f"the optimizer buffer {name!r} is {buf.dtype} of shape {buf.shape}, but the weights are "
                      f"{weights.dtype} of shape {weights.shape}")
        _finite(path, f"the optimizer buffer {name!r}", buf)
    step = arrays["step"]
    if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:  # 0: Network.save, no step trained
        raise bad(f"step is {step.dtype} of shape {step.shape} ({_brief(step)}), not an integer >= 0")
    if "format" in arrays:
        fmt = arrays["format"]
        if fmt.shape != () or fmt.dtype.kind not in "iu":
            raise bad(f"format is {fmt.dtype} of shape {fmt.shape}")
        if int(fmt) > FORMAT:
            raise DataError(f"{path}: checkpoint format {int(fmt)} was written by a newer distbp "
                            f"(this one reads format {FORMAT})")
    config = _text(path, arrays, "config_json")
    try:
        config = json.loads(config)
    except (ValueError, RecursionError) as exc:
        raise bad(f"config_json is not JSON: {one_line(exc)}") from None
    if not isinstance(config, dict):
        raise bad(f"config_json holds a JSON {type(config).__name__}, not an object of options")
    data = _text(path, arrays, "data_fingerprint") if "data_fingerprint" in arrays else None
    return {"weights": weights, "step": int(step), "config": config, "optimizer": optimizer, "data": data}


def _text(path: str, arrays: dict[str, np.ndarray], name: str) -> str:
    a = arrays[name]
    if a.shape != () or a.dtype.kind != "U":
        raise DataError(f"{path}: corrupt checkpoint ({name} is {a.dtype} of shape {a.shape}, not a string)")
    return str(a)


def _finite(path: str, what: str, a: np.ndarray) -> None:
    ok = np.isfinite(a)
    if not ok.all():
        i = int(np.argmin(ok))
        raise DataError(f"{path}: corrupt checkpoint ({what}: {a[i]} at index {i} of {a.size}; "
                        "a checkpoint holds only finite values)")


def _brief(a: np.ndarray) -> str:
    return " ".join(np.array2string(a.reshape(-1)[:4], threshold=4).split())
