"""``<out>/timeline.jsonl`` (``--timeline``): when each actor did what, one JSON object a line.

The timings are those the actors take anyway: each worker's compute calls (``WorkerState.spans``:
wall-clock start and end, CPU seconds, the step), each server's step (``ServerState.timings``: start, end,
sum and update seconds, CPU seconds) and the driver's own waits.  Three kinds of line:

- ``{"lane": "server", "id": s, "step": t, "start", "end", "sum", "update", "cpu"}``
- ``{"lane": "worker", "id": k, "step": t, "start", "end", "cpu"}`` (a timeline written before
  workers recorded their step has none: it is then found from the servers' spans when the
  timeline is drawn, a worker's compute of step t ending before any server starts step t)
- ``{"lane": "driver", "id": 0, "step": t, "name", "start", "end"}``

Times are seconds since the epoch (``time.time()``), comparable between the processes of one
machine.  A resumed run appends: a step redone after a failure or a resume shows twice, at the
times it ran.  ``distbp timeline`` (tools/timeline.py) draws the file.
"""

from __future__ import annotations

import json
import time

NAME = "timeline.jsonl"


class Timeline:
    """Appends the lines of ``timeline.jsonl``; the driver lane runs from one ``mark`` to the next."""

    def __init__(self, path: str):
        self.fh = open(path, "a", buffering=1 << 16)
        self.mark = time.time()  # the end of the driver's last span
        self.seen: dict[int, float] = {}  # worker slot -> start of its last span written

    def _line(self, **entry) -> None:
        self.fh.write(json.dumps(entry) + "\n")

    def driver(self, name: str, step: int) -> None:
        """The driver spent the time since its last span on ``name`` (of step ``step``)."""
        now = time.time()
        self._line(lane="driver", id=0, step=step, name=name, start=self.mark, end=now)
        self.mark = now

    def servers(self, step: int, reports: list[dict[int, dict]]) -> None:
        """Step ``step`` as each server's ``report()`` timed it."""
        for s, report in enumerate(reports):
            entry = report.get(step)
            if entry is not None:
                self._line(lane="server", id=s, step=step, start=entry["start"], end=entry["end"],
                           sum=entry["server_sum"], update=entry["update"], cpu=entry["cpu"])

    def worker(self, k: int, spans: list[tuple[float, float, float]]) -> None:
        """Worker slot ``k``'s recent compute calls (``Worker.spans``): those not written yet."""
        last = self.seen.get(k, float("-inf"))
        for start, end, cpu, step in spans:
            if start > last:
                self._line(lane="worker", id=k, step=step, start=start, end=end, cpu=cpu)
                last = start
        self.seen[k] = last

    # RunFiles tells it of each checkpoint and of the close (outdir.py).
    def saved(self, files, step: int) -> None:
        self.fh.flush()

    def summarised(self, files, summary: dict) -> None:
        self.fh.flush()  # everything on disk before the summary is uploaded (remote.py)

    def closed(self, files) -> None:
        self.fh.close()


def read(path: str) -> list[dict]:
    """The lines of a ``timeline.jsonl``; a last line cut short (a run that died) is skipped."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    out = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            out.append(json.loads(text))
        except ValueError:
            if number == len(lines):
                break
            raise ValueError(f"line {number} is not JSON") from None
    return out
