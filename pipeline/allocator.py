"""Host memory allocation tuned for training in a Dask worker process.

A Dask nanny starts its worker with ``MALLOC_TRIM_THRESHOLD_=65536`` so that glibc hands freed
memory back to the OS at once: right for a worker holding short-lived task results, wrong for a
training step, which frees and allocates the same large activation and gradient tensors every
step. Each of them then comes from fresh ``mmap`` pages that the kernel must zero and fault in
again, which measured 5-15% of a CPU step of the built-in MLP here. A plain PyTorch process does
not pay this: glibc's default raises its mmap threshold as large blocks are freed.

:func:`keep_freed_memory` gives the worker that behaviour, bounded: blocks up to
:data:`MMAP_THRESHOLD` come from the heap and freed memory is kept for reuse (up to
:data:`TRIM_THRESHOLD` at the heap's top). It is process-wide, on purpose: it is the worker's
allocator that the replica's tensors come from.

One more thing only the process's start can set (:data:`WORKER_ENVIRON`): a Dask worker runs its
tasks in a thread of its own, and glibc gives each new thread one of its per-thread arenas. Those
grow in heaps of at most 64 MiB, which a large activation nearly fills alone: heaps are mapped
and unmapped again every step, and the thresholds above do not reach them. Measured on the
benchmark CNN (batch 128 per worker, 2 workers): 9,000-70,000 fresh pages faulted in per step and
a forward and backward 10% slower than with ``MALLOC_ARENA_MAX=1``, where the task thread
allocates from the main heap as a plain PyTorch loop's main thread does (about 6,000 per step,
all of them at start-up). The clusters dasktrain starts set it for their workers
(:data:`dasktrain.cluster.specs.WORKER_ENVIRON`); a worker of another cluster says so in its log
when it runs without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading

from dasktrain.cluster.specs import WORKER_ENVIRON

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 256 * 2**20
"""Blocks at least this large still get their own mapping (and go back to the OS when freed)."""
TRIM_THRESHOLD = 512 * 2**20
"""Free memory at the heap's top beyond this is returned to the OS."""

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Apply the thresholds above to this process's glibc allocator; False where there is none."""
    if platform.system() != "Linux":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the allocator thresholds; keeping the defaults")
    missing = {k: v for k, v in WORKER_ENVIRON.items() if os.environ.get(k) != v}
    if missing and threading.current_thread() is not threading.main_thread():
        settings = " ".join(f"{k}={v}" for k, v in missing.items())
        log.info("this worker process started without %s: its training thread allocates from glibc's per-thread "
                 "heaps, mapped again every step (about 10%% slower on a CNN); start workers with it set", settings)
    return ok
