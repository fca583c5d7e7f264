"""``--fault-injection SPEC``: faults on purpose, to show that a run survives them.

SPEC is a comma-separated list of

- ``kill-worker:K@S``           worker K (0-based) SIGKILLs its own process at step S;
- ``delay-worker:K@S:SECONDS``  worker K sleeps SECONDS before computing its share of step S;
- ``kill-server@S``             the parameter server SIGKILLs itself when step S reaches it.

Steps count from 1, as in metrics.jsonl.  The driver plans where each strikes
(distributed/windows.py): a kill in a window's plan strikes inside the actor's call when it
comes to step S (a worker with no share of step S is armed, ``Worker.arm``, and dies at once);
a stall is armed just before step S's work and strikes at the start of the worker's next call;
the server dies inside its call when it comes to step S.  The faults are real (SIGKILL of the
process, a sleeping process), not simulated exceptions, and each strikes once.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from dataclasses import dataclass
from enum import Enum

from .errors import UsageError

_FORMS = {
    "kill-worker": re.compile(r"kill-worker:(?P<target>\d+)@(?P<step>\d+)"),
    "delay-worker": re.compile(r"delay-worker:(?P<target>\d+)@(?P<step>\d+):(?P<seconds>[0-9.eE+-]+)"),
    "kill-server": re.compile(r"kill-server@(?P<step>\d+)"),
}


class Action(Enum):
    """What an actor does when its fault strikes."""

    KILL = "kill"
    DELAY = "delay"


@dataclass(frozen=True)
class Fault:
    kind: str  # "kill-worker", "delay-worker" or "kill-server"
    step: int  # from 1
    target: int | None = None  # the worker index
    seconds: float = 0.0

    @property
    def action(self) -> Action:
        """What the actor does when the fault strikes."""
        return Action.DELAY if self.kind == "delay-worker" else Action.KILL

    def __str__(self) -> str:
        if self.kind == "kill-server":
            return f"kill-server@{self.step}"
        tail = f":{self.seconds:g}" if self.kind == "delay-worker" else ""
        return f"{self.kind}:{self.target}@{self.step}{tail}"


def parse(spec: str | None, workers: int) -> list[Fault]:
    """The faults of ``spec``; a malformed item or a worker index >= ``workers`` is a UsageError."""
    faults, planned = [], {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind = item.split(":")[0].split("@")[0]
        match = _FORMS[kind].fullmatch(item) if kind in _FORMS else None
        if match is None:
            raise UsageError(f"--fault-injection: cannot read {item!r}; expected kill-worker:K@S, "
                             "delay-worker:K@S:SECONDS or kill-server@S")
        fields = match.groupdict()
        try:
            seconds = float(fields.get("seconds") or 0.0)
        except ValueError:
            raise UsageError(f"--fault-injection {item}: the delay must be a number of seconds") from None
        fault = Fault(kind, int(fields["step"]), int(fields["target"]) if "target" in fields else None, seconds)
        if fault.step < 1:
            raise UsageError(f"--fault-injection {item}: steps count from 1")
        if fault.target is not None and fault.target >= workers:
            raise UsageError(f"--fault-injection {item}: there are only {workers} workers (0..{workers - 1})")
        if not (math.isfinite(fault.seconds) and fault.seconds >= 0):
            raise UsageError(f"--fault-injection {item}: the delay must be a finite number of seconds >= 0")
        # One fault per actor and step: arming an actor twice keeps only the later fault, and
        # the earlier one would silently never strike.
        actor = "the server" if fault.target is None else f"worker {fault.target}"
        if (actor, fault.step) in planned:
            raise UsageError(f"--fault-injection {item}: {planned[actor, fault.step]} already strikes {actor} "
                             f"at step {fault.step}; give one fault per actor and step")
        planned[actor, fault.step] = item
        faults.append(fault)
    return faults


def check_steps(faults: list[Fault], total_steps: int) -> None:
    """UsageError for a fault planned after the run's last step: it would silently never strike."""
    for fault in faults:
        if fault.step > total_steps:
            raise UsageError(f"--fault-injection {fault}: step {fault.step} is after the run's last step "
                             f"({total_steps})")


def strike(action: Action, seconds: float = 0.0) -> None:
    """Run inside the actor: die the way a crashed or OOM-killed process dies, or stall."""
    if action is Action.KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        time.sleep(seconds)
