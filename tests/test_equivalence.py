"""One matrix of the ways a step can travel, each run to the bits of the reference path.

The paths: the object store (the actors' Ray calls to each other), the direct transport as
users get it (``auto``: memfds between the actors of this one node), the direct transport
with every vector over its authenticated sockets, as between nodes (``Direct.within_node``
off), and the direct transport where no worker can reach a server's socket (``Direct.sockets``
off: every pair falls back to the object store when they first meet).  Across them: K workers,
S servers, T threads per worker, the window length (1: a window a step) and --clip-norm (with
S > 1 the servers swap their sums of squares inside the window).  Each run must give the
reference's weights and the same loss at every step, logged once per step in order, every
step in a window planned at once.
"""


import pytest
from conftest import step_lines, train_config

from distbp.distributed import windows
from distbp.distributed.direct import Direct
from distbp.loops.sync import train

STEPS = 12
OPTIONS = dict(batch_size=60, micro_batch=8, steps=STEPS, optimizer="adam", weight_decay=0.01, dtype="float32")

CASES = [  # (path, K, S, T, window, clip_norm)
    ("object-store", 3, 2, 1, 16, None),
    ("object-store", 2, 1, 1, 1, None),
    ("direct", 1, 1, 1, 16, None),
    ("direct", 3, 2, 2, 16, None),
    ("direct", 2, 3, 1, 1, None),
    ("direct", 2, 1, 2, 4, None),
    ("sockets", 2, 1, 1, 16, None),
    ("sockets", 3, 3, 1, 1, None),
    ("sockets", 2, 2, 2, 16, None),
    ("unreached", 2, 2, 1, 16, None),
    ("object-store", 3, 2, 1, 4, 0.05),
    ("direct", 3, 1, 1, 16, 0.05),
    ("direct", 2, 3, 2, 16, 0.05),
    ("sockets", 2, 2, 1, 4, 0.05),
    ("unreached", 3, 2, 1, 4, 0.05),
]


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The reference path (the object store, K = S = T = 1, a window a step), once for each --clip-norm."""
    made = {}

    def run(clip_norm):
        if clip_norm not in made:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(windows, "WINDOW", 1)
                made[clip_norm] = train(train_config(tmp_path_factory.mktemp("reference"), workers=1, servers=1,
                                                     threads_per_worker=1, transport="object-store",
                                                     clip_norm=clip_norm, **OPTIONS))
        return made[clip_norm]
    return run


@pytest.mark.parametrize("path, workers, servers, threads, window, clip_norm", CASES)
def test_every_path_gives_the_bits_of_the_reference(reference, tmp_path, monkeypatch, path, workers, servers,
                                                     threads, window, clip_norm):
    ref = reference(clip_norm)
    if path in ("sockets", "unreached"):
        monkeypatch.setattr(Direct, "within_node", False)  # in the driver, before the transport is made
    if path == "unreached":  # no server listens: every pair finds the socket out of reach, at once
        monkeypatch.setattr(Direct, "sockets", False)
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
    # every step in a window planned at once, a window at most ``window`` steps long
    assert run["windows"]["steps"] == STEPS and run["windows"]["one_by_one"] == 0
    assert run["windows"]["windows"] >= -(-STEPS // window)
