"""glibc's allocator policy for CPU processes: keep freed memory in the heap while training (the step's
large temporaries are not faulted in from the OS again every step), give it back for stages whose
temporaries vary in size. Process-wide, so the CLI, the browse stage and benchmarks call these, never an import."""

from __future__ import annotations

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


def _glibc():
    """The C library through ctypes if it has glibc's mallopt and malloc_trim, else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - AttributeError where they do not exist
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory_on_cpu() -> bool:
    """Ask glibc to serve every allocation from its heap and keep freed memory there.

    By default glibc maps each block above 32 MiB fresh from the OS and unmaps it on free, so every
    CPU training step page-faults its (B, d_sae) pre-activations and (d_sae, d_model) gradients in
    again: 10-20 % of a step at d_sae 16384 (docs/BENCHMARKS.md). Process-wide, so the CLI calls it
    (never an import or fit); a no-op where the C library is not glibc. Returns whether it took effect.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory_on_cpu() -> bool:
    """Undo keep_freed_memory_on_cpu (glibc's defaults: large blocks mapped apart, free memory at the top
    of the heap given back) and return what the heap holds free now. For stages whose temporaries vary
    in size from one batch to the next (the browse stage's merges), where a never-trimmed heap fragments
    and grows. Returns whether it took effect."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_MAX, 65536)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))
    libc.malloc_trim(0)
    return ok
