#!/usr/bin/env python3
"""The data-parallel yardstick of scripts/bench.py: PyTorch DistributedDataParallel on the CPU.

    python scripts/baselines/ddp_baseline.py --workers 2 --layers 784,1024,1024,10 --batch-size 1024 --dtype float64

DDP over gloo is what a user would reach for instead of distbp, so it is the peer to beat
at equal resources: K processes, one BLAS thread each (as each distbp worker has), the same
network (tanh hidden layers, softmax cross-entropy, plain SGD on the mean over the global
batch), the same global batch split evenly over the processes, the same dtype.  DDP
all-reduces the gradients in buckets while backprop runs; nothing in it is exact across K,
and it is not asked to be.  It needs torch (a CPU build is enough); scripts/bench.py skips it
when torch does not import.

Prints one JSON line: ``samples_per_second`` (the global batch over the median step time of
rank 0, which the all-reduce keeps in step with the others), ``step_ms`` and the options.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def network(sizes: list[int], dtype):
    """The baseline's network: linear layers, tanh between them, in ``dtype`` (a torch dtype)."""
    from torch import nn

    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def core_gflops(sizes: list[int], dtype: str, rows: int, repeats: int = 3) -> float:
    """torch's backprop rate on one thread, GFLOP/s, as a DDP rank computes (forward, loss,
    backward over ``rows`` samples; no all-reduce): 6 flops per weight and sample over the median
    of ``repeats`` steps, one more before them left out.  The cost model's compute for DDP on
    this machine (scripts/netlab.py)."""
    import numpy as np
    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kind = getattr(torch, dtype)
        model = network(sizes, kind)
        X, y = torch.randn(rows, sizes[0], dtype=kind), torch.randint(0, sizes[-1], (rows,))
        loss_fn, seconds = nn.CrossEntropyLoss(), []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.zero_grad()
            loss_fn(model(X), y).backward()
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    weights = sum(p.numel() for p in model.parameters())
    return 6 * weights * rows / float(np.median(seconds[1:])) / 1e9


def rank_main(rank: int, args: argparse.Namespace, store: str, results) -> None:
    """One DDP process: train ``args.warmup + args.steps`` steps on its share of the batch."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from threadpoolctl import threadpool_limits
    from torch import nn

    # threadpoolctl caps the BLAS and OpenMP pools torch has loaded; torch's own intra-op pool
    # is sized apart from them, so it is set too.  K processes of one thread each share the
    # cores as distbp's K workers do.
    threadpool_limits(args.threads)
    torch.set_num_threads(args.threads)
    # A file rendezvous: no port to pick, and so no race with other programs for a free one.
    dist.init_process_group("gloo", store=dist.FileStore(store, args.workers), rank=rank,
                            world_size=args.workers)
    dtype = getattr(torch, args.dtype)
    sizes = [int(v) for v in args.layers.split(",")]
    torch.manual_seed(0)  # every rank starts from the same weights, as DDP expects
    model = nn.parallel.DistributedDataParallel(network(sizes, dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # Every rank draws the whole global batch from one seed and keeps its slice: the ranks
    # together train on exactly one batch of B, whatever K is.
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(args.batch_size, sizes[0], generator=gen, dtype=dtype).tensor_split(args.workers)[rank]
    y = torch.randint(0, sizes[-1], (args.batch_size,), generator=gen).tensor_split(args.workers)[rank]
    # The mean over this rank's slice; DDP averages the K gradients: the mean over the global batch.
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(X), y).backward()  # returns once DDP's all-reduce of every bucket is done
        optimizer.step()
        times.append(time.perf_counter() - start)
    if rank == 0:  # one float: the queue is read only after every process has ended
        results.put(float(np.median(times[args.warmup:])))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="K processes")
    ap.add_argument("--layers", default="784,1024,1024,10", help="layer sizes, inputs first")
    ap.add_argument("--batch-size", type=int, default=1024, help="the global batch B, split over the K processes")
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per process (default 1: as each distbp worker runs BLAS on one thread)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (gloo's first buffers, page faults)")
    args = ap.parse_args(argv)

    import torch.multiprocessing as mp

    # Every process is on this machine: gloo's pairs stay on loopback, as distbp's local Ray does.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="ddp-baseline-") as tmp:
        mp.spawn(rank_main, args=(args, os.path.join(tmp, "store"), results), nprocs=args.workers)
    median = results.get()
    print(json.dumps({"impl": "torch-ddp-gloo", "workers": args.workers, "threads": args.threads,
                      "layers": [int(v) for v in args.layers.split(",")], "batch_size": args.batch_size,
                      "dtype": args.dtype, "steps": args.steps, "step_ms": median * 1e3,
                      "samples_per_second": args.batch_size / median}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
