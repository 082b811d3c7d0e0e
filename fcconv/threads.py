"""How many threads fcconv's tensor work may use: the CPUs this process may really run on.

torch sizes its thread pool by the machine's cores, not by what the process
is allowed to use (its CPU affinity, a container's CPU quota), and its
threads spin while they wait for each other. On a busy 2-core machine one
order-evidence call took 3.9 s with 2 threads and 0.18 s with 1: the small
reductions fcconv runs cost less than the synchronisation.

So work on small tensors runs on one thread, and larger work on one thread
per ``ELEMENTS_PER_THREAD`` elements, never more than :func:`available_cpus`.
Use :func:`torch_threads` around the work::

    with torch_threads(weight.numel()):
        ...

The checks of a safetensors conversion (:mod:`fcconv.verify`) run in numpy
and never import torch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

ELEMENTS_PER_THREAD = 1 << 22
"""Elements of the largest tensor an operation touches, per thread (16 MB of float32)."""

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where the process's cgroup limits are mounted (inside a container: its own cgroup)."""


@functools.lru_cache(maxsize=1)
def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    A quota of 1.5 CPUs counts as 2: the work then spreads over the time the
    quota allows. Read once; at least 1.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path | None = None) -> float | None:
    """The CPU quota of the process's cgroup in CPUs, or None when there is none.

    cgroup v2 keeps it in ``cpu.max`` (``"200000 100000"`` is 2 CPUs,
    ``"max 100000"`` no limit); v1 in ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us`` (a quota of -1 is no limit).
    """
    root = CGROUP_ROOT if root is None else root
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        allowed, each = float(quota), float(period)
    except ValueError:  # "max": no limit
        return None
    return allowed / each if allowed > 0 and each > 0 else None


def threads_for(elements: int) -> int:
    """Threads for work whose largest tensor holds ``elements`` elements.

    >>> threads_for(1000)
    1
    """
    wanted = max(1, elements // ELEMENTS_PER_THREAD)
    return min(wanted, available_cpus())


@contextlib.contextmanager
def torch_threads(elements: int) -> Iterator[int]:
    """Run the enclosed torch work on :func:`threads_for` ``(elements)`` threads.

    Never more than torch is already set to use (``OMP_NUM_THREADS``, or a
    caller's ``torch.set_num_threads``), and the previous count is restored
    afterwards. Yields the count in use.
    """
    import torch

    before = torch.get_num_threads()
    count = min(threads_for(elements), before)
    if count != before:
        torch.set_num_threads(count)
    try:
        yield count
    finally:
        if count != before:
            torch.set_num_threads(before)
