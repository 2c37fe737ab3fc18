"""Host allocator settings, and the process's resident memory as the OS sees it.

Why: a converted model keeps many small, long-lived packed codes (kilobytes to a few MiB each)
while the forward and backward allocate and free much larger, short-lived fp32 activations
and gradients. glibc's ``malloc`` serves blocks below its mmap threshold from the heap, and by
default that threshold is *dynamic*: every time a block that was mmap'd is freed, the
threshold rises to that block's size (up to 32 MiB on 64-bit). After the first few frees
(importing torch is enough) almost every activation comes from the heap, where the small
codes allocated in between pin the pages around them: the heap cannot shrink past the
highest live block, and the freed activation memory stays resident. The OS then sees the
process's memory grow with the fp32 activations even though the live bytes are the codes.

:func:`tune_host_allocator` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also
turns glibc's dynamic adjustment off) and the trim threshold (``M_TRIM_THRESHOLD``): every
block at or above the threshold is its own mapping, returned to the OS when freed, and the
codes and other small blocks stay on the heap. :func:`~qbackprop.surgery.convert_model` calls
it, so Python API users get it without an extra call. It does nothing when the user set
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_MAX_`` or the matching
``GLIBC_TUNABLES`` (their choice wins), when ``QBACKPROP_TUNE_MALLOC=0``, and off glibc.

The threshold, :data:`DEFAULT_MMAP_THRESHOLD` = 256 KiB, was chosen by measurement
(docs/benchmarks.md, "Peak RSS of a training step"): efficientnetv2_rw_t, batch 64, 96 px,
SGD, 2bit-stochastic, 1 thread, 2-core VM, each setting in a fresh process. "Added" is the
step's peak RSS minus the RSS before it (the process holds ~790 MiB before the first step:
705 MiB of it is importing torch, timm and qbackprop); faults and system time are per step:

=========  =================  ================  ==============  ===========
threshold  first step added   later steps       minor faults    system time
=========  =================  ================  ==============  ===========
dynamic    1018-1135 MiB      ~2,050 MiB total  0.1-0.7 M       0.3-1.0 s
64 KiB     224 MiB            ~1,030 MiB total  5.09 M          ~7 s
256 KiB    229 MiB            ~1,040 MiB total  5.05 M          ~7 s
1 MiB      280 MiB            ~1,140 MiB total  4.5-4.8 M       ~6 s
4 MiB      578 MiB            ~1,450 MiB total  2.6-3.5 M       ~4 s
16 MiB     1087 MiB           ~2,000 MiB total  0.5-1.4 M       ~1 s
=========  =================  ================  ==============  ===========

Between 64 KiB and 256 KiB the peak is the same (the codes and the small blocks between them
stay on the heap either way), and 256 KiB keeps the blocks between 64 and 256 KiB on the heap
(fewer mappings to make and unmake); from 1 MiB up, more and more activations stay on the
fragmented heap again. The trim threshold made no measurable difference (128 KiB, 1 MiB,
32 MiB); it is reset to glibc's default.

The cost is page faults: every large block is a fresh mapping whose pages the kernel zeroes
on first touch, and a 2-bit step allocates ~20 GB of them (compress and decompress allocate
full-size fp32 temporaries: ~4.6x and ~2.5x the activation's bytes), so the step's system
time grows from ~0.3 s to ~7 s (user time unchanged, ~7.8 s) on this VM. That is the price
of giving memory back between uses; fewer full-size temporaries in the compressor would
lower it. ``QBACKPROP_TUNE_MALLOC=0`` keeps glibc's defaults (fast, but the fragmented heap
holds ~2 GiB instead of ~1 GiB).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MMAP_THRESHOLD",
    "AllocatorSettings",
    "allocator_settings",
    "current_rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "tune_host_allocator",
    "why_not_tuned",
]

DEFAULT_MMAP_THRESHOLD = 256 * 1024
# glibc's M_TRIM_THRESHOLD default; set because the dynamic scheme may have raised it (to
# twice the mmap threshold it reached, up to 64 MiB) before we are called.
DEFAULT_TRIM_THRESHOLD = 128 * 1024
OPT_OUT_ENV = "QBACKPROP_TUNE_MALLOC"
# The user's own glibc malloc settings: any of them means "leave malloc alone".
USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class AllocatorSettings:
    """What :func:`tune_host_allocator` set (glibc ``mallopt``), in bytes."""

    mmap_threshold: int
    trim_threshold: int

    def describe(self) -> str:
        return (
            f"glibc malloc: blocks >= {self.mmap_threshold // 1024} KiB mmap'd (returned to the "
            f"OS on free), heap trimmed above {self.trim_threshold // 1024} KiB free"
        )


_settings: AllocatorSettings | None = None
_decided = False
_reason: str | None = None  # why the first call left the allocator alone


def _skip_reason() -> str | None:
    """Why the allocator is left alone, or None to tune it."""
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT_ENV}=0"
    user = [name for name in USER_ENV if name in os.environ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    user += [t for t in _USER_TUNABLES if t in tunables]
    if user:
        return "the user's own " + ", ".join(user)
    if not sys.platform.startswith("linux"):
        return f"not glibc ({sys.platform})"
    return None


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl does not)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def tune_host_allocator(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> AllocatorSettings | None:
    """Fix glibc's mmap and trim thresholds, once per process; returns what was set.

    Large blocks (at or above ``mmap_threshold``: activations, gradients, temporaries) are then
    mmap'd and given back to the OS when freed, whatever small blocks sit between them, so the
    resident memory follows the live bytes. The first call decides; later calls return the
    same result without touching the allocator (their arguments are ignored).

    Args:
        mmap_threshold: bytes; blocks at least this large get their own mapping.
        trim_threshold: bytes of free memory at the top of the heap that trigger giving it back.

    Returns:
        The settings applied, or None where nothing was changed: not glibc, the user set
        ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_MAX_`` (or the
        ``GLIBC_TUNABLES`` equivalents) themselves, or ``QBACKPROP_TUNE_MALLOC=0``.
    """
    global _settings, _decided, _reason
    if _decided:
        return _settings
    _decided = True
    _reason = _skip_reason()
    if _reason is not None:
        return None
    libc = _libc()
    if libc is None:
        _reason = "no glibc mallopt"
        return None
    # mallopt returns 1 on success; glibc refuses mmap thresholds above 32 MiB.
    if not libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)):
        _reason = f"mallopt(M_MMAP_THRESHOLD, {mmap_threshold}) failed"
        return None
    libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
    libc.malloc_trim(0)  # give back what the heap already holds free
    _settings = AllocatorSettings(int(mmap_threshold), int(trim_threshold))
    return _settings


def allocator_settings() -> AllocatorSettings | None:
    """What :func:`tune_host_allocator` set in this process (None: not applied, or skipped)."""
    return _settings


def why_not_tuned() -> str | None:
    """Why :func:`tune_host_allocator` left the allocator alone; None if it tuned it, or if it
    has not been called yet and would tune it now."""
    if _decided:
        return _reason
    return _skip_reason() or ("no glibc mallopt" if _libc() is None else None)


# --- resident memory ----------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int | None:
    """The process's resident set size now (Linux ``VmRSS``); None where unknown."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size since start or the last :func:`reset_peak_rss`.

    Linux ``VmHWM``; elsewhere ``getrusage``'s ``ru_maxrss`` (a lifetime maximum).
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource  # POSIX only

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError, ValueError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS, so that :func:`peak_rss_bytes` measures from now.

    Linux only (writes ``5`` to ``/proc/self/clear_refs``). Returns False where unsupported: the
    peak then stays a process-lifetime maximum.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None
