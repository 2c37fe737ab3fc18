"""Few-bit backward: optimal piecewise-constant codes for smooth activation derivatives.

Storing a quantized copy of a smooth activation's input gives a *biased* derivative (``f'`` is
nonlinear), and the bias is large at 2-4 bits. The Few-bit backward idea (Novikov et al.,
"Few-Bit Backward: Quantized Gradients of Activation Functions for Memory Footprint Reduction",
2022) stores instead which of ``k = 2**b`` intervals of the *exact* input each element fell in,
and uses one constant per interval in backward: ``grad_in = grad_out * levels[code]``. The
intervals and constants minimise ``E[(f'(x) - c(x))**2]`` under a weight on ``x``; here that
minimum is found exactly (on a fine grid) by dynamic programming, once per activation and bit
width.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import runtime
from ..quant.packing import pack_codes, packed_numel, unpack_codes
from ..quant.stochastic import stochastic_round

# Standard deviation of the zero-mean normal weight the tables minimise the error under. Measured
# over sigma in {1, 1.5, 2, 2.5, 3} on N(0, 1), N(0, 1.5^2) and BN-output-like inputs (per-channel
# gamma * z + beta, gamma log-uniform in [0.3, 3], beta ~ N(-0.5, 1)): 1.5 gave the lowest
# worst-case relative gradient error at 2 and 3 bits for nearly every activation and was within
# a few percent of the best at 4 bits; sigma 1 over-fits unit-variance inputs (sigmoid 4-bit error
# 0.074 on BN-like inputs vs 0.046), sigma >= 2 wastes levels on the tails (hardswish 3-bit 0.15
# vs 0.14).
WEIGHT_STD = 1.5
# The grid spans +-GRID_HALF_WIDTH with cells of 1/GRID_CELLS_PER_UNIT; the tails beyond it
# fold into the outer cells. Every integer is a cell edge, so discontinuities of f' (hardswish's
# at +-3, hard mish's at -2) can be boundaries exactly. 512 cells keep the O(k n^2) DP at
# ~0.15 s for 8 bits on one core; the grid costs nothing measurable up to 4-5 bits, and at 8 bits
# it, not the level count, sets the error (SiLU: 0.45 % relative; 0.23 % on a 3x finer grid).
GRID_HALF_WIDTH = 8
GRID_CELLS_PER_UNIT = 32
GRID_HALF_CELLS = GRID_HALF_WIDTH * GRID_CELLS_PER_UNIT
MAX_BITS = 8


def grid_edges() -> torch.Tensor:
    """The cell edges ``v / GRID_CELLS_PER_UNIT``, ``v = -GRID_HALF_CELLS..GRID_HALF_CELLS``
    (float64; integer numerators keep 0, +-1, +-3 exact edges, not 1e-16 off)."""
    v = torch.arange(-GRID_HALF_CELLS, GRID_HALF_CELLS + 1, dtype=torch.float64)
    return v / GRID_CELLS_PER_UNIT


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _hard_mish(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (x + 2).clamp(min=0, max=2)


# name -> f(x, *params), differentiated by autograd in float64 to get f'.
_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardswish": F.hardswish,
    "mish": F.mish,
    "elu": lambda x, alpha=1.0: F.elu(x, alpha),
    "softplus": lambda x, beta=1.0, threshold=20.0: F.softplus(x, beta, threshold),
    "quick_gelu": _quick_gelu,
    "hard_mish": _hard_mish,
}

DERIVATIVE_NAMES: tuple[str, ...] = tuple(_FUNCTIONS)


def derivative(name: str, x: torch.Tensor, params: tuple[float, ...] = ()) -> torch.Tensor:
    """The exact derivative ``f'(x)`` of activation ``name`` (torch's own convention at kinks).

    Args:
        name: one of ``DERIVATIVE_NAMES``.
        x: points to evaluate at (any float dtype).
        params: the activation's parameters in order (ELU ``alpha``; Softplus ``beta,
            threshold``); empty for the defaults.
    """
    fn = _function(name)
    with private_autograd():
        xx = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(xx, *params).sum(), xx)
    return grad


def _unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


def _detached(t: torch.Tensor) -> torch.Tensor:
    # (An output packed with its grad_fn would make a cycle through C++ that leaks.)
    return t.detach()


@contextlib.contextmanager
def private_autograd():
    """Grad mode on, with identity saved-tensor hooks innermost.

    A table built lazily during a model's forward (or a backward that reruns a forward) makes a
    small graph of its own; only the innermost hooks apply, so an enclosing hook (the fallback
    compressor, a memory meter) never sees, compresses or counts that graph's tensors.
    """
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_detached, _unchanged):
        yield


def _function(name: str) -> Callable[..., torch.Tensor]:
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"no few-bit derivative table for {name!r}; known: {', '.join(DERIVATIVE_NAMES)}"
        ) from None


def optimal_segments(
    values: torch.Tensor, weights: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a sequence into ``k`` contiguous runs minimising the weighted squared error.

    Exact dynamic programming, vectorised over the end point: ``D_j[i] = min_m D_{j-1}[m] +
    cost(m, i)``, where ``cost`` (the weighted variance of ``values[m:i]``) comes from prefix
    sums. O(k n^2) arithmetic, no Python loop over elements.

    Args:
        values: 1-D float tensor, the sequence to approximate.
        weights: 1-D non-negative weights, same length.
        k: number of runs (clamped to ``len(values)``).

    Returns:
        ``(starts, levels)``: the start index of runs 2..k (``k - 1`` increasing ints) and the
        weighted mean of each run (``k`` float64).
    """
    n = values.numel()
    k = max(1, min(k, n))
    v = values.to(torch.float64)
    w = weights.to(torch.float64)
    zero = v.new_zeros(1)
    s0 = torch.cat([zero, w.cumsum(0)])
    s1 = torch.cat([zero, (w * v).cumsum(0)])
    s2 = torch.cat([zero, (w * v * v).cumsum(0)])
    mass = s0[None, :] - s0[:, None]  # [m, i]: weight of values[m:i]
    first = s1[None, :] - s1[:, None]
    cost = (s2[None, :] - s2[:, None]) - first * first / mass.clamp_min(1e-300)
    # Costs are variances (>= 0); cancellation can leave tiny negatives. The sums themselves are
    # float64; the min-plus sweeps run in float32, which only ranks candidates.
    cost = cost.clamp_min(0).to(torch.float32)
    idx = torch.arange(n + 1)
    cost.masked_fill_(idx[:, None] >= idx[None, :], float("inf"))  # runs are never empty
    cost_by_end = cost.t().contiguous()  # [i, m]: reduce along contiguous memory
    rows = [cost[0]]  # rows[j][i]: least error of values[:i] in j + 1 runs
    scratch = torch.empty_like(cost_by_end)
    for _ in range(1, k):
        # amin is several times faster than min-with-indices; backtracking below recovers the
        # k - 1 split points from the stored rows at the cost of one vector each.
        rows.append(torch.add(cost_by_end, rows[-1], out=scratch).amin(dim=1))
    starts = []
    end = n
    for j in range(k - 1, 0, -1):
        end = int((rows[j - 1] + cost_by_end[end]).argmin())
        starts.append(end)
    starts.reverse()
    bounds = torch.tensor([0, *starts, n])
    run_mass = s0[bounds[1:]] - s0[bounds[:-1]]
    run_first = s1[bounds[1:]] - s1[bounds[:-1]]
    levels = run_first / run_mass.clamp_min(1e-300)
    return torch.tensor(starts, dtype=torch.long), levels


@functools.cache
def derivative_table(
    name: str, bits: int, params: tuple[float, ...] = (), weight_std: float = WEIGHT_STD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal ``2**bits``-level piecewise-constant approximation of an activation derivative.

    Minimises ``E[(f'(x) - c(x))**2]`` for ``x ~ N(0, weight_std**2)`` over boundaries
    ``t_1 < ... < t_{k-1}`` (on a grid of step ``1/GRID_CELLS_PER_UNIT``) and one constant per
    interval. Computed once per argument tuple (cached).

    Args:
        name: one of ``DERIVATIVE_NAMES`` (``silu``, ``gelu``, ``gelu_tanh``, ``sigmoid``,
            ``tanh``, ``hardswish``, ``mish``, ``elu``, ``softplus``, ``quick_gelu``,
            ``hard_mish``).
        bits: code width, 1..8 (``k = 2**bits`` levels).
        params: the activation's parameters (see ``derivative``).
        weight_std: standard deviation of the normal weight.

    Returns:
        ``(boundaries, levels)``: float32 CPU tensors of ``k - 1`` increasing boundaries and
        ``k`` levels. Element ``x`` has code ``torch.bucketize(x, boundaries)`` (interval
        ``(t_{i}, t_{i+1}]``) and derivative ``levels[code]``.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"derivative codes take 1..{MAX_BITS} bits, got {bits}")
    edges = grid_edges()
    centers = (edges[1:] + edges[:-1]) / 2
    # Each cell's probability mass; the outer cells also take the tails beyond the grid.
    cdf = torch.special.ndtr(edges / weight_std)
    cdf[0], cdf[-1] = 0.0, 1.0
    weights = cdf[1:] - cdf[:-1]
    values = derivative(name, centers, params)
    starts, levels = optimal_segments(values, weights, 2**bits)
    boundaries = edges[starts]
    return boundaries.to(torch.float32), levels.to(torch.float32)


# The range of f' is taken over +-40 (every tabled activation's derivative is within 1e-15 of
# its limit there) and the fine grid, so clamping a derivative into it adds no visible bias.
RANGE_HALF_WIDTH = 40.0


@functools.cache
def derivative_range(name: str, params: tuple[float, ...] = ()) -> tuple[float, float]:
    """``(min f', max f')`` of activation ``name``: the end levels of its unbiased codes."""
    wide = torch.linspace(-RANGE_HALF_WIDTH, RANGE_HALF_WIDTH, 8001, dtype=torch.float64)
    values = derivative(name, torch.cat([grid_edges(), wide]), params)
    values = values[values.isfinite()]
    return float(values.min()), float(values.max())


# The four code ops below are registered (``torch.library.custom_op`` with fake kernels): one
# opaque call each for torch.compile, output sizes from the element count and width alone.


@torch.library.custom_op("qbackprop::encode_derivative_unbiased", mutates_args=())
def _encode_unbiased(
    slope: torch.Tensor, name: str, bits: int, params: list[float]
) -> torch.Tensor:
    low, high = derivative_range(name, tuple(params))
    top = 2**bits - 1
    scale = top / (high - low) if high > low else 0.0
    u = (slope.reshape(-1).float() - low).mul_(scale).clamp_(0, top)
    return pack_codes(stochastic_round(u, top), bits)


@torch.library.custom_op("qbackprop::decode_derivative_unbiased", mutates_args=())
def _decode_unbiased(
    packed: torch.Tensor, n: int, name: str, bits: int, params: list[float]
) -> torch.Tensor:
    low, high = derivative_range(name, tuple(params))
    step = (high - low) / (2**bits - 1)
    return unpack_codes(packed, bits, n, torch.float32).mul_(step).add_(low)


@torch.library.custom_op("qbackprop::encode_derivative", mutates_args=())
def _encode(x: torch.Tensor, name: str, bits: int, params: list[float]) -> torch.Tensor:
    # The boundaries lie on the grid of step 1/GRID_CELLS_PER_UNIT, so the interval of x is a
    # table lookup at ceil(x * GRID_CELLS_PER_UNIT) (exact: a power-of-two scale), the same
    # code torch.bucketize gives, without its per-element binary search (5-10x slower on CPU).
    table = _grid_codes_on(name, bits, tuple(params), x.device)
    half = GRID_HALF_CELLS
    flat = x.reshape(-1)
    scaled = flat.double() if flat.dtype == torch.float64 else flat.float()
    cell = (scaled * GRID_CELLS_PER_UNIT).ceil_().clamp_(-half, half)
    cell.nan_to_num_(nan=half)  # NaN takes the top interval, as bucketize gives it
    return pack_codes(table[cell.to(torch.int32).add_(half)], bits)


@torch.library.custom_op("qbackprop::decode_derivative", mutates_args=())
def _decode(
    packed: torch.Tensor, n: int, name: str, bits: int, params: list[float]
) -> torch.Tensor:
    _, levels = _table_on(name, bits, tuple(params), packed.device)
    return levels[unpack_codes(packed, bits, n)]


@_encode_unbiased.register_fake
@_encode.register_fake
def _(x, name, bits, params):
    return x.new_empty(packed_numel(x.numel(), bits), dtype=torch.uint8)


@_decode_unbiased.register_fake
@_decode.register_fake
def _(packed, n, name, bits, params):
    return packed.new_empty(n, dtype=torch.float32)


def encode_derivative_unbiased(
    slope: torch.Tensor, name: str, bits: int, params: tuple[float, ...] = ()
) -> torch.Tensor:
    """Packed ``bits``-wide codes of the exact derivative ``slope``, rounded stochastically.

    The ``2**bits`` levels are spread evenly over ``[min f', max f']``, so every derivative lies
    between two of them and stochastic rounding between those two is unbiased:
    ``E[decode(code)] = slope``. (Levels placed by dynamic programming for the least variance
    under N(0, 1.5²) were measured 0-27 % better, 3 % for SiLU, and cost a search per element.)

    Args:
        slope: ``f'(x)`` of the exact input (any shape; flattened in the given order).
        name, bits, params: the activation (see ``derivative_range``).

    Returns:
        A uint8 tensor of ``ceil(slope.numel() * bits / 8)`` bytes.
    """
    _ready(name, bits, params, slope.device)
    return torch.ops.qbackprop.encode_derivative_unbiased(slope, name, bits, list(params))


def decode_derivative_unbiased(
    packed: torch.Tensor, n: int, name: str, bits: int, params: tuple[float, ...] = ()
) -> torch.Tensor:
    """The derivative level of each of ``n`` packed unbiased codes, as 1-D float32."""
    _ready(name, bits, params, packed.device)
    return torch.ops.qbackprop.decode_derivative_unbiased(packed, n, name, bits, list(params))


@functools.lru_cache(maxsize=256)
def _table_on(
    name: str, bits: int, params: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # One host-to-device copy per (table, device), not one per forward.
    boundaries, levels = derivative_table(name, bits, params)
    return boundaries.to(device), levels.to(device)


def encode_derivative(
    x: torch.Tensor, name: str, bits: int, params: tuple[float, ...] = ()
) -> torch.Tensor:
    """Packed ``bits``-wide interval codes of ``x`` (flattened in the given order).

    Args:
        x: exact activation input, any float dtype; it is read, never modified.
        name, bits, params: the table (see ``derivative_table``).

    Returns:
        A uint8 tensor of ``ceil(x.numel() * bits / 8)`` bytes.
    """
    _ready(name, bits, params, x.device)
    return torch.ops.qbackprop.encode_derivative(x, name, bits, list(params))


@functools.lru_cache(maxsize=256)
def _grid_codes_on(
    name: str, bits: int, params: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """Code of every grid point v/GRID_CELLS_PER_UNIT (v = -half..half): x in ((v-1)/g, v/g]
    has ``#boundaries < x = #boundaries < v/g``, i.e. ``bucketize(v/g)``."""
    boundaries, _ = derivative_table(name, bits, params)
    return torch.bucketize(grid_edges(), boundaries.double(), out_int32=True).to(device)


def decode_derivative(
    packed: torch.Tensor, n: int, name: str, bits: int, params: tuple[float, ...] = ()
) -> torch.Tensor:
    """The approximate derivative ``levels[code]`` of ``n`` packed codes, as 1-D float32."""
    _ready(name, bits, params, packed.device)
    return torch.ops.qbackprop.decode_derivative(packed, n, name, bits, list(params))


def _ready(name: str, bits: int, params: tuple[float, ...], device: torch.device) -> None:
    # The tables are built by autograd in float64, which cannot run inside an op's kernel
    # (below the autograd key): build them here, before the call. Under torch.compile the
    # conversion already built them (``prepare``) and this is skipped, not traced.
    if runtime.prepares():
        prepare(name, bits, tuple(params), device)


def prepare(name: str, bits: int, params: tuple[float, ...], device: torch.device) -> None:
    """Build the tables of one activation and width on ``device`` now (at conversion), so
    that no training step pays the search or its host reads."""
    derivative_range(name, params)
    derivative_table(name, bits, params)
    _table_on(name, bits, params, device)
    _grid_codes_on(name, bits, params, device)
