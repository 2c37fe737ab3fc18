"""Unbiased stochastic rounding and the random two-bit mix (which buckets use ``mix_bits``)."""

from __future__ import annotations

import torch


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
    # rand_like when no generator: works on symbolic shapes under torch.compile as well.
    # rand_like when no generator: works on symbolic shapes under torch.compile as well. The
    # noise buffer becomes the codes (in place): one full-size temporary, not three, which is
    # what the process's resident memory and page faults pay for.
    noise = (
        torch.rand_like(u)
        if generator is None
        else torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device)
    )
    q = noise.add_(u).floor_().clamp_(min=0)
    if isinstance(levels, torch.Tensor):
        return torch.minimum(q, levels, out=q)
    return q.clamp_(max=levels)


def mix_mask(
    num_buckets: int, count: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A bool mask of ``num_buckets`` with exactly ``count`` True at uniformly random places.

    Drawn on the device (a random permutation), so the host never waits for it; with a count
    fixed by the spec (``compressed.mixed_count``) every packed size is known in advance. Each
    bucket uses the wider codes with probability ``count / num_buckets``, the spec's ``mix_prob``
    up to rounding.
    """
    gen = generator if generator is not None and generator.device == torch.device(device) else None
    chosen = torch.randperm(num_buckets, generator=gen, device=device)[:count]
    mask = torch.zeros(num_buckets, dtype=torch.bool, device=device)
    return mask.index_fill_(0, chosen, True)
