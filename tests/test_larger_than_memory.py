"""scripts/larger_than_memory.py: data larger than the object store trains from npy:DIR in bounded memory.

The script runs as a subprocess because it starts a Ray of its own with a small object store
(the session's Ray has the default one).  400 MiB of features against a 100 MiB store (Ray's
least is 75 MiB): the in-memory path's ``ray.put`` must fail, the run on ``npy:DIR`` must
finish, and no worker may own memory on the scale of the data.

A worker's resident set also counts the pages of the data files it has mapped (file-backed:
the page cache's, shared by every process and dropped by the kernel under pressure); the
kernel maps the neighbours of each row read too, so after a few hundred random rows most of
a small set is mapped.  What the worker owns is its anonymous memory, and that is what must
stay small; the file-backed part is bounded by the data itself.
"""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "larger_than_memory.py")


def test_data_larger_than_the_object_store_trains_from_npy_in_bounded_memory(tmp_path):
    out = tmp_path / "ltm.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, SCRIPT, "--data-mb", "400", "--store-mb", "100", "--steps", "150",
                           "--repeats", "1", "--compare-steps", "10", "--subset-rows", "4000",
                           "--tmpdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    data = result["data_bytes"]
    assert data > 3 * result["object_store_bytes"]

    put = result["in_memory_put"]
    assert put["failed"] and put["error"] in ("ObjectStoreFullError", "OutOfDiskError"), put
    assert put["put_bytes"] >= data

    run = result["npy_run"]
    assert run["steps"] == 150 and run["samples_per_second"] > 0 and run["transport"] == "direct"

    workers = result["peak_memory_bytes"]["workers"]
    assert len(workers) == 2, workers
    for peak in workers:
        assert 0 < peak["RssAnon"] < data / 2, peak  # what the worker owns: far from the data's size
        # the rows come from the files' pages (shared, the page cache's); smaps is sampled rarely, so a
        # run may end before a sample sees them: at most the data, never more
        assert 0 <= peak["data"] <= data

    compare = result["compare"]
    assert compare["same_weights"], compare  # in memory and npy:DIR: the same bits
    assert compare["memory_samples_per_second"] > 0 and compare["npy_samples_per_second"] > 0

    assert not [p for p in os.listdir(tmp_path) if p.startswith("distbp-ltm-")]  # the data is removed
