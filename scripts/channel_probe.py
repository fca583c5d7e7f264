#!/usr/bin/env python3
"""How fast distbp's socket channel moves a step's weights: 7.45 MB (784-1024-1024-10 in float32)
from a ``channel.Listener`` in one process to ``channel.connect`` in another over loopback, as a
worker pulls them (a request, then ``recv_into`` its buffer).  Median milliseconds per pull
over 35 pulls, for the system's autotuned socket buffers and for channel.py's 4 MiB ones, each
twice, interleaved.  The ``socket_gbytes`` constant of distbp/tools/costmodel.py comes from here.

    python scripts/channel_probe.py        # a few seconds
"""
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

from distbp.distributed import channel


def server(key, q, tune):
    channel.BUFFER_BYTES = tune
    if not tune:
        channel._tune = lambda s: s.setsockopt(channel.socket.IPPROTO_TCP, channel.socket.TCP_NODELAY, 1)
    a = np.ones(1863690, np.float32)

    def serve(sock):
        while True:
            channel.recv(sock)
            channel.send_array(sock, a)
    post = channel.Listener("127.0.0.1", key, serve)
    q.put(post.address)
    time.sleep(3600)

def client(addr, key, tune, n=40):
    if not tune:
        channel._tune = lambda s: s.setsockopt(channel.socket.IPPROTO_TCP, channel.socket.TCP_NODELAY, 1)
    else:
        channel.BUFFER_BYTES = tune
    sock = channel.connect(addr, key)
    out, ts = np.empty(1863690, np.float32), []
    for _ in range(n):
        t = time.perf_counter()
        channel.send(sock, ("pull",))
        channel.recv_array(sock, out)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[5:]) * 1e3

if __name__ == "__main__":
    key, res = channel.new_key(), {}
    for tune in (0, 4 << 20, 0, 4 << 20):
        q = mp.Queue()
        p = mp.Process(target=server, args=(key, q, tune), daemon=True)
        p.start()
        res.setdefault(tune, []).append(client(q.get(), key, tune))
        p.kill()
    print({("autotuned" if k == 0 else f"SO_*BUF {k >> 20} MiB"): [round(v, 2) for v in vs] for k, vs in res.items()},
          "ms per 7.45 MB pull;", "load average", os.getloadavg()[0])
