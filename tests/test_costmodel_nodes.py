"""The N nodes x C cores model of distbp/tools/costmodel.py: what it must say whatever its constants."""

import pytest

from distbp.tools import costmodel

P, W = 1_863_690, 4  # 784-1024-1024-10 in float32


def test_one_node_has_nothing_on_the_wire():
    c = costmodel.Constants()
    assert costmodel.ring_step(1, 16, P, 1024, W, 10, c)["allreduce"] == 0
    ps = costmodel.ps_step(1, 16, 1, P, 1024, W, 10, c)
    assert ps["push"] == ps["pull"] == 0


@pytest.mark.parametrize("N", [2, 4, 16, 64])
def test_sharded_servers_move_what_a_ring_moves(N):
    """S = N servers, one per node: each node's link carries (N - 1) / N of a vector each way per
    phase, twice per step, as a ring all-reduce's 2 (N - 1) / N (Patarasuk and Yuan)."""
    c = costmodel.Constants(socket_gbytes=1e9, ring_latency_s=0.0, overlap=0.0)  # the wire alone
    gbit = 10
    ps = costmodel.ps_step(N, 16, N, P, 1024 * N, W, gbit, c)
    ring = costmodel.ring_step(N, 16, P, 1024 * N, W, gbit, c)
    assert ps["push"] + ps["pull"] == pytest.approx(ring["allreduce"])


def test_one_server_is_the_bottleneck_as_nodes_grow():
    c = costmodel.Constants()
    one = [costmodel.ps_step(N, 16, 1, P, 1024 * N, W, 100, c, colocated=False)["step"] for N in (2, 8, 64)]
    sharded = [costmodel.ps_step(N, 16, N, P, 1024 * N, W, 100, c)["step"] for N in (2, 8, 64)]
    assert one[0] < one[1] < one[2] and one[2] > 10 * sharded[2]


def test_the_table_has_every_row():
    rows = costmodel.compare(P, 1024, W)
    assert len(rows) == 2 * 7 and {r["nodes"] for r in rows} == {1, 2, 4, 8, 16, 32, 64}
    assert "| 100 | 64 |" in costmodel.markdown(rows)
