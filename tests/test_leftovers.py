"""What a killed process leaves is removed by the next one, and only that: a staging directory of
an ``--out``/``--resume`` URL run (``~/.cache/distbp/staging/run-*``) and a ``distbp convert``'s
``.DIR.*.converting``.  Each is made locked (a flock on the directory, run/remote.py
``locked_tempdir``) and the kernel lets the lock go when its process dies, however it dies:
a directory whose lock is free is a dead writer's.  Killed writers here are real processes
killed with SIGKILL; live ones are real processes still running.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from distbp import cli
from distbp.data.datasets import spirals
from distbp.errors import RunFailed
from distbp.run import remote

# A process that makes a locked directory (``make``), prints its path, and waits to be killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from distbp.run import remote
    remote.STAGING = sys.argv[1]
    {make}
    print(path, flush=True)
    time.sleep(120)
""")
STAGES = "path = remote._stage()\nopen(path + '/checkpoint.npz', 'wb').write(b'partial')"


def holder(make: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A live process holding the directory ``make`` creates, and that directory's path."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(make=make), *args], stdout=subprocess.PIPE,
                            text=True)
    path = proc.stdout.readline().strip()
    assert path and os.path.isdir(path), "the holder made nothing"
    return proc, path


def killed(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


# ---- staging directories of runs to a URL ---------------------------------------------------------

@pytest.fixture
def staging(tmp_path, monkeypatch):
    folder = str(tmp_path / "staging")
    monkeypatch.setattr(remote, "STAGING", folder)
    return folder


def url_run(tmp_path) -> str:
    """A run at a file:// URL, for ``remote.fetch`` (what ``--resume URL`` and ``Result.from_path``
    download through): a new staging directory each time."""
    run = tmp_path / "at-url"
    run.mkdir()
    (run / "checkpoint.npz").write_bytes(b"not read here")
    return f"file://{run}"


def test_the_staging_of_a_killed_driver_goes_with_the_next_staging(staging, tmp_path):
    live, live_path = holder(STAGES, staging)
    dead, dead_path = holder(STAGES, staging)  # (a staging sweeps: the live one is made first)
    killed(dead)
    try:
        assert os.path.isdir(dead_path)  # nothing could clean up after a SIGKILL
        local = remote.fetch(url_run(tmp_path))  # --resume URL: downloads into a new staging directory
        try:
            assert not os.path.exists(dead_path), "the killed driver's staging directory is still there"
            assert os.path.isdir(live_path), "a live run's staging directory was removed"
            assert sorted(os.listdir(staging)) == sorted(os.path.basename(p) for p in (live_path, local))
        finally:
            remote.discard(local)
        assert not os.path.exists(local)
    finally:
        killed(live)
    assert remote.sweep_stale(staging, remote.STAGED) == [live_path]  # once its process is gone


def test_a_staging_kept_for_the_user_or_in_use_by_a_resume_stays(staging, tmp_path):
    """Not removed although no staging holds it: one whose failed upload named it to the user
    (``.kept``), one a ``distbp train --resume`` runs in (outdir.py's ``.lock`` held), and links."""
    os.makedirs(staging)
    kept = os.path.join(staging, "run-kept0000")
    os.mkdir(kept)
    open(os.path.join(kept, remote.KEEP), "w").close()
    resumed = os.path.join(staging, "run-resumed0")
    os.mkdir(resumed)
    fd = os.open(os.path.join(resumed, ".lock"), os.O_RDWR | os.O_CREAT)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": "here", "since": "now"}).encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, os.path.join(staging, "run-linked00"))
    stale = os.path.join(staging, "run-stale000")  # an older distbp's, made without a lock
    os.mkdir(stale)
    try:
        local = remote.fetch(url_run(tmp_path))
        remote.discard(local)
        assert sorted(os.listdir(staging)) == ["run-kept0000", "run-linked00", "run-resumed0"]
        assert target.is_dir()
    finally:
        os.close(fd)


class Refusing:
    """An object store that refuses every upload."""

    protocol = "s3"

    def put_file(self, source, key):
        raise PermissionError(13, "Access Denied")


def test_a_failed_upload_marks_its_staging_as_the_users(staging, tmp_path):
    """``cannot upload ...; the run's files are kept in <staging>``: kept they are."""
    local = remote._stage()
    with open(os.path.join(local, "metrics.jsonl"), "w") as fh:
        fh.write("{}\n")
    upload = remote.Upload("s3://bucket/run", Refusing(), "bucket/run", local)
    with pytest.raises(RunFailed, match="kept in"):
        upload.sync()
    assert os.path.exists(os.path.join(local, remote.KEEP))
    os.close(remote._locks.pop(local))  # as if its process ended
    assert remote.sweep_stale(staging, remote.STAGED, keep=remote._kept) == [] and os.path.isdir(local)


# ---- distbp convert's temporary directories -------------------------------------------------------

LOCKS_CONVERTING = "path, fd = remote.locked_tempdir('.out.', '.converting', sys.argv[2])"
CONVERTING = re.compile(r"\.out\.[a-z0-9_]{8}\.converting")  # what convert sweeps for DIR "out"


def leftovers(parent) -> list[str]:
    return sorted(p for p in os.listdir(parent) if p.endswith(".converting"))


@pytest.fixture
def source(tmp_path) -> str:
    d = spirals()
    np.savez(tmp_path / "src.npz", X=d.X, y=d.y)
    return f"npz:{tmp_path / 'src.npz'}"


def test_a_killed_converts_leftover_goes_with_the_next_convert(tmp_path, source, capsys):
    """As the issue found it: a convert killed mid-write, then a successful one to the same DIR."""
    dead, dead_path = holder(LOCKS_CONVERTING + "\nopen(path + '/X-00000.npy', 'wb').write(b'half')", "-",
                             str(tmp_path))
    killed(dead)
    assert leftovers(tmp_path) == [os.path.basename(dead_path)]
    assert cli.main(["convert", source, str(tmp_path / "out")]) == 0
    assert leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path / "out")) == ["X-00000.npy", "y-00000.npy"]
    assert capsys.readouterr().err == ""


def test_a_live_converts_directory_and_other_targets_are_left_alone(tmp_path, source):
    live, live_path = holder(LOCKS_CONVERTING, "-", str(tmp_path))
    try:
        stale = tmp_path / ".out.abcd1234.converting"  # an older distbp's, made without a lock
        stale.mkdir()
        other = tmp_path / ".outer.abcd1234.converting"  # another DIR's: its own convert sweeps it
        other.mkdir()
        not_ours = tmp_path / ".out.x.converting"  # not a name convert makes
        not_ours.mkdir()
        assert cli.main(["convert", source, str(tmp_path / "out")]) == 0
        assert leftovers(tmp_path) == sorted([os.path.basename(live_path), other.name, not_ours.name])
    finally:
        killed(live)


def test_a_convert_that_fails_on_its_options_sweeps_nothing(tmp_path, source, capsys):
    """Bad input changes nothing, a dead writer's leftovers included: they go with a convert
    that gets as far as writing."""
    stale = tmp_path / ".out.abcd1234.converting"
    stale.mkdir()
    assert cli.main(["convert", source, str(tmp_path / "out"), "--rows-per-shard", "0"]) == 2
    assert stale.is_dir() and "--rows-per-shard" in capsys.readouterr().err


def test_a_sweep_never_removes_a_directory_it_cannot_lock(tmp_path):
    """The race the lock closes: a writer between mkdtemp and its flock loses its directory to a
    sweep only if the sweep holds the lock, and then makes another (``locked_tempdir`` retries)."""
    path, fd = remote.locked_tempdir(".out.", ".converting", str(tmp_path))
    try:
        assert remote.sweep_stale(str(tmp_path), CONVERTING) == []
        assert os.path.isdir(path)
    finally:
        os.close(fd)
    started = time.monotonic()
    assert remote.sweep_stale(str(tmp_path), CONVERTING) == [path]
    assert time.monotonic() - started < 5
