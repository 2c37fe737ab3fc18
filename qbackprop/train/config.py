"""The ``train:`` section (TrainSpec), a whole run's config, and dotted KEY=VALUE overrides."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qbackprop.config import (
    QUANT_KEYS,
    SPEC_KEYS,
    TOP_LEVEL_KEYS,
    QuantConfig,
    _bad,
    _unknown_keys,
    load_yaml_file,
)
from qbackprop.errors import ConfigError
from qbackprop.models import MODEL_KEYS, ModelSpec, model_spec_from_dict

from .data import DataSpec, data_spec_errors

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "onecycle", "constant")
AMP_MODES = ("off", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
# DataSpec field -> its key in the train: section
_DATA_KEYS = {
    "name": "dataset",
    "root": "data_root",
    "image_size": "image_size",
    "augment": "augment",
    "download": "download",
    "num_samples": "num_samples",
}
_SCHEDULE_KEYS = ("start", "end")


@dataclass(frozen=True)
class MixProbSchedule:
    """``mix_prob`` of ``quant.default`` over epochs: linear from ``start`` to ``end``.

    Args:
        start: the value in the first epoch.
        end: the value in the last epoch (equal to ``start`` for a constant).
    """

    start: float
    end: float

    def at(self, epoch: int, epochs: int) -> float:
        """The value for 0-based ``epoch`` of ``epochs``."""
        if epochs <= 1:
            return self.start
        return self.start + (self.end - self.start) * epoch / (epochs - 1)

    def to_yaml(self) -> float | dict[str, float]:
        return self.start if self.start == self.end else {"start": self.start, "end": self.end}


@dataclass(frozen=True)
class TrainSpec:
    """How to train: data, optimizer, schedule, precision, seed. Defaults: the thesis recipe.

    Args:
        dataset: one of ``digits | cifar10 | cifar100 | tinyimagenet | imagefolder | synthetic``.
        data_root: folder holding the data.
        image_size: square input side; null takes ``model.input_size`` or the native size.
        augment: random crop + horizontal flip on the train split.
        download: let torchvision fetch CIFAR / Tiny ImageNet when missing.
        num_samples: synthetic only: training images.
        batch_size: images per step (per process under DDP).
        epochs: epochs to train (``--resume`` continues up to this).
        optimizer: ``adamw`` (decoupled weight decay) or ``sgd`` (Nesterov momentum).
        lr: peak learning rate.
        weight_decay: applied to weights only, not to biases or norm parameters.
        momentum: SGD momentum.
        schedule: ``cosine`` (to ``min_lr``), ``step`` (x ``step_gamma`` every ``step_epochs``),
            ``onecycle`` (cosine up over 30% of steps from lr/25, then down), or ``constant``.
        warmup_epochs: linear warmup from 0 (cosine, step and constant; fractions allowed).
        min_lr: final learning rate of ``cosine``.
        step_epochs: epochs between decays of ``step``.
        step_gamma: decay factor of ``step``.
        label_smoothing: cross-entropy label smoothing.
        grad_clip_norm: clip the global gradient norm to this; null disables clipping.
        amp: ``off``, ``bf16`` (CPU and CUDA) or ``fp16`` (CUDA, with a GradScaler).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        seed: seeds weights, data order, augmentation and stochastic rounding.
        workers: DataLoader worker processes.
        mix_prob_schedule: null keeps ``quant.default.mix_prob``; a number or
            ``{start, end}`` sets it per epoch (linear), needs ``quant.default.mix_bits``.
        max_steps_per_epoch: stop each epoch after this many steps (smoke tests); null: all.
        retune_every: re-run ``qbackprop tune`` every this many steps (one process only):
            per-layer bits re-chosen from the current weights at the bytes the ``quant:``
            section keeps; null (default): never.
        distributed: under torchrun, ``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2
            ``fully_shard`` per block, then the whole model: parameters, gradients and
            optimizer state sharded across processes). Ignored in a single process.

    Raises:
        ConfigError: listing every invalid field and what is allowed.
    """

    dataset: str = "digits"
    data_root: str = "data"
    image_size: int | None = None
    augment: bool = True
    download: bool = False
    num_samples: int = 512
    batch_size: int = 128
    epochs: int = 50
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    step_epochs: int = 30
    step_gamma: float = 0.1
    label_smoothing: float = 0.05
    grad_clip_norm: float | None = 1.0
    amp: str = "off"
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    mix_prob_schedule: MixProbSchedule | None = None
    max_steps_per_epoch: int | None = None
    retune_every: int | None = None
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        if self.amp is False:  # YAML 1.1 reads a bare `off` as false
            object.__setattr__(self, "amp", "off")
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "min_lr", "step_gamma"):
            if _is_number(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        problems = train_spec_errors(self, "train")
        if problems:
            raise ConfigError(problems)

    def data_spec(self, num_classes: int | None = None) -> DataSpec:
        """The DataSpec of this section.

        Args:
            num_classes: the model's class count, checked against the dataset; None reads it
                from the dataset.
        """
        return DataSpec(
            **{f: getattr(self, k) for f, k in _DATA_KEYS.items()}, num_classes=num_classes
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML form of the section; ``from_dict`` reads it back equal."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.mix_prob_schedule is not None:
            out["mix_prob_schedule"] = self.mix_prob_schedule.to_yaml()
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, *, source: str = "<dict>") -> TrainSpec:
        """Build from a ``train:`` mapping, reporting every problem at once.

        Args:
            raw: the ``train:`` mapping (None gives the defaults).
            source: where ``raw`` came from, named in every error line.

        Raises:
            ConfigError: one line per problem: source, key, bad value, what is allowed.
        """
        spec, problems = _parse_train(raw, f"{source}: train")
        if problems:
            raise ConfigError(problems)
        return spec


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainSpec))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice_errors(spec: Any, loc: str, name: str, choices: Sequence[str]) -> list[str]:
    value = getattr(spec, name)
    return [] if value in choices else [_bad(f"{loc}.{name}", value, " | ".join(choices), choices)]


def _number_errors(spec: Any, loc: str, name: str, low: float, high: float | None) -> list[str]:
    value = getattr(spec, name)
    ok = _is_number(value) and value >= low and (high is None or value <= high)
    allowed = f"a number >= {low:g}" if high is None else f"a number in [{low:g}, {high:g}]"
    return [] if ok else [_bad(f"{loc}.{name}", value, allowed)]


def _int_errors(spec: Any, loc: str, name: str, low: int, nullable: bool = False) -> list[str]:
    value = getattr(spec, name)
    if (nullable and value is None) or (_is_int(value) and value >= low):
        return []
    return [_bad(f"{loc}.{name}", value, ("null or " if nullable else "") + f"an int >= {low}")]


def _data_errors(spec: Any, loc: str) -> list[str]:
    """DataSpec's own checks, reported under this section's key names."""
    fields = {f: getattr(spec, k) for f, k in _DATA_KEYS.items()}
    problems = data_spec_errors(types.SimpleNamespace(**fields, num_classes=None))
    for f, k in _DATA_KEYS.items():
        problems = [p.replace(f"data.{f}=", f"{loc}.{k}=", 1) for p in problems]
    return problems


def train_spec_errors(spec: Any, loc: str = "train") -> list[str]:
    """Every problem with the fields of ``spec`` (a TrainSpec or anything with its attributes).

    Args:
        spec: the object to check.
        loc: prefix of each key path, e.g. ``"cfg.yaml: train"``.
    """
    problems = _data_errors(spec, loc)
    problems += _int_errors(spec, loc, "batch_size", 1)
    problems += _int_errors(spec, loc, "epochs", 1)
    problems += _choice_errors(spec, loc, "optimizer", OPTIMIZERS)
    problems += _choice_errors(spec, loc, "schedule", SCHEDULES)
    problems += _choice_errors(spec, loc, "amp", AMP_MODES)
    problems += _choice_errors(spec, loc, "distributed", DISTRIBUTED)
    problems += _choice_errors(spec, loc, "device", DEVICES)
    problems += _number_errors(spec, loc, "lr", 0.0, None)
    problems += _number_errors(spec, loc, "min_lr", 0.0, None)
    problems += _number_errors(spec, loc, "weight_decay", 0.0, None)
    problems += _number_errors(spec, loc, "momentum", 0.0, 1.0)
    problems += _number_errors(spec, loc, "warmup_epochs", 0.0, None)
    problems += _number_errors(spec, loc, "step_gamma", 0.0, 1.0)
    problems += _number_errors(spec, loc, "label_smoothing", 0.0, 1.0)
    problems += _int_errors(spec, loc, "step_epochs", 1)
    problems += _int_errors(spec, loc, "seed", 0)
    problems += _int_errors(spec, loc, "workers", 0)
    problems += _int_errors(spec, loc, "max_steps_per_epoch", 1, nullable=True)
    problems += _int_errors(spec, loc, "retune_every", 1, nullable=True)
    clip = spec.grad_clip_norm
    if clip is not None and not (_is_number(clip) and clip > 0):
        problems.append(_bad(f"{loc}.grad_clip_norm", clip, "null (no clipping) or a number > 0"))
    mix = spec.mix_prob_schedule
    if mix is not None and not isinstance(mix, MixProbSchedule):
        problems.append(_bad(f"{loc}.mix_prob_schedule", mix, "a MixProbSchedule"))
    return problems


def _parse_mix_schedule(raw: Any, loc: str) -> tuple[MixProbSchedule | None, list[str]]:
    allowed = "null, a probability in [0, 1], or {start: P, end: P}"
    if raw is None:
        return None, []
    if _is_number(raw):
        raw = {"start": raw, "end": raw}
    if not isinstance(raw, Mapping):
        return None, [_bad(loc, raw, allowed)]
    problems = _unknown_keys(loc, raw, _SCHEDULE_KEYS)
    for key in _SCHEDULE_KEYS:
        value = raw.get(key)
        if not (_is_number(value) and 0.0 <= value <= 1.0):
            problems.append(_bad(f"{loc}.{key}", value, "a probability in [0, 1]"))
    if problems:
        return None, problems
    return MixProbSchedule(float(raw["start"]), float(raw["end"])), []


def _parse_train(raw: Any, loc: str) -> tuple[TrainSpec | None, list[str]]:
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        return None, [_bad(loc, raw, f"a mapping with keys {', '.join(TRAIN_KEYS)}")]
    problems = _unknown_keys(loc, raw, TRAIN_KEYS)
    values = {k: raw[k] for k in TRAIN_KEYS if k in raw}
    mix, errors = _parse_mix_schedule(values.get("mix_prob_schedule"), f"{loc}.mix_prob_schedule")
    problems += errors
    values["mix_prob_schedule"] = mix
    merged = {**{f.name: f.default for f in dataclasses.fields(TrainSpec)}, **values}
    if merged["amp"] is False:
        merged["amp"] = "off"
    problems += train_spec_errors(types.SimpleNamespace(**merged), loc)
    if problems:
        return None, problems
    return TrainSpec(**values), []


# --- a whole run: model + quant + train -------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs, validated.

    Args:
        model: the model to build; ``num_classes`` and ``input_size`` agree with the data.
        quant: what to compress.
        train: how to train.
        source: the file (and overrides) it came from, for messages.
        classes_from_data: ``model.num_classes`` was not given and must be read from the
            dataset on disk (Tiny ImageNet, imagefolder) before building the model.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainSpec = field(default_factory=TrainSpec)
    source: str = "<dict>"
    classes_from_data: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config as plain YAML data (``model``, ``quant``, ``train``)."""
        return {
            "model": self.model.to_dict(),
            "quant": self.quant.to_dict(),
            "train": self.train.to_dict(),
        }

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _resolve_model(model: ModelSpec, raw: Mapping, train: TrainSpec, loc: str) -> tuple:
    """``(model, train, classes_from_data, problems)`` with sizes and classes made to agree."""
    problems: list[str] = []
    given = raw if isinstance(raw, Mapping) else {}
    size = model.input_size
    if size[0] != 3:
        problems.append(f"{loc}: model.input_size={list(size)!r}: datasets give 3 channels")
    if train.image_size is None and "input_size" in given:
        if size[1] != size[2]:
            problems.append(f"{loc}: model.input_size={list(size)!r}: images are square; H == W")
        train = dataclasses.replace(train, image_size=size[1])
    side = train.data_spec().resolved_image_size
    if "input_size" in given and tuple(size[1:]) != (side, side):
        problems.append(
            f"{loc}: model.input_size={list(size)!r} disagrees with train.image_size={side}; "
            "set one of them"
        )
    train = dataclasses.replace(train, image_size=side)
    model = dataclasses.replace(model, input_size=(3, side, side))
    native = train.data_spec().num_classes  # None: Tiny ImageNet / imagefolder, read from disk
    if "num_classes" not in given:
        if native is not None:
            model = dataclasses.replace(model, num_classes=native)
        return model, train, native is None, problems
    if train.dataset in ("digits", "cifar10", "cifar100") and model.num_classes != native:
        problems.append(
            f"{loc}: model.num_classes={model.num_classes!r} but {train.dataset} has {native} "
            f"classes; remove model.num_classes or set it to {native}"
        )
    elif train.dataset == "synthetic" and model.num_classes < 2:
        problems.append(f"{loc}: model.num_classes={model.num_classes!r}: synthetic needs >= 2")
    return model, train, False, problems


def _mix_errors(quant: QuantConfig, train: TrainSpec, loc: str) -> list[str]:
    if train.mix_prob_schedule is None or quant.default.mix_bits is not None:
        return []
    return [
        f"{loc}: train.mix_prob_schedule is set but quant.default.mix_bits is not; "
        "give quant.default.mix_bits (e.g. 4)"
    ]


def run_config_from_dict(
    raw: Mapping[str, Any], *, source: str = "<dict>", overrides: Sequence[str] = ()
) -> RunConfig:
    """Validate a whole config mapping (``model``, ``quant``, ``train``), overrides applied.

    Args:
        raw: the file's top-level mapping.
        source: its path, named in every error line.
        overrides: ``KEY=VALUE`` strings such as ``train.epochs=3``; see :func:`apply_overrides`.

    Raises:
        ConfigError: every problem of every section at once.
    """
    # a bad override is skipped, not fatal: the file's own problems are reported with it
    raw, problems = _apply(raw, overrides, source)
    problems += _unknown_keys(f"{source}: ", raw, TOP_LEVEL_KEYS)
    sections: dict[str, Any] = {}
    parsers = {
        "model": lambda: model_spec_from_dict(raw.get("model"), source=source),
        "quant": lambda: QuantConfig.from_dict(raw.get("quant"), source=source),
        "train": lambda: TrainSpec.from_dict(raw.get("train"), source=source),
    }
    for name, parse in parsers.items():
        try:
            sections[name] = parse()
        except ConfigError as exc:
            problems += exc.problems
    if len(sections) == len(parsers):
        model, train, from_data, errors = _resolve_model(
            sections["model"], raw.get("model"), sections["train"], source
        )
        problems += errors + _mix_errors(sections["quant"], train, source)
    if problems:
        raise ConfigError(_mark_overridden(problems, overrides))
    return RunConfig(model, sections["quant"], train, source, from_data)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a run config file, with dotted ``KEY=VALUE`` overrides applied.

    Args:
        path: YAML file with ``model:``, ``quant:`` and ``train:`` sections.
        overrides: e.g. ``["train.epochs=3", "quant.default.bits=4"]``.

    Raises:
        ConfigError: naming the file and key of every problem.
    """
    return run_config_from_dict(load_yaml_file(path), source=str(path), overrides=overrides)


# --- overrides ----------------------------------------------------------------------------------

_SECTION_KEYS = {"model": MODEL_KEYS, "train": TRAIN_KEYS, "quant": QUANT_KEYS}
# keys under which any sub-key is allowed (checked later by the section's own validation)
_OPEN_PATHS = {("model", "kwargs"), ("train", "mix_prob_schedule")}
_NESTED_KEYS = {("quant", "default"): ("preset", *SPEC_KEYS)}


def _parse_override(text: str) -> tuple[list[str], Any, list[str]]:
    """``(path, value, problems)`` of one ``a.b.c=VALUE``; VALUE is read as YAML."""
    key, sep, value_text = text.partition("=")
    path = key.strip().split(".")
    if not sep or not key.strip() or any(not p for p in path):
        return [], None, [f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3"]
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        return [], None, [f"override {text!r}: {key} value is not valid YAML: {exc}"]
    return path, value, _path_errors(path, text)


def _path_errors(path: list[str], text: str) -> list[str]:
    def unknown(prefix: str, name: str, allowed: Sequence[str]) -> list[str]:
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f'; did you mean "{prefix}{close[0]}"?' if close else f"; allowed: {allowed}"
        return [f"override {text!r}: unknown key {prefix}{name}{hint}"]

    if path[0] not in TOP_LEVEL_KEYS:
        return unknown("", path[0], TOP_LEVEL_KEYS)
    if len(path) == 1 or tuple(path[:2]) in _OPEN_PATHS:
        return []
    if path[1] not in _SECTION_KEYS[path[0]]:
        return unknown(f"{path[0]}.", path[1], _SECTION_KEYS[path[0]])
    nested = _NESTED_KEYS.get(tuple(path[:2]))
    if nested and len(path) > 2 and path[2] not in nested:
        return unknown(f"{path[0]}.{path[1]}.", path[2], nested)
    return []


def _set_path(node: Any, path: list[str], value: Any, text: str) -> list[str]:
    for depth, part in enumerate(path[:-1]):
        child = _child(node, part)
        if child is None:
            child = {}
        elif isinstance(child, str) and tuple(path[:2]) == ("quant", "default"):
            child = {"preset": child}  # "quant.default: 2bit-stochastic" then ...default.bits=4
        elif not isinstance(child, (dict, list)):
            where = ".".join(path[: depth + 1])
            return [f"override {text!r}: {where} is {child!r}, not a mapping"]
        errors = _assign(node, part, child, text)
        if errors:
            return errors
        node = child
    return _assign(node, path[-1], value, text)


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _assign(node: Any, part: str, value: Any, text: str) -> list[str]:
    if isinstance(node, dict):
        node[part] = value
        return []
    if not (part.isdigit() and int(part) < len(node)):
        return [f"override {text!r}: {part} is not an index of a list of {len(node)}"]
    node[int(part)] = value
    return []


def _apply(raw: Mapping[str, Any], overrides: Sequence[str], source: str) -> tuple[dict, list]:
    out = copy.deepcopy(dict(raw))
    problems: list[str] = []
    for text in overrides:
        path, value, errors = _parse_override(text)
        if not errors:
            errors = _set_path(out, path, value, text)
        problems += [f"{source}: {e}" for e in errors]
    return out, problems


def apply_overrides(
    raw: Mapping[str, Any], overrides: Sequence[str], *, source: str = "<dict>"
) -> dict[str, Any]:
    """A copy of ``raw`` with each dotted ``KEY=VALUE`` set; VALUE is parsed as YAML.

    Keys are checked against the schema (with a close-match suggestion); values are checked
    afterwards by the sections' own validation, like values in the file. List items are
    addressed by index: ``quant.layers.0.bits=8``.

    Args:
        raw: a config file's top-level mapping (not modified).
        overrides: strings such as ``train.epochs=3`` or ``model.input_size=[3,64,64]``.
        source: named in error messages.

    Raises:
        ConfigError: every malformed override or unknown key at once.
    """
    out, problems = _apply(raw, overrides, source)
    if problems:
        raise ConfigError(problems)
    return out


def _mark_overridden(problems: list[str], overrides: Sequence[str]) -> list[str]:
    """Say which problems an override (rather than the file) caused."""
    keys = [o.partition("=")[0].strip() for o in overrides]
    marked = []
    for problem in problems:
        hits = [k for k in keys if f"{k}=" in problem or f"{k}:" in problem]
        hits = [] if "override '" in problem else hits  # already names its override
        marked.append(f"{problem} (set by override {hits[-1]})" if hits else problem)
    return marked
