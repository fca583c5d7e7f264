#!/usr/bin/env python3
"""Train on a dataset larger than the Ray object store, from ``npy:DIR``, with bounded memory per worker.

    python scripts/larger_than_memory.py                  # 1200 MiB of features, a 300 MiB object store
    python scripts/larger_than_memory.py --quick          # 400 MiB, 100 MiB: about half a minute
    python scripts/larger_than_memory.py --data-mb 4000 --store-mb 500 --out ltm.json

What it does:

1. Writes a learnable classification set (float32 features drawn from a normal distribution,
   labels from a fixed random linear teacher) as ``.npy`` shards in a temporary directory,
   chunk by chunk through ``numpy.lib.format.open_memmap``: the set is never whole in memory.
   The first ``--subset-rows`` rows are also written as a directory of their own.
2. Starts a private local Ray on 127.0.0.1 whose object store is a hard limit: ``--store-mb``
   of memory, automatic spilling off, and no fallback allocation.  (Left to itself, Ray puts an
   object the store cannot hold into a file under its temporary directory on local disk; a
   ``local_fs_capacity_threshold`` of 0 turns that off, as a full disk would.)
3. Shows that the in-memory path cannot hold the data: ``ray.put`` of the features, as the
   in-memory path puts them, fails (the error is caught and printed as one line).
4. Trains on ``npy:DIR`` with K workers, while a process of its own samples ``/proc/<pid>/status``
   of the driver and of every ``ray::Worker`` process of this Ray: the peak resident set (VmHWM)
   and the peaks of its anonymous and file-backed parts (RssAnon, RssFile; the file-backed
   pages are the page cache's, shared, and the kernel can drop them at any time), and from
   ``/proc/<pid>/smaps`` how much of the data files each process has resident in its mappings.
5. Measures what reading rows from the page cache costs: the same model and options on the
   subset, once in memory (``distbp.fit`` on an array loaded with ``np.load``) and once as
   ``npy:DIR``, alternately, ``--repeats`` times each; the median samples/s of each.  The files
   were just written, so the page cache is warm: this is the cost of the path, not of a disk.
6. Prints a table, writes JSON with ``--out``, removes the temporary data (also on Ctrl-C) and
   stops the Ray it started.

The figures in docs/performance.md ("Data larger than memory") come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

import numpy as np
from numpy.lib.format import open_memmap

from distbp.distributed.loopback import keep_local_ray_on_loopback

# This script's Ray is always a private local one (its object store is what it measures): not
# $RAY_ADDRESS's cluster.  Before Ray is imported: that Ray listens on 127.0.0.1 only.
os.environ.pop("RAY_ADDRESS", None)
keep_local_ray_on_loopback(None)

FEATURES, CLASSES, HIDDEN = 784, 10, 256
MiB = 1 << 20
CHUNK_BYTES = 32 * MiB  # what the generator holds in memory at a time
SHARD_BYTES = 128 * MiB
RAY_MIN_STORE_MB = 75  # Ray refuses a smaller object_store_memory (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES)
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def fail(message: str) -> None:
    print(f"larger_than_memory: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data-mb", type=float, default=None, help="MiB of features to write (default 1200; --quick 400)")
    p.add_argument("--store-mb", type=float, default=None,
                   help=f"the object store's size in MiB, at least {RAY_MIN_STORE_MB} (default 300; --quick 100)")
    p.add_argument("--workers", type=int, default=2, help="K (default 2)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch B (default 256)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the run on all the data (default 800; --quick 200)")
    p.add_argument("--subset-rows", type=int, default=None,
                   help="rows of the in-memory comparison (default: 100000, or fewer so that they take at most "
                        "40%% of the object store)")
    p.add_argument("--compare-steps", type=int, default=None,
                   help="steps of each comparison run (default 300; --quick 150)")
    p.add_argument("--repeats", type=int, default=None,
                   help="comparison runs of each kind; 0 skips the comparison (default 5; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps: about half a minute")
    p.add_argument("--tmpdir", default=None, help="where the temporary data goes (default: the system's)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("data_mb", 1200.0, 400.0), ("store_mb", 300.0, 100.0), ("steps", 800, 200),
                              ("compare_steps", 300, 150), ("repeats", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.store_mb < RAY_MIN_STORE_MB:
        fail(f"--store-mb {args.store_mb:g}: Ray's object store takes at least {RAY_MIN_STORE_MB} MiB")
    if args.data_mb <= args.store_mb:
        fail(f"--data-mb {args.data_mb:g} must be more than --store-mb {args.store_mb:g}: the point is data "
             "the object store cannot hold")
    for name in ("workers", "batch_size", "steps", "compare_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.repeats < 0:
        fail("--repeats must be 0 or more")
    row_bytes = FEATURES * 4
    args.rows = int(args.data_mb * MiB) // row_bytes
    fits = int(0.4 * args.store_mb * MiB) // row_bytes
    if args.subset_rows is None:
        args.subset_rows = min(100_000, fits, args.rows)
    if not args.batch_size <= args.subset_rows <= min(fits, args.rows):
        fail(f"--subset-rows {args.subset_rows} must be from --batch-size {args.batch_size} to {min(fits, args.rows)} "
             "(40% of the object store, and no more than the data)")
    if args.tmpdir is not None and not os.path.isdir(args.tmpdir):
        fail(f"--tmpdir {args.tmpdir}: no such directory")
    return args


# --- 1. the data -------------------------------------------------------------------------------

def generate(root: str, rows: int, subset_rows: int, seed: int) -> tuple[str, str, int]:
    """Shards ``X-00000.npy``, ``y-00000.npy``, ... of ``rows`` rows under ``root/all``, and their
    first ``subset_rows`` rows as ``X.npy``, ``y.npy`` under ``root/subset``; returns the two
    directories and the number of shards."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32) / np.float32(np.sqrt(FEATURES))
    full, part = os.path.join(root, "all"), os.path.join(root, "subset")
    os.makedirs(full)
    os.makedirs(part)
    shard_rows = max(1, SHARD_BYTES // (FEATURES * 4))
    chunk_rows = max(1, CHUNK_BYTES // (FEATURES * 4))
    sub_X = open_memmap(os.path.join(part, "X.npy"), mode="w+", dtype=np.float32, shape=(subset_rows, FEATURES))
    sub_y = np.empty(subset_rows, dtype=np.int64)
    shards = 0
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        X = open_memmap(os.path.join(full, f"X-{shards:05d}.npy"), mode="w+", dtype=np.float32, shape=(n, FEATURES))
        y = np.empty(n, dtype=np.int64)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            x = rng.standard_normal((hi - lo, FEATURES), dtype=np.float32)
            X[lo:hi] = x
            y[lo:hi] = np.argmax(x @ teacher, axis=1)
            a, b = start + lo, min(start + hi, subset_rows)  # global rows of this chunk that the subset takes
            if a < b:
                sub_X[a:b] = x[:b - a]
                sub_y[a:b] = y[lo:lo + b - a]
        X.flush()
        del X  # unmapped: the driver keeps none of the pages it wrote
        np.save(os.path.join(full, f"y-{shards:05d}.npy"), y)
        shards += 1
    sub_X.flush()
    del sub_X
    np.save(os.path.join(part, "y.npy"), sub_y)
    return full, part, shards


# --- 2. memory of the processes ------------------------------------------------------------------

def status(pid: int) -> dict[str, int] | None:
    """The ``STATUS_FIELDS`` of ``/proc/<pid>/status`` in bytes, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in STATUS_FIELDS:
            values[key] = int(rest.split()[0]) * 1024  # "kB"
    return values


def mapped(pid: int, prefix: str) -> int | None:
    """Bytes of files under ``prefix`` resident in ``pid``'s mappings (``/proc/<pid>/smaps``): the
    page-cache pages of the data the process has mapped, shared with every other process."""
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            text = fh.read()
    except OSError:
        return None
    # A mapping is a header line ending in its path, then "Size:", ..., "Rss:   N kB", ...:
    # find the data's mappings and the Rss line after each (str.find: no parsing of the rest).
    total, at = 0, text.find(" " + prefix)
    while at != -1:
        rss = text.find("\nRss:", at)
        if rss == -1:
            break
        total += int(text[rss + 5:text.index("kB", rss)]) * 1024
        at = text.find(" " + prefix, rss)
    return total


def processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, the first word of its command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")[0].decode(errors="replace").split(" ")[0]
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after the command name, which may hold spaces
        table[int(entry)] = (ppid, cmd)
    return table


class MemoryWatch:
    """Samples the driver ``me`` and every ``ray::Worker`` process descended from it (this
    script's Ray, not another Ray on the machine) every ``period`` seconds; keeps each one's peaks.

    It runs in a process of its own (``watch``): a thread in the driver would take the GIL from
    the driver's step loop, whose latency is part of every step.
    """

    def __init__(self, me: int, data_dir: str, workers: int, period: float = 0.2):
        self.me, self.data_dir, self.workers, self.period = me, os.path.realpath(data_dir) + os.sep, workers, period
        self.peaks: dict[int, dict[str, int]] = {}
        self.names: dict[int, str] = {me: "driver"}

    def mine(self, table: dict[int, tuple[int, str]], pid: int) -> bool:
        for _ in range(8):  # the driver -> raylet -> worker: a few generations at most
            pid = table.get(pid, (0, ""))[0]
            if pid == self.me:
                return True
            if pid <= 1:
                return False
        return False

    def find(self) -> int:
        """Look for new workers (a replaced one, too); returns how many have been seen."""
        table = processes()  # ~2 ms
        for pid, (_, cmd) in table.items():
            if pid not in self.names and cmd.startswith("ray::Worker") and self.mine(table, pid):
                self.names[pid] = "worker"
        return len(self.names) - 1

    def sample(self, smaps: bool) -> None:
        for pid in self.names:
            values = status(pid)
            if values and smaps:
                values["data"] = mapped(pid, self.data_dir) or 0
            if values:
                peak = self.peaks.setdefault(pid, {})
                for key, value in values.items():
                    peak[key] = max(peak.get(key, 0), value)

    def result(self) -> dict:
        for peak in self.peaks.values():
            peak.setdefault("data", 0)  # gone before its smaps was read
        workers = [self.peaks[pid] for pid, name in self.names.items() if name == "worker" and pid in self.peaks]
        return {"driver": self.peaks.get(self.me, {}), "workers": workers}


def watch(me: int, data_dir: str, workers: int) -> None:
    """The watcher process: sample until stdin closes, then print the peaks as JSON.

    It shares the cores with the run it watches, so it does little: ``status`` of the known
    processes every 0.2 s (tens of microseconds each); the list of all processes every 0.2 s
    only until all K workers are seen, then every 2 s; ``smaps`` (for which the kernel walks
    the page tables of every mapping, so it costs more as more of the data is mapped) at most
    2% of the time: after a pass that took t seconds, the next comes 50 t later (0.2 s at
    least).  A sampler that listed all processes every 0.2 s and read ``smaps`` every 0.5 s
    cost the run a fifth of its speed (docs/performance.md).
    """
    import select

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the driver ends us
    w, last_find, next_smaps, passes = MemoryWatch(me, data_dir, workers), 0.0, 0.0, 0
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        if len(w.names) - 1 < workers or now - last_find > 2.0:
            w.find()
            last_find = now
        smaps = now >= next_smaps
        w.sample(smaps)
        if smaps:
            next_smaps = now + max(0.2, 50 * (time.monotonic() - now))
            passes += 1
        if select.select([sys.stdin], [], [], w.period)[0] and not sys.stdin.buffer.read1(1):
            break
    w.sample(True)  # the driver's last values (the workers are gone by now)
    print(json.dumps({**w.result(), "smaps_passes": passes, "seconds": time.monotonic() - t0}))


class Watcher:
    """The driver's end of ``watch``: ``start``, run something, ``stop`` returns the peaks."""

    def __init__(self, data_dir: str, workers: int):
        self.data_dir, self.workers, self.proc = data_dir, workers, None

    def start(self) -> None:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--watch", str(os.getpid()),
                                      self.data_dir, str(self.workers)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def stop(self) -> dict:
        out, _ = self.proc.communicate(timeout=60)  # closes its stdin: it takes a last sample and answers
        try:
            return json.loads(out)
        except ValueError:  # it died (killed with the driver's group): no figures rather than a second error
            return {"driver": {}, "workers": []}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux 4.0+: ``5`` into ``/proc/self/clear_refs``), so that its
    peak covers the training run only and not the generation before it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --- 3. the runs -------------------------------------------------------------------------------

def options(args, steps: int) -> dict:
    """The options of every run: only the data differs between them."""
    return dict(layers=f"{FEATURES},{HIDDEN},{CLASSES}", workers=args.workers, steps=steps,
                batch_size=args.batch_size, dtype="float32", seed=args.seed)


def try_put(full: str) -> dict:
    """``ray.put`` of every feature shard as one object (the bytes the in-memory path puts), each
    shard as a plain array over its memory map: the store refuses the object before any byte is read."""
    import ray

    shards = sorted(f for f in os.listdir(full) if f.startswith("X-"))
    arrays = [np.asarray(np.load(os.path.join(full, f), mmap_mode="r")) for f in shards]
    size = sum(a.nbytes for a in arrays)
    t0 = time.perf_counter()
    try:
        ref = ray.put(arrays)
    except Exception as exc:  # ObjectStoreFullError, OutOfDiskError (no fallback to disk): both RayError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"put_bytes": size, "failed": True, "error": type(exc).__name__, "reason": reason,
                "seconds": time.perf_counter() - t0}
    del ref
    return {"put_bytes": size, "failed": False, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.load_before = os.getloadavg()
    # SIGTERM, like Ctrl-C, ends the script through the cleanup below (Python's default would skip it).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    root = tempfile.mkdtemp(prefix="distbp-ltm-", dir=args.tmpdir)
    started_ray = False
    try:
        from distbp.data import npydir

        npydir.CACHE = os.path.join(root, "checked")  # the finiteness verdicts go with the data
        t0 = time.perf_counter()
        print(f"writing {args.rows:,} rows x {FEATURES} float32 ({args.rows * FEATURES * 4 / MiB:.0f} MiB) to {root}",
              file=sys.stderr, flush=True)
        full, part, shards = generate(root, args.rows, args.subset_rows, args.seed)
        os.sync()  # the pages written are clean before anything is measured: no writeback during the runs
        gen_s = time.perf_counter() - t0

        from distbp.distributed import runtime

        started_ray = True
        # runtime._init is ray.init plus distbp's reaper: whatever part of this Ray has started is
        # ended with this process, even if it is killed or ray.init is cut short.
        runtime._init(local=True, num_cpus=max(os.cpu_count() or 1, args.workers + 2),
                      object_store_memory=int(args.store_mb * MiB), include_dashboard=False,
                      _node_ip_address="127.0.0.1", logging_level="ERROR", configure_logging=True,
                      # The store is a hard limit: no spilling, and no fallback allocation on local disk
                      # (Ray's plasma allocator falls back to a file under its temp dir unless the disk is
                      # "over capacity"; with a threshold of 0 it always is).
                      _system_config={"automatic_object_spilling_enabled": False,
                                      "local_fs_capacity_threshold": 0.0})
        put = try_put(full)
        if put["failed"]:
            print(f"in memory: ray.put of the features ({put['put_bytes'] / MiB:.0f} MiB) failed: {put['error']} "
                  f"(Ray: {put['reason']!r}; the {args.store_mb:g} MiB object store cannot hold them, and falling "
                  "back to disk is off)", file=sys.stderr, flush=True)
        else:
            print(f"in memory: ray.put of {put['put_bytes'] / MiB:.0f} MiB succeeded", file=sys.stderr, flush=True)

        from distbp import Config
        from distbp.loops.sync import train

        watcher = Watcher(root, args.workers)
        hwm_reset = reset_peak_rss()
        before = status(os.getpid())
        watcher.start()
        try:
            run = train(Config(dataset="npy:" + full, out=os.path.join(root, "run-all"), **options(args, args.steps)))
        finally:
            memory = watcher.stop()
        memory["driver_peak_reset"], memory["driver_before"] = hwm_reset, before

        compare = []
        if args.repeats:
            X = np.load(os.path.join(part, "X.npy"))  # in memory: an ordinary array
            y = np.load(os.path.join(part, "y.npy"))
            import distbp
            for r in range(args.repeats):  # alternately, so that a change in the machine's load hits both
                same = options(args, args.compare_steps)
                mem = distbp.fit(X, y, out=os.path.join(root, f"mem-{r}"), **same).summary
                npy = train(Config(dataset="npy:" + part, out=os.path.join(root, f"npy-{r}"), **same))
                compare.append({"memory": mem["samples_per_second"], "npy": npy["samples_per_second"],
                                "same_weights": mem["weights_sha256"] == npy["weights_sha256"]})
                print(f"subset, repeat {r + 1}: in memory {mem['samples_per_second']:.0f}, "
                      f"npy:DIR {npy['samples_per_second']:.0f} samples/s", file=sys.stderr, flush=True)
        result = report(args, shards, gen_s, put, run, memory, compare)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
        return 0
    finally:
        if started_ray:
            runtime.disconnect()  # ray.shutdown(), then the reaper clears anything of this Ray left
        shutil.rmtree(root, ignore_errors=True)


def report(args, shards: int, gen_s: float, put: dict, run: dict, memory: dict, compare: list) -> dict:
    """Print the table; return everything as a dict for ``--out``."""
    data_bytes = args.rows * FEATURES * 4
    load = os.getloadavg()
    mib = lambda v: v / MiB  # noqa: E731
    rows = [
        ("data", f"{mib(data_bytes):.0f} MiB of float32 features ({args.rows:,} x {FEATURES}) in {shards} shards, "
                 f"written in {gen_s:.0f} s"),
        ("object store", f"{args.store_mb:g} MiB (no spilling, no fallback to disk)"),
        ("in memory: ray.put", f"failed: {put['error']}" if put["failed"] else "succeeded (!)"),
        (f"npy:DIR, K={args.workers}", f"{run['samples_per_second']:.0f} samples/s over {run['steps']} steps of "
                                       f"B={args.batch_size}; train accuracy {run['train_accuracy']:.3f}"),
    ]

    def rss(peak: dict) -> str:
        return (f"{mib(peak.get('VmHWM', 0)):.0f} MiB: anonymous {mib(peak.get('RssAnon', 0)):.0f}, file-backed "
                f"{mib(peak.get('RssFile', 0)):.0f} (the data files' pages, sampled: {mib(peak.get('data', 0)):.0f})")

    for i, w in enumerate(memory["workers"]):
        rows.append((f"peak RSS worker {i + 1}", rss(w)))
    rows.append(("peak RSS driver", rss(memory["driver"])))
    summary = None
    if compare:
        memory_sps = statistics.median(c["memory"] for c in compare)
        npy_sps = statistics.median(c["npy"] for c in compare)
        pairs = [c["npy"] / c["memory"] for c in compare]  # each pair ran back to back, under the same load
        summary = {"subset_rows": args.subset_rows, "steps": args.compare_steps, "repeats": len(compare),
                   "memory_samples_per_second": memory_sps, "npy_samples_per_second": npy_sps,
                   "ratio": npy_sps / memory_sps, "pair_ratios": pairs, "pair_ratio_median": statistics.median(pairs),
                   "same_weights": all(c["same_weights"] for c in compare), "runs": compare}
        rows.append((f"subset of {args.subset_rows:,} rows", f"in memory {memory_sps:.0f}, npy:DIR {npy_sps:.0f} "
                                                             f"samples/s (median of {len(compare)}, page cache warm)"))
        spread = f"pair by pair {min(pairs):.2f}-{max(pairs):.2f}, median {statistics.median(pairs):.2f}"
        rows.append(("page cache / in memory", f"{npy_sps / memory_sps:.2f} (of the medians); {spread}"
                                               + ("" if summary["same_weights"] else " (weights differ!)")))
    rows.append(("load average", f"{args.load_before[0]:.1f} before, {load[0]:.1f} at the end (1 min; this "
                                 "script's processes included)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return {
        "data_bytes": data_bytes, "rows": args.rows, "features": FEATURES, "shards": shards,
        "object_store_bytes": int(args.store_mb * MiB), "workers": args.workers, "batch_size": args.batch_size,
        "layers": [FEATURES, HIDDEN, CLASSES], "generate_seconds": gen_s, "in_memory_put": put,
        "npy_run": {k: run[k] for k in ("steps", "samples_per_second", "wall_time_s", "train_accuracy",
                                        "final_loss", "weights_sha256", "transport")},
        "peak_memory_bytes": memory, "compare": summary,
        "load_average_before": list(args.load_before), "load_average_after": list(load),
    }


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    watch(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
elif __name__ == "__main__":
    from distbp.errors import DistbpError, Interrupted

    try:
        sys.exit(main())
    except (KeyboardInterrupt, Interrupted):
        print("larger_than_memory: interrupted; the temporary data is removed", file=sys.stderr)
        sys.exit(130)
    except DistbpError as exc:
        fail(str(exc))
