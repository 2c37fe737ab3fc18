"""compress / CompressedTensor: error bounds, unbiasedness, Brevitas codes, bytes, edge cases."""

import math

import pytest
import torch

import qbackprop as qb
from qbackprop.quant.deterministic import brevitas_int_quant
from qbackprop.quant.spec import QuantSpec


def _step(ct: qb.CompressedTensor) -> torch.Tensor:
    """Per-element step size of a minmax, unmixed CompressedTensor, in the original layout."""
    step = ct.meta[1].float().view(-1, 1).expand(-1, ct.layout.bucket_len)
    from qbackprop.quant.buckets import from_buckets

    return from_buckets(step.contiguous(), ct.layout, torch.float32)


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_nearest_error_at_most_half_step(bits):
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(bits)) * 5
    ct = qb.compress(x, QuantSpec(bits=bits, rounding="nearest", bucket_size=256))
    err = (ct.decompress() - x).abs()
    step = _step(ct)
    assert torch.all(err <= step * 0.5 * (1 + 1e-4) + 1e-6)


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_stochastic_error_below_one_step(bits):
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(bits)) * 5
    spec = QuantSpec(bits=bits, rounding="stochastic", bucket_size=256)
    ct = qb.compress(x, spec, generator=torch.Generator().manual_seed(0))
    err = (ct.decompress() - x).abs()
    assert torch.all(err < _step(ct) * (1 + 1e-4) + 1e-6)


@pytest.mark.parametrize("scale", ["minmax", "absmax", "l2"])
def test_stochastic_rounding_is_unbiased_within_variance_bound(scale):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=gen)
    spec = QuantSpec(bits=2, bucket_size=512, scale=scale)
    draws = 400
    samples = torch.stack([qb.compress(x, spec, generator=gen).decompress() for _ in range(draws)])
    ct = qb.compress(x, spec)
    if scale == "minmax":
        step = _step(ct)
    else:
        radius = ct.meta[0].view(-1, 1).expand(-1, 512).reshape(-1)
        step = 2 * radius / 3
    var_bound = step**2 / 4
    # Variance per element never exceeds s^2/4 (up to sampling error of the variance estimate).
    assert torch.all(samples.var(dim=0) <= var_bound * 1.35 + 1e-6)
    # Mean over draws: |mean - x| <= 5 sigma of the mean, sigma^2 <= (s^2/4)/draws.
    tol = 5 * torch.sqrt(var_bound / draws) + 1e-6
    assert torch.all((samples.mean(dim=0) - x).abs() <= tol)
    # And the overall bias is tiny compared to one step.
    assert (samples.mean(dim=0) - x).mean().abs() < 0.01 * step.mean()


def test_nearest_is_biased_where_stochastic_is_not():
    # A constant 1/3 of a step inside each bucket: nearest always rounds down, stochastic not.
    x = torch.cat([torch.zeros(1), torch.full((510,), 1.0 / 3 * 3 / 3), torch.full((1,), 3.0)])
    near = qb.compress(x, QuantSpec(bits=2, rounding="nearest")).decompress()
    assert (near[1:-1] - x[1:-1]).abs().mean() > 0.3
    gen = torch.Generator().manual_seed(0)
    mean = torch.stack(
        [qb.compress(x, QuantSpec(bits=2), generator=gen).decompress() for _ in range(200)]
    ).mean(0)
    assert (mean[1:-1] - x[1:-1]).mean().abs() < 0.05


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 12])
@pytest.mark.parametrize("scale", ["minmax", "absmax"])
def test_nearest_codes_equal_brevitas_int_quant(bits, scale):
    """Our stored codes are exactly what Brevitas's IntQuant gives for the same parameters."""
    x = torch.randn(2048, generator=torch.Generator().manual_seed(bits)) * 3
    ct = qb.compress(x, QuantSpec(bits=bits, rounding="nearest", bucket_size=512, scale=scale))
    levels = 2**bits - 1
    buckets = x.view(-1, 512)
    if scale == "minmax":
        low = buckets.amin(dim=1, keepdim=True)
        step = ct.meta[1].float().view(-1, 1)
        zero_point = -low / step
    else:
        step = 2 * buckets.abs().amax(dim=1, keepdim=True) / levels
        zero_point = torch.full_like(step, levels / 2)
    # A fresh Brevitas quantizer; its dequantized output divided back gives its codes.
    from brevitas.core.function_wrapper import RoundSte, TensorClamp
    from brevitas.core.quant import IntQuant

    proxy = IntQuant(False, False, torch.nn.Identity(), RoundSte(), TensorClamp())
    dequant = proxy(step, zero_point, torch.tensor(float(bits)), buckets)
    brevitas_codes = torch.round(dequant / step + zero_point).to(torch.int32)
    assert torch.equal(ct.codes(), brevitas_codes)
    assert isinstance(brevitas_int_quant(), IntQuant)


def _meta_bytes(spec: QuantSpec, buckets: int) -> int:
    # minmax: bucket minimum (fp32; fp64 above 12 bits) + bf16 step; absmax/l2: one radius.
    low = 8 if spec.bits > 12 else 4
    return buckets * (low + 2 if spec.scale.value == "minmax" else low)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 9, 16, 20])
@pytest.mark.parametrize("scale", ["minmax", "absmax"])
def test_nbytes_matches_formula(bits, scale):
    n, bucket = 10_000, 512
    spec = QuantSpec(bits=bits, bucket_size=bucket, scale=scale)
    ct = qb.compress(torch.randn(n), spec)
    buckets = math.ceil(n / bucket)
    bucket_len = math.ceil(n / buckets)
    padded = buckets * bucket_len
    code_bytes = math.ceil(padded * bits / 8) if bits <= 8 else padded * (2 if bits <= 16 else 4)
    assert ct.nbytes == code_bytes + _meta_bytes(spec, buckets)
    assert sum(t.nbytes for t in ct.tensors()) == ct.nbytes


def test_nbytes_matches_formula_for_mixed_spec():
    n, bucket = 512 * 64, 512
    spec = QuantSpec(bits=2, mix_bits=4, mix_prob=0.5, bucket_size=bucket)
    ct = qb.compress(torch.randn(n), spec, generator=torch.Generator().manual_seed(3))
    k = ct.n_mixed
    assert k == 32  # exactly round(p * buckets): the bytes do not depend on a draw
    expected = math.ceil(k * bucket * 4 / 8) + math.ceil((64 - k) * bucket * 2 / 8)
    expected += _meta_bytes(spec, 64) + math.ceil(64 / 8)
    assert ct.nbytes == expected
    assert (ct.row_bits().view(-1) == 4).sum().item() == k


def test_two_four_mix_at_half_stores_about_one_and_a_half_times_two_bit():
    x = torch.randn(512 * 2000)
    two = qb.compress(x, QuantSpec(bits=2)).nbytes
    mixed = qb.compress(
        x, QuantSpec(bits=2, mix_bits=4, mix_prob=0.5), generator=torch.Generator().manual_seed(0)
    )
    assert 1.4 < mixed.nbytes / two < 1.6
    # Each bucket's codes are dequantized at its own width: 4-bit buckets are more accurate.
    err = (mixed.decompress() - x).view(-1, 512).abs().mean(dim=1)
    wide = mixed.row_bits().view(-1) == 4
    assert err[wide].mean() < err[~wide].mean() / 2


def test_mix_per_tensor_uses_one_width():
    x = torch.randn(512 * 8)
    spec = QuantSpec(bits=2, mix_bits=4, mix_prob=0.5, mix_granularity="tensor")
    widths = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ct = qb.compress(x, spec, generator=gen)
        rb = ct.row_bits()
        assert isinstance(rb, int)
        widths.add(rb)
    assert widths == {2, 4}


def test_mix_prob_extremes():
    x = torch.randn(512 * 8)
    assert qb.compress(x, QuantSpec(bits=2, mix_bits=4, mix_prob=1.0)).row_bits() == 4
    assert qb.compress(x, QuantSpec(bits=2, mix_bits=4, mix_prob=0.0)).row_bits() == 2


def test_two_bit_bucket_512_bits_per_element():
    ct = qb.compress(torch.randn(64, 256, 32, 32), QuantSpec(bits=2, bucket_size=512))
    assert ct.bits_per_element <= 2.13
    assert 32 / ct.bits_per_element >= 15


def test_stochastic_is_reproducible_with_generator():
    x = torch.randn(5000)
    spec = QuantSpec(bits=2, mix_bits=4, mix_prob=0.3)
    a = qb.compress(x, spec, generator=torch.Generator().manual_seed(7)).decompress()
    b = qb.compress(x, spec, generator=torch.Generator().manual_seed(7)).decompress()
    c = qb.compress(x, spec, generator=torch.Generator().manual_seed(8)).decompress()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bits_32_is_the_tensor_itself():
    x = torch.randn(10, 10)
    ct = qb.compress(x, QuantSpec(bits=32))
    assert ct.decompress() is x
    assert ct.nbytes == x.nbytes


def test_constant_bucket_roundtrips_exactly():
    for value in [0.1, -3.7, 0.0, 1e-30, 6e4]:
        x = torch.full((1500,), value)
        for spec in ["2bit-stochastic", "4bit-nearest", QuantSpec(bits=1, scale="absmax")]:
            y = qb.compress(x, spec).decompress()
            assert torch.equal(y, x), (value, spec)


def test_tiny_ranges_do_not_underflow():
    x = 1.0 + torch.linspace(0, 1e-6, 1024)
    y = qb.compress(x, QuantSpec(bits=8, rounding="nearest")).decompress()
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() <= 1e-6 / 255 * 0.51 * 1.01 + 1e-7
    x = torch.linspace(0, 1e-35, 1024)  # below fp16's smallest subnormal
    y = qb.compress(x, QuantSpec(bits=8, rounding="nearest")).decompress()
    assert (y - x).abs().max() <= 1e-35 / 255


def test_a_bucket_with_nonfinite_values_decompresses_to_nan_and_spares_the_others():
    x = torch.randn(4 * 512)
    x[5], x[600], x[1500] = float("nan"), float("inf"), -float("inf")
    for spec in ["2bit-stochastic", "4bit-nearest", QuantSpec(bits=4, scale="absmax")]:
        y = qb.compress(x, spec).decompress().view(4, 512)
        # Buckets 0, 1 and 2 held NaN, +Inf and -Inf: all NaN, so a step's gradients are
        # non-finite and GradScaler skips it, as fp32 would.
        assert torch.isnan(y[:3]).all(), spec
        # Bucket 3 is untouched by its neighbours: finite, within one step.
        clean = x.view(4, 512)[3]
        levels = 3 if spec == "2bit-stochastic" else 15
        width = 2 * clean.abs().max() if isinstance(spec, QuantSpec) else clean.max() - clean.min()
        assert (y[3] - clean).abs().max() <= width / levels * 1.01


def test_nonfinite_input_does_not_read_back_to_the_host():
    x = torch.randn(2048)
    x[7] = float("inf")
    from torch.profiler import profile

    with profile() as prof:
        qb.compress(x, "2bit-stochastic").decompress()
    names = [e.name for e in prof.events()]
    assert "aten::_local_scalar_dense" not in names
    assert "aten::nonzero" not in names


def test_all_nan_bucket():
    x = torch.full((600,), float("nan"))
    y = qb.compress(x, "2bit-stochastic").decompress()
    assert torch.isnan(y).all()


@pytest.mark.parametrize("shape", [(0,), (0, 3, 4), (3, 0)])
def test_empty_tensors(shape):
    x = torch.randn(shape)
    ct = qb.compress(x, "2bit-stochastic")
    y = ct.decompress()
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("n", [1, 2, 3, 511, 513, 1025, 7919])
def test_odd_sizes(n):
    x = torch.randn(n)
    y = qb.compress(x, QuantSpec(bits=4, rounding="nearest")).decompress()
    assert y.shape == x.shape
    assert (y - x).abs().max() <= (x.max() - x.min()) / 15 * 0.51 + 1e-6


def test_scalar_tensor():
    x = torch.tensor(2.5)
    y = qb.compress(x, "2bit-stochastic").decompress()
    assert y.shape == () and y == x


@pytest.mark.parametrize("layout", ["flat", "channel"])
def test_channels_last_and_non_contiguous(layout):
    spec = QuantSpec(bits=8, rounding="nearest", bucket_layout=layout)
    x = torch.randn(4, 6, 5, 7).to(memory_format=torch.channels_last)
    y = qb.compress(x, spec).decompress()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == x.stride()
    assert (y - x).abs().max() < 0.05
    z = torch.randn(8, 10)[:, ::2]  # not dense: comes back contiguous, same values
    w = qb.compress(z, spec).decompress()
    assert w.shape == z.shape and (w - z).abs().max() < 0.05
    t = torch.randn(10, 8).t()
    v = qb.compress(t, spec).decompress()
    assert v.stride() == t.stride() and (v - t).abs().max() < 0.05


def test_channel_layout_buckets_never_straddle_channels():
    # Channel 0 is tiny, channel 1 huge: a flat bucket shares one scale and wipes out channel 0.
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0] *= 1e-4
    x[:, 1] *= 1e4
    flat = qb.compress(x, QuantSpec(bits=4, rounding="nearest")).decompress()
    chan = qb.compress(x, QuantSpec(bits=4, rounding="nearest", bucket_layout="channel"))
    ych = chan.decompress()
    rel = lambda y: ((y[:, 0] - x[:, 0]).norm() / x[:, 0].norm()).item()  # noqa: E731
    assert rel(flat) > 0.5
    assert rel(ych) < 0.2
    assert chan.layout.rows == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    x = torch.randn(3000).to(dtype)
    ct = qb.compress(x, QuantSpec(bits=8, rounding="nearest"))
    y = ct.decompress()
    assert y.dtype == dtype
    assert (y.float() - x.float()).abs().max() < 0.05


def test_non_float_tensors_pass_through():
    x = torch.arange(10)
    ct = qb.compress(x, "2bit-stochastic")
    assert ct.decompress() is x


def test_preset_by_name_and_unknown_preset():
    assert qb.compress(torch.randn(100), "4bit-nearest").spec.bits == 4
    with pytest.raises(ValueError, match="unknown preset"):
        QuantSpec.preset("3bit-magic")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 33}, "bits"),
        ({"bits": "two"}, "bits"),
        ({"rounding": "round"}, "rounding"),
        ({"bucket_size": 1}, "bucket_size"),
        ({"bucket_size": "global"}, "bucket_size"),
        ({"scale": "max"}, "scale"),
        ({"mix_bits": 4}, "mix_prob"),
        ({"mix_bits": 4, "mix_prob": 1.5}, "mix_prob"),
        ({"mix_prob": 0.5}, "mix_bits"),
        ({"bucket_layout": "rows"}, "bucket_layout"),
        ({"storage": "disk"}, "storage"),
    ],
)
def test_spec_validation_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**kwargs)


def test_spec_is_frozen_and_round_trips():
    spec = QuantSpec(bits=2, mix_bits=4, mix_prob=0.3)
    with pytest.raises(AttributeError):
        spec.bits = 3
    assert QuantSpec(**spec.to_dict()) == spec


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_roundtrip():
    x = torch.randn(4, 64, 16, 16, device="cuda")
    for spec in ["2bit-stochastic", "4bit-nearest", "2/4-mix"]:
        ct = qb.compress(x, spec)
        y = ct.decompress()
        assert y.device == x.device and y.shape == x.shape
        assert (y - x).abs().max() < (x.max() - x.min()) / 3 * 1.01
