"""The ``train:`` section (TrainSpec), a whole run's config, and dotted KEY=VALUE overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbackprop import schema
from qbackprop.config import QuantConfig, load_yaml_file, top_level_problems
from qbackprop.errors import ConfigError
from qbackprop.models import ModelSpec
from qbackprop.schema import (
    Problem,
    choice,
    from_mapping,
    integer,
    is_number,
    like,
    number,
    option,
    options,
    section,
    validate,
)

from .data import DataSpec, download_problems


def _is_budget(value: Any) -> bool:
    from qbackprop.tune import parse_budget

    try:
        parse_budget(value)
    except ValueError:
        return False
    return not isinstance(value, bool)


def _budget() -> schema.Kind:
    """A ``qbackprop tune --budget`` value, stored as its text."""
    return schema.Kind(
        "null, a ratio to fp32 (12x), average bits (2.1) or MiB (24MiB)",
        _is_budget,
        str,
        type_name="str",
        nullable=True,
    )


_PROBABILITY = number(0.0, 1.0, expected="a probability in [0, 1]")


@dataclass(frozen=True)
class MixProbSchedule:
    """``mix_prob`` of ``quant.default`` over epochs: linear from ``start`` to ``end``."""

    start: float = option(kind=_PROBABILITY, doc="the value in the first epoch")
    end: float = option(kind=_PROBABILITY, doc="the value in the last epoch")

    def __post_init__(self) -> None:
        validate(self, "MixProbSchedule")

    def at(self, epoch: int, epochs: int) -> float:
        """The value for 0-based ``epoch`` of ``epochs``."""
        if epochs <= 1:
            return self.start
        return self.start + (self.end - self.start) * epoch / (epochs - 1)

    def to_yaml(self) -> float | dict[str, float]:
        return self.start if self.start == self.end else {"start": self.start, "end": self.end}


@dataclass(frozen=True)
class TrainSpec:
    """How to train: data, optimizer, schedule, precision, seed (defaults: the thesis recipe).
    Every field is documented in the schema (``qbackprop schema train``, docs/config.md).

    Raises:
        ConfigError: listing every invalid field and what is allowed.
    """

    dataset: str = like(DataSpec, "name", default="digits")
    data_root: str = like(DataSpec, "root")
    image_size: int | None = like(
        DataSpec, "image_size", doc="square input side; null: model.input_size's, else native"
    )
    augment: bool = like(DataSpec, "augment")
    download: bool = like(DataSpec, "download")
    num_samples: int = like(DataSpec, "num_samples")
    batch_size: int = option(128, integer(1), "images per step (per process under DDP/FSDP)")
    epochs: int = option(50, integer(1), "epochs to train (--resume continues up to this)")
    optimizer: str = option("adamw", choice(("adamw", "sgd")), "sgd: with Nesterov momentum")
    lr: float = option(1e-3, number(0.0), "peak learning rate")
    weight_decay: float = option(0.05, number(0.0), "on weights only, not biases or norms")
    momentum: float = option(0.9, number(0.0, 1.0), "SGD momentum")
    schedule: str = option(
        "cosine",
        choice(("cosine", "step", "onecycle", "constant")),
        "cosine (to min_lr), step (x step_gamma every step_epochs), onecycle (up over 30% of "
        "steps from lr/25, then down) or constant",
    )
    warmup_epochs: float = option(
        1.0, number(0.0), "linear warmup from 0 (cosine, step, constant; fractions allowed)"
    )
    min_lr: float = option(0.0, number(0.0), "final learning rate of cosine")
    step_epochs: int = option(30, integer(1), "epochs between decays of step")
    step_gamma: float = option(0.1, number(0.0, 1.0), "decay factor of step")
    label_smoothing: float = option(0.05, number(0.0, 1.0), "cross-entropy label smoothing")
    grad_clip_norm: float | None = option(
        1.0,
        number(0.0, above=True, nullable=True, expected="null (no clipping) or a number > 0"),
        "clip the global gradient norm to this; null: no clipping",
    )
    amp: str = option(
        "off",
        choice(("off", "bf16", "fp16"), aliases={False: "off"}),  # YAML 1.1: `off` is false
        "bf16 (CPU and CUDA) or fp16 (CUDA, with a GradScaler)",
    )
    device: str = option("auto", choice(("auto", "cpu", "cuda")), "auto: CUDA when available")
    seed: int = option(0, integer(0), "seeds weights, data order, augmentation and rounding")
    workers: int = option(0, integer(0), "DataLoader worker processes")
    mix_prob_schedule: MixProbSchedule | None = option(
        None,
        section(
            MixProbSchedule,
            "null, a probability in [0, 1], or {start: P, end: P}",
            lambda v: {"start": v, "end": v} if is_number(v) else v,
        ),
        "null keeps quant.default.mix_prob; a number or {start, end} sets it per epoch "
        "(linear); needs quant.default.mix_bits",
    )
    max_steps_per_epoch: int | None = option(
        None, integer(1, nullable=True), "stop each epoch after this many steps (smoke tests)"
    )
    retune_every: int | None = option(
        None,
        integer(1, nullable=True),
        "re-run qbackprop tune every this many steps (rank 0 tunes, every rank applies it)",
    )
    retune_budget: str | None = option(
        None,
        _budget(),
        "the bytes a re-tune keeps: 12x (ratio to fp32), 2.1 (bits) or 24MiB; "
        "null: the bytes quant: keeps",
    )
    distributed: str = option(
        "ddp",
        choice(("ddp", "fsdp")),
        "under torchrun: ddp, or fsdp (FSDP2 fully_shard per block, then the whole model)",
    )

    def __post_init__(self) -> None:
        validate(self, "train")

    @staticmethod
    def cross_problems(values: dict, failed: set, path: str) -> list[Problem]:
        problems = download_problems(values["dataset"], values["download"], f"{path}.download")
        if values.get("retune_budget") is not None and values.get("retune_every") is None:
            problems.append(
                Problem(
                    f"{path}.retune_budget",
                    message=f"={values['retune_budget']!r} is set but retune_every is not "
                    "(the steps between re-tunes)",
                )
            )
        return problems

    def data_spec(self, num_classes: int | None = None) -> DataSpec:
        """The DataSpec of this section.

        Args:
            num_classes: the model's class count, checked against the dataset; None reads it
                from the dataset.
        """
        data = {
            f.metadata["like"]: getattr(self, f.name) for f in options(self) if "like" in f.metadata
        }
        return DataSpec(**data, num_classes=num_classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML form of the section; ``from_dict`` reads it back equal."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.mix_prob_schedule is not None:
            out["mix_prob_schedule"] = self.mix_prob_schedule.to_yaml()
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, *, source: str = "<dict>") -> TrainSpec:
        """Build from a ``train:`` mapping, reporting every problem at once.

        Raises:
            ConfigError: one line per problem: source, key, bad value, what is allowed.
        """
        return from_mapping(cls, raw, f"{source}: train")


# --- a whole run: model + quant + train -------------------------------------------------------

SECTIONS = {"model": ModelSpec, "quant": QuantConfig, "train": TrainSpec}


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
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _resolve_model(model: ModelSpec, given: Mapping, train: TrainSpec, src: str) -> tuple:
    """``(model, train, classes_from_data, problems)`` with sizes and classes made to agree."""
    problems: list[Problem] = []
    size, classes = list(model.input_size), model.num_classes

    def say(key: str, text: str) -> None:
        problems.append(Problem(f"{src}: model.{key}", message=text))

    if size[0] != 3:
        say("input_size", f"={size!r}: datasets give 3 channels")
    if train.image_size is None and "input_size" in given:
        if size[1] != size[2]:
            say("input_size", f"={size!r}: images are square; H == W")
        train = dataclasses.replace(train, image_size=size[1])
    side = train.data_spec().resolved_image_size
    if "input_size" in given and size[1:] != [side, side]:
        say("input_size", f"={size!r} disagrees with train.image_size={side}; set one of them")
    train = dataclasses.replace(train, image_size=side)
    model = dataclasses.replace(model, input_size=(3, side, side))
    native = train.data_spec().num_classes  # None: Tiny ImageNet / imagefolder, read from disk
    if "num_classes" not in given:
        if native is not None:
            model = dataclasses.replace(model, num_classes=native)
        return model, train, native is None, problems
    if train.dataset in ("digits", "cifar10", "cifar100") and classes != native:
        say("num_classes", f"={classes!r} but {train.dataset} has {native} classes; remove "
            f"model.num_classes or set it to {native}")  # fmt: skip
    elif train.dataset == "synthetic" and classes < 2:
        say("num_classes", f"={classes!r}: synthetic needs >= 2")
    return model, train, False, problems


def run_config_from_dict(
    raw: Mapping[str, Any], *, source: str = "<dict>", overrides: Sequence[str] = ()
) -> RunConfig:
    """Validate a whole config mapping (``model``, ``quant``, ``train``), overrides applied.

    Args:
        raw: the file's top-level mapping.
        source: its path, named in every error line.
        overrides: ``KEY=VALUE`` strings such as ``train.epochs=3``; see
            :func:`qbackprop.schema.apply_overrides`.

    Raises:
        ConfigError: every problem of every section at once.
    """
    # a bad override is skipped, not fatal: the file's own problems are reported with it
    raw, problems = schema.apply_overrides(raw, overrides, SECTIONS, source)
    problems += top_level_problems(raw, source)
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = from_mapping(cls, raw.get(name), f"{source}: {name}")
        except ConfigError as exc:
            problems += exc.details
    if len(sections) == len(SECTIONS):
        given = raw.get("model") if isinstance(raw.get("model"), Mapping) else {}
        model, train, from_data, errors = _resolve_model(
            sections["model"], given, sections["train"], source
        )
        problems += errors
        if train.mix_prob_schedule is not None and sections["quant"].default.mix_bits is None:
            text = " is set but quant.default.mix_bits is not; give quant.default.mix_bits (e.g. 4)"
            problems.append(Problem(f"{source}: train.mix_prob_schedule", message=text))
    if problems:
        raise ConfigError(schema.mark_overridden(problems, overrides))
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
