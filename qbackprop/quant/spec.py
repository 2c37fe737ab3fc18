"""QuantSpec: how one saved activation is compressed (frozen, validated on construction)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Rounding(str, Enum):
    """How a real value in code units becomes an integer code."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


class Scale(str, Enum):
    """How each bucket's quantization range is chosen."""

    MINMAX = "minmax"  # [min, max] of the bucket, affine
    ABSMAX = "absmax"  # [-max|x|, +max|x|], symmetric, one value per bucket
    L2 = "l2"  # [-||x||_2, +||x||_2], symmetric, one value per bucket


class MixGranularity(str, Enum):
    """Whether the two-bit mix is drawn per bucket or once per tensor."""

    BUCKET = "bucket"
    TENSOR = "tensor"


class BucketLayout(str, Enum):
    """How elements are grouped into buckets."""

    FLAT = "flat"  # contiguous runs of the flattened tensor (memory order)
    CHANNEL = "channel"  # buckets never straddle dim 1: each holds one channel's elements


class Storage(str, Enum):
    """What a layer keeps for backward."""

    PACKED = "packed"  # compress in forward, keep only the packed copy (saves memory)
    ON_BACKWARD = "on_backward"  # keep full precision, quantize at backward (ablation)


TENSOR_BUCKET = "tensor"
FULL_PRECISION_BITS = 32
_ENUM_FIELDS = {
    "rounding": Rounding,
    "scale": Scale,
    "mix_granularity": MixGranularity,
    "bucket_layout": BucketLayout,
    "storage": Storage,
}


def _allowed(enum: type[Enum]) -> str:
    return " | ".join(m.value for m in enum)


@dataclass(frozen=True)
class QuantSpec:
    """How one saved activation is compressed.

    Args:
        bits: code width, 1..32; 32 keeps the tensor as it is (no quantization).
        rounding: ``"nearest"`` (Brevitas integer quantizer) or ``"stochastic"`` (unbiased).
        bucket_size: elements sharing one scale, an int >= 2, or ``"tensor"`` for one scale per
            tensor.
        scale: ``"minmax"`` (affine), ``"absmax"`` or ``"l2"`` (symmetric).
        mix_bits: optional second bit width, used per bucket (or tensor) with ``mix_prob``.
        mix_prob: probability in [0, 1] of using ``mix_bits``; required with ``mix_bits``.
        mix_granularity: ``"bucket"`` or ``"tensor"``: what the mix is drawn for.
        bucket_layout: ``"flat"`` (memory order) or ``"channel"`` (buckets stay in one channel).
        storage: ``"packed"`` (compress in forward) or ``"on_backward"`` (ablation, saves none).

    Raises:
        ValueError: naming the field, the value and what is allowed.
    """

    bits: int = 2
    rounding: Rounding | str = Rounding.STOCHASTIC
    bucket_size: int | str = 512
    scale: Scale | str = Scale.MINMAX
    mix_bits: int | None = None
    mix_prob: float | None = None
    mix_granularity: MixGranularity | str = MixGranularity.BUCKET
    bucket_layout: BucketLayout | str = BucketLayout.FLAT
    storage: Storage | str = Storage.PACKED

    def __post_init__(self) -> None:
        errors = spec_errors(self)
        if errors:
            raise ValueError("invalid QuantSpec: " + "; ".join(errors))
        for name, enum in _ENUM_FIELDS.items():
            object.__setattr__(self, name, enum(getattr(self, name)))
        if self.mix_prob is not None:
            object.__setattr__(self, "mix_prob", float(self.mix_prob))
        # The canonical string the compression ops take (ops.spec_key), made once per spec:
        # under torch.compile reading it is an attribute load, not a traced to_dict().
        fields = self.to_dict()
        object.__setattr__(self, "key", ";".join(f"{k}={fields[k]}" for k in sorted(fields)))

    @property
    def enabled(self) -> bool:
        """False when nothing is quantized (bits 32 and no mix)."""
        return self.bits < FULL_PRECISION_BITS or (
            self.mix_bits is not None
            and self.mix_bits < FULL_PRECISION_BITS
            and bool(self.mix_prob)
        )

    @property
    def per_tensor(self) -> bool:
        return self.bucket_size == TENSOR_BUCKET

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        try:
            return _replaced(self, tuple(sorted(changes.items())))
        except TypeError:  # an unhashable value: nothing to cache
            return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML form: enums as strings, unset mix fields left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value.value if isinstance(value, Enum) else value
        return out

    def short(self) -> str:
        """Compact one-line description, e.g. ``2b/4b@0.3 stochastic b512 minmax``."""
        if not self.enabled:
            return "fp (32 bits)"
        bits = f"{self.bits}b"
        if self.mix_bits is not None:
            bits += f"/{self.mix_bits}b@{self.mix_prob:g}"
            if self.mix_granularity == MixGranularity.TENSOR:
                bits += "(tensor)"
        bucket = "tensor" if self.per_tensor else f"b{self.bucket_size}"
        layout = "" if self.bucket_layout == BucketLayout.FLAT else " per-channel"
        storage = "" if self.storage == Storage.PACKED else " on_backward"
        return f"{bits} {self.rounding.value} {bucket}{layout} {self.scale.value}{storage}"

    @classmethod
    def preset(cls, name: str) -> QuantSpec:
        """A named preset: ``"2bit-stochastic"``, ``"4bit-nearest"``, ``"2/4-mix"``, ..."""
        try:
            return PRESETS[name]()
        except KeyError:
            raise ValueError(
                f"unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}"
            ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def spec_errors(spec: Any, prefix: str = "") -> list[str]:
    """Every problem with the fields of ``spec`` (a QuantSpec or anything with its attributes)."""
    errors: list[str] = []

    def bad(field: str, value: Any, allowed: str) -> None:
        errors.append(f"{prefix}{field}={value!r} is not allowed; expected {allowed}")

    def check_bits(field: str, value: Any) -> None:
        if not _is_int(value) or not 1 <= value <= FULL_PRECISION_BITS:
            bad(field, value, "an integer from 1 to 32 (32 = full precision)")

    check_bits("bits", spec.bits)
    for name, enum in _ENUM_FIELDS.items():
        value = getattr(spec, name)
        try:
            enum(value)
        except ValueError:
            bad(name, value, _allowed(enum))
    bucket = spec.bucket_size
    if bucket != TENSOR_BUCKET and (not _is_int(bucket) or bucket < 2):
        bad("bucket_size", bucket, 'an integer >= 2 or "tensor"')
    if spec.mix_bits is not None:
        check_bits("mix_bits", spec.mix_bits)
        if spec.mix_prob is None:
            errors.append(f"{prefix}mix_bits is set but mix_prob is not; give mix_prob in [0, 1]")
    if spec.mix_prob is not None:
        prob = spec.mix_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            bad("mix_prob", prob, "a number in [0, 1]")
        elif spec.mix_bits is None:
            errors.append(f"{prefix}mix_prob is set but mix_bits is not; give mix_bits too")
    return errors


PRESETS = {
    "2bit-stochastic": lambda: QuantSpec(bits=2, rounding="stochastic"),
    "3bit-stochastic": lambda: QuantSpec(bits=3, rounding="stochastic"),
    "4bit-stochastic": lambda: QuantSpec(bits=4, rounding="stochastic"),
    "4bit-nearest": lambda: QuantSpec(bits=4, rounding="nearest"),
    "8bit-nearest": lambda: QuantSpec(bits=8, rounding="nearest"),
    "2/4-mix": lambda: QuantSpec(bits=2, mix_bits=4, mix_prob=0.5, rounding="stochastic"),
    "fp32": lambda: QuantSpec(bits=32),
}


@functools.lru_cache(maxsize=1024)
def _replaced(spec: QuantSpec, changes: tuple) -> QuantSpec:
    # Layers derive specs (wider shared copies, gate bits) in every forward: validating the
    # same derived spec again each time is measurable on small tensors.
    return dataclasses.replace(spec, **dict(changes))
