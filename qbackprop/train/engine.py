"""The training loop: one call trains (or resumes) a RunConfig into a run directory."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qbackprop import allocator
from qbackprop.config import QuantConfig
from qbackprop.errors import ConfigError, QbackpropUserError

from .checkpoint import CHECKPOINT_NAME, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, TrainSpec
from .conversion import apply_quant, measure_memory, quant_for_epoch
from .data import build_loaders, num_classes
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state,
    init_distributed,
    load_full_state,
    shard_blocks,
)
from .metrics import METRICS_NAME, append_metrics, read_metrics, truncate_metrics
from .rundir import check_resumable, write_config
from .schedule import build_optimizer, build_scheduler

MiB = 2**20


@dataclass
class TrainResult:
    """What :func:`train` leaves behind.

    Args:
        run_dir: the run directory (metrics.csv, config.yaml, checkpoint.pt).
        metrics: one dict per epoch, as in metrics.csv (every epoch, resumed ones included).
        model: the trained, unwrapped model (still converted).
        config: the fully resolved config.
    """

    run_dir: Path
    metrics: list[dict[str, Any]]
    model: nn.Module
    config: RunConfig


def _epoch_seed(*key: int) -> int:
    # A pure function of (seed, epoch, ...): a resumed run draws exactly what the
    # uninterrupted one drew, whatever happened in earlier epochs.
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _seed_epoch(loader: DataLoader, spec: TrainSpec, epoch: int, ctx: DistContext) -> None:
    seed = _epoch_seed(spec.seed, epoch, 0, ctx.rank)  # augmentation, rounding: per rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):  # DistributedSampler shuffles by (seed, epoch) itself
        sampler.set_epoch(epoch)
    elif getattr(sampler, "generator", None) is not None:
        sampler.generator.manual_seed(_epoch_seed(spec.seed, epoch, 1))  # data order


def _loaders(config: RunConfig, ctx: DistContext) -> tuple[DataLoader, DataLoader]:
    spec = config.train
    data = spec.data_spec(config.model.num_classes)
    train, test = build_loaders(
        data, spec.batch_size, distributed=ctx.distributed, seed=spec.seed, drop_last=True
    )
    pin = ctx.device.type == "cuda"
    if not spec.workers and not pin:
        return train, test

    # build_loaders keeps workers alive across epochs, which carries their augmentation RNG
    # from epoch to epoch; fresh workers each epoch are seeded from the epoch's RNG instead,
    # so a resumed run replays the same augmentations.
    def again(loader: DataLoader) -> DataLoader:
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=loader.sampler,
            drop_last=loader.drop_last,
            num_workers=spec.workers,
            pin_memory=pin,
        )

    return again(train), again(test)


def _autocast(spec: TrainSpec, device: torch.device):
    if spec.amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if spec.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _resolve(config: RunConfig, device: torch.device) -> RunConfig:
    """Fill in what needs the disk (class count) and check what needs the device."""
    if config.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{config.source}: train.amp='fp16' needs CUDA (this run is on {device.type}); "
            "use bf16 or off"
        )
    if config.classes_from_data:
        classes = num_classes(config.train.data_spec())
        model = dataclasses.replace(config.model, num_classes=classes)
        config = config.replace(model=model, classes_from_data=False)
    return config


def _memory_peaks(device: torch.device) -> dict[str, Any]:
    """The epoch's memory peaks for metrics.csv: host RSS, and CUDA allocated/reserved."""
    peaks: dict[str, Any] = {}
    rss = allocator.peak_rss_bytes()
    if rss is not None:
        peaks["peak_rss_mib"] = round(rss / MiB, 1)
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device)
        peaks["peak_cuda_mem_bytes"] = allocated
        peaks["cuda_max_allocated_mib"] = round(allocated / MiB, 1)
        peaks["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / MiB, 1)
    return peaks


class _Trainer:
    """The state of one run; :func:`train` is its public face."""

    def __init__(self, config: RunConfig, run_dir: Path, ctx: DistContext, progress: bool):
        self.config, self.spec, self.ctx, self.run_dir = config, config.train, ctx, run_dir
        self.device = ctx.device
        self.progress = progress and ctx.is_main
        self.train_loader, self.test_loader = _loaders(config, ctx)
        steps = len(self.train_loader)
        if steps == 0:
            raise QbackpropUserError(
                f"{config.source}: train.batch_size={self.spec.batch_size} is larger than the "
                f"training set ({len(self.train_loader.dataset)} images per process)"
            )
        self.steps = min(steps, self.spec.max_steps_per_epoch or steps)
        torch.manual_seed(self.spec.seed)  # same initial weights for every rank and rerun
        self.model = config.model.build().to(self.device)
        self.quant = None
        self.memory = None
        self.fsdp = ctx.distributed and self.spec.distributed == "fsdp"
        if self.spec.retune_every and self.fsdp:
            raise QbackpropUserError(
                f"{config.source}: train.retune_every={self.spec.retune_every} needs the whole "
                "model on every rank (tune measures unsharded layers); use train.distributed=ddp"
            )
        self.retuned = False  # once re-tuned, the tuned config replaces quant_for_epoch's
        self.base_bytes = 0  # the bytes quant: keeps, the budget of a re-tune without one
        if self.fsdp:
            # Converted (and measured) before sharding; the optimizer then holds the shards.
            self.set_quant(0)
            shard_blocks(self.model)
        self.optimizer = build_optimizer(self.model, self.spec)
        self.scheduler = build_scheduler(self.optimizer, self.spec, self.steps)
        enabled = self.spec.amp == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=enabled)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.spec.label_smoothing)
        self.start_epoch, self.best_acc = 0, 0.0

    # --- state ------------------------------------------------------------------------------

    def state(self, epoch: int) -> dict[str, Any]:
        """The checkpoint; under FSDP every rank must call it (it gathers the shards)."""
        if self.fsdp:
            model_state, optim_state = full_state(self.model, self.optimizer)
        else:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "epoch": epoch,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "best_test_acc": self.best_acc,
            "world_size": self.ctx.world_size,
            # A re-tuned plan (train.retune_every) is part of the run: --resume restores it.
            "tuned_quant": self.quant.to_dict() if self.retuned else None,
            "base_bytes": self.base_bytes,
        }

    def load(self, state: dict[str, Any]) -> None:
        if self.fsdp:
            load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The optimizer restored the lr of the run's last step; recompute it from the schedule,
        # which depends on train.epochs (a resume may extend them).
        sched = self.scheduler
        for group, base, factor in zip(
            self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(sched.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_epoch, self.best_acc = state["epoch"], state["best_test_acc"]
        if state.get("tuned_quant") is not None:
            tuned = QuantConfig.from_dict(state["tuned_quant"], source=f"{self.config.source} "
                                          "(the re-tuned plan of the checkpoint)")  # fmt: skip
            self.base_bytes = state.get("base_bytes", 0)
            self._apply_tuned(tuned)

    # --- one epoch --------------------------------------------------------------------------

    def set_quant(self, epoch: int) -> None:
        quant = quant_for_epoch(self.config.quant, self.spec, epoch)
        if quant == self.quant or self.retuned:
            return
        apply_quant(self.model, quant, self.config.source)
        self.quant = quant
        self.memory = measure_memory(
            self.model,
            self.train_loader.dataset,
            self.spec.batch_size,
            self.spec.seed,
            self.device,
        )
        self.base_bytes = self.memory.stored_bytes  # what a re-tune keeps (retune_every)

    def train_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        model.train()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, n
        step_times = []
        retunes = 0
        lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(
            total=self.steps,
            desc=f"epoch {epoch + 1}/{self.spec.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for step, (images, labels) in enumerate(self.train_loader):
            if step == self.steps:
                break
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            start = time.perf_counter()
            loss, correct = self.step(model, images, labels)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_times.append(time.perf_counter() - start)
            every = self.spec.retune_every
            if every and (epoch * self.steps + step + 1) % every == 0:
                self.retune(images, labels)
                retunes += 1
            n = labels.numel()
            totals += torch.stack(
                [loss.detach().double() * n, correct.double(), totals.new_tensor(n)]
            )
            bar.update()
            if step % 5 == 0 or step == self.steps - 1:
                bar.set_postfix(
                    loss=f"{totals[0] / totals[2]:.3f}", acc=f"{totals[1] / totals[2]:.3f}"
                )
        bar.close()
        totals = all_reduce_sum(totals, self.ctx)
        return {
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(totals[1] / totals[2]),
            "lr": lr,
            # the median: robust to the first steps' compilation and to a busy machine's spikes
            "step_time_s": statistics.median(step_times),
            **({"retunes": retunes} if self.spec.retune_every else {}),
        }

    def retune(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """``qbackprop tune`` on the current weights and this batch, at ``train.retune_budget``
        (default: the bytes the config's own quant section keeps); the model is converted with
        the result in place. Under DDP rank 0 tunes on its batch and every rank applies its
        choice, so the ranks keep one plan."""
        from ..tune import Budget, MiB, parse_budget, tune

        if self.memory is None or not self.memory.stored_bytes:
            return
        if self.spec.retune_budget is not None:
            budget = parse_budget(self.spec.retune_budget)
        else:
            budget = Budget("mib", self.base_bytes / MiB)
        tuned = None
        if self.ctx.is_main:
            was_training = self.model.training
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the training's random streams go on
                batch = [(images, labels)]
                result = tune(self.model, self.config.quant, batch, budget, fidelity_draws=0)
            self.model.train(was_training)
            tuned = result.config.to_dict()
        tuned = broadcast_object(tuned, self.ctx)
        self._apply_tuned(QuantConfig.from_dict(tuned, source=f"{self.config.source} (re-tuned)"))

    def _apply_tuned(self, quant: QuantConfig) -> None:
        was_training = self.model.training
        apply_quant(self.model, quant, self.config.source)
        self.model.train(was_training)
        self.quant, self.retuned = quant, True
        self.memory = measure_memory(
            self.model, self.train_loader.dataset, self.spec.batch_size, self.spec.seed, self.device
        )

    def step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.spec, self.device):
            logits = model(images)
            loss = self.criterion(logits.float(), labels)
        self.scaler.scale(loss).backward()
        if self.spec.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), self.spec.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, (logits.argmax(1) == labels).sum()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        # Every rank evaluates the whole (unsharded) test set on the unwrapped model: no
        # collectives, so no rank can wait on another here.
        self.model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for images, labels in self.test_loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with _autocast(self.spec, self.device):
                logits = self.model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            count += labels.numel()
        return {"test_loss": loss_sum / count, "test_acc": correct / count}

    def run(self) -> None:
        model = self.model
        if self.ctx.distributed and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        for epoch in range(self.start_epoch, self.spec.epochs):
            started = time.perf_counter()
            self.set_quant(epoch)
            _seed_epoch(self.train_loader, self.spec, epoch, self.ctx)
            # memory peaks of the epoch's steps and evaluation (not of set_quant's measurement)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            allocator.reset_peak_rss()
            row = {"epoch": epoch + 1, **self.train_epoch(model, epoch), **self.evaluate()}
            self.best_acc = max(self.best_acc, row["test_acc"])
            row["mix_prob"] = self.quant.default.mix_prob
            row["saved_activation_bytes"] = self.memory.stored_bytes
            row["fp32_activation_bytes"] = self.memory.fp32_bytes
            row["epoch_time_s"] = time.perf_counter() - started
            row.update(_memory_peaks(self.device))
            state = self.state(epoch + 1) if self.fsdp or self.ctx.is_main else None
            if self.ctx.is_main:
                append_metrics(self.run_dir / METRICS_NAME, row)
                save_checkpoint(state, self.run_dir / CHECKPOINT_NAME)
                self.log(row)
            barrier(self.ctx)

    def log(self, row: dict[str, Any]) -> None:
        if not self.progress:
            return
        saved, fp32 = row["saved_activation_bytes"], row["fp32_activation_bytes"]
        rss = row.get("peak_rss_mib")
        cuda = row.get("cuda_max_allocated_mib")
        peaks = "" if rss is None else f" | peak RSS {rss:.0f} MiB"
        if cuda is not None:
            peaks += (
                f", CUDA {cuda:.0f} MiB allocated / {row['cuda_max_reserved_mib']:.0f} reserved"
            )
        tqdm.write(
            f"epoch {row['epoch']}/{self.spec.epochs}: train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_acc']:.2f}% | test loss {row['test_loss']:.4f} "
            f"acc {100 * row['test_acc']:.2f}% | lr {row['lr']:.2e} | saved activations "
            f"{saved / MiB:.2f} MiB/step ({fp32 / max(saved, 1):.1f}x less than fp32) | "
            f"{row['step_time_s']:.3f} s/step{peaks}"
        )


def train(
    config: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Train ``config`` into ``run_dir``; under torchrun, as one DDP process of many.

    Writes ``config.yaml`` (fully resolved), appends one row per epoch to ``metrics.csv`` and
    replaces ``checkpoint.pt`` atomically after every epoch (rank 0 only). Data order,
    augmentation and stochastic rounding of epoch ``e`` depend only on ``(seed, e, rank)``,
    so a resumed run reproduces the metrics of an uninterrupted one.

    Args:
        config: from :func:`~qbackprop.train.config.load_run_config`.
        run_dir: output directory; created if missing.
        resume: continue from ``run_dir/checkpoint.pt`` up to ``config.train.epochs``;
            without it, a directory that already holds a run is an error.
        progress: tqdm bars and one summary line per epoch (rank 0).

    Returns:
        The run directory, its metrics (all epochs) and the trained model.

    Raises:
        QbackpropUserError: a bad config, missing data, or a run directory that conflicts.
    """
    run_dir = Path(run_dir)
    owns_group = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(config.train.device)
    try:
        config = _resolve(config, ctx.device)
        state = check_resumable(run_dir, config, resume, ctx.device)
        trainer = _Trainer(config, run_dir, ctx, progress)
        if state is not None:
            trainer.load(state)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(run_dir / METRICS_NAME, trainer.start_epoch)
            write_config(config, run_dir)
        barrier(ctx)
        trainer.run()
        if trainer.quant is None:  # nothing left to train: still return the configured model
            apply_quant(trainer.model, quant_for_epoch(config.quant, config.train, 0))
        return TrainResult(run_dir, read_metrics(run_dir), trainer.model, config)
    finally:
        if owns_group and ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()
