"""Checkpoints and result files, written atomically and read without pickle.

A checkpoint is an ``.npz`` of plain arrays: the flat weights, the optimizer buffers, the
step counter and the config as JSON text.  Files are written to a temporary name in the
same directory, flushed, fsynced and renamed over the old one, so a crash mid-write leaves
the previous file whole.  Loading uses ``allow_pickle=False``: a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable

import numpy as np

from ..errors import DataError

FORMAT = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call ``write(fh)`` on a temporary file beside ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
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


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def sha256_le(flat: np.ndarray) -> str:
    """sha256 of a flat buffer's bytes, little-endian: ``weights_sha256`` and ``grad_sha256``."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("<")).tobytes()).hexdigest()


def save(path: str, weights: np.ndarray, optimizer_state: dict[str, np.ndarray], step: int,
         config: dict) -> None:
    arrays = {"weights": weights, "step": np.int64(step), "format": np.int64(FORMAT),
              "config_json": np.array(json.dumps(config))}
    arrays.update({f"opt_{name}": buf for name, buf in optimizer_state.items()})
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load(path: str) -> dict:
    """``{"weights", "optimizer", "step", "config"}``; any damage is a DataError naming the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no checkpoint here")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # np.load would take anything else for .npy or pickle data
            raise DataError(f"{path}: corrupt checkpoint (not an .npz file)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        config = json.loads(str(arrays["config_json"]))
        out = {"weights": arrays["weights"], "step": int(arrays["step"]), "config": config,
               "optimizer": {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")}}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from None
    if out["weights"].ndim != 1:
        raise DataError(f"{path}: corrupt checkpoint (weights are not a flat vector)")
    return out
