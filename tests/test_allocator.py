"""qbackprop.allocator: glibc malloc tuning (once, respecting the user's settings) and RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbackprop import allocator

ALLOCATOR_PY = Path(allocator.__file__)
GLIBC = sys.platform.startswith("linux") and allocator._libc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
MiB = 2**20

# Loads allocator.py alone (no torch: a subprocess starts in ~50 ms), runs BODY, prints JSON.
_PRELUDE = f"""
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("qb_allocator", {str(ALLOCATOR_PY)!r})
al = importlib.util.module_from_spec(spec)
sys.modules["qb_allocator"] = al
spec.loader.exec_module(al)
"""

# Big short-lived blocks ("activations", 1 MiB and growing, two live at a time as a layer's
# input and output) interleaved with small long-lived ones ("codes", 16 KiB each). First one
# 16 MiB block is allocated and freed, as importing torch does: with glibc's dynamic threshold
# every later block up to 16 MiB then comes from the heap, where the small blocks pin the
# freed big ones.
_PATTERN = """
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MiB = 2**20
first = libc.malloc(16 * MiB)
libc.free(first)
settings = al.tune_host_allocator()
def big(n):
    block = libc.malloc(n)
    ctypes.memset(block, 1, n)
    return block
base = al.current_rss_bytes()
keep, excess = [], 0
prev = big(MiB)
for i in range(100):
    size = MiB + i * 32 * 1024
    nxt = big(size)
    small = libc.malloc(16384)
    ctypes.memset(small, 1, 16384)
    keep.append(small)
    libc.free(prev)
    prev = nxt
    live = size + 16384 * len(keep)
    excess = max(excess, al.current_rss_bytes() - base - live)
out = {"excess": excess, "tuned": settings is not None}
"""


def _run(body: str, **env: str) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in (*allocator.USER_ENV, allocator.OPT_OUT_ENV, "GLIBC_TUNABLES")
    }
    code = _PRELUDE + body + "\nprint(json.dumps(out))\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


_TUNE_TWICE = """
a = al.tune_host_allocator()
b = al.tune_host_allocator(mmap_threshold=4 * 2**20)  # ignored: the first call decided
out = {
    "first": None if a is None else [a.mmap_threshold, a.trim_threshold],
    "same": a is b,
    "recorded": al.allocator_settings() is a,
    "why": al.why_not_tuned(),
}
"""


@needs_glibc
def test_tunes_once_with_the_default_thresholds():
    out = _run(_TUNE_TWICE)
    assert out["first"] == [allocator.DEFAULT_MMAP_THRESHOLD, allocator.DEFAULT_TRIM_THRESHOLD]
    assert out["same"] and out["recorded"]
    assert out["why"] is None


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_THRESHOLD_": "1048576"},
        {"MALLOC_TRIM_THRESHOLD_": "1048576"},
        {"MALLOC_MMAP_MAX_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
    ],
)
def test_leaves_the_users_malloc_settings_alone(env):
    out = _run(_TUNE_TWICE, **env)
    assert out["first"] is None and out["same"] and out["recorded"]
    (name,) = env
    assert ("glibc.malloc.mmap_threshold" if name == "GLIBC_TUNABLES" else name) in out["why"]


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_opt_out(value):
    out = _run(_TUNE_TWICE, QBACKPROP_TUNE_MALLOC=value)
    assert out["first"] is None and out["same"]
    assert allocator.OPT_OUT_ENV in out["why"]


def test_opt_out_only_for_false_values():
    out = _run(_TUNE_TWICE, QBACKPROP_TUNE_MALLOC="1")
    assert (out["first"] is not None) == GLIBC


def test_a_no_op_off_linux(monkeypatch):
    # A fresh copy of the module, so that this process's allocator is never touched.
    import importlib.util

    spec = importlib.util.spec_from_file_location("qb_allocator_copy", ALLOCATOR_PY)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "qb_allocator_copy", copy)
    spec.loader.exec_module(copy)
    for name in (*allocator.USER_ENV, allocator.OPT_OUT_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert copy.tune_host_allocator() is None
    assert copy.allocator_settings() is None
    assert "not glibc" in copy.why_not_tuned()


@needs_glibc
def test_rss_follows_live_bytes_only_when_tuned():
    # "excess": the most the RSS exceeded the bytes live (one big block, the small ones so far)
    tuned = _run(_PATTERN)
    untuned = _run(_PATTERN, QBACKPROP_TUNE_MALLOC="0")
    assert tuned["tuned"] and not untuned["tuned"]
    assert tuned["excess"] < 0.5 * MiB, tuned
    assert untuned["excess"] > 5 * MiB, untuned  # the freed big blocks stay resident


def test_rss_helpers_are_plausible():
    rss, peak = allocator.current_rss_bytes(), allocator.peak_rss_bytes()
    if rss is None:
        pytest.skip("no /proc/self/status")
    assert 10 * MiB < rss < 64 * 2**30
    assert peak >= rss - MiB  # the peak is at least what is resident now


def test_peak_rss_reset_measures_from_now():
    if allocator.current_rss_bytes() is None or not allocator.reset_peak_rss():
        pytest.skip("the peak RSS cannot be reset here")
    start = allocator.current_rss_bytes()
    block = b"\x01" * (200 * MiB)  # written, so resident
    assert allocator.peak_rss_bytes() >= start + 190 * MiB
    del block
    high = allocator.peak_rss_bytes()
    assert allocator.current_rss_bytes() < high - 150 * MiB  # given back (mmap'd)
    assert allocator.reset_peak_rss()
    after = allocator.peak_rss_bytes()
    assert after < high - 150 * MiB
    assert after <= allocator.current_rss_bytes() + 8 * MiB


def test_metrics_record_the_epochs_memory_peaks(tmp_path):
    import torch

    from qbackprop.train.engine import _memory_peaks
    from qbackprop.train.metrics import COLUMNS, TIMING_COLUMNS, append_metrics, read_metrics

    peaks = _memory_peaks(torch.device("cpu"))
    if allocator.peak_rss_bytes() is not None:
        assert 10 < peaks["peak_rss_mib"] < 64 * 1024
    assert "cuda_max_reserved_mib" not in peaks and "peak_cuda_mem_bytes" not in peaks
    new = {"peak_rss_mib", "cuda_max_allocated_mib", "cuda_max_reserved_mib"}
    assert new <= set(COLUMNS) and new <= set(TIMING_COLUMNS)
    append_metrics(tmp_path / "m.csv", {"epoch": 1, **peaks, "cuda_max_reserved_mib": 12.5})
    (row,) = read_metrics(tmp_path / "m.csv")
    assert row["peak_rss_mib"] == peaks.get("peak_rss_mib")
    assert row["cuda_max_reserved_mib"] == 12.5 and row["cuda_max_allocated_mib"] is None


def test_convert_model_leaves_the_allocator_alone_when_asked(monkeypatch):
    from torch import nn

    import qbackprop as qb
    from qbackprop import allocator

    calls = []
    monkeypatch.setattr(allocator, "tune_host_allocator", lambda *a, **k: calls.append(1))
    qb.convert_model(nn.Sequential(nn.Linear(4, 4)), "2bit-stochastic", tune_allocator=False)
    qb.convert_model(
        nn.Sequential(nn.Linear(4, 4)), {"default": "2bit-stochastic", "tune_allocator": False}
    )
    assert calls == []
    qb.convert_model(nn.Sequential(nn.Linear(4, 4)), "2bit-stochastic")
    assert calls == [1]
