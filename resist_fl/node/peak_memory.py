"""Peak memory of a block of code (a client's step loop), measured honestly per device.

- CUDA: ``torch.cuda.max_memory_allocated`` over the block, after resetting the peak: the
  tensors' bytes (not the allocator's cache), code :data:`CUDA_MAX_ALLOCATED`.
- CPU (Linux): the process's resident set size sampled every few milliseconds by a thread during
  the block; the peak minus the size at the start, code :data:`RSS_PEAK_OVER_START`. Before the
  start, glibc's ``malloc_trim`` hands the memory freed by earlier rounds back to the system, so a
  long-lived process (a simulation's Ray actor) shows the block's working set every round rather
  than only the first time. It counts what the block added on top of what the process already
  held (the model, the data), and can miss a spike shorter than the sampling interval.
- Elsewhere: ``ru_maxrss`` growth over the block, code :data:`MAXRSS_GROWTH` (0 when the process
  had been larger before).

The code travels as a number in the reply's metrics (metrics are numbers); :data:`MEASURES`
names it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import threading
from types import TracebackType

import torch

CUDA_MAX_ALLOCATED = 1
RSS_PEAK_OVER_START = 2
MAXRSS_GROWTH = 3
MEASURES = {CUDA_MAX_ALLOCATED: "cuda-max-allocated", RSS_PEAK_OVER_START: "rss-peak-over-start",
            MAXRSS_GROWTH: "maxrss-growth"}
_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _release_free_heap() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); otherwise nothing."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open(_STATM) as f:
        return int(f.read().split()[1]) * _PAGE


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.megabytes`` and ``peak.measure``."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.megabytes = 0.0
        if device.type == "cuda":
            self.measure = CUDA_MAX_ALLOCATED
        elif os.path.exists(_STATM):
            self.measure = RSS_PEAK_OVER_START
        else:
            self.measure = MAXRSS_GROWTH
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        if self.measure == CUDA_MAX_ALLOCATED:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = 0
        elif self.measure == RSS_PEAK_OVER_START:
            _release_free_heap()
            self._start = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._start = _maxrss_bytes()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.measure == CUDA_MAX_ALLOCATED:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.measure == RSS_PEAK_OVER_START:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        else:
            peak = _maxrss_bytes()
        self.megabytes = max(0, peak - self._start) / 2**20


def resident_memory_mb() -> float | None:
    """This process's resident memory now, in MB (Linux ``/proc``; None elsewhere)."""
    try:
        return _rss_bytes() / 2**20
    except (OSError, ValueError, IndexError):
        return None
