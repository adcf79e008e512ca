"""How many CPU threads a selection round uses: never more than the cores other processes leave idle.

torch runs each CPU operation on ``torch.get_num_threads()`` OpenMP threads, which meet at a barrier at its
end. On a machine whose cores are busy with other work one of them is often descheduled and the others
wait for it: on the project's shared 2-core machine a gradient pass with 2 threads took 85-97 s against
3.8 s with 1 (bench/overhead.py, the threads section; 8× in issue 14's first measurement). A plain
``torch.set_num_threads(1)`` avoids that but gives up every core of a quiet machine.

The policy (`SelectionThreads`, ``SpiceConfig.threads=None``): while a selection round computes on the CPU,
use as many threads as there are idle cores, capped by the caller's ``torch.get_num_threads()``. Idle cores
are measured from ``/proc/stat`` over a 0.1 s window while this process waits (so its own threads do not
count), on the cores this process may run on; where ``/proc/stat`` is missing (not Linux) the one-minute
load average stands in. The count is measured again every ``recheck_seconds`` of a long pass (short passes in
a row share one measurement), and the caller's setting is restored afterwards. ``SpiceConfig.threads=N``
uses exactly ``N`` threads instead.

Only torch and the standard library are imported.
"""

from __future__ import annotations

import math
import os
import time
from types import TracebackType

import torch

# Seconds of /proc/stat sampling per measurement: 10 scheduler ticks per core at the usual 100 Hz.
_WINDOW_SECONDS = 0.1
# A core counts as free when at least 3/4 of it was idle: 1.8 idle cores give 2 threads, 1.6 give 1.
_IDLE_ROUNDING = 0.25


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity mask; all CPUs where that is not available)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def idle_cpus(window: float = _WINDOW_SECONDS) -> float | None:
    """Cores of `usable_cpus` that were idle over the next ``window`` seconds, from ``/proc/stat``.

    The caller sleeps while it measures, so the figure is what *other* processes leave free. Returns `None`
    where ``/proc/stat`` cannot be read (then see `free_cpus`).
    """
    cpus = usable_cpus()
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(window)
    after = _cpu_times(cpus)
    if after is None:
        return None
    idle = 0.0
    for cpu in cpus:
        (idle0, total0), (idle1, total1) = before.get(cpu, (0, 0)), after.get(cpu, (0, 0))
        if total1 > total0:
            idle += (idle1 - idle0) / (total1 - total0)
    return idle


def free_cpus() -> float:
    """Idle cores: `idle_cpus`, or where that is not available the usable cores minus the 1-minute load."""
    idle = idle_cpus()
    if idle is not None:
        return idle
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1.0
    return max(0.0, len(usable_cpus()) - load)


# The latest measurement, (time.monotonic(), idle cores): many short passes in a row (a proxy's pools, probes)
# share one measurement instead of each waiting _WINDOW_SECONDS.
_last_measurement: tuple[float, float] | None = None


def choose_threads(requested: int | None, ceiling: int | None = None, *, max_age: float = 0.0) -> int:
    """The thread count for CPU selection work.

    Args:
        requested: an explicit count (``SpiceConfig.threads``), used as it is; `None` applies the policy.
        ceiling: the most threads the policy may choose; defaults to ``torch.get_num_threads()``.
        max_age: reuse a measurement of the idle cores taken less than this many seconds ago.

    Returns:
        ``requested``, or ``clamp(⌊idle cores + 1/4⌋, 1, ceiling)``.
    """
    global _last_measurement
    if requested is not None:
        return int(requested)
    ceiling = torch.get_num_threads() if ceiling is None else ceiling
    if ceiling <= 1:
        return 1
    now = time.monotonic()
    if _last_measurement is None or now - _last_measurement[0] >= max_age:
        _last_measurement = (now, free_cpus())
    return max(1, min(ceiling, math.floor(_last_measurement[1] + _IDLE_ROUNDING)))


class SelectionThreads:
    """Context manager: torch's CPU thread count for a selection round, restored on exit.

    ``with SelectionThreads(config.threads) as threads:`` sets the count from `choose_threads`; a long loop
    calls ``threads.recheck()`` between steps, which measures the idle cores again every ``recheck_seconds``
    (policy only: an explicit count never changes). ``enabled=False`` (e.g. a model on a GPU, whose CPU
    threads only launch kernels) leaves torch's setting alone.

    Args:
        requested: ``SpiceConfig.threads``: a count, or `None` for the policy.
        enabled: whether to touch torch's thread count at all.
        recheck_seconds: how often `recheck` measures again.
    """

    def __init__(self, requested: int | None, *, enabled: bool = True, recheck_seconds: float = 10.0) -> None:
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
            raise ValueError(f"threads must be a positive int or None, got {requested!r}")
        self.requested = requested
        self.enabled = enabled
        self.recheck_seconds = recheck_seconds
        self.threads = torch.get_num_threads()
        self._saved = self.threads
        self._checked_at = 0.0

    def __enter__(self) -> SelectionThreads:
        self._saved = torch.get_num_threads()
        if self.enabled:
            self._apply()
        return self

    def recheck(self) -> None:
        """Measure the idle cores again if ``recheck_seconds`` have passed (policy mode only)."""
        if self.enabled and self.requested is None and time.monotonic() - self._checked_at >= self.recheck_seconds:
            self._apply()

    def _apply(self) -> None:
        self.threads = choose_threads(self.requested, ceiling=self._saved, max_age=self.recheck_seconds)
        self._checked_at = time.monotonic()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if torch.get_num_threads() != self._saved:
            torch.set_num_threads(self._saved)


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle + iowait ticks, total ticks)}`` from ``/proc/stat``; `None` if it cannot be read."""
    wanted = set(cpus)
    out: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *fields = line.split()
                cpu = int(name[3:])
                if cpu not in wanted:
                    continue
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                out[cpu] = (ticks[3] + ticks[4], sum(ticks))
    except (OSError, ValueError):
        return None
    return out or None
