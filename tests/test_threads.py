"""The thread policy: threads from the CPUs the process may use, one for small work.

Nothing here is timed: the policy is a pure function of the affinity mask,
the cgroup quota and the size of the work.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fcconv import threads


@pytest.fixture(autouse=True)
def fresh_count():
    threads.available_cpus.cache_clear()
    yield
    threads.available_cpus.cache_clear()


def _cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[str, str] | None = None) -> Path:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    return tmp_path


@pytest.mark.parametrize(
    ("v2", "v1", "quota"),
    [
        ("200000 100000\n", None, 2.0),
        ("150000 100000\n", None, 1.5),
        ("max 100000\n", None, None),
        (None, ("50000\n", "100000\n"), 0.5),
        (None, ("-1\n", "100000\n"), None),
        (None, None, None),
        ("garbage\n", None, None),
    ],
)
def test_cgroup_quota_v1_and_v2(tmp_path, v2, v1, quota) -> None:
    assert threads.cgroup_cpu_quota(_cgroup(tmp_path, v2, v1)) == quota


def test_available_cpus_is_the_affinity_mask_capped_by_the_quota(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "CGROUP_ROOT", _cgroup(tmp_path, "150000 100000"))
    assert threads.available_cpus() == 2  # 1.5 CPUs of quota: two threads share it
    threads.available_cpus.cache_clear()
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path / "absent")
    assert threads.available_cpus() == 4
    threads.available_cpus.cache_clear()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert threads.available_cpus() == 1


def test_small_work_runs_on_one_thread_large_work_on_what_is_available(monkeypatch) -> None:
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert threads.threads_for(0) == 1
    assert threads.threads_for(threads.ELEMENTS_PER_THREAD - 1) == 1
    assert threads.threads_for(threads.ELEMENTS_PER_THREAD * 2) == 2
    assert threads.threads_for(threads.ELEMENTS_PER_THREAD * 50) == 2  # never more than available


def test_torch_threads_sets_and_restores_and_never_raises_the_count(monkeypatch) -> None:
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with threads.torch_threads(10) as count:
            assert count == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
        with threads.torch_threads(threads.ELEMENTS_PER_THREAD * 100) as count:
            assert count == 3  # what the caller allowed, not the 8 available
        with pytest.raises(RuntimeError), threads.torch_threads(10):
            raise RuntimeError("the work failed")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
