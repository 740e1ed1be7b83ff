"""How many intra-op threads torch should use: the cores that other processes leave idle, measured, not assumed.

An OpenMP team waits at every barrier for its slowest thread (libgomp spins first, then sleeps), so one thread the
OS descheduled for a busy neighbour stalls each parallel region for a scheduler timeslice: on a loaded machine
full-width teams run 5-100x slower, not proportionally slower. `ThreadGovernor` keeps the team no wider than the
cores nobody else is using (benchmarks/busy_neighbours.py measures both)."""

from __future__ import annotations

import math
import os
import sys
import time

# torch is imported where it is used, so that importing this module stays cheap.

# A neighbour using more than this much of a core costs us that core: a thread that shares a core with a busy
# neighbour stalls its whole team every time it is descheduled, so partial use counts as full use.
DOWN_SLACK = 0.25  # drop a thread once less than (threads - 0.25) cores are free
UP_SLACK = 0.1  # add one back only once (threads + 1 - 0.1) cores are free ...
UP_READINGS = 2  # ... in this many readings in a row
RECHECK_SECONDS = 1.0
STALE_SECONDS = 5.0  # a window longer than this (nobody called) says nothing about the present load


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, capped by a cgroup (v2) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """cores' worth of CPU time the cgroup may use (cpu.max: "<quota> <period>", or "max ..." for none)."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as file:
            quota, period = file.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def explicit_num_threads() -> int | None:
    """OMP_NUM_THREADS when the user set it to a positive count: an explicit choice that beats any measurement."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        count = int(value)
    except ValueError:
        return None
    return count if count > 0 else None


class CpuSample:
    """One reading of the busy CPU time (seconds) of our cores, machine-wide and of this process alone."""

    __slots__ = ("when", "machine_busy", "own_busy")

    def __init__(self, when: float, machine_busy: float, own_busy: float) -> None:
        self.when, self.machine_busy, self.own_busy = when, machine_busy, own_busy

    @classmethod
    def take(cls) -> CpuSample | None:
        """None where /proc/stat is not there to read (not Linux)."""
        machine = _machine_busy_seconds()
        if machine is None:
            return None
        return cls(time.monotonic(), machine, time.process_time() + _companions_busy_seconds())

    def busy_elsewhere_since(self, earlier: CpuSample) -> float:
        """Cores' worth of CPU time other processes used between the two readings (>= 0)."""
        wall = self.when - earlier.when
        if wall <= 0:
            return 0.0
        others = (self.machine_busy - earlier.machine_busy) - (self.own_busy - earlier.own_busy)
        return max(0.0, others / wall)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_companions: set[int] = set()


def count_as_own(pid: int) -> None:
    """Count process `pid`'s CPU time as this process's own, not a neighbour's: an engine process and the server
    that feeds it are one job (the server's HTTP work is what the engine's output needs), and a team that shrank
    whenever the server streamed would cost more than the server's occasional timeslice."""
    _companions.add(pid)


def _companions_busy_seconds() -> float:
    total = 0
    for pid in list(_companions):
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            _companions.discard(pid)  # gone
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICKS
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal; guest time is already inside user


def _machine_busy_seconds() -> float | None:
    """Busy seconds of the cores in our affinity set since boot, from /proc/stat's per-CPU lines."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/stat") as file:
            text = file.read()
        ours = os.sched_getaffinity(0)
    except OSError:
        return None
    ticks = 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if int(name[3:]) in ours:
            values = [int(value) for value in fields]
            ticks += sum(values[i] for i in _BUSY_FIELDS if i < len(values))
    return ticks / _TICKS


def busy_cores_elsewhere(interval: float = 0.1) -> float:
    """Cores' worth of CPU other processes use, over `interval` seconds from now (this call sleeps that long):
    machine-wide busy time of our cores minus this process's own. 0.0 where it cannot be measured (not Linux)."""
    start = CpuSample.take()
    if start is None:
        return 0.0
    time.sleep(interval)
    end = CpuSample.take()
    return end.busy_elsewhere_since(start) if end is not None else 0.0


def threads_for(busy_elsewhere: float, cores: int, slack: float = DOWN_SLACK) -> int:
    """The team width the free cores allow: floor(cores - busy + slack), in [1, cores]."""
    return max(1, min(cores, math.floor(cores - busy_elsewhere + slack)))


def choose_num_threads(requested: int | None = None, interval: float = 0.1, processes_sharing: int = 1) -> int:
    """`requested` if given; else the cores not busy elsewhere (measured over `interval` seconds), at least 1.
    `processes_sharing`: this many processes of one job (ranks on one host) split those cores evenly."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_threads must be at least 1, got {requested}; leave it unset to choose by load")
        return requested
    cores = max(1, available_cores() // max(1, processes_sharing))
    return threads_for(busy_cores_elsewhere(interval), cores)


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the cores other processes leave free. `apply()` once at the start,
    then `maybe_adjust()` between steps, from the thread that runs the model (OpenMP's thread count is a per-thread
    setting: torch.set_num_threads in one thread does not change a team another thread starts). With `requested`
    set the count is that and never changes."""

    def __init__(self, requested: int | None = None, processes_sharing: int = 1,
                 recheck_seconds: float = RECHECK_SECONDS) -> None:
        if requested is not None and requested < 1:
            raise ValueError(f"num_threads must be at least 1, got {requested}; leave it unset to choose by load")
        self.requested = requested
        self.cores = max(1, available_cores() // max(1, processes_sharing))
        self.recheck_seconds = recheck_seconds
        self.num_threads = requested if requested is not None else self.cores
        self.num_changes = 0  # how often maybe_adjust changed the count (for logs and tests)
        self._next_check = math.inf if requested is not None else 0.0
        self._last: CpuSample | None = None
        self._up_votes = 0

    @classmethod
    def from_environment(cls, recheck_seconds: float = RECHECK_SECONDS) -> ThreadGovernor:
        """OMP_NUM_THREADS, when set, fixes the count; ranks torchrun starts on this host (LOCAL_WORLD_SIZE) split
        the cores."""
        try:
            sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            sharing = 1
        return cls(explicit_num_threads(), processes_sharing=sharing, recheck_seconds=recheck_seconds)

    @property
    def fixed(self) -> bool:
        return self.requested is not None

    def apply(self, interval: float = 0.1) -> int:
        """Measure now (sleeping `interval` seconds, unless the count is fixed), set torch's thread count, return it."""
        if self.requested is None:
            start = CpuSample.take()
            if start is not None:
                time.sleep(interval)
                self._last = CpuSample.take()
                if self._last is not None:
                    self.num_threads = threads_for(self._last.busy_elsewhere_since(start), self.cores)
            self._next_check = time.monotonic() + self.recheck_seconds
        import torch

        torch.set_num_threads(self.num_threads)
        return self.num_threads

    def maybe_adjust(self) -> bool:
        """Re-measure at most every `recheck_seconds` and change the thread count if the free cores changed; True
        when it changed. Between re-measurements this is one clock read and a comparison."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.recheck_seconds
        sample = CpuSample.take()
        if sample is None:  # not measurable here: keep what apply() chose, and stop looking
            self._next_check = math.inf
            return False
        last, self._last = self._last, sample
        if last is None or sample.when - last.when > STALE_SECONDS:
            self._up_votes = 0
            return False
        busy = sample.busy_elsewhere_since(last)
        return self._decide(busy)

    def _decide(self, busy_elsewhere: float) -> bool:
        """Drop threads at once (a stalled team costs a timeslice per region); add them only after UP_READINGS
        readings in a row show a core free with margin, so a neighbour that comes and goes does not cause flapping."""
        down = threads_for(busy_elsewhere, self.cores, DOWN_SLACK)
        if down < self.num_threads:
            self._up_votes = 0
            return self._set(down)
        up = threads_for(busy_elsewhere, self.cores, UP_SLACK)
        if up <= self.num_threads:
            self._up_votes = 0
            return False
        self._up_votes += 1
        if self._up_votes < UP_READINGS:
            return False
        self._up_votes = 0
        return self._set(up)

    def _set(self, num_threads: int) -> bool:
        if num_threads == self.num_threads:
            return False
        import torch

        self.num_threads = num_threads
        self.num_changes += 1
        torch.set_num_threads(num_threads)
        return True


def engine_process_env() -> dict[str, str]:
    """Environment variables for an engine subprocess we spawn (libgomp reads them once, when torch loads it).

    Empty, by measurement (benchmarks/busy_neighbours.py --wait-policy, 2 cores): OMP_WAIT_POLICY=PASSIVE does
    cure the 50x slowdown next to busy processes (a thread that sleeps at a barrier at once is woken and run
    promptly; one that spins first burns its share and then waits a whole timeslice), but it taxes every idle step
    with a futex wake: 2.2x slower decode on the bundled model, ~1.15x on a Qwen2-0.5B shape. Smaller
    GOMP_SPINCOUNTs keep idle speed but stay 3-20x slow under load. ThreadGovernor removes the slowdown without
    the idle tax, so the engine process should run it between steps rather than change libgomp's waiting."""
    return {}
