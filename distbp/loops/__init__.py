"""The training loops: ``sync`` (exact, the same bits for any K and S) and ``async_`` (async
and ssp, for experiments)."""
