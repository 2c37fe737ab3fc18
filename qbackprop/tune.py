"""Per-layer bit widths from measured sensitivity under a memory budget (``qbackprop tune``).

Model (GACT's): the gradient noise a layer adds at ``b`` bits is ``C_l · 2^(−2b)``, the layers'
noises add up, and a layer's saved bytes at ``b`` bits are what ``measure_saved_activations``
attributes to it when every layer runs at ``b`` (measured for b = 1..8, not computed). ``C_l``
is measured: each layer alone compressed at ``probe_bits`` (everything else exact), a few
stochastic draws of the gradient on one real batch, ``C_l = E||g_q − g||² · 2^(2·probe_bits)``.

The solver minimises ``Σ C_l 2^(−2 b_l)`` under ``Σ bytes_l(b_l) ≤ budget``. Between two integer
widths a layer can use a two-bit mix (``bits=k, mix_bits=k+1, mix_prob=p``), whose bytes and
expected noise are linear in ``p``; the relaxed problem is then convex and separable, and
taking the steps ``k → k+1`` in order of noise removed per byte added is optimal, the last one
fractional (one mixed layer, the budget met exactly). Since layers share saved tensors
(a BatchNorm's x̂ serves its consumer), the bytes of a mixed-width model differ a little from
the sum of the uniform ones: the tuned model is measured and the budget corrected, at most
``MAX_ROUNDS`` times, until the measured bytes are within ``BYTES_TOLERANCE`` of the budget.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig, as_quant_config
from .errors import QbackpropUserError
from .fidelity import Batch, flat_grad, measure_fidelity, measurement_copy
from .memory import measure_saved_activations
from .planner import converted_layers, replan
from .quant import QuantSpec
from .schema import Problem
from .surgery import conversion_report, convert_model

MIN_BITS, MAX_BITS = 1, 8
PROBE_BITS = 2
BYTES_TOLERANCE = 0.02
MAX_ROUNDS = 4
MiB = 2**20


@dataclass(frozen=True)
class Budget:
    """A memory budget: ``bits`` (average bits per saved fp32 element), ``ratio`` (times
    fewer bytes than fp32) or ``mib`` (MiB of saved activations at the batch measured)."""

    kind: str
    value: float

    def bytes(self, fp32_bytes: int, fp32_elements: int) -> float:
        """The budget in bytes, for a model that saves ``fp32_bytes`` at fp32."""
        if self.kind == "bits":
            return self.value * fp32_elements / 8
        if self.kind == "ratio":
            return fp32_bytes / self.value
        return self.value * MiB

    def __str__(self) -> str:
        return {
            "bits": f"{self.value:g} bits",
            "ratio": f"{self.value:g}x",
            "mib": f"{self.value:g} MiB",
        }[self.kind]


_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(x|mib)?\s*$", re.IGNORECASE)


def parse_budget(text: str | float) -> Budget:
    """``"2.1"`` (average bits), ``"15x"`` (ratio to fp32) or ``"24MiB"``.

    Raises:
        ValueError: anything else, or a non-positive value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    match = _BUDGET.match(str(text))
    if match is None or float(match.group(1)) <= 0:
        expected = "average bits per element (2.1), a ratio to fp32 (15x) or MiB of saved "
        raise ValueError(str(Problem("--budget", text, expected + "activations (24MiB)")))
    value, unit = float(match.group(1)), (match.group(2) or "").lower()
    return Budget({"": "bits", "x": "ratio", "mib": "mib"}[unit], value)


@dataclass(frozen=True)
class LayerChoice:
    """What the solver gave one layer."""

    name: str
    family: str
    bits: int
    mix_bits: int | None
    mix_prob: float | None
    sensitivity: float  # its gradient noise alone at PROBE_BITS
    predicted_bytes: float
    predicted_noise: float

    @property
    def average_bits(self) -> float:
        return self.bits + (self.mix_prob or 0.0) * ((self.mix_bits or self.bits) - self.bits)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"average_bits": self.average_bits}


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found: the config and the figures to judge it by.

    ``predicted_*`` come from the per-layer model, ``measured_*`` from the tuned model itself
    (``measure_saved_activations``, ``measure_fidelity``); ``uniform_ratio`` is the measured
    variance ratio of the uniform spec at ``uniform_bits`` (the nearest uniform width to the
    budget), for comparison.
    """

    config: QuantConfig
    budget: Budget
    budget_bytes: float
    fp32_bytes: int
    predicted_bytes: float
    measured_bytes: int
    predicted_ratio: float
    measured_ratio: float | None
    layers: tuple[LayerChoice, ...]
    note: str = ""

    def to_yaml_dict(self) -> dict[str, Any]:
        """The ``quant:`` section that ``convert``, ``train`` and ``fidelity`` accept."""
        return self.config.to_dict()

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget": str(self.budget),
            "budget_bytes": self.budget_bytes,
            "fp32_bytes": self.fp32_bytes,
            "predicted_bytes": self.predicted_bytes,
            "measured_bytes": self.measured_bytes,
            "predicted_ratio": self.predicted_ratio,
            "measured_ratio": self.measured_ratio,
            "note": self.note,
            "layers": [c.as_dict() for c in self.layers],
            "quant": self.to_yaml_dict(),
        }


# --- measurements ---------------------------------------------------------------------------


def _uniform(cfg: QuantConfig, bits: int) -> QuantConfig:
    spec = cfg.default.replace(bits=bits, mix_bits=None, mix_prob=None)
    return dataclasses.replace(cfg, default=spec, layers=())


def _convert(model: nn.Module, cfg: QuantConfig, example) -> nn.Module:
    with warnings.catch_warnings():
        # Probe copies of one model: its "nothing to convert" would repeat for every copy.
        warnings.filterwarnings("ignore", message=".*nothing to convert.*")
        return convert_model(measurement_copy(model), cfg, example_input=example)


def layer_bytes(
    model: nn.Module, cfg: QuantConfig, x: torch.Tensor, widths: Sequence[int]
) -> tuple[dict[str, dict[int, int]], dict[str, int], int]:
    """Measured saved bytes per layer (the module running when a tensor was saved) at each
    uniform width.

    Returns:
        ``{layer: {bits: bytes}}``, ``{layer: fp32 saved elements}`` and the fp32 bytes.
    """
    table: dict[str, dict[int, int]] = {}
    elements: dict[str, int] = {}
    fp32 = 0
    for bits in widths:
        converted = _convert(model, _uniform(cfg, bits), x[:2])
        report = measure_saved_activations(converted, x)
        fp32 = report.fp32_bytes
        for row in report.rows:
            table.setdefault(row.name, {})[bits] = row.stored_bytes
            elements[row.name] = row.elements
    return table, elements, fp32


def _set_only(model: nn.Module, names: Sequence[str], name: str | None, spec: QuantSpec) -> None:
    # Through the planner, as every plan is made (no forward: the structure is known).
    replan(model, {other: spec if other == name else None for other in names})


def sensitivities(
    model: nn.Module,
    cfg: QuantConfig,
    batch: Batch,
    names: Sequence[str],
    *,
    draws: int = 2,
    probe_bits: int = PROBE_BITS,
    progress: bool = False,
) -> dict[str, float]:
    """Each layer's gradient noise ``E||g_q − g||²`` alone at ``probe_bits`` (the rest exact)."""
    x, y = batch
    # The fallback off: its own stochastic rounding would be noise in every draw.
    cfg = dataclasses.replace(cfg, fallback=False)
    converted = _convert(model, _uniform(cfg, probe_bits), x[:2])
    # every converted layer, not only the measured ones: a layer left at the probe spec would
    # add its noise to every measurement
    layers = list(converted_layers(converted))
    spec = _uniform(cfg, probe_bits).default
    _set_only(converted, layers, None, spec)
    exact = flat_grad(converted, x, y)
    out = {}
    for name in tqdm(names, desc="layer sensitivity", disable=not progress, leave=False):
        _set_only(converted, layers, name, spec)
        noise = sum(
            float((flat_grad(converted, x, y) - exact).square().sum()) for _ in range(draws)
        )
        out[name] = noise / draws
    return out


# --- the solver -----------------------------------------------------------------------------


def _bytes_at(table: dict[int, int], bits: float) -> float:
    low = math.floor(bits)
    if low >= MAX_BITS:
        return float(table[MAX_BITS])
    frac = bits - low
    return table[low] + frac * (table[low + 1] - table[low])


def noise_table(
    probe_noise: float, bytes_at: dict[int, int], elements: int, probe_bits: int = PROBE_BITS
) -> dict[int, float]:
    """A layer's predicted noise at each width from its noise at ``probe_bits``.

    GACT's ``C·2^(−2b)`` with ``b`` the width the layer really stores, read off its measured
    bytes: a BatchNorm's x̂ grows two bits per bit of spec (noise ÷16), a ReLU's 1-bit mask and
    a classifier input held at 8 bits do not grow at all (noise unchanged).
    """
    per_bit = max(elements, 1) / 8
    # clamped: a layer whose saved elements are few next to its bytes (metadata) stays finite
    return {
        k: probe_noise * 4.0 ** min(max(-(bytes_at[k] - bytes_at[probe_bits]) / per_bit, -40), 40)
        for k in bytes_at
    }


def _noise_at(table: dict[int, float], bits: float) -> float:
    low = math.floor(bits)
    if low >= MAX_BITS:
        return table[MAX_BITS]
    frac = bits - low
    return (1 - frac) * table[low] + frac * table[low + 1]


def solve(
    noise: dict[str, dict[int, float]], table: dict[str, dict[int, int]], budget_bytes: float
) -> dict[str, float]:
    """Average bits per layer (1..8, one layer fractional) minimising the summed noise.

    Raises:
        ValueError: the budget is below every layer at 1 bit.
    """
    bits = {name: float(MIN_BITS) for name in noise}
    used = sum(table[name][MIN_BITS] for name in bits)
    if used > budget_bytes:
        raise ValueError(
            f"the budget ({budget_bytes / MiB:.3f} MiB) is below every layer at {MIN_BITS} bit "
            f"({used / MiB:.3f} MiB)"
        )
    steps = []  # (noise removed per byte, name, k): convex, so each layer's steps come in order
    for name, n in noise.items():
        for k in range(MIN_BITS, MAX_BITS):
            cost = table[name][k + 1] - table[name][k]
            gain = n[k] - n[k + 1]
            steps.append((gain / cost if cost > 0 else math.inf, name, k, max(cost, 0)))
    steps.sort(key=lambda s: (-s[0], s[2]))
    for _, name, k, cost in steps:
        if bits[name] != k:  # an earlier step of this layer was cut short
            continue
        room = budget_bytes - used
        if cost <= room:
            bits[name], used = k + 1.0, used + cost
        else:
            if room > 0:
                bits[name] = k + room / cost
            break
    return bits


def _choices(bits, sensitivity, noise, table, family) -> list[LayerChoice]:
    out = []
    for name, b in bits.items():
        low = int(math.floor(b + 1e-9))
        frac = b - low
        mixed = frac > 1e-3 and low < MAX_BITS
        out.append(
            LayerChoice(
                name,
                family[name],
                low,
                low + 1 if mixed else None,
                round(frac, 4) if mixed else None,
                sensitivity[name],
                _bytes_at(table[name], b),
                _noise_at(noise[name], b),
            )
        )
    return out


def _config(cfg: QuantConfig, choices: Sequence[LayerChoice]) -> QuantConfig:
    rules = []
    for c in choices:
        rule = {"match": c.name, "bits": c.bits}
        if c.mix_bits is not None:
            rule |= {"mix_bits": c.mix_bits, "mix_prob": c.mix_prob}
        else:
            rule |= {"mix_bits": None, "mix_prob": None}
        rules.append(rule)
    raw = cfg.to_dict()
    raw["layers"] = rules + raw.get("layers", [])
    return QuantConfig.from_dict(raw, source="tune")


# --- the verb -------------------------------------------------------------------------------


def tune(
    model: nn.Module,
    cfg: QuantConfig | dict | str | Path,
    batches: Sequence[Batch],
    budget: Budget | str | float,
    *,
    draws: int = 1,
    fidelity_draws: int = 4,
    progress: bool = False,
) -> TuneResult:
    """Per-layer bits (and one two-bit mix) for ``model`` that fit ``budget``.

    Args:
        model: an unconverted fp32 model (deep-copied, never modified), trained a little:
            sensitivities of a random model say little about a trained one.
        cfg: the base config (its default's rounding, buckets, scale are kept).
        batches: real ``(images, labels)`` batches; ``batches[0]`` is measured, the rest give
            the fp32 minibatch variance of the final check (at least 2 in all).
        budget: average bits (``2.1``), ``"15x"`` or ``"24MiB"`` (see :func:`parse_budget`).
        draws: stochastic draws per layer for its sensitivity (1: efficientnetv2_rw_t tunes in
            under 4 minutes on 2 CPU cores, and 2 draws gave the same ratio within noise).
        fidelity_draws: draws of the tuned model's measured variance ratio (0: not measured).
        progress: tqdm bars.

    Raises:
        QbackpropUserError: a budget that no width can meet (below 1 bit everywhere).
    """
    cfg = as_quant_config(cfg)
    budget = parse_budget(budget) if not isinstance(budget, Budget) else budget
    x = batches[0][0]
    widths = list(range(MIN_BITS, MAX_BITS + 1))
    table, elements, fp32_bytes = layer_bytes(model, cfg, x, widths)
    budget_bytes = budget.bytes(fp32_bytes, sum(elements.values()))
    if budget_bytes >= fp32_bytes:
        off = QuantConfig.from_dict({"default": {"bits": 32}}, source="tune")
        note = (
            f"the budget ({budget_bytes / MiB:.2f} MiB) is not below fp32 "
            f"({fp32_bytes / MiB:.2f} MiB): nothing is converted"
        )
        return TuneResult(off, budget, budget_bytes, fp32_bytes, fp32_bytes, fp32_bytes, 0.0,
                          0.0, (), note)  # fmt: skip
    probe = _convert(model, _uniform(cfg, PROBE_BITS), x[:2])
    rows = [r for r in conversion_report(probe) if r.converted]
    family = {r.name: r.family for r in rows}
    # A layer whose bytes do not change with the width (a ReLU's 1-bit mask, a classifier
    # input held at 8 bits, a consumer rebuilding its input from a shared producer) has
    # nothing to tune: it follows the default.
    tuned = [n for n in family if n in table and len(set(table[n].values())) > 1]
    fixed = sum(table[n][PROBE_BITS] for n in table if n not in tuned)
    sens = sensitivities(model, cfg, batches[0], tuned, draws=draws, progress=progress)
    sub = {n: table[n] for n in tuned}
    noise = {n: noise_table(sens[n], sub[n], elements[n]) for n in tuned}
    target = budget_bytes - fixed
    try:
        bits = solve(noise, sub, target)
    except ValueError:
        least = fixed + sum(sub[n][MIN_BITS] for n in tuned)
        n_elements = sum(elements.values())
        raise QbackpropUserError(
            f"--budget {budget} ({budget_bytes / MiB:.3f} MiB) cannot be met: every layer at "
            f"{MIN_BITS} bit still keeps {least / MiB:.3f} MiB ({8 * least / n_elements:.2f} "
            f"bits per element, {fp32_bytes / least:.1f}x less than fp32); ask for at least that"
        ) from None
    for _ in range(MAX_ROUNDS):
        choices = _choices(bits, sens, noise, sub, family)
        tuned_cfg = _config(cfg, choices)
        measured = measure_saved_activations(_convert(model, tuned_cfg, x[:2]), x).stored_bytes
        if abs(measured - budget_bytes) <= BYTES_TOLERANCE * budget_bytes:
            break
        target *= budget_bytes / measured  # sharing made the sum of layers off: correct it
        try:
            bits = solve(noise, sub, target)
        except ValueError:
            break
    predicted = sum(c.predicted_bytes for c in choices) + fixed
    variance = None
    if fidelity_draws and len(batches) >= 2:
        rep = measure_fidelity(model, tuned_cfg, batches, draws=fidelity_draws, by=None)
        variance = rep.ratio
        scale = rep.minibatch_variance
    else:
        scale = float("nan")
    predicted_ratio = sum(c.predicted_noise for c in choices) / scale if scale else math.nan
    return TuneResult(
        tuned_cfg,
        budget,
        budget_bytes,
        fp32_bytes,
        predicted,
        measured,
        predicted_ratio,
        variance,
        tuple(choices),
    )
