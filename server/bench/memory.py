"""Peak memory growth of one benchmark run, on CUDA or from the process's resident set.

Every system is loaded before the first timed run, so that the systems can be
interleaved. A process-wide peak would therefore mix all of them. Instead each run
measures its growth over the memory in use just before it. The report adds that to the
bytes of the system's own weights and preallocated caches, which are counted from the
tensors.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

RSS_SAMPLE_SECONDS = 0.005
_STATM = Path("/proc/self/statm")

CUDA_METHOD = ("CUDA: weights and preallocated caches of the system (tensor sizes) plus the largest growth of "
               "torch.cuda.max_memory_allocated over the allocation before each run")
RSS_METHOD = ("CPU: weights and preallocated caches of the system (tensor sizes) plus the largest growth of the "
              f"process's resident set size, sampled every {RSS_SAMPLE_SECONDS * 1000:.0f} ms during each run, "
              "over its size before that run")
UNAVAILABLE_METHOD = "weights and preallocated caches of the system (tensor sizes) only; no run growth on this OS"


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return CUDA_METHOD
    return RSS_METHOD if _STATM.exists() else UNAVAILABLE_METHOD


def _resident_bytes() -> int:
    resident_pages = int(_STATM.read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class PeakGrowth:
    """Context manager that stores the peak memory growth during the block in `growth_bytes`.

    `growth_bytes` stays None where nothing can be measured. On CPU a background thread
    samples the resident set, so it can miss an allocation that lives shorter than the
    sampling period. Memory that the allocator kept from earlier runs is reused without
    growing the resident set, too. The CPU value is therefore a lower bound.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.growth_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._peak = 0

    def __enter__(self) -> "PeakGrowth":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _STATM.exists():
            self._base = self._peak = _resident_bytes()
            self._thread = threading.Thread(target=self._sample, name="bench-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._peak = max(self._peak, _resident_bytes())

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.growth_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _resident_bytes())
            self.growth_bytes = max(0, self._peak - self._base)
