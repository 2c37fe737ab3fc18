"""Fused (compiled) compress / decompress: same bytes as the eager path, unbiased rounding.

The kernel functions are plain tensor code, so most properties are checked on them uncompiled
(fast, every width); a few configurations are compiled to check that Inductor's code keeps
them (each costs seconds of compilation, so they are few).
"""

import contextlib
import warnings

import pytest
import torch

import qbackprop as qb
from qbackprop.quant import fused
from qbackprop.quant.packing import pack_codes, unpack_codes
from qbackprop.quant.spec import QuantSpec


def _compiler_problem() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # the reason is the skip message
        return f"torch.compile on CPU needs a C++ compiler: {err}"
    return None


needs_compiler = pytest.mark.skipif(
    _compiler_problem() is not None, reason=str(_compiler_problem())
)


@contextlib.contextmanager
def fused_mode(mode):
    before = fused.is_enabled()
    fused.set_enabled(mode)
    try:
        yield
    finally:
        fused.set_enabled(before)


@contextlib.contextmanager
def kernel_calls():
    """The kinds ("compress", "decompress") of the compiled kernels run inside the block."""
    calls, original = [], fused._call

    def spy(key, *args):
        out = original(key, *args)
        calls.append(key[0] if out is not None else "failed")
        return out

    fused._call = spy
    try:
        yield calls
    finally:
        fused._call = original


def compress_both(x, spec, **kwargs):
    """(fused, eager) compressions of ``x``; fails if the fused kernel did not run."""
    with fused_mode(True), kernel_calls() as calls:
        fast = qb.compress(x, spec, **kwargs)
    assert calls and set(calls) == {"compress"}
    with fused_mode(False):
        slow = qb.compress(x, spec, **kwargs)
    return fast, slow


def decompress_both(fast, slow):
    """Fused decompression of ``fast``, eager of ``slow``."""
    with fused_mode(True), kernel_calls() as calls:
        y = fast.decompress()
    assert calls == ["decompress"]
    with fused_mode(False):
        return y, slow.decompress()


def assert_same_bytes(a, b):
    assert a.nbytes == b.nbytes
    for s, t in zip(a.tensors(), b.tensors(), strict=True):
        assert s.dtype == t.dtype and torch.equal(s, t)


def uncompiled_compress(x, spec, seed=0):
    """The compress kernel function run as plain PyTorch on an unpadded ``x``."""
    stochastic = spec.rounding.value == "stochastic"
    fn = fused._compress_fn(spec.bits, spec.scale.value, stochastic, torch.float32, "cpu")
    blocks = x.reshape(-1, spec.bucket_size // 64, 64)
    packed, *meta, bad = fn(blocks, torch.tensor(seed, dtype=torch.int32))
    assert not bad
    return packed.reshape(-1), meta


# ----- the format and the kernel maths, uncompiled --------------------------------------------


def test_planar_block_layout():
    # A 64-code block of 2-bit codes is 16 bytes; byte j holds codes j, 16+j, 32+j, 48+j.
    codes = torch.randint(0, 4, (70,), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 2)
    assert packed.numel() == 16 + 2  # then 6 codes in plain order: 2 bytes
    c = codes[:64].view(4, 16)
    assert torch.equal(packed[:16], (c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6).to(torch.uint8))
    assert torch.equal(unpack_codes(packed, 2, 70), codes.to(torch.int32))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("scale", ["minmax", "absmax"])
def test_kernel_functions_give_the_eager_bytes(bits, scale):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 512, generator=gen) * torch.logspace(-3, 3, 6).view(-1, 1)
    x[2] = 0.7  # constant buckets
    x[4, :128] = 0.0
    spec = QuantSpec(bits=bits, rounding="nearest", bucket_size=128, scale=scale)
    with fused_mode(False):
        ref = qb.compress(x, spec)
    packed, meta = uncompiled_compress(x, spec)
    assert torch.equal(packed, ref.packed[0])
    assert all(torch.equal(a, b) for a, b in zip(meta, ref.meta, strict=True))
    expected = ref.decompress()
    for dtype in (torch.float32, torch.float16):  # computed in fp32, rounded at the end
        decompress = fused._decompress_fn(bits, scale, dtype, "cpu")
        values = decompress(ref.packed[0].view(24, 2, -1), *ref.meta).reshape(x.shape)
        assert torch.equal(values, expected.to(dtype))


@pytest.mark.parametrize("bits, scale", [(1, "minmax"), (3, "absmax"), (8, "minmax")])
def test_kernel_stochastic_rounding_is_unbiased(bits, scale):
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(bits))
    spec = QuantSpec(bits=bits, bucket_size=512, scale=scale)
    decompress = fused._decompress_fn(bits, scale, torch.float32, "cpu")
    draws = []
    for seed in range(300):
        packed, meta = uncompiled_compress(x, spec, seed=seed * 7919 - 2**30)
        draws.append(decompress(packed.view(8, 8, -1), *meta).reshape(x.shape))
    if scale == "minmax":
        step = meta[1].float().view(-1, 1)
    else:
        step = 2 * meta[0].view(-1, 1) / (2**bits - 1)
    _check_unbiased(torch.stack(draws), x, step)


def test_random_bits_are_uniform_and_uncorrelated():
    (threshold,) = fused._thresholds((64, 64, 16), torch.tensor(12345, dtype=torch.int32), 2)[:1]
    r = threshold.reshape(-1)
    counts = torch.histc(r, bins=64, min=0, max=1)
    expected = r.numel() / 64
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 120  # 63 degrees of freedom: mean 63, sd 11
    centred = r - 0.5
    neighbours = (centred[1:] * centred[:-1]).mean() / centred.var()
    assert neighbours.abs() < 0.02


def _check_unbiased(samples, x, step):
    """``samples`` (draws, buckets, bucket_len): error < one step, variance <= s^2/4, no bias."""
    assert torch.all((samples - x).abs() < step * (1 + 1e-4) + 1e-6)
    var_bound = step**2 / 4
    draws = samples.shape[0]
    assert torch.all(samples.var(dim=0) <= var_bound * 1.35 + 1e-6)
    tol = 5 * torch.sqrt(var_bound / draws) + 1e-6
    assert torch.all((samples.mean(dim=0) - x).abs() <= tol)
    assert (samples.mean(dim=0) - x).mean().abs() < 0.01 * step.mean()


# ----- the switch and the fallback, with compilation stubbed out ------------------------------


@pytest.fixture
def stub_compile(monkeypatch):
    """Kernels run uncompiled; a fresh cache and policy state."""
    monkeypatch.setattr(fused, "_compile", lambda fn, name, serial, args: fn)
    monkeypatch.setattr(fused, "_cache", {})
    monkeypatch.setattr(fused, "_eager_elements", {})
    monkeypatch.setitem(fused._state, "broken", False)


@pytest.mark.parametrize(
    "value, mode", [("0", False), ("off", False), ("1", True), ("", None), ("auto", None)]
)
def test_env_switch(monkeypatch, value, mode):
    monkeypatch.setenv("QBACKPROP_FUSED", value)
    assert fused._mode_from_env() is mode


def test_off_means_eager(stub_compile):
    with fused_mode(False):
        qb.compress(torch.randn(64, 512), QuantSpec(bits=2)).decompress()
    assert fused._cache == {}


def test_auto_compiles_only_after_enough_elements(stub_compile, monkeypatch):
    x = torch.randn(64, 512)
    monkeypatch.setattr(fused, "AUTO_ELEMENTS", 3 * x.numel())
    spec = QuantSpec(bits=4, rounding="nearest")
    with fused_mode(None):
        for _ in range(2):
            qb.compress(x, spec)
        assert fused._cache == {}
        small = torch.randn(fused.MIN_NUMEL // 2)
        for _ in range(10):  # too small to count
            qb.compress(small, spec)
        assert fused._cache == {}
        qb.compress(x, spec)
    assert len(fused._cache) == 1


def test_compile_failure_warns_once_and_falls_back(stub_compile, monkeypatch):
    def broken(fn, name, serial, args):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(fused, "_compile", broken)
    x = torch.randn(64, 512)
    spec = QuantSpec(bits=4, rounding="nearest")
    with fused_mode(True):
        with pytest.warns(RuntimeWarning, match="eager path"):
            a = qb.compress(x, spec)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b = qb.compress(x, spec)
    with fused_mode(False):
        ref = qb.compress(x, spec)
    assert_same_bytes(a, ref)
    assert_same_bytes(b, ref)


# ----- compiled kernels -------------------------------------------------------------------


@needs_compiler
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(64, 1024),
        lambda: torch.randn(5, 7160) * 100,  # 70 buckets of 512, the last short: padded
        lambda: torch.randn(16, 32, 8, 8).to(memory_format=torch.channels_last),
        lambda: torch.randn(128, 512)[:, ::2],  # not dense: copied first
        lambda: torch.randn(2**17, 2)[:, 0].reshape(256, 512) + 1e4,  # large offset
    ],
)
def test_compiled_nearest_codes_equal_eager(make):
    x = make()
    for spec in [
        QuantSpec(bits=2, rounding="nearest"),
        QuantSpec(bits=2, rounding="nearest", bucket_size=128),
    ]:
        fast, slow = compress_both(x, spec)
        assert_same_bytes(fast, slow)
        y, ref = decompress_both(fast, slow)
        assert y.stride() == ref.stride()
        assert torch.equal(y, ref)


@needs_compiler
def test_compiled_half_precision_absmax_non_divisor_width():
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(3)).half()
    spec = QuantSpec(bits=3, rounding="nearest", scale="absmax")
    fast, slow = compress_both(x, spec)
    assert_same_bytes(fast, slow)  # (its decompress kernel is checked uncompiled, above)


@needs_compiler
def test_compiled_shapes_do_not_recompile(monkeypatch):
    compiled, original = [], fused._compile_graph

    def spy(fn, args, options):
        compiled.append(tuple(t.shape for t in args))
        return original(fn, args, options)

    monkeypatch.setattr(fused, "_compile_graph", spy)
    monkeypatch.setattr(fused, "_cache", {})
    spec = QuantSpec(bits=2, rounding="nearest", bucket_size=256)
    with fused_mode(True), kernel_calls() as calls:
        for rows in [64, 100, 300]:  # all under PARALLEL_NUMEL: one kernel variant
            for cols in [64, 256, 512, 768]:  # 64: one block per bucket
                x = torch.randn(rows, cols)
                y = qb.compress(x, spec).decompress()
                with fused_mode(False):
                    assert torch.equal(y, qb.compress(x, spec).decompress())
    assert calls.count("compress") == 12 and calls.count("decompress") == 12
    assert len(compiled) == 2  # one compress and one decompress graph for every shape
    assert "graph_error" not in fused._state


@needs_compiler
def test_dynamo_route_when_the_graph_route_fails(monkeypatch):
    def unavailable(fn, args, options):
        raise RuntimeError("internals of another torch release")

    monkeypatch.setattr(fused, "_compile_graph", unavailable)
    monkeypatch.setattr(fused, "_cache", {})
    monkeypatch.setitem(fused._state, "broken", False)
    spec = QuantSpec(bits=2, rounding="nearest")
    for rows in (64, 100):
        x = torch.randn(rows, 1024)
        fast, slow = compress_both(x, spec)
        assert_same_bytes(fast, slow)
    assert "another torch release" in fused._state.pop("graph_error")


@needs_compiler
@pytest.mark.parametrize("shape", [(64, 512), (5, 7160)])
def test_compiled_stochastic_is_unbiased_and_reproducible(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=2)
    gen = torch.Generator().manual_seed(0)
    with fused_mode(True), kernel_calls() as calls:
        cts = [qb.compress(x, spec, generator=gen) for _ in range(300)]
        samples = torch.stack([ct.decompress() for ct in cts])
    assert set(calls) == {"compress", "decompress"}
    layout = cts[0].layout
    flat = samples.view(300, -1)[:, : x.numel()]
    step = cts[0].meta[1].float().repeat_interleave(layout.bucket_len)[: x.numel()]
    # With a fixed input the step is the same in every draw.
    assert all(torch.equal(ct.meta[1], cts[0].meta[1]) for ct in cts)
    _check_unbiased(flat, x.reshape(-1), step)

    with fused_mode(True):
        a = qb.compress(x, spec, generator=torch.Generator().manual_seed(7))
        b = qb.compress(x, spec, generator=torch.Generator().manual_seed(7))
        c = qb.compress(x, spec, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.packed[0], b.packed[0]) and not torch.equal(a.packed[0], c.packed[0])
    # Exactly one draw from the generator per call.
    used, fresh = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    with fused_mode(True):
        qb.compress(x, spec, generator=used)
    torch.randint(-(2**31), 2**31, (), dtype=torch.int32, generator=fresh)
    assert torch.equal(used.get_state(), fresh.get_state())


@needs_compiler
def test_compiled_nonfinite_values_are_restored():
    x = torch.randn(64, 512)
    x[0, 5], x[3, 7], x[40, 0] = float("nan"), float("inf"), -float("inf")
    with fused_mode(True), kernel_calls() as calls:
        y = qb.compress(x, QuantSpec(bits=2)).decompress()
    assert calls == ["compress", "decompress"]  # the compress redone eagerly, then fused
    assert torch.isnan(y[0, 5]) and y[3, 7] == float("inf") and y[40, 0] == -float("inf")
    finite = torch.isfinite(x)
    xf = x[finite]
    assert (y[finite] - xf).abs().max() <= (xf.max() - xf.min()) / 3 * 1.01


@needs_compiler
@pytest.mark.parametrize("bits", [2, 3])
def test_compiled_derivative_codes_are_unbiased_like_eager(bits):
    from qbackprop.functions import fewbit

    x = torch.randn(64 * 100 + 37, generator=torch.Generator().manual_seed(2)) * 3
    slope = torch.ops.aten.silu_backward(torch.ones_like(x), x)
    low, high = fewbit.derivative_range("silu")
    step = (high - low) / (2**bits - 1)

    def draws(mode):
        with fused_mode(mode), kernel_calls() as calls:
            out = torch.stack([
                fewbit.decode_derivative_unbiased(
                    fewbit.encode_derivative_unbiased(slope, "silu", bits), x.numel(), "silu", bits
                )
                for _ in range(200)
            ])  # fmt: skip
        return out, calls

    fast, calls = draws(True)
    assert set(calls) == {"range_encode", "range_decode"}
    slow, _ = draws(False)
    for samples in (fast, slow):
        assert torch.all((samples - slope).abs() <= step * (1 + 1e-5))
        # Unbiased: the mean of 200 draws is within ~4 standard errors (sd <= step / 2).
        assert (
            (samples.mean(0) - slope).abs() <= 4 * step / 2 / 200**0.5 + 1e-6
        ).float().mean() > 0.999
    assert 0.95 < fast.var(0).mean() / slow.var(0).mean() < 1.05
    # Decoding is deterministic: the kernel gives the eager levels for the same bytes.
    packed = fewbit.encode_derivative_unbiased(slope, "silu", bits)
    with fused_mode(True):
        a = fewbit.decode_derivative_unbiased(packed, x.numel(), "silu", bits)
    with fused_mode(False):
        b = fewbit.decode_derivative_unbiased(packed, x.numel(), "silu", bits)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_grid_derivative_codes_equal_eager(dtype):
    from qbackprop.functions import fewbit

    x = torch.randn(64 * 80 + 13, generator=torch.Generator().manual_seed(4)) * 4
    x[5], x[7], x[9], x[11] = float("nan"), float("inf"), -float("inf"), 1e3
    x = x.to(dtype)
    for bits in (2, 3):
        with fused_mode(True), kernel_calls() as calls:
            fast = fewbit.encode_derivative(x, "silu", bits)
            slope = fewbit.decode_derivative(fast, x.numel(), "silu", bits)
        assert calls == ["grid_encode", "level_decode"]
        with fused_mode(False):
            slow = fewbit.encode_derivative(x, "silu", bits)
            ref = fewbit.decode_derivative(slow, x.numel(), "silu", bits)
        assert torch.equal(fast, slow) and torch.equal(slope, ref)


# ----- CUDA (Triton): run where a GPU is present ---------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_compiled_nearest_equals_eager(bits, dtype):
    x = (torch.randn(5, 7160, device="cuda") * 10).to(dtype)  # last bucket short: padded
    spec = QuantSpec(bits=bits, rounding="nearest")
    fast, slow = compress_both(x, spec)
    assert_same_bytes(fast, slow)
    y, ref = decompress_both(fast, slow)
    assert y.device.type == "cuda" and torch.equal(y, ref)


@needs_cuda
@pytest.mark.cuda
def test_cuda_compiled_stochastic_is_unbiased_and_matches_eager_statistics():
    x = torch.randn(64, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    spec = QuantSpec(bits=2)
    gen = torch.Generator("cuda").manual_seed(0)
    with fused_mode(True), kernel_calls() as calls:
        cts = [qb.compress(x, spec, generator=gen) for _ in range(300)]
        fast = torch.stack([ct.decompress() for ct in cts]).view(300, -1)
    assert set(calls) == {"compress", "decompress"}
    step = cts[0].meta[1].float().repeat_interleave(cts[0].layout.bucket_len)
    _check_unbiased(fast.cpu(), x.reshape(-1).cpu(), step.cpu())
    with fused_mode(False):
        slow = torch.stack([qb.compress(x, spec, generator=gen).decompress() for _ in range(300)])
    # Same distribution: per-element variances agree on average within sampling error.
    ratio = fast.var(0).mean() / slow.view(300, -1).var(0).mean()
    assert 0.9 < ratio < 1.1
