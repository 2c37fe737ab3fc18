"""QuantSpec: how one saved activation is compressed (frozen, validated on construction)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from enum import Enum
from typing import Any

from qbackprop import runtime
from qbackprop.schema import Problem, choice, integer, join, number, option, validate


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
_BITS = integer(1, FULL_PRECISION_BITS, expected="an integer from 1 to 32 (32 = full precision)")


@dataclass(frozen=True)
class QuantSpec:
    """How one saved activation is compressed; each field is documented in the schema
    (``qbackprop schema quant.default``, docs/config.md).

    Raises:
        ConfigError: a ``ValueError`` naming the field, the value and what is allowed.
    """

    bits: int = option(2, _BITS, "code width; 32 keeps the tensor as it is (no quantization)")
    rounding: Rounding | str = option(
        Rounding.STOCHASTIC,
        choice(enum=Rounding),
        "nearest (Brevitas integer quantizer) or stochastic (unbiased)",
    )
    bucket_size: int | str = option(
        512,
        integer(2, also=(TENSOR_BUCKET,), expected='an integer >= 2 or "tensor"'),
        'elements sharing one scale; "tensor": one scale per tensor',
    )
    scale: Scale | str = option(
        Scale.MINMAX, choice(enum=Scale), "minmax (affine), absmax or l2 (symmetric) range"
    )
    mix_bits: int | None = option(
        None,
        integer(1, FULL_PRECISION_BITS, nullable=True, expected=_BITS.expected),
        "a second bit width, used with probability mix_prob",
    )
    mix_prob: float | None = option(
        None,
        number(0.0, 1.0, nullable=True, expected="a number in [0, 1]"),
        "probability of mix_bits; required with it",
    )
    mix_granularity: MixGranularity | str = option(
        MixGranularity.BUCKET, choice(enum=MixGranularity), "what the mix is drawn for"
    )
    bucket_layout: BucketLayout | str = option(
        BucketLayout.FLAT,
        choice(enum=BucketLayout),
        "flat (memory order) or channel (buckets stay in one channel)",
    )
    storage: Storage | str = option(
        Storage.PACKED,
        choice(enum=Storage),
        "packed (compress in forward) or on_backward (ablation: keeps full precision)",
    )

    def __post_init__(self) -> None:
        # Under torch.compile the only specs made are derived in forward (wider copies, gate
        # bits) from checked ones by our own code, and the schema's kinds are not traceable.
        if runtime.validates_specs():
            validate(self, "QuantSpec")
        # The canonical string the compression ops take (ops.spec_key), made once per spec:
        # under torch.compile reading it is an attribute load, not a traced to_dict().
        fields = self.to_dict()
        object.__setattr__(self, "key", ";".join(f"{k}={fields[k]}" for k in sorted(fields)))

    @staticmethod
    def cross_problems(values: dict, failed: set, path: str) -> list[Problem]:
        bits, prob = values.get("mix_bits"), values.get("mix_prob")
        if bits is not None and prob is None and "mix_bits" not in failed:
            return [
                Problem(
                    join(path, "mix_bits"),
                    message=" is set but mix_prob is not; give mix_prob in [0, 1]",
                )
            ]
        if prob is not None and bits is None and "mix_prob" not in failed:
            return [
                Problem(
                    join(path, "mix_prob"),
                    message=" is set but mix_bits is not; give mix_bits too",
                )
            ]
        return []

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
