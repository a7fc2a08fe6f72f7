"""This machine as the planner sees a device: memory bandwidth and peak FLOP/s, measured.

The catalogue gives vendors' figures for accelerators; for the machine modelpress runs on,
``--hardware local`` measures instead, in about two seconds:

- bandwidth: the best of several full reads (a sum) of a 256 MB float32 tensor, far larger than
  any cache: what a decode step does with the weights;
- FLOP/s: the best of several 1024 x 1024 float32 matmuls with every core torch uses.

Both are what torch reaches on this machine, not the hardware's datasheet peak: the point of the
measurement is a ceiling an engine here can be compared against.
"""

from __future__ import annotations

import functools
import os
import time

import torch

LOCAL_NAME = "this machine (measured)"


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm up: page faults, thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a streaming read of ``nbytes`` (a sum over a float32 tensor)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best_seconds(lambda: x.sum().item(), repeats)


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an ``n x n`` float32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), repeats)


def physical_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@functools.cache
def measure_local() -> tuple[float, float, float]:
    """``(memory bytes, read bytes/s, FLOP/s)`` of this machine, measured once per process
    (:func:`modelpress.plan.hardware.find_hardware` makes it a device named ``local``)."""
    return physical_memory(), read_bandwidth(), matmul_flops()
