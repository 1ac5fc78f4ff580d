"""Keep freed CPU memory in the process, so that each training step does not map it again.

glibc serves a block larger than its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it
back to the kernel on ``free``. A training step allocates and frees the same large tensors every time
(attention scores of a 16 x 12 x 256 x 256 batch are 48 MiB), so every step pays one page fault per
4 KiB page touched: on this project's 2-core CPU a quarter of a MiniLM fine-tune's time went to the
kernel, about 140,000 faults a second. Serving all blocks from the heap and never trimming it makes a
step reuse the pages of the last one (the fine-tune ran 1.45x faster, same losses to the last digit).

The price is that a process keeps its peak memory until it exits, which is what a training or
evaluation command wants and a long-lived host program may not; so the library never does this on
import, only the ``maskattn`` command line (and whoever calls :func:`keep_freed_memory`).

Where batch shapes vary from step to step (batches by length) a SQuAD fine-tune grew to 10.7 GB resident in
800 steps. Most of it was oneDNN's cache of compiled kernels, one per shape (:func:`limit_kernel_cache`);
:func:`release_freed_memory` (glibc's ``malloc_trim``) hands the pages of free blocks back, and the trainer calls
it every ``RELEASE_EVERY`` steps where memory is kept, so the faults come back for one step in that many.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# mallopt(3) parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


_kept = False  # keep_freed_memory() applied in this process


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Ask glibc to serve every block from the heap and never hand freed memory back to the kernel.

    Returns True when the setting was applied; False where it does not apply (not Linux with glibc) or
    where the environment already sets any ``MALLOC_*`` variable, which is the user's own choice and wins.
    """
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in environ):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int, so "never" is its largest value
    global _kept
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


KERNEL_CACHE = 64  # oneDNN primitives kept by the maskattn program (oneDNN's default: 1,024)


def limit_kernel_cache(environ: dict[str, str] | None = None) -> bool:
    """Keep at most ``KERNEL_CACHE`` compiled oneDNN primitives (PyTorch's CPU matmuls in bfloat16 run through
    oneDNN, which compiles and caches one per shape). Batches of varying shape fill the default 1,024-entry cache
    with primitives that hold their own buffers: a length-batched MiniLM fine-tune grew 9 MB a step with it and
    3 MB with 64 entries, at the same speed (0.4%; 16% slower with none). Returns False where the environment
    already sets ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, which wins; read by oneDNN at its first primitive, so call
    this before any matmul."""
    environ = os.environ if environ is None else environ
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in environ:
        return False
    environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(KERNEL_CACHE)
    return True


def memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` applied its setting in this process."""
    return _kept


def release_freed_memory() -> bool:
    """Hand the pages of freed heap blocks back to the kernel (glibc's ``malloc_trim(0)``); the blocks stay
    the process's, so a later step faults their pages in again once. Returns False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
