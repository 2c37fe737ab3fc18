"""Unbiased stochastic rounding and the random two-bit mix (which buckets use ``mix_bits``)."""

from __future__ import annotations

import torch

from .spec import MixGranularity, QuantSpec


def stochastic_round(
    u: torch.Tensor, levels: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round ``u`` (in code units, ``0 <= u <= levels``) up with probability ``frac(u)``.

    ``floor(u + r)`` with ``r ~ U[0, 1)`` equals ``floor(u) + Bernoulli(u - floor(u))``, so
    ``E[q] = u`` exactly: the rounding is unbiased and its variance is at most 1/4 code step².

    Args:
        u: real-valued codes.
        levels: the largest code, ``2**bits - 1`` (a scalar or a tensor broadcastable to ``u``).
        generator: optional ``torch.Generator`` on ``u``'s device, for reproducible draws.

    Returns:
        Integral-valued codes in ``[0, levels]``, same dtype as ``u``.
    """
    noise = torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device)
    q = (u + noise).floor_().clamp_(min=0)
    if isinstance(levels, torch.Tensor):
        return torch.minimum(q, levels)
    return q.clamp_(max=levels)


def _host_generator(generator: torch.Generator | None) -> torch.Generator | None:
    # Mix counts are drawn on the host so that the packed sizes are known without a device sync.
    if generator is not None and generator.device.type == "cpu":
        return generator
    return None


def draw_mix(
    num_buckets: int,
    spec: QuantSpec,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, int]:
    """Which buckets use ``spec.mix_bits``: ``(mask or None, how many)``.

    Each bucket independently uses ``mix_bits`` with probability ``mix_prob``. The draw is made
    as ``k ~ Binomial(n, p)`` on the host followed by a uniformly random k-subset on the device,
    which has exactly the distribution of n independent Bernoulli(p) draws but tells the host
    ``k`` (and so every packed size) without a device-to-host sync.

    Returns:
        ``(None, 0)`` without a mix; ``(None, n)`` when the whole tensor uses ``mix_bits``;
        otherwise a bool mask of shape ``(num_buckets,)`` and its count of True.
    """
    if spec.mix_bits is None or not spec.mix_prob:
        return None, 0
    host = _host_generator(generator)
    if spec.mix_granularity == MixGranularity.TENSOR:
        use_mix = bool(torch.rand((), generator=host) < spec.mix_prob)
        return None, num_buckets if use_mix else 0
    count = torch.tensor(float(num_buckets))
    k = int(torch.binomial(count, torch.tensor(float(spec.mix_prob)), generator=host))
    if k in (0, num_buckets):
        return None, k
    device_gen = generator if generator is not None and generator.device == device else None
    chosen = torch.randperm(num_buckets, generator=device_gen, device=device)[:k]
    mask = torch.zeros(num_buckets, dtype=torch.bool, device=device)
    mask[chosen] = True
    return mask, k
