"""Sweeps: bit-width / rounding / bucket / mix grids and the per-block sensitivity study, K seeds
each, one run directory per run, and a summary.csv of mean and std across seeds."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qbackprop.blocks import block_namer
from qbackprop.config import LayerRule, QuantConfig
from qbackprop.errors import ConfigError
from qbackprop.quant import QuantSpec
from qbackprop.schema import Problem
from qbackprop.surgery import conversion_report, convert_model

from .checkpoint import CHECKPOINT_NAME
from .config import RunConfig
from .engine import train
from .metrics import read_metrics
from .rundir import write_config

SUMMARY_NAME = "summary.csv"
RUNS_NAME = "runs.csv"
SETTING_COLUMNS = ("bits", "rounding", "bucket_size", "mix_bits", "mix_prob", "layer")
RUN_COLUMNS = (
    "name",
    "group",
    "seed",
    *SETTING_COLUMNS,
    "run_dir",
    "final_test_acc",
    "best_test_acc",
    "saved_activation_bytes",
    "fp32_activation_bytes",
    "step_time_s",
)
SUMMARY_COLUMNS = (
    "group",
    *SETTING_COLUMNS,
    "seeds",
    "final_acc_mean",
    "final_acc_std",
    "best_acc_mean",
    "best_acc_std",
    "saved_bytes_mean",
    "saved_bytes_std",
    "fp32_bytes",
    "memory_ratio",
    "step_time_s_mean",
)
FP32 = "fp32"


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    Args:
        group: the setting without the seed (runs of one group are averaged).
        seed: ``train.seed`` of this run.
        settings: bits, rounding, bucket_size, mix_bits, mix_prob, layer (None when n/a).
        config: the run's full config.
    """

    group: str
    seed: int
    settings: Mapping[str, Any]
    config: RunConfig

    @property
    def name(self) -> str:
        return f"{self.group}-seed{self.seed}"


def _spec_name(spec: QuantSpec) -> str:
    if not spec.enabled:
        return FP32
    name = f"b{spec.bits}-{spec.rounding.value}-bs{spec.bucket_size}"
    if spec.mix_bits is not None:
        name += f"-mix{spec.mix_bits}p{spec.mix_prob:g}"
    return name


def _settings(spec: QuantSpec, layer: str | None = None) -> dict[str, Any]:
    if not spec.enabled:
        return {
            "bits": 32,
            "rounding": None,
            "bucket_size": None,
            "mix_bits": None,
            "mix_prob": None,
            "layer": layer,
        }
    return {
        "bits": spec.bits,
        "rounding": spec.rounding.value,
        "bucket_size": spec.bucket_size,
        "mix_bits": spec.mix_bits,
        "mix_prob": spec.mix_prob,
        "layer": layer,
    }


def _with_seeds(
    config: RunConfig, groups: list[tuple[str, dict, RunConfig]], seeds: int
) -> list[SweepRun]:
    runs = []
    for group, settings, group_config in groups:
        for k in range(seeds):
            seed = config.train.seed + k
            train = dataclasses.replace(group_config.train, seed=seed)
            runs.append(SweepRun(group, seed, settings, group_config.replace(train=train)))
    return runs


def _check_seeds(seeds: int) -> None:
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError([Problem("--seeds", seeds, "an int >= 1")])


def plan_bit_sweep(
    config: RunConfig,
    *,
    bits: Sequence[int] | None = None,
    rounding: Sequence[str] | None = None,
    bucket_size: Sequence[int | str] | None = None,
    mix_prob: Sequence[float] | None = None,
    mix_bits: int | None = None,
    seeds: int = 1,
) -> list[SweepRun]:
    """Every combination of the given values of ``quant.default``, ``seeds`` times each.

    An axis left as None keeps the config's value. Combinations that are the same setting
    (e.g. bits 32 with either rounding: no quantization) run once.

    Args:
        config: the base run config.
        bits: e.g. ``[1, 2, 4, 8, 32]``.
        rounding: subset of ``["nearest", "stochastic"]``.
        bucket_size: e.g. ``[64, 512]`` or ``["tensor"]``.
        mix_prob: probabilities of ``mix_bits`` per bucket (a constant, replacing any
            ``train.mix_prob_schedule``).
        mix_bits: the second bit-width for ``mix_prob``; defaults to ``quant.default.mix_bits``.
        seeds: runs per combination, with seeds ``train.seed``, ``train.seed + 1``, ...

    Raises:
        ConfigError: every invalid value at once, naming the option.
    """
    _check_seeds(seeds)
    base = config.quant.default
    mix_bits = mix_bits if mix_bits is not None else base.mix_bits
    if mix_prob is not None and mix_bits is None:
        raise ConfigError(
            "--mix-prob needs a second bit-width: give --mix-bits or quant.default.mix_bits"
        )
    axes = {
        "bits": bits or [base.bits],
        "rounding": rounding or [base.rounding.value],
        "bucket_size": bucket_size or [base.bucket_size],
        "mix_prob": mix_prob if mix_prob is not None else [base.mix_prob],
    }
    groups, problems = {}, []
    for values in itertools.product(*axes.values()):
        changes = dict(zip(axes, values, strict=True))
        if changes["mix_prob"] is not None:
            changes["mix_bits"] = mix_bits
        try:
            spec = base.replace(**changes)
        except ValueError as exc:
            problems.append(f"sweep setting {changes}: {exc}")
            continue
        train = config.train
        if mix_prob is not None:
            train = dataclasses.replace(train, mix_prob_schedule=None)
        quant = dataclasses.replace(config.quant, default=spec)
        groups.setdefault(
            _spec_name(spec), (_settings(spec), config.replace(quant=quant, train=train))
        )
    if problems:
        raise ConfigError(problems)
    return _with_seeds(config, [(g, s, c) for g, (s, c) in groups.items()], seeds)


def discover_blocks(config: RunConfig) -> dict[str, list[str]]:
    """The model's blocks (stem, blocks.N, head, classifier) → the module-name prefixes in each.

    Args:
        config: builds the model; every module qbackprop can convert is assigned a block.
    """
    model = config.model.build()
    with warnings.catch_warnings():
        # Only the layer names are read: no warning about this throwaway conversion matters.
        warnings.filterwarnings("ignore", message="convert_model:")
        convert_model(model, QuantConfig(default=QuantSpec(bits=2)), tune_allocator=False)
    namer = block_namer(model)
    blocks: dict[str, list[str]] = {}
    for row in conversion_report(model):
        name = "" if row.name == "<root>" else row.name
        block = namer(name)
        parts = name.split(".")
        # the outermost module of this block containing the layer: one rule covers its subtree
        prefix = next(
            (
                ".".join(parts[:i])
                for i in range(1, len(parts) + 1)
                if namer(".".join(parts[:i])) == block
            ),
            name,
        )
        prefixes = blocks.setdefault(block, [])
        if prefix not in prefixes:
            prefixes.append(prefix)
    return blocks


def layer_quant(base: QuantConfig, prefixes: Sequence[str], bits: int) -> QuantConfig:
    """Only the modules under ``prefixes`` compressed at ``bits``; everything else full precision.

    The fallback stays off (it follows the default, here full precision), so ops without a
    drop-in layer keep their activations in every block.

    Args:
        base: the config whose default supplies rounding, bucket size, scale and mix.
        prefixes: module-name prefixes of one block.
        bits: bit-width of that block.
    """
    spec = base.default
    full = spec.replace(bits=32, mix_bits=None, mix_prob=None)
    overrides = {"bits": bits, "mix_bits": spec.mix_bits, "mix_prob": spec.mix_prob}
    pairs = tuple((k, v) for k, v in overrides.items() if v is not None)
    rules = [LayerRule(p, overrides=pairs) for prefix in prefixes for p in (prefix, f"{prefix}.*")]
    return dataclasses.replace(base, default=full, layers=tuple(rules), allow_unmatched=True)


def plan_layer_sweep(
    config: RunConfig,
    *,
    bits: Sequence[int] | None = None,
    seeds: int = 1,
    blocks: Sequence[str] | None = None,
    baseline: bool = True,
) -> list[SweepRun]:
    """The thesis's sensitivity study: one block at a time at ``bits``, the rest full precision.

    Args:
        config: the base config (its quant default gives rounding, bucket size and scale; its
            layer rules are replaced).
        bits: bit-widths to try per block (default ``[4]``, as in the thesis).
        seeds: runs per setting.
        blocks: restrict to these block names (default: every block found).
        baseline: also run the all-full-precision model for reference.

    Raises:
        ConfigError: a requested block does not exist.
    """
    _check_seeds(seeds)
    found = discover_blocks(config)
    unknown = [b for b in blocks or () if b not in found]
    if unknown:
        raise ConfigError(
            [f"--blocks: no block {b!r}; the model has {', '.join(found)}" for b in unknown]
        )
    groups = []
    if baseline:
        fp = dataclasses.replace(
            config.quant,
            default=config.quant.default.replace(bits=32, mix_bits=None, mix_prob=None),
            layers=(),
        )
        groups.append((FP32, _settings(fp.default), config.replace(quant=fp)))
    for b in bits or [4]:
        for block in blocks or found:
            quant = layer_quant(config.quant, found[block], b)
            spec = quant.default.replace(**dict(quant.layers[0].overrides))
            settings = _settings(spec, block)
            groups.append((f"{block}-{_spec_name(spec)}", settings, config.replace(quant=quant)))
    return _with_seeds(config, groups, seeds)


# --- running and summarising ---------------------------------------------------------------


def _run_row(run: SweepRun, run_dir: Path) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    last = rows[-1]
    return {
        "name": run.name,
        "group": run.group,
        "seed": run.seed,
        **run.settings,
        "run_dir": str(run_dir),
        "final_test_acc": last["test_acc"],
        "best_test_acc": max(r["test_acc"] for r in rows),
        "saved_activation_bytes": last["saved_activation_bytes"],
        "fp32_activation_bytes": last["fp32_activation_bytes"],
        "step_time_s": sum(r["step_time_s"] for r in rows) / len(rows),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan  # one seed has no spread; nan says so instead of a fake 0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(run_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per group: mean and sample std (ddof 1) across seeds.

    Args:
        run_rows: rows as written to runs.csv.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in run_rows:
        groups.setdefault(row["group"], []).append(row)
    summary = []
    for group, rows in groups.items():
        final = _mean_std([r["final_test_acc"] for r in rows])
        best = _mean_std([r["best_test_acc"] for r in rows])
        saved = _mean_std([float(r["saved_activation_bytes"]) for r in rows])
        fp32 = rows[0]["fp32_activation_bytes"]
        summary.append(
            {
                "group": group,
                **{k: rows[0][k] for k in SETTING_COLUMNS},
                "seeds": len(rows),
                "final_acc_mean": final[0],
                "final_acc_std": final[1],
                "best_acc_mean": best[0],
                "best_acc_std": best[1],
                "saved_bytes_mean": saved[0],
                "saved_bytes_std": saved[1],
                "fp32_bytes": fp32,
                "memory_ratio": fp32 / saved[0] if saved[0] else math.inf,
                "step_time_s_mean": sum(r["step_time_s"] for r in rows) / len(rows),
            }
        )
    return summary


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` (None as an empty cell) with a header of ``columns``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return path


def run_sweep(
    runs: Sequence[SweepRun], out_dir: str | Path, *, progress: bool = True
) -> list[dict[str, Any]]:
    """Train every run into ``out_dir/runs/<name>`` and write runs.csv and summary.csv.

    A run whose directory already holds a checkpoint is resumed (a finished one is only read),
    so an interrupted sweep continues where it stopped when started again.

    Args:
        runs: from :func:`plan_bit_sweep` or :func:`plan_layer_sweep`.
        out_dir: the sweep directory.
        progress: a bar over runs, and each run's own bars.

    Returns:
        The summary rows (also in ``out_dir/summary.csv``).
    """
    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    if runs:
        write_config(runs[0].config, out_dir)  # the base settings, for reference
    run_rows = []
    bar = tqdm(runs, desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(run.name)
        run_dir = out_dir / "runs" / run.name
        resume = (run_dir / CHECKPOINT_NAME).exists()
        train(run.config, run_dir, resume=resume, progress=progress)
        run_rows.append(_run_row(run, run_dir))
        write_csv(out_dir / RUNS_NAME, run_rows, RUN_COLUMNS)  # partial results survive a kill
    summary = summarize(run_rows)
    write_csv(out_dir / SUMMARY_NAME, summary, SUMMARY_COLUMNS)
    return summary
