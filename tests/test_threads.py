"""The CPU thread policy of selection rounds: explicit counts, the idle-core rule, restoring the caller's count."""

import pytest
import torch

from spice_trainer.config import SpiceConfig
from spice_trainer.core import threads as th


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_explicit_count_is_used_and_restored_also_on_error(two_threads):
    with th.SelectionThreads(1) as threads:
        assert threads.threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), th.SelectionThreads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("idle,ceiling,expected", [(0.0, 4, 1), (0.7, 4, 1), (1.8, 4, 2), (1.6, 4, 1), (9.0, 4, 4)])
def test_policy_uses_the_idle_cores_up_to_the_ceiling(monkeypatch, idle, ceiling, expected):
    monkeypatch.setattr(th, "free_cpus", lambda: idle)
    assert th.choose_threads(None, ceiling=ceiling) == expected
    assert th.choose_threads(3, ceiling=ceiling) == 3  # an explicit count is not capped


def test_policy_never_exceeds_the_callers_setting_and_rechecks(monkeypatch, two_threads):
    readings = iter([8.0, 0.2])
    monkeypatch.setattr(th, "free_cpus", lambda: next(readings))
    with th.SelectionThreads(None, recheck_seconds=0.0) as threads:
        assert threads.threads == 2  # 8 idle cores, but the caller allowed 2
        threads.recheck()  # the machine got busy
        assert threads.threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_disabled_policy_leaves_torch_alone(monkeypatch, two_threads):
    monkeypatch.setattr(th, "free_cpus", lambda: pytest.fail("a disabled policy must not measure"))
    with th.SelectionThreads(None, enabled=False) as threads:
        threads.recheck()
        assert torch.get_num_threads() == 2


def test_idle_cpus_is_a_share_of_the_usable_cores():
    idle = th.idle_cpus(window=0.05)
    if idle is None:
        pytest.skip("/proc/stat is not readable here (not Linux)")
    # A fraction of each usable core; ticks are counted per core, so rounding can push the sum a little over.
    assert 0.0 <= idle <= len(th.usable_cpus()) + 0.5
    assert 0.0 <= th.free_cpus() <= len(th.usable_cpus()) + 0.5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_counts_are_clear_errors(bad):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        th.SelectionThreads(bad)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        SpiceConfig(threads=bad)


def test_short_passes_in_a_row_share_one_measurement(monkeypatch, two_threads):
    calls = []
    monkeypatch.setattr(th, "free_cpus", lambda: calls.append(1) or 2.0)
    monkeypatch.setattr(th, "_last_measurement", None)  # forget what earlier tests measured
    for _ in range(3):
        with th.SelectionThreads(None, recheck_seconds=60.0):
            pass
    assert len(calls) == 1
    assert th.choose_threads(None, ceiling=2) == 2 and len(calls) == 2  # max_age 0: measured afresh
