"""What the servers report of each step (step/server.py's ``report``), merged into one record
per step for the driver: pure Python, no Ray."""

from __future__ import annotations

import math

import xxhash


def exact_sum(parts: list[list[float]]) -> float:
    """``math.fsum`` of every number of ``parts``: inf where the partial sums overflow."""
    try:
        return math.fsum(x for part in parts for x in part)
    except OverflowError:
        return math.inf


def merge_reports(reports: list[dict[int, dict]]) -> dict[int, dict]:
    """One report per step from the S servers' ``report()``: the steps every server has.

    The servers run side by side, so a step's ``server_sum`` and ``update`` are the slowest
    server's.  ``bytes_in`` becomes the list of each server's received bytes.  With S > 1 the
    ``grad_xxh3`` is the XXH3-128 of the S range digests joined: stable for a given S, but not
    the same string as with one server (the weights hash is the same for every S).  ``grad_norm``
    (``--clip-norm``) is the same number on every server.  ``grad_sq``, the squared norm of the
    summed gradient, is the exact sum of every server's block sums (``squares``): the same bits
    for every S.
    """
    if len(reports) == 1:
        return {t: {**entry, "bytes_in": [entry["bytes_in"]], "grad_sq": exact_sum([entry["squares"]])}
                for t, entry in reports[0].items()}
    merged = {}
    for t in set.intersection(*(set(r) for r in reports)):
        entries = [r[t] for r in reports]
        timings = set(entries[0]) - {"grad_xxh3", "bytes_in", "start", "squares"}  # durations and end times
        merged[t] = {
            **{key: max(e[key] for e in entries) for key in timings},
            "start": min(e["start"] for e in entries),
            "grad_xxh3": xxhash.xxh3_128_hexdigest("".join(e["grad_xxh3"] for e in entries).encode()),
            "bytes_in": [e["bytes_in"] for e in entries],
            "grad_sq": exact_sum([e["squares"] for e in entries]),
        }
    return merged
