"""Signals, stray output and leftovers: a stopped run says one line and exits 128 + the signal,
stdout holds only the summary, and nothing of the run's private Ray outlives its driver.

Most cases run in this process without Ray (the signal scopes, the command with a stand-in for
the training loop); a few run the real command in a subprocess, each ending every process it
started, by pid.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from distbp import cli
from distbp.errors import UsageError
from distbp.run import signals

SMALL = ["--dataset", "spirals", "--layers", "2,16,16,3", "--batch-size", "60", "--micro-batch", "8"]
SUMMARY = {"steps": 3, "epochs": 1.0, "workers": 1, "final_loss": 0.5, "train_accuracy": 0.5, "test_split": None,
           "test_accuracy": None, "samples_per_second": 1.0, "wall_time_s": 1.0, "mode": "sync", "exact": True,
           "weights_sha256": "0" * 64, "out": "x"}


def interrupt_self(signum=signal.SIGTERM) -> None:
    """Send ``signum`` to this process and give its handler the chance to run."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


# --- the scopes, in this process ---

def test_loop_scope_stops_at_the_boundary_then_at_once():
    before = signal.getsignal(signal.SIGTERM)  # the default, or Ray's when a test session started Ray
    with signals.StopSignals() as stop:
        interrupt_self()
        assert stop.signum == signal.SIGTERM and signals.stopped_at_once() is None  # the loop finishes its step
        with pytest.raises(signals.Stopped) as raised:
            interrupt_self(signal.SIGINT)
    assert raised.value.signum == signal.SIGINT
    assert signals.received() == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is before  # put back as it was


def test_command_scope_stops_at_once_and_a_shield_waits_for_its_end():
    done = []
    with signals.StopSignals(at_once=True):
        with pytest.raises(signals.Stopped):
            with signals.shielded():
                interrupt_self()
                interrupt_self()  # a second one a moment later changes nothing
                done.append("cleanup")  # ran whole
        assert done == ["cleanup"] and signals.stopped_at_once() == signal.SIGTERM
        assert not signals.loop_began()


def test_ray_init_replacing_the_handler_is_undone():
    def chosen(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, chosen)
    try:
        before = signals.handlers()
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does
        signals.restore_after(before)
        assert signal.getsignal(signal.SIGTERM) is chosen
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        before = signals.handlers()
        signal.signal(signal.SIGTERM, chosen)
        signals.restore_after(before)  # nobody chose SIG_DFL: the library's handler stays
        assert signal.getsignal(signal.SIGTERM) is chosen
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_python(code: str, timeout=60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


def test_a_stop_that_is_lost_still_ends_the_process_with_one_line():
    """Ray drops the exception, then the cleanup hangs: the watchdog ends the process."""
    proc, seconds = run_python("""
        import os, signal, time
        from distbp.run import signals
        signals.GRACE_S = 1.0
        with signals.StopSignals(at_once=True, describe=lambda: "distbp: stopped by SIGTERM (watchdog)"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except KeyboardInterrupt:
                pass  # dropped, as a library might
            time.sleep(60)  # a cleanup that never ends
    """)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr == "distbp: stopped by SIGTERM (watchdog)\n"
    assert seconds < 30  # far from the 60 s sleep: the watchdog ended it


def test_a_third_signal_ends_the_process_at_once():
    proc, seconds = run_python("""
        import os, signal, time
        from distbp.run import signals
        signals.GRACE_S = 60
        with signals.StopSignals(at_once=True, describe=lambda: "distbp: stopped by SIGINT (third)"):
            with signals.shielded():
                for _ in range(3):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.2)
                time.sleep(60)
    """)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert proc.stderr == "distbp: stopped by SIGINT (third)\n"
    assert seconds < 30


SIGTERM_IN_A_FINALIZER = """
    import os, signal, sys, time

    def like_rays(signum, frame):  # ray._private.worker's handler in an actor's process
        sys.exit(1)

    signal.signal(signal.SIGTERM, like_rays)
    if {ours}:
        from distbp.distributed.actors import end_at_once_on_sigterm
        end_at_once_on_sigterm()

    class Pool:
        def __del__(self):  # as a thread pool's weakref callback runs while Ray ends the actor
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

    pool = Pool()
    del pool
    print("went on")
"""


@pytest.mark.parametrize("ours", [False, True], ids=["rays-handler", "actors-handler"])
def test_an_actor_ended_by_sigterm_in_a_finalizer_prints_no_traceback(ours):
    """Ray ends each run's servers with SIGTERM; taken in a finalizer, Ray's SystemExit is printed
    as a traceback (the first case shows the scene does that).  The actors' handler ends the
    process at once instead, silent, with 128 + SIGTERM."""
    proc, _ = run_python(SIGTERM_IN_A_FINALIZER.format(ours=ours))
    if not ours:
        assert "Exception ignored" in proc.stderr and "SystemExit" in proc.stderr, proc.stderr
        assert proc.stdout == "went on\n"
    else:
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
        assert proc.stderr == "" and proc.stdout == ""


# --- the command, with a stand-in for the training loop ---

def test_a_stop_that_ray_converts_is_still_reported_as_the_signal(monkeypatch, capfd, tmp_path):
    def train(config, *rest):
        try:
            interrupt_self()
        except KeyboardInterrupt:
            raise RuntimeError("a task failed") from None  # what a Ray call may make of it
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr("distbp.loops.sync.train", train)
    code = cli.main(["train", *SMALL, "--out", str(tmp_path / "run")])
    out, err = capfd.readouterr()
    assert code == 128 + signal.SIGTERM, err
    assert out == "" and err == "distbp: stopped by SIGTERM before the first step; nothing to resume\n"


def test_stdout_is_only_the_summary_whatever_else_prints(monkeypatch, capfd, tmp_path):
    def train(config, *rest):
        print("(raylet) A worker died or was killed")  # Ray's log lines, through sys.stdout
        os.write(1, b"[C++] straight to file descriptor 1\n")
        return SUMMARY

    monkeypatch.setattr("distbp.loops.sync.train", train)
    assert cli.main(["train", *SMALL, "--out", str(tmp_path / "run")]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == SUMMARY
    assert "A worker died" in err and "[C++]" in err
    print("after")  # and stdout is back where it was
    assert capfd.readouterr().out == "after\n"


def test_stdout_is_put_back_after_an_error(monkeypatch, capfd, tmp_path):
    def train(config, *rest):
        raise UsageError("bad")

    monkeypatch.setattr("distbp.loops.sync.train", train)
    assert cli.main(["train", *SMALL, "--out", str(tmp_path / "run")]) == 2
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == "distbp: error: bad\n"


# --- addresses ---

@pytest.mark.parametrize("address, fragment", [
    ("ray://10.0.0.5:10001", "Ray Client addresses (ray://) are not supported"),
    ("127.0.0.1:", "--address 127.0.0.1:: the port is missing"),
    ("127.0.0.1:x", "the port 'x' is not a number"),
    ("10.0.0.5:70000", "the port '70000' is not a number"),
    ("10.0.0.5", "not a Ray address"),
    (":6379", "not a Ray address"),
    ("http://10.0.0.5:6379", "not a Ray address"),
])
def test_an_unusable_address_is_refused_naming_what_was_given(address, fragment):
    from distbp.distributed.runtime import check_address

    with pytest.raises(UsageError) as raised:
        check_address(address, f"--address {address}")
    assert str(raised.value).startswith(f"--address {address}: ") and fragment in str(raised.value)
    assert "192." not in str(raised.value)  # not the address Ray would have made of it


@pytest.mark.parametrize("address", ["auto", "local", "10.0.0.5:6379", "head-node:6379", "[::1]:6379"])
def test_a_usable_address_passes(address):
    from distbp.distributed.runtime import check_address

    check_address(address, f"--address {address}")


def test_a_ray_client_address_is_refused_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", *SMALL, "--steps", "2", "--address",
                           "ray://127.0.0.1:10001", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("distbp: error: --address ray://127.0.0.1:10001: Ray Client addresses")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr  # no UserWarning
    assert time.monotonic() - start < 20  # Ray Client itself tries for 30 s
    assert not (tmp_path / "run").exists()


# --- the real command ---

def stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None for a dead or zombie one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state, ppid, *rest = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return None if state == b"Z" else (int(ppid), rest[17].decode())


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root``, with its start time."""
    table = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := stat(int(p)))}
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as fh:
            return fh.read()
    except OSError:
        return ""


def alive(processes: dict[int, str]) -> list[int]:
    return [pid for pid, start in processes.items() if (stat(pid) or (0, ""))[1] == start]


def gone_within(processes: dict[int, str], seconds: float) -> list[int]:
    """The processes still alive after waiting up to ``seconds`` for them to end."""
    deadline = time.monotonic() + seconds
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(processes)


class Command:
    """``distbp train`` in a subprocess, with every process below it remembered so that the
    test can check they end, and end them (by pid) if they do not."""

    def __init__(self, *args):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen([sys.executable, "-m", "distbp", "train", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.tree: dict[int, str] = {}

    def look(self) -> dict[int, str]:
        self.tree.update(descendants(self.proc.pid))
        return self.tree

    def wait_for(self, ready, seconds=120) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            self.look()
            assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.communicate()
            time.sleep(0.02)
        self.look()

    def finish(self, timeout=60) -> tuple[str, str]:
        return self.proc.communicate(timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        for pid in alive(self.tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def lines_of(err: str) -> list[str]:
    """stderr without the progress lines."""
    return [line for line in err.splitlines() if not line.startswith("epoch ")]


def has_lines(path: str, n: int):
    return lambda: os.path.exists(path) and sum(1 for _ in open(path)) >= n


def test_a_second_sigterm_soon_after_the_first_ends_with_one_line(tmp_path):
    run_dir = str(tmp_path / "run")
    with Command(*SMALL, "--steps", "3000", "--out", run_dir) as cmd:
        cmd.wait_for(has_lines(os.path.join(run_dir, "metrics.jsonl"), 2))
        cmd.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        cmd.proc.send_signal(signal.SIGTERM)
        out, err = cmd.finish()
        assert cmd.proc.returncode == 128 + signal.SIGTERM, err
        assert out == "" and len(lines_of(err)) == 1 and lines_of(err)[0].startswith("distbp: stopped "), err
        assert gone_within(cmd.tree, 10) == []


def test_sigterm_while_ray_starts_ends_with_one_line_and_leaves_nothing(tmp_path):
    run_dir = tmp_path / "run"

    def ray_starting():  # the GCS is up: ray.init is under way
        return any("gcs_server" in cmdline(pid) for pid in alive(cmd.look()))

    with Command(*SMALL, "--steps", "3000", "--out", str(run_dir)) as cmd:
        cmd.wait_for(ray_starting)
        cmd.proc.send_signal(signal.SIGTERM)
        out, err = cmd.finish()
        assert cmd.proc.returncode == 128 + signal.SIGTERM, err
        assert out == "" and err == "distbp: stopped by SIGTERM before the first step; nothing to resume\n"
        assert not run_dir.exists()
        assert gone_within(cmd.tree, 10) == []


def test_nothing_of_the_ray_outlives_a_killed_driver(tmp_path):
    """Ray's agents used to stay 60 s after the driver's SIGKILL."""
    run_dir = str(tmp_path / "run")
    with Command(*SMALL, "--steps", "3000", "--out", run_dir) as cmd:
        cmd.wait_for(has_lines(os.path.join(run_dir, "metrics.jsonl"), 2))
        names = {cmdline(pid).split("\0")[0] for pid in alive(cmd.look())}
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
        cmd.proc.kill()
        cmd.finish()
        assert gone_within(cmd.tree, 10) == []


def test_stdout_is_only_the_summary_after_a_worker_dies(tmp_path):
    run_dir = str(tmp_path / "run")
    with Command(*SMALL, "--workers", "2", "--steps", "30", "--fault-injection", "kill-worker:1@5",
                 "--out", run_dir) as cmd:
        out, err = cmd.finish(timeout=120)
        assert cmd.proc.returncode == 0, err
        assert json.loads(out)["steps"] == 30
