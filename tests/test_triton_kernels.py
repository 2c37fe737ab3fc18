"""The hand-written Triton kernels store exactly what the eager path stores (Triton interpreter).

The CPU tests run the kernels in Triton's interpreter, which must be switched on before Triton
is first imported (Triton jit-s its own library at import, in the mode of that moment). So this
module sets ``TRITON_INTERPRET=1`` at import, before importing Triton, on machines without
CUDA; with CUDA it leaves the setting alone (an interpreted Triton would slow down every other
compiled test) and the CUDA test runs instead. ``test_kernels_run_in_the_interpreter`` checks
that the CPU tests really run the kernels. Shapes are small: the interpreter runs each program
as numpy code.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from qbackprop.quant import triton_kernels as tk  # noqa: E402
from qbackprop.quant.compressed import _bucket_stats, _quantize  # noqa: E402
from qbackprop.quant.packing import pack_codes, unpack_codes  # noqa: E402
from qbackprop.quant.spec import QuantSpec  # noqa: E402

FLOATS = (torch.float32, torch.bfloat16)


INTERPRETER = tk.interpreting()


@pytest.fixture(autouse=True)
def _cpu_tests_need_the_interpreter(request):
    # Skipped, with the reason, rather than failing: Triton was imported before this module
    # could switch the interpreter on, or CUDA is there and the interpreter was not asked for.
    if request.node.get_closest_marker("cuda") is None and not INTERPRETER:
        pytest.skip("Triton's interpreter is off (set TRITON_INTERPRET=1 before importing Triton)")


def _seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _matrix(num_buckets: int, bucket_len: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    # Buckets of different offsets and spreads, so low, step and zero point all vary.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_buckets, bucket_len, generator=gen)
    x = x * torch.linspace(0.01, 5.0, num_buckets).view(-1, 1) + torch.arange(num_buckets).view(
        -1, 1
    )
    return x.to(dtype)


def _eager(matrix: torch.Tensor, bits: int):
    """The eager nearest path of ``compressed.py``: (packed, low, step, codes)."""
    work = matrix.float()
    spec = QuantSpec(bits=bits, rounding="nearest", bucket_size=matrix.shape[1])
    codes, (low, step) = _quantize(work, _bucket_stats(work, spec), spec, bits, None)
    return pack_codes(codes.reshape(-1), bits), low, step, codes


def _codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    return unpack_codes(packed, bits, math.prod(shape)).view(shape)


def _eager_decompress(packed, low, step, bits, shape) -> torch.Tensor:
    """``compressed.decompress_tensors``'s arithmetic: fp32 ``addcmul(low, code, step)``."""
    codes = _codes(packed, bits, shape).float()
    return torch.addcmul(low.view(-1, 1), codes, step.float().view(-1, 1))


def _u(matrix: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Real-valued codes, the same fp32 operations as the kernel and the eager path."""
    step = step.float().view(-1, 1)
    safe = torch.where(step > 0, step, 1.0)
    return matrix.float() / safe + (-low.view(-1, 1) / safe)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN, -0.0 != 0.0)."""
    int_dtype = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(int_dtype), b.view(int_dtype))


def test_kernels_run_in_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    assert tk.interpreting()
    assert isinstance(tk._kernel("compress"), InterpretedFunction)
    assert isinstance(tk._kernel("decompress"), InterpretedFunction)
    assert tk.supported(torch.zeros(2, 64), 2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_nearest_is_bit_identical_to_eager(bits, dtype):
    # 3 blocks per bucket: not a power of two, so the chunk tile has masked-off blocks.
    x = _matrix(5, 192, dtype, seed=bits)
    packed, low, step = tk.compress_minmax(x, bits, False, _seed(0))
    ref_packed, ref_low, ref_step, ref_codes = _eager(x, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 5 * 192 * bits // 8
    assert torch.equal(packed, ref_packed)
    assert _same_bits(low, ref_low)
    assert _same_bits(step, ref_step)
    # The codes use the whole range (so the comparison covers the top code too).
    codes = _codes(packed, bits, x.shape)
    assert codes.min() == 0 and codes.max() == 2**bits - 1
    assert torch.equal(codes, ref_codes.to(torch.int32))


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_long_bucket_spans_several_chunks(bits):
    # 40 blocks per bucket: two chunks of 32 blocks, the second partly masked.
    x = _matrix(2, 64 * 40, torch.float16, seed=10 + bits)
    packed, low, step = tk.compress_minmax(x, bits, False, _seed(0))
    ref_packed, ref_low, ref_step, _ = _eager(x, bits)
    assert torch.equal(packed, ref_packed)
    assert _same_bits(low, ref_low) and _same_bits(step, ref_step)
    out = tk.decompress_minmax(packed, low, step, bits, 2, 64 * 40, torch.float16)
    ref = _eager_decompress(ref_packed, ref_low, ref_step, bits, x.shape).half()
    assert _same_bits(out, ref)


def test_ties_round_half_to_even():
    # step 1 (exact in bf16), low 0: u = x exactly, so x.5 is a tie. Half to even gives
    # 0, 2, 2 (round-half-up would give 1, 2, 3).
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([3.0, 0.5, 1.5, 2.5])
    packed, low, step = tk.compress_minmax(x, 2, False, _seed(0))
    assert low.item() == 0.0 and step.item() == 1.0
    assert _codes(packed, 2, x.shape)[0, :4].tolist() == [3, 0, 2, 2]
    assert torch.equal(packed, _eager(x, 2)[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_near_ties_follow_the_eager_operation_order(bits):
    # Values within a few ulps of the midpoints k + 1/2 between codes: there the code depends
    # on the exact fp32 operations. The eager order, x / step + (-low / step), must be matched;
    # the algebraically equal (x - low) / step or x * (1 / step) + zero point give other codes
    # for some of these values (checked below, so this test can tell them apart).
    low, high = torch.tensor(-1.2345), torch.tensor(2.71)
    levels = 2**bits - 1
    step = _eager(torch.stack([low, high]).repeat(32).view(1, 64), bits)[2].float()
    mids = (low.double() + (torch.arange(levels).double() + 0.5) * step.double()).float()
    near, up, down = [mids], mids, mids
    for _ in range(6):
        up, down = torch.nextafter(up, high), torch.nextafter(down, low)
        near += [up, down]
    values = torch.cat([low.view(1), high.view(1), *near])
    pad = (-values.numel()) % 64
    x = torch.cat([values, low.repeat(pad)]).view(1, -1)
    packed, got_low, got_step = tk.compress_minmax(x, bits, False, _seed(0))
    ref_packed, ref_low, ref_step, ref_codes = _eager(x, bits)
    assert _same_bits(got_low, ref_low) and _same_bits(got_step, ref_step)
    assert torch.equal(packed, ref_packed)
    other_orders = [(x - low) / step, x * (1 / step) + (-low / step)]
    for u in other_orders:
        assert (u.clamp(0, levels).round() != ref_codes).any()


def test_step_is_rounded_up_to_bf16():
    # A range whose fp32 step is not a bf16 value gets the next bf16 above it (not the nearest,
    # which is below here), so the top code still covers the maximum; an exact one is kept.
    x = torch.zeros(2, 64)
    x[0, 1] = 0.9976  # step 0.33253: 170.26 bf16 ulps (2**-9), so nearest rounds down
    x[1, 1] = 3.0 * 1.0078125  # 3 levels at 2 bits: step 1 + 2**-7 exactly, a bf16 value
    packed, low, step = tk.compress_minmax(x, 2, False, _seed(0))
    exact = x[:, 1] / 3
    nearest = exact.to(torch.bfloat16)
    assert nearest[0].float() < exact[0]  # round-to-nearest would not cover the range
    assert step[0] == torch.nextafter(nearest[0], torch.tensor(2.0, dtype=torch.bfloat16))
    assert step[1].item() == 1.0078125
    assert torch.all(step.float() >= exact)
    assert _codes(packed, 2, x.shape)[:, 1].tolist() == [3, 3]
    assert _same_bits(step, _eager(x, 2)[2])


def test_constant_bucket():
    # Zero range: step 0 (safe step 1 inside), every code 0, decompresses exactly.
    x = torch.full((2, 64), 2.5)
    x[1] = -7.0
    packed, low, step = tk.compress_minmax(x, 4, False, _seed(0))
    assert torch.equal(step.float(), torch.zeros(2)) and torch.equal(low, x[:, 0])
    assert not packed.any()
    assert torch.equal(tk.decompress_minmax(packed, low, step, 4, 2, 64, torch.float32), x)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 7, 8])
def test_roundtrip_within_half_a_step_and_identical_to_eager(bits, dtype):
    x = _matrix(4, 128, dtype, seed=100 + bits)
    packed, low, step = tk.compress_minmax(x, bits, False, _seed(0))
    out32 = tk.decompress_minmax(packed, low, step, bits, 4, 128, torch.float32)
    err = (out32 - x.float()).abs()
    # Half a step, plus the fp32 rounding of low + code * step (a few ulps of the values).
    slack = 4 * torch.finfo(torch.float32).eps * x.float().abs().clamp(min=1.0)
    assert torch.all(err <= 0.5 * step.float().view(-1, 1) + slack)
    # code * step is exact in fp32 (8-bit code, 8-bit bf16 significand), so the kernel and
    # eager addcmul agree bit for bit whether or not either fuses the multiply-add.
    ref32 = _eager_decompress(packed, low, step, bits, x.shape)
    assert _same_bits(out32, ref32)
    out = tk.decompress_minmax(packed, low, step, bits, 4, 128, dtype)
    assert out.dtype == dtype and _same_bits(out, ref32.to(dtype))


@pytest.mark.parametrize("bits", [1, 2, 5])
def test_stochastic_codes_are_a_neighbour_of_u(bits):
    x = _matrix(3, 128, torch.float32, seed=200 + bits)
    packed, low, step = tk.compress_minmax(x, bits, True, _seed(7))
    # Same metadata as nearest rounding.
    _, near_low, near_step = tk.compress_minmax(x, bits, False, _seed(0))
    assert _same_bits(low, near_low) and _same_bits(step, near_step)
    codes = _codes(packed, bits, x.shape).float()
    u = _u(x, low, step).clamp(0, 2**bits - 1)
    down = u.floor()
    assert torch.all((codes == down) | ((codes == down + 1) & (u > down)))
    # Both neighbours occur (the draw is not always floor or always ceil).
    fractional = u > down
    assert (codes[fractional] == down[fractional]).any()
    assert (codes[fractional] == down[fractional] + 1).any()
    nearest = _codes(tk.compress_minmax(x, bits, False, _seed(0))[0], bits, x.shape).float()
    assert torch.all((codes - nearest).abs() <= 1)


def test_stochastic_seeds():
    x = _matrix(2, 128, torch.float32, seed=300)
    a = tk.compress_minmax(x, 2, True, _seed(1))[0]
    b = tk.compress_minmax(x, 2, True, _seed(1))[0]
    c = tk.compress_minmax(x, 2, True, _seed(2))[0]
    big = tk.compress_minmax(x, 2, True, _seed(2**40 + 1))[0]  # the seed's high word counts
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, big)
    # Different seeds disagree on a good share of the codes, not just one.
    ca, cc = _codes(a, 2, x.shape), _codes(c, 2, x.shape)
    assert (ca != cc).float().mean() > 0.1


def test_stochastic_rounding_is_unbiased():
    # One bucket (the interpreter's cost is per program), 200 seeds.
    bits, draws = 2, 200
    x = _matrix(1, 256, torch.float32, seed=400)
    total = torch.zeros(1, 256, dtype=torch.float64)
    step = None
    for seed in range(draws):
        packed, low, step = tk.compress_minmax(x, bits, True, _seed(seed))
        total += _codes(packed, bits, x.shape).double()
    u = _u(x, low, step).double().clamp(0, 2**bits - 1)
    mean = total / draws
    # A draw is Bernoulli(frac(u)) above floor(u): per element the mean's standard error is
    # at most 1 / (2 sqrt(draws)) code steps; over all n elements 1 / (2 sqrt(draws n)).
    sigma_element = 0.5 / math.sqrt(draws)
    sigma_all = 0.5 / math.sqrt(draws * u.numel())
    assert (mean - u).abs().max() < 5 * sigma_element
    assert abs((mean - u).mean()) < 5 * sigma_all
    # The bounds are tight enough to reject a biased rounding (nearest) on the same data.
    nearest = _codes(tk.compress_minmax(x, bits, False, _seed(0))[0], bits, x.shape).double()
    assert (nearest - u).abs().max() > 5 * sigma_element


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.parametrize("stochastic", [False, True])
def test_nonfinite_bucket_decompresses_to_nan(stochastic):
    bits = 3
    x = _matrix(5, 128, torch.float32, seed=500)
    x[1, 17] = math.nan
    x[2, 100] = math.inf
    x[3, 0] = -math.inf
    x[4, 5], x[4, 6] = -3e38, 3e38  # finite, but the range overflows fp32
    packed, low, step = tk.compress_minmax(x, bits, stochastic, _seed(3))
    bad = torch.tensor([False, True, True, True, True])
    assert torch.isnan(low[bad]).all() and torch.isnan(step[bad].float()).all()
    assert torch.isfinite(low[~bad]).all() and torch.isfinite(step[~bad].float()).all()
    per_bucket = packed.view(5, -1)
    assert not per_bucket[bad].any()  # codes 0 in the non-finite buckets
    out = tk.decompress_minmax(packed, low, step, bits, 5, 128, torch.float32)
    assert torch.isnan(out[bad]).all()
    assert torch.isfinite(out[~bad]).all()
    # The finite bucket is exactly what it would be on its own (same offsets: bucket 0).
    alone, alone_low, alone_step = tk.compress_minmax(x[:1].clone(), bits, stochastic, _seed(3))
    assert torch.equal(per_bucket[0], alone)
    assert _same_bits(low[:1], alone_low) and _same_bits(step[:1], alone_step)


def test_supported_and_errors():
    assert tk.supported(torch.zeros(3, 128, dtype=torch.bfloat16), 8)
    assert tk.supported(torch.zeros(3, 128, dtype=torch.float16), 1)
    assert not tk.supported(torch.zeros(3, 96), 2)  # not whole 64-code blocks
    assert not tk.supported(torch.zeros(3, 128), 9)
    assert not tk.supported(torch.zeros(3, 128), 0)
    assert not tk.supported(torch.zeros(3, 128, dtype=torch.float64), 2)
    assert not tk.supported(torch.zeros(384), 2)  # not a matrix
    assert not tk.supported(torch.zeros(128, 3).t(), 2)  # not contiguous
    with pytest.raises(ValueError, match="does not apply"):
        tk.compress_minmax(torch.zeros(3, 96), 2, False, _seed(0))
    with pytest.raises(ValueError, match="bits=9"):
        tk.compress_minmax(torch.zeros(3, 128), 9, False, _seed(0))
    with pytest.raises(ValueError, match="seed"):
        tk.compress_minmax(torch.zeros(3, 128), 2, False, torch.tensor([0]))
    with pytest.raises(ValueError, match="do not match"):
        bad_size = torch.zeros(10, dtype=torch.uint8)
        low, step = torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)
        tk.decompress_minmax(bad_size, low, step, 2, 3, 128, torch.float32)


def test_supported_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tk.supported(torch.zeros(3, 128), 2)


def test_registered_ops_run_on_cpu():
    x = _matrix(2, 64, torch.float32, seed=600)
    packed, low, step = torch.ops.qbackprop.triton_compress_minmax(x, 4, False, _seed(0))
    assert torch.equal(packed, _eager(x, 4)[0])
    out = torch.ops.qbackprop.triton_decompress_minmax(packed, low, step, 4, 2, 64, torch.bfloat16)
    assert out.shape == (2, 64) and out.dtype == torch.bfloat16


def test_empty_matrix():
    packed, low, step = tk.compress_minmax(torch.zeros(0, 64), 2, True, _seed(0))
    assert packed.numel() == low.numel() == step.numel() == 0
    out = tk.decompress_minmax(packed, low, step, 2, 0, 64, torch.float32)
    assert out.shape == (0, 64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", range(1, 9))
def test_compiled_kernels_on_cuda_match_cpu_eager(bits, monkeypatch):
    # The compiled kernels (not the interpreter) must give the CPU eager bytes: IEEE division
    # and the magic-number rounding leave no room for the GPU's faster approximations.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not tk.compiling():
        pytest.skip("Triton was imported with TRITON_INTERPRET=1: no compiled kernels here")
    x = _matrix(64, 512, torch.bfloat16, seed=700 + bits)
    packed, low, step = tk.compress_minmax(x.cuda(), bits, False, _seed(0).cuda())
    ref_packed, ref_low, ref_step, _ = _eager(x, bits)
    assert torch.equal(packed.cpu(), ref_packed)
    assert _same_bits(low.cpu(), ref_low) and _same_bits(step.cpu(), ref_step)
    out = tk.decompress_minmax(packed, low, step, bits, 64, 512, torch.float32)
    ref = _eager_decompress(ref_packed, ref_low, ref_step, bits, x.shape)
    assert _same_bits(out.cpu(), ref)
    s_packed = tk.compress_minmax(x.cuda(), bits, True, _seed(5).cuda())[0].cpu()
    codes = _codes(s_packed, bits, x.shape).float()
    u = _u(x, ref_low, ref_step).clamp(0, 2**bits - 1)
    assert torch.all((codes == u.floor()) | (codes == u.floor() + 1))


def test_tracing_under_the_interpreter_fails_clearly():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x, seed = mode.from_tensor(torch.zeros(2, 64)), mode.from_tensor(_seed(0))
        with pytest.raises(RuntimeError, match="cannot be traced under TRITON_INTERPRET=1"):
            torch.ops.qbackprop.triton_compress_minmax(x, 2, False, seed)


_TRACE_SCRIPT = """
import torch
from functorch.compile import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from qbackprop.quant import triton_kernels as tk

mode = FakeTensorMode()
with mode:
    x = torch.empty(4, 192, device="cuda", dtype=torch.bfloat16)
    seed = torch.empty((), dtype=torch.int64, device="cuda")
assert tk.compiling() and tk.supported(x, 3)

def f(x, seed):
    packed, low, step = tk.compress_minmax(x, 3, True, seed)
    return tk.decompress_minmax(packed, low, step, 3, 4, 192, torch.bfloat16), packed, low, step

graphs = []
def compiler(gm, inputs):
    graphs.append(gm.code)
    return gm

with mode:
    out, packed, low, step = aot_function(f, fw_compiler=compiler)(x, seed)
assert (out.shape, out.dtype) == ((4, 192), torch.bfloat16)
assert (packed.shape, packed.dtype) == ((4 * 192 * 3 // 8,), torch.uint8)
assert (low.dtype, step.dtype, low.shape, step.shape) == (
    torch.float32, torch.bfloat16, (4,), (4,))
print("HOPS", graphs[0].count("triton_kernel_wrapper_functional("))
"""


def test_ops_trace_into_triton_kernels_for_cuda():
    # Compiled-kernel mode (no TRITON_INTERPRET) in a fresh process, on fake CUDA tensors, so
    # no GPU is needed: AOTAutograd decomposes each triton_op into its Triton kernel (what lets
    # Inductor see and schedule them), with the output sizes of the fake kernels.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HOPS 2" in result.stdout


def test_supported_is_traceable_by_dynamo():
    # torch.compile traces the public entry points, and with them supported(): the mode checks
    # must not break the graph (Triton's knobs call a C function Dynamo cannot trace).
    fn = torch.compile(
        lambda x: x + 1 if tk.supported(x, 2) else x - 1, fullgraph=True, backend="eager"
    )
    assert torch.equal(fn(torch.zeros(2, 64)), torch.ones(2, 64))


# ---- the registered ops' CUDA kernels (run here on CPU tensors under the interpreter) -------


@pytest.mark.parametrize("preset", ["2bit-stochastic", "4bit-nearest", "8bit-nearest"])
def test_cuda_op_kernels_take_the_triton_path_and_store_the_eager_format(preset, monkeypatch):
    from qbackprop.quant import ops
    from qbackprop.quant.compressed import compress_tensors

    if not tk.interpreting():
        pytest.skip("Triton's interpreter is off")
    calls = []
    real = tk.compress_minmax
    monkeypatch.setattr(tk, "compress_minmax", lambda *a: calls.append(a) or real(*a))
    spec = QuantSpec.preset(preset)
    x = torch.randn(4, 8, 16, 16)  # 8192 elements: 16 buckets of 512
    key = ops.spec_key(spec)
    tensors = ops.compress_triton_or_eager(x, key, 0)
    assert len(calls) == 1
    eager = compress_tensors(x, spec, ops.plan_layout(tuple(x.shape), tuple(x.stride()), spec), 0)
    assert [t.shape for t in tensors] == [t.shape for t in eager]
    if spec.rounding.value == "nearest":
        for got, want in zip(tensors, eager, strict=True):
            assert torch.equal(got, want)
    y = ops.decompress_triton_or_eager(tensors, key, 0, list(x.shape), list(x.stride()), x.dtype)
    step = (x.max() - x.min()) / (2**spec.bits - 1)
    assert y.shape == x.shape and (y - x).abs().max() <= step * 1.01
    # A bucket layout the kernels do not cover (padding) takes the eager path.
    calls.clear()
    odd = torch.randn(1000)
    assert len(ops.compress_triton_or_eager(odd, key, 0)) == 3 and calls == []
