"""Keep the memory a worker frees for its next batch, instead of handing it back to the OS.

glibc serves blocks above M_MMAP_THRESHOLD with fresh mmap()s and gives a freed heap top back once it exceeds
M_TRIM_THRESHOLD. Both adapt to the sizes a process frees, but not to a batched CNN's mix of activations: measured
here, ResNet-18 at batch 8 on one thread faulted in ~15,600 zeroed pages per forward (~60 MB) and ran at 44 ms per
sample; with both thresholds fixed high, 0 faults and 39.6 ms. Batch 1 does not fault, so this pays back a cost only
batching has (served: 40 -> 44-46 requests/s on ResNet-18, .npy bodies, c=32). Setting one threshold alone turns off
glibc's adaptation and is slower (62 ms per sample). The price: a worker keeps its peak heap, which it reuses on
every batch anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The highest mmap threshold glibc accepts on 64-bit hosts (DEFAULT_MMAP_THRESHOLD_MAX); blocks above it are
# still mmapped, so a batch whose single activations exceed 32 MB keeps part of the cost.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def freed_memory_wanted(handler_config: dict) -> bool:
    """The archive's choice (model-config.yaml `handler.keep_freed_memory`, written by serving.keep_freed_memory);
    on unless it says false."""
    return handler_config.get("keep_freed_memory", True) is not False


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds high for this process; False where the C library has no mallopt or
    refuses it (musl's is a stub)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS: no mallopt, or no libc found
        return False
    kept = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not kept:
        logger.warning("tspack: the C library refused mallopt; freed memory goes back to the OS after each batch")
    return kept
