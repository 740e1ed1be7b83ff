"""ThreadGovernor and the load measurement behind it: explicit counts win, busy neighbours take threads away, and
re-measuring is rate limited and does not flap."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from llmasos import threads
from llmasos.threads import (
    ThreadGovernor,
    available_cores,
    busy_cores_elsewhere,
    choose_num_threads,
    engine_process_env,
    explicit_num_threads,
)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_requested_wins():
    assert choose_num_threads(3) == 3
    assert choose_num_threads(1) == 1
    with pytest.raises(ValueError, match="num_threads"):
        choose_num_threads(0)
    assert 1 <= choose_num_threads(interval=0.05) <= available_cores()


def test_explicit_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert explicit_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # nested levels: the outer one is ours
    assert explicit_num_threads() == 4
    for value in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert explicit_num_threads() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert explicit_num_threads() is None
    assert ThreadGovernor.from_environment().requested is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="load is measured from /proc/stat")
@pytest.mark.skipif(available_cores() < 2, reason="one core: there is nothing to take away")
def test_busy_neighbours_take_threads():
    cores = available_cores()
    quiet_busy = busy_cores_elsewhere(0.3)
    quiet_choice = choose_num_threads(interval=0.3)
    busy_loop = "import time\nend = time.time() + 8\nwhile time.time() < end: pass"  # bounded even if never killed
    neighbours = [subprocess.Popen([sys.executable, "-c", busy_loop]) for _ in range(2)]
    try:
        time.sleep(0.3)  # interpreter start-up
        busy = busy_cores_elsewhere(0.5)
        choice = choose_num_threads(interval=0.3)
        governor = ThreadGovernor()
        governed = governor.apply(interval=0.3)
    finally:
        for process in neighbours:
            process.kill()
        for process in neighbours:
            process.wait()
    # Two busy loops (plus whatever else runs here) fill at least ~1.5 cores while we sleep.
    assert busy >= 1.4, (busy, quiet_busy)
    assert choice <= cores - 1 and governed <= cores - 1, (choice, governed, busy)
    assert torch.get_num_threads() == governed
    if quiet_busy < 0.2:  # a quiet machine (other test runs may be loading this one): the drop must show
        assert choice < quiet_choice, (choice, quiet_choice, quiet_busy)


def test_requested_governor_never_changes(monkeypatch):
    governor = ThreadGovernor(requested=1, recheck_seconds=0.0)
    assert governor.apply() == 1 and governor.num_threads == 1 and governor.fixed
    assert torch.get_num_threads() == 1
    calls = []
    monkeypatch.setattr(threads.CpuSample, "take", classmethod(lambda cls: calls.append(1)))
    torch.set_num_threads(2)
    for _ in range(100):
        assert governor.maybe_adjust() is False
    assert calls == [] and governor.num_changes == 0
    assert torch.get_num_threads() == 2  # the governor did not touch it
    with pytest.raises(ValueError, match="num_threads"):
        ThreadGovernor(requested=0)


def test_maybe_adjust_is_rate_limited_and_cheap(monkeypatch):
    governor = ThreadGovernor(recheck_seconds=1.0)
    governor.apply(interval=0.01)
    real_take = threads.CpuSample.take.__func__
    calls = []

    def counting_take(cls):
        calls.append(1)
        return real_take(cls)

    monkeypatch.setattr(threads.CpuSample, "take", classmethod(counting_take))
    start = time.perf_counter()
    for _ in range(20_000):
        governor.maybe_adjust()
    elapsed = time.perf_counter() - start
    assert len(calls) <= 1, len(calls)  # at most one re-measurement, should the loop have crossed the 1 s mark
    assert elapsed / 20_000 < 20e-6, elapsed  # ~0.1 us in practice; generous for a loaded machine

    governor.recheck_seconds = 0.05
    governor._next_check = 0.0
    governor.maybe_adjust()
    time.sleep(0.06)
    governor.maybe_adjust()
    assert len(calls) >= 2


def test_hysteresis_drops_at_once_and_climbs_slowly():
    governor = ThreadGovernor(recheck_seconds=1.0)
    governor.cores = 4
    governor.num_threads = 4
    assert governor._decide(0.2) is False  # background noise: keep every thread
    assert governor._decide(1.6) is True and governor.num_threads == 2  # two busy neighbours: drop at once
    assert torch.get_num_threads() == 2
    assert governor._decide(0.05) is False and governor.num_threads == 2  # one quiet reading is not enough
    assert governor._decide(0.05) is True and governor.num_threads == 4
    # A neighbour that comes and goes: the count drops when it shows and does not climb back in between.
    history = []
    for busy in (1.0, 0.05, 1.0, 0.05, 1.0, 0.05):
        governor._decide(busy)
        history.append(governor.num_threads)
    assert history == [3] * 6
    assert governor._decide(9.0) is True and governor.num_threads == 1  # never below one


def test_stale_window_is_not_used(monkeypatch):
    governor = ThreadGovernor(recheck_seconds=0.0)
    governor.apply(interval=0.01)
    old = governor._last
    old.when -= threads.STALE_SECONDS + 1
    old.machine_busy -= 1000.0  # would read as a huge load if it were used
    assert governor.maybe_adjust() is False and governor.num_changes == 0


def test_engine_process_env():
    env = engine_process_env()
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in env.items())


def test_a_companion_process_counts_as_our_own_work():
    """An engine process counts its server's CPU time as its own: a busy server is not a neighbour to give way to."""
    from llmasos import threads

    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 8\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        start = threads.CpuSample.take()
        time.sleep(0.5)
        before = threads.CpuSample.take().busy_elsewhere_since(start)
        threads.count_as_own(busy.pid)
        start = threads.CpuSample.take()
        time.sleep(0.5)
        after = threads.CpuSample.take().busy_elsewhere_since(start)
    finally:
        busy.kill()
        busy.wait()
        threads._companions.discard(busy.pid)
    assert before > 0.6  # the busy loop is seen as a neighbour using most of a core ...
    assert after < before - 0.5  # ... until it counts as our own
