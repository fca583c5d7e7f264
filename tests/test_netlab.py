"""The network lab (scripts/netlab.py): distbp over shaped links between network namespaces gives the
bits of a plain local run, and the lab's teardown leaves none of the namespaces, links or processes it made.

Skipped where namespaces cannot be made (not root, no ``ip``/``tc``, ``ip netns add`` refused)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import netlab  # scripts/ is on sys.path (conftest)
import pytest
from conftest import ROOT

# A small model, a few steps, distbp only: about 30 s, most of it the start of three Ray nodes on 2 cores.
LAB = ["--nodes", "2", "--rate", "1gbit", "--layers", "8,32,32,4", "--batch-size", "64", "--micro-batch", "8",
       "--steps", "3", "--warmup", "1", "--no-ddp"]


def why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veths, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the network lab needs '{tool}': apt-get install iproute2"
    probe = f"{netlab.PREFIX}probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"'ip netns add' failed here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


NO_NAMESPACES = why_no_namespaces()


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line holds ``text`` (Ray's hold their node's --temp-dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize("layout", [[], ["--server-nodes", "1"]], ids=["servers-on-worker-nodes", "server-nodes"])
def test_lab_run_has_the_bits_of_a_local_run_and_leaves_nothing(tmp_path, request, layout) -> None:
    if NO_NAMESPACES:  # before the session's Ray starts: nothing to wait for when skipped
        pytest.skip(NO_NAMESPACES)
    request.getfixturevalue("ray_session")
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out = tmp_path / "lab.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "netlab.py"), *LAB, *layout, "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    lab, run = result["lab"], result["runs"][0]

    # The lab's run went over its links, one worker on each node namespace; with --server-nodes the
    # server is on a namespace of its own (distbp train --server-resource), where no worker is
    assert run["distbp"]["link_bytes"] > 0
    # the cost model's prediction beside the measured step, term by term (distbp.tools.nodemodel)
    predicted = run["model"]["distbp"]
    after = predicted["push"] - predicted["hidden"]  # what the push takes once the backward pass is done
    pulled = predicted["pull"] - predicted["hidden_pull"]  # and the pull once the forward pass is on layer 2
    assert predicted["step"] == pytest.approx(predicted["compute"] + max(after, predicted["sum"] / 2) +
                                              max(pulled, predicted["sum"] / 2) + predicted["ray"] +
                                              predicted["latency"])
    assert predicted["push"] > 0 and run["model"]["ddp"]["allreduce"] > 0
    assert len(set(run["distbp"]["worker_nodes"])) == 2
    apart = not set(run["distbp"]["server_nodes"]) & set(run["distbp"]["worker_nodes"])
    assert apart == bool(layout) and len(lab["namespaces"]) == 3 + len(layout) // 2

    # The same options on the session's local Ray: the same weights, bit for bit
    from distbp.cli import build_parser
    from distbp.loops.sync import train
    from distbp.options import from_args

    args = netlab.parser().parse_args(LAB)  # the same run without a place for its servers: one local node
    config = from_args(build_parser().parse_args(["train", *netlab.train_args(args, None, str(tmp_path / "local"))]))
    assert train(config)["weights_sha256"] == run["distbp"]["weights_sha256"]

    # Teardown: no namespace, link, process or temp dir of the run is left
    assert not netlab.lab_namespaces(f"{netlab.PREFIX}{lab['run_id']}")
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("lab") == \
        links_before.count("lab")
    assert not [pid for pid, start in lab["procs"] if netlab.start_time(pid) == start]
    assert not processes_mentioning(lab["temp_dir"])
    assert not Path(lab["temp_dir"]).exists()


def test_without_privileges_one_line_and_status_2(monkeypatch, capsys) -> None:
    """Not root: the script says so in one line on stderr and exits 2, having made nothing."""
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    before = netlab.lab_namespaces()
    assert netlab.main(["--no-ddp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("netlab: ") and err.count("\n") == 1, err
    assert netlab.lab_namespaces() == before


def test_the_model_computes_at_the_rates_measured_on_this_machine() -> None:
    """``netlab.model``'s compute terms come from ``probe``'s rates, each design's its own: half
    the rate, twice the compute; the rest of the step does not move."""
    args = netlab.parser().parse_args(["--layers", "784,1024,1024,10", "--batch-size", "1024"])
    P = (785 * 1024 + 1025 * 1024 + 1025 * 10)
    one = netlab.model(args, "1gbit", 512, {"distbp": 100.0, "ddp": 50.0})
    half = netlab.model(args, "1gbit", 512, {"distbp": 50.0, "ddp": 50.0})
    assert one["distbp"]["compute"] == pytest.approx(6 * P * 512 / 100e6)  # ms: one micro-batch of 512 a node
    assert one["ddp"]["compute"] == pytest.approx(6 * P * 512 / 50e6)
    assert half["distbp"]["compute"] == pytest.approx(2 * one["distbp"]["compute"])
    assert half["distbp"]["push"] == one["distbp"]["push"] and half["ddp"] == one["ddp"]
    from distbp.tools.corerate import core_gflops
    assert 0 < core_gflops((16, 8, 4), "float64", 64, 16, repeats=1) < 1e4  # GFLOP/s of a real compute
