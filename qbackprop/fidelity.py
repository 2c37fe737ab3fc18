"""Gradient fidelity: the compression's gradient noise on one batch over fp32 SGD noise."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FAMILIES, LayerRule, QuantConfig, as_quant_config
from .schema import Problem
from .surgery import ConversionRow, conversion_report, convert_model

GROUP_BY = ("family", "block", "layer")
TOTAL_THRESHOLD = 1.0  # the total may add at most the noise SGD already has
GROUP_THRESHOLD = 0.25  # a group alone adding a quarter of it is worth a line
MAX_GROUP_DRAWS = 4  # per group: bounds the cost of by="layer" on deep models
MAX_SUGGESTED_BITS = 8
FALLBACK = "fallback"
MIXED = "mixed"
# Every converted layer kept exact (bits 32): only the fallback hooks compress.
_FULL_PRECISION = LayerRule("*", overrides={"bits": 32, "mix_bits": None, "mix_prob": None})

Batch = tuple[torch.Tensor, torch.Tensor]
Keep = Callable[[nn.Module, str], bool] | None


@dataclass(frozen=True)
class FidelityRow:
    """One group's ratio when only that group is compressed.

    Args:
        name: the family, block (``blocks.3``) or layer name, or ``fallback``.
        family: the group's layer family, ``mixed`` for a block of several, or ``fallback``.
        ratio: the group's compression variance over the fp32 minibatch variance.
    """

    name: str
    family: str
    ratio: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "ratio": _finite(self.ratio)}


@dataclass(frozen=True)
class FidelityReport:
    """What :func:`measure_fidelity` found.

    Args:
        ratio: E||g_q - g||^2 over the draws / fp32 minibatch variance (below 1: compression
            adds less noise than SGD already has).
        bias: ||mean_k g_q - g|| / ||g||, the relative error of the mean of ``draws`` draws.
        ideal_bias: the single-draw relative error / sqrt(draws): what ``bias`` would be for
            an unbiased estimator.
        draws: K, the stochastic draws of the total.
        groups: one row per family, block or layer (see ``by``).
        verdict: warning lines, or one ``ok:`` line.
        minibatch_variance: mean over minibatches of ||g_b - mean_b g_b||^2 at fp32.
        by: how ``groups`` are formed (``family``, ``block`` or ``layer``).
    """

    ratio: float
    bias: float
    ideal_bias: float
    draws: int
    groups: tuple[FidelityRow, ...]
    verdict: tuple[str, ...]
    minibatch_variance: float
    by: str = "family"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (non-finite numbers become None)."""
        return {
            "ratio": _finite(self.ratio),
            "bias": _finite(self.bias),
            "ideal_bias": _finite(self.ideal_bias),
            "draws": self.draws,
            "minibatch_variance": _finite(self.minibatch_variance),
            "by": self.by,
            "groups": [row.as_dict() for row in self.groups],
            "verdict": list(self.verdict),
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- gradients ----------------------------------------------------------------------------------


def flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cross-entropy gradient of every trainable parameter as one float64 vector."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    # an unused parameter counts as a zero gradient, so every model's vector lines up
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return torch.cat([g.flatten() for g in grads]).double()


def measurement_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode (no dropout) except BatchNorm, which uses batch statistics as in
    training: the exact gradient is then a fixed target and only the compression is random."""
    model = copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    return model


def _converted(model: nn.Module, cfg: QuantConfig, keep: Keep = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nothing to convert.*")
        return convert_model(measurement_copy(model), cfg, filter_fn=keep)


def _minibatch_variance(model: nn.Module, batches: Sequence[Batch], step) -> float:
    total = sq = None
    for x, y in batches:
        g = flat_grad(model, x, y)
        total = g if total is None else total + g
        sq = g.square().sum() if sq is None else sq + g.square().sum()
        step()
    n = len(batches)
    # mean ||g_b - mean g||^2 = mean ||g_b||^2 - ||mean g||^2, accumulated in float64
    return max(float(sq / n - (total / n).square().sum()), 0.0)


def _compression_noise(
    model: nn.Module, batch: Batch, exact: torch.Tensor, draws: int, step
) -> tuple[float, torch.Tensor]:
    """(mean over draws of ||g_q - g||^2, mean of the draws) on one batch."""
    x, y = batch
    flat_grad(model, x, y)  # the first step learns which outputs are shared: not counted
    step()
    sq, mean = 0.0, torch.zeros_like(exact)
    for _ in range(draws):
        g = flat_grad(model, x, y)
        sq += float((g - exact).square().sum())
        mean += g / draws
        step()
    return sq / draws, mean


# --- groups ---------------------------------------------------------------------------------------


def _block_of(containers: set[str], name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in containers else parts[0]


def _grouped(model: nn.Module, rows: Sequence[ConversionRow], by: str) -> dict[str, list]:
    """Converted rows by family (registry order), block or layer (model order)."""
    converted = [r for r in rows if r.converted]
    if by == "family":
        return {f: [r for r in converted if r.family == f] for f in FAMILIES}
    if by == "layer":
        return {r.name: [r] for r in converted}
    containers = {
        n for n, m in model.named_children() if isinstance(m, (nn.Sequential, nn.ModuleList))
    }
    groups: dict[str, list] = {}
    for row in converted:
        groups.setdefault(_block_of(containers, row.name), []).append(row)
    return groups


def _keep(rows: Sequence[ConversionRow]) -> Keep:
    names = {"" if r.name == "<root>" else r.name for r in rows}
    return lambda module, name: name in names


def _group_jobs(
    model: nn.Module, cfg: QuantConfig, rows: Sequence[ConversionRow], by: str
) -> list[tuple[str, str, list, QuantConfig, Keep]]:
    """(name, family, members, config, filter_fn) per group: only the members compress."""
    alone = dataclasses.replace(cfg, fallback=False)
    jobs = []
    for name, members in _grouped(model, rows, by).items():
        if members:
            families = {r.family for r in members}
            family = families.pop() if len(families) == 1 else MIXED
            jobs.append((name, family, members, alone, _keep(members)))
    if cfg.fallback and cfg.default.enabled:
        # the layers the total converts stay converted (their tensors are theirs, not the
        # fallback's) but exact; the rest is what the fallback hooks compress in the total
        only = dataclasses.replace(cfg, layers=(_FULL_PRECISION, *cfg.layers), allow_unmatched=True)
        jobs.append((FALLBACK, FALLBACK, [], only, _keep([r for r in rows if r.converted])))
    return jobs


# --- verdict --------------------------------------------------------------------------------------


def _pattern(name: str, members: Sequence[ConversionRow], by: str) -> str:
    if by == "family":
        return f'match: "*", type: [{name}]'
    names = {r.name for r in members}
    if names == {name}:
        return f'match: "{name}"'
    return f'match: "{name}*"' if name in names else f'match: "{name}.*"'


def _advice(name: str, members: Sequence[ConversionRow], by: str) -> str:
    if name == FALLBACK:
        return "try fallback: false, or a larger fallback_min_numel"
    bits = min((r.spec.bits for r in members if r.spec is not None and r.spec.enabled), default=32)
    rule = _pattern(name, members, by)
    if bits >= MAX_SUGGESTED_BITS:
        return f"try keeping it exact (first rule in quant.layers: {{{rule}, enabled: false}})"
    more = min(2 * bits, MAX_SUGGESTED_BITS)
    return f"try bits: {more} there (first rule in quant.layers: {{{rule}, bits: {more}}})"


def _verdict(ratio: float, rows: Sequence[FidelityRow], members: dict, by: str) -> list[str]:
    lines = []
    if not ratio <= TOTAL_THRESHOLD:  # NaN included
        lines.append(
            f"warning: compression adds {ratio:.2g}x the SGD noise in total (more than SGD "
            "already has); raise bits where the lines below say, or quant.default.bits"
        )
    for row in sorted(rows, key=lambda r: -r.ratio if math.isfinite(r.ratio) else -math.inf):
        if not row.ratio <= GROUP_THRESHOLD:
            label = row.name if row.family in (row.name, MIXED) else f"{row.name} {row.family}"
            lines.append(
                f"warning: {label} alone {row.ratio:.2g}x the SGD noise; "
                + _advice(row.name, members[row.name], by)
            )
    return lines or [f"ok: compression adds {ratio:.2g}x the SGD noise"]


# --- the measurement ------------------------------------------------------------------------------


def _on(device: torch.device, batches: Sequence[Batch]) -> list[Batch]:
    return [(x.to(device), y.to(device)) for x, y in batches]


def _variance_batches(batches: list[Batch], chosen: list[Batch] | None) -> list[Batch]:
    if not batches:
        raise ValueError("measure_fidelity needs at least one batch (and 2 for the variance)")
    if chosen is None:
        chosen = batches[1:] if len(batches) > 2 else batches
    if len(chosen) < 2:
        raise ValueError(
            f"measure_fidelity needs at least 2 batches for the fp32 minibatch variance, got "
            f"{len(chosen)}; pass more batches (e.g. batch 0 plus 16 minibatches)"
        )
    return chosen


def measure_fidelity(
    model: nn.Module,
    cfg: QuantConfig | dict | str | Path,
    batches: Sequence[Batch],
    *,
    draws: int = 8,
    by: str | None = "family",
    minibatch_batches: Sequence[Batch] | None = None,
    progress: bool = False,
) -> FidelityReport:
    """How much gradient noise the compression of ``cfg`` adds, relative to SGD's own.

    The exact gradient g is taken on ``batches[0]`` with the fp32 model; the converted model
    (after one uncounted warm-up step, in which sharing is learned) draws ``draws`` gradients
    g_q on the same batch. ``ratio`` = mean ||g_q - g||^2 / the fp32 variance of minibatch
    gradients. Then each group (family, block or layer) is measured alone, everything else
    uncompressed, with min(draws, 4) draws. Dropout is off and BatchNorm uses batch
    statistics throughout, so only the compression is random.

    Args:
        model: an unconverted fp32 model; it is deep-copied, never modified.
        cfg: a QuantConfig, a ``quant:`` dict, a YAML path or a preset name.
        batches: ``(images, labels)`` classification batches (cross-entropy loss).
        draws: stochastic draws K of the converted model's gradient.
        by: ``family``, ``block`` (``blocks.3``, ``layer2.0``, ``conv_stem``) or ``layer``;
            None measures the total only (no groups).
        minibatch_batches: batches for the fp32 variance; default ``batches[1:]`` (all of
            ``batches`` when only two are given).
        progress: show a tqdm bar.

    Returns:
        The total ratio and bias, one row per group, and the verdict lines.

    Raises:
        ValueError: fewer than 2 batches for the variance, identical minibatch gradients,
            ``draws`` < 1 or an unknown ``by``.
        ConfigError: ``cfg`` is invalid or its rules match no module of ``model``.
    """
    if by is not None and by not in GROUP_BY:
        raise ValueError(str(Problem("by", by, f"one of {', '.join(GROUP_BY)}")))
    if draws < 1:
        raise ValueError(str(Problem("draws", draws, ">= 1")))
    cfg = as_quant_config(cfg)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = _on(device, batches)
    variance_batches = _variance_batches(
        batches, None if minibatch_batches is None else _on(device, minibatch_batches)
    )

    total_model = _converted(model, cfg)
    rows = conversion_report(total_model)
    jobs = _group_jobs(model, cfg, rows, by) if by is not None else []
    group_draws = min(draws, MAX_GROUP_DRAWS)
    work = len(variance_batches) + 1 + (1 + draws) + len(jobs) * (1 + group_draws)
    with tqdm(total=work, desc="gradient fidelity", disable=not progress, leave=False) as bar:
        step = bar.update
        fp32 = measurement_copy(model)
        variance = _minibatch_variance(fp32, variance_batches, step)
        if variance == 0.0:
            raise ValueError(
                "the fp32 gradients of all minibatches are identical; pass different batches"
            )
        exact = flat_grad(fp32, *batches[0])
        step()
        del fp32
        noise, mean = _compression_noise(total_model, batches[0], exact, draws, step)
        del total_model
        groups = []
        for name, family, _, group_cfg, keep in jobs:
            group_noise, _ = _compression_noise(
                _converted(model, group_cfg, keep), batches[0], exact, group_draws, step
            )
            groups.append(FidelityRow(name, family, group_noise / variance))

    norm = float(exact.norm())
    ratio = noise / variance
    members = {name: group_members for name, _, group_members, _, _ in jobs}
    return FidelityReport(
        ratio=ratio,
        bias=float((mean - exact).norm()) / norm if norm else math.nan,
        ideal_bias=math.sqrt(noise) / norm / math.sqrt(draws) if norm else math.nan,
        draws=draws,
        groups=tuple(groups),
        verdict=tuple(_verdict(ratio, groups, members, by)),
        minibatch_variance=variance,
        by=by,
    )
