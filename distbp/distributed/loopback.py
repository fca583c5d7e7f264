"""Keep a private local Ray on 127.0.0.1: to call before Ray is first imported (so no Ray here).

Ray on Linux swaps 127.0.0.1 for the routable address, and then its GCS, raylet and actors
listen on every interface; with multi-node support off (read when ray is first imported)
all of them stay on 127.0.0.1 (measured, Ray 2.60).
"""

from __future__ import annotations

import os
import sys


def keep_local_ray_on_loopback(address: str | None) -> None:
    """For a private local Ray (no ``address``, no ``$RAY_ADDRESS``): listen on 127.0.0.1 only."""
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local" and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
