"""One matrix of the ways a step can travel, each run to the bits of the reference path.

The paths: the object store (steps one by one, each through Ray's calls), the direct transport
as users get it (``auto``: memfds between the actors of this one node; windows of steps), and
the direct transport with every vector over its authenticated sockets, as between nodes
(``Direct.within_node`` off).  Across them: K workers, S servers, T threads per worker, the
window length (1: steps one by one on the direct transport too) and --clip-norm (with S > 1 a
step's norm needs every server's sums).  Each run must give the reference's weights and the
same loss at every step, logged once per step in order.
"""


import pytest
from conftest import step_lines, train_config

from distbp.distributed import windows
from distbp.distributed.direct import Direct
from distbp.loops.sync import train

STEPS = 12
OPTIONS = dict(batch_size=60, micro_batch=8, steps=STEPS, optimizer="adam", weight_decay=0.01, dtype="float32")

CASES = [  # (path, K, S, T, window, clip_norm)
    ("object-store", 3, 2, 1, None, None),
    ("direct", 1, 1, 1, 16, None),
    ("direct", 3, 2, 2, 16, None),
    ("direct", 2, 3, 1, 1, None),
    ("direct", 2, 1, 2, 4, None),
    ("sockets", 2, 1, 1, 16, None),
    ("sockets", 3, 3, 1, 1, None),
    ("sockets", 2, 2, 2, 16, None),
    ("object-store", 3, 2, 1, None, 0.05),
    ("direct", 3, 1, 1, 16, 0.05),
    ("direct", 2, 3, 2, 16, 0.05),
    ("sockets", 2, 2, 1, 4, 0.05),
]


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The reference path (the object store, K = S = T = 1), once for each --clip-norm."""
    made = {}

    def run(clip_norm):
        if clip_norm not in made:
            made[clip_norm] = train(train_config(tmp_path_factory.mktemp("reference"), workers=1, servers=1,
                                                 threads_per_worker=1, transport="object-store",
                                                 clip_norm=clip_norm, **OPTIONS))
        return made[clip_norm]
    return run


@pytest.mark.parametrize("path, workers, servers, threads, window, clip_norm", CASES)
def test_every_path_gives_the_bits_of_the_reference(reference, tmp_path, monkeypatch, path, workers, servers,
                                                     threads, window, clip_norm):
    ref = reference(clip_norm)
    if path == "sockets":
        monkeypatch.setattr(Direct, "within_node", False)  # in the driver, before the transport is made
    if window is not None:
        monkeypatch.setattr(windows, "WINDOW", window)
    run = train(train_config(tmp_path, workers=workers, servers=servers, threads_per_worker=threads,
                             transport="object-store" if path == "object-store" else "direct",
                             clip_norm=clip_norm, **OPTIONS))
    assert run["transport"] == ("object-store" if path == "object-store" else "direct")
    assert run["weights_sha256"] == ref["weights_sha256"]
    got, want = step_lines(run["out"]), step_lines(ref["out"])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # the same micro-batch errors, summed exactly
    assert [r["workers"] for r in got] == [workers] * STEPS
    if clip_norm is not None:
        assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
    if servers == 1:  # the fingerprint of a step's gradient depends on S
        assert [r["grad_xxh3"] for r in got] == [r["grad_xxh3"] for r in want]
    times = [r["time"] for r in got]
    assert times == sorted(times) and len(set(times)) == STEPS  # each step's own time, not its window's
    # where the steps went: in windows on the direct transport, unless a window holds one step or
    # a step needs every server's sums first (--clip-norm with S > 1)
    in_windows = path != "object-store" and window > 1 and not (clip_norm and servers > 1)
    assert (run["windows"] or {}).get("steps", 0) == (STEPS if in_windows else 0)
