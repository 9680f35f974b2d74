"""Keep the memory a simulation frees inside the process, so that the next time chunk reuses it (glibc malloc).

Every time chunk allocates the same large buffers — convolution outputs, spikes, membranes: megabytes each — and
frees them when the chunk is done. glibc's malloc hands blocks above its mmap threshold straight back to the
operating system, and trims the top of its heap once more than its trim threshold is free there, so the next
chunk takes the same memory back page by page: a minor page fault per 4 KiB, each page zeroed by the kernel. At
batch 128 and T = 32 (``benchmarks/simulation_speed.py``'s networks, 2-core machines) a width-0.25 VGG-7 took
44,000-74,000 minor faults per simulation on a 2-core Intel Xeon (1.3-1.6x the process CPU time of a run with the
memory kept), and a ResNet-20 on the same machine anywhere from none to 1.09 million, depending on glibc's adaptive
threshold (up to 2.1x the CPU time); with the memory kept, none for blocks below the mmap threshold.

:func:`retain_freed_memory` raises glibc's mmap threshold to its largest allowed value (32 MiB on 64-bit Linux:
smaller blocks come from the heap) and its trim threshold to 1 GiB (up to that much free memory stays mapped).
It changes the whole process, once, and is not undone: the process keeps its high-water mark of freed memory
(bounded by one time chunk's buffers, so still flat in T) instead of returning it to the OS. It does nothing where
the C library is not glibc. :class:`bsnn.simulate.SimConfig` ``retain_memory`` (default on) calls it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter numbers (``malloc.h``)."""
MMAP_THRESHOLD_BYTES = 32 * 2**20
"""Blocks below this come from the heap: glibc's largest allowed value on 64-bit (``HEAP_MAX_SIZE / 2``)."""
TRIM_THRESHOLD_BYTES = 2**30
"""Free memory at the top of the heap kept mapped, up to this much."""


def is_glibc() -> bool:
    """The process runs on Linux with the GNU C library (whose ``mallopt`` this module tunes)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> bool:
    """Tune glibc's malloc to keep freed memory mapped (module docstring); once per process. Returns whether the
    setting took: False where the C library is not glibc or refused a value."""
    if not is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    took = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    log.debug("glibc malloc: mmap threshold %d B, trim threshold %d B (%s)", MMAP_THRESHOLD_BYTES,
              TRIM_THRESHOLD_BYTES, "set" if took else "refused")
    return took
