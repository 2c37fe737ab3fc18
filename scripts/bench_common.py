"""Shared pieces of the benchmark scripts: model building, per-stage checkpointing, tables,
and the peak memory of training steps measured in a fresh process (``step_memory``)."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Where timm keeps the list of stages, by model family.
_STAGE_ATTRS = ("blocks", "stages", "features")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """A randomly initialised timm model (no download)."""
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def stages(model: nn.Module) -> list[nn.Module]:
    """The model's stages: the children of ``blocks``/``stages`` or ResNet's layer1..4."""
    if all(hasattr(model, a) for a in _RESNET_STAGES):
        return [getattr(model, a) for a in _RESNET_STAGES]
    for attr in _STAGE_ATTRS:
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential):
            return list(seq)
    raise ValueError(f"cannot find the stages of {type(model).__name__}")


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.inner(x)
        # Reentrant checkpointing keeps only the stage input for backward, visible to hooks.
        return checkpoint(self.inner, x, use_reentrant=True)


def checkpoint_stages(model: nn.Module) -> nn.Module:
    """Wrap every stage in ``torch.utils.checkpoint`` (recomputed in backward); in place."""
    if all(hasattr(model, a) for a in _RESNET_STAGES):
        for attr in _RESNET_STAGES:
            setattr(model, attr, _Checkpointed(getattr(model, attr)))
        return model
    for attr in _STAGE_ATTRS:
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential):
            for i in range(len(seq)):
                seq[i] = _Checkpointed(seq[i])
            return model
    raise ValueError(f"cannot find the stages of {type(model).__name__}")


def header(title: str) -> str:
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return (
        f"# {title}\n# command: {' '.join(sys.argv)}\n"
        f"# torch {torch.__version__}, timm {timm.__version__}, {threads} threads, "
        f"device: {device or platform.machine()}"
    )


def table(rows: list[list], headers: list[str]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *[fmt(r) for r in cells[1:]]])


def quiet() -> None:
    warnings.filterwarnings("ignore")


# --- peak memory of training steps, each variant in a fresh process -------------------------

_PROBE_TAG = "QBACKPROP_STEP_MEMORY "


def make_variant(base: nn.Module, how: str | None, *, copy_model: bool = True) -> nn.Module:
    """``base`` as one benchmark variant: fp32 (None), ``"checkpoint"`` (per stage) or a
    ``convert_model`` preset/config (then the host allocator is tuned, as convert_model does)."""
    import qbackprop as qb
    from qbackprop import allocator

    model = copy.deepcopy(base) if copy_model else base
    if how == "checkpoint":
        return checkpoint_stages(model)
    if how is not None:
        qb.convert_model(model, how)
        allocator.tune_host_allocator()  # a no-op where convert_model already did it
    return model


@dataclass(frozen=True)
class StepMemory:
    """Memory of the first ``steps`` training steps of one variant, in a process of its own.

    All in bytes. ``rss_before``: the process's RSS just before the first step (imports, model,
    conversion); ``peak_rss``: its highest RSS from the first step to the last, as the OS sees
    it (VmHWM, reset before the first step); ``added`` = ``peak_rss - rss_before``: what the
    steps add. ``cuda_max_allocated`` / ``cuda_max_reserved``: ``torch.cuda.max_memory_*``
    over the same steps (None on CPU). ``allocator``: what ``tune_host_allocator`` set.
    """

    rss_imports: int
    rss_before: int
    peak_rss: int
    first_step_peak_rss: int
    cuda_max_allocated: int | None
    cuda_max_reserved: int | None
    peak_reset: bool
    allocator: str | None

    @property
    def added(self) -> int:
        return self.peak_rss - self.rss_before


def step_memory(
    model: str,
    how: str | None,
    batch_size: int,
    image_size: int,
    *,
    device: str = "cpu",
    optimizer: str = "sgd",
    steps: int = 2,
    threads: int | None = None,
    timeout: float = 3600,
) -> StepMemory | None:
    """Run ``steps`` training steps of one variant in a fresh Python process and measure them.

    A fresh process per variant: what one variant leaves in the heap (or in the CUDA caching
    allocator) cannot inflate the next one's figures, and the first step is measured as a
    user's first step is. The child inherits the environment (``OMP_NUM_THREADS``,
    ``MALLOC_*``, ``QBACKPROP_TUNE_MALLOC``). Returns None (and prints why) if it fails.
    """
    job = {
        "model": model,
        "how": how,
        "batch_size": batch_size,
        "image_size": image_size,
        "device": device,
        "optimizer": optimizer,
        "steps": steps,
        "threads": threads,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--step-memory-probe", json.dumps(job)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"# step memory of {model} / {how}: timed out after {timeout:.0f} s", flush=True)
        return None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_PROBE_TAG):
            return StepMemory(**json.loads(line[len(_PROBE_TAG) :]))
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    print(f"# step memory of {model} / {how} failed (rc {done.returncode}):", flush=True)
    print("\n".join("#   " + t for t in tail), flush=True)
    return None


def _probe(job: dict) -> None:
    from qbackprop import allocator

    rss_imports = allocator.current_rss_bytes() or 0
    quiet()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    torch.manual_seed(0)
    model = make_variant(build_model(job["model"]).to(device), job["how"], copy_model=False)
    params = model.parameters()
    if job["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3)
    else:
        opt = torch.optim.SGD(params, lr=0.01)
    b, s = job["batch_size"], job["image_size"]
    x = torch.randn(b, 3, s, s, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = allocator.current_rss_bytes() or 0
    reset = allocator.reset_peak_rss()
    first = None
    for _ in range(job["steps"]):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        first = first or allocator.peak_rss_bytes()
    settings = allocator.allocator_settings()
    result = {
        "rss_imports": rss_imports,
        "rss_before": rss_before,
        "peak_rss": allocator.peak_rss_bytes() or 0,
        "first_step_peak_rss": first or 0,
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda_max_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        "peak_reset": reset,
        "allocator": settings.describe() if settings is not None else None,
    }
    print(_PROBE_TAG + json.dumps(result), flush=True)


def ratio_cell(fp32: int | None, other: int | None, digits: int = 0) -> str:
    """``"fp32 / other = ratio"`` in MiB, or empty where either is unknown."""
    if fp32 is None or other is None:
        return ""
    mib = 2**20
    return f"{fp32 / mib:.{digits}f} / {other / mib:.{digits}f} = {fp32 / max(other, 1):.2f}x"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--step-memory-probe":
        _probe(json.loads(sys.argv[2]))
    else:
        sys.exit("bench_common.py is a module of the benchmark scripts; run one of them")
