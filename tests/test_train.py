"""Training: config + overrides, the loop, resume, atomic checkpoints, sweeps, plots and DDP."""

import argparse
import os
import socket

import pytest
import torch
import yaml

from qbackprop.cli import app as cli
from qbackprop.cli.train import add_train_parsers
from qbackprop.errors import ConfigError, QbackpropUserError
from qbackprop.surgery import conversion_report, convert_model
from qbackprop.train import engine
from qbackprop.train.checkpoint import load_checkpoint, save_checkpoint
from qbackprop.train.config import (
    MixProbSchedule,
    TrainSpec,
    load_run_config,
    run_config_from_dict,
)
from qbackprop.train.conversion import quant_for_epoch
from qbackprop.train.engine import train
from qbackprop.train.metrics import TIMING_COLUMNS, read_metrics
from qbackprop.train.plots import plot
from qbackprop.train.schedule import lr_factor
from qbackprop.train.sweep import (
    discover_blocks,
    layer_quant,
    plan_bit_sweep,
    plan_layer_sweep,
    run_sweep,
)

# Tiny everything: 32 synthetic 16x16 images, batches of 16 -> 2 steps per epoch.
TINY = {
    "model": {"name": "test_efficientnet"},
    "quant": {"default": {"bits": 2, "rounding": "stochastic", "bucket_size": 512}},
    "train": {
        "dataset": "synthetic",
        "num_samples": 32,
        "image_size": 16,
        "batch_size": 16,
        "epochs": 2,
        "lr": 3e-3,
        "warmup_epochs": 0.5,
        "device": "cpu",
    },
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions on a shared 2-core machine: torch's thread pool only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(*overrides):
    return run_config_from_dict(TINY, source="tiny.yaml", overrides=list(overrides))


def _same_training(rows_a, rows_b):
    strip = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows_b]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Two uninterrupted epochs, shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    return train(_config(), run_dir, progress=False)


# --- config -------------------------------------------------------------------------------


def test_train_spec_reports_every_problem_with_suggestions():
    with pytest.raises(ConfigError) as exc:
        TrainSpec.from_dict(
            {"epocs": 3, "lr": -1, "optimizer": "adam", "amp": "fp8", "dataset": "mnist"},
            source="f.yaml",
        )
    text = "\n".join(exc.value.problems)
    assert len(exc.value.problems) == 5, text
    assert all(p.startswith("f.yaml: train.") for p in exc.value.problems), text
    assert 'did you mean "epochs"' in text and 'did you mean "adamw"' in text
    assert "train.lr=-1" in text and "train.dataset='mnist'" in text


def test_overrides_set_dotted_keys_and_are_validated():
    cfg = _config("train.epochs=3", "quant.default.bits=4", "model.name=test_resnet")
    assert (cfg.train.epochs, cfg.quant.default.bits, cfg.model.name) == (3, 4, "test_resnet")
    cfg = run_config_from_dict(
        {**TINY, "quant": {"default": "2bit-stochastic"}}, overrides=["quant.default.bits=4"]
    )  # a preset default stays the preset, with the override on top
    assert (cfg.quant.default.bits, cfg.quant.default.rounding.value) == (4, "stochastic")
    with pytest.raises(ConfigError) as exc:
        _config("train.epocs=3", "train.lr=fast", "quant.default.bits=0", "nonsense")
    text = "\n".join(exc.value.problems)
    assert 'unknown key train.epocs; did you mean "train.epochs"' in text
    assert "train.lr='fast'" in text and "(set by override train.lr)" in text
    assert "quant.default.bits=0" in text and "expected KEY=VALUE" in text


def test_model_and_data_must_agree():
    cfg = _config()
    assert cfg.model.num_classes == 10 and cfg.model.input_size == (3, 16, 16)
    with pytest.raises(ConfigError, match="model.input_size"):
        _config("model.input_size=[3,32,32]")
    with pytest.raises(ConfigError, match="mix_prob_schedule"):
        _config("train.mix_prob_schedule={start: 0.2, end: 0.8}")
    digits = {**TINY, "model": {"name": "test_efficientnet", "num_classes": 5}}
    with pytest.raises(ConfigError, match="digits has 10 classes"):
        run_config_from_dict(digits, overrides=["train.dataset=digits"])


def test_shipped_configs_are_valid():
    for name in ("digits_demo", "thesis_cifar10", "thesis_cifar100", "thesis_tinyimagenet"):
        path = f"configs/{name}.yaml"
        with open(path) as f:
            assert f.readline().startswith("# qbackprop train ")
        cfg = load_run_config(path)
        if name.startswith("thesis"):
            t = cfg.train
            assert (t.epochs, t.lr, t.batch_size, t.optimizer) == (50, 1e-3, 128, "adamw")
            assert (t.label_smoothing, cfg.quant.default.bucket_size) == (0.05, 512)
            assert cfg.quant.default.scale.value == "absmax" and t.grad_clip_norm


def test_lr_schedules_and_mix_prob_schedule():
    spec = TrainSpec(epochs=10, warmup_epochs=1, lr=1e-3, min_lr=1e-5)
    factors = [lr_factor(s, 100, 10, spec) for s in range(100)]
    assert factors[0] < factors[5] < factors[9] <= 1.0  # linear warmup
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.01, abs=1e-3)
    step = TrainSpec(schedule="step", warmup_epochs=0, step_epochs=3, step_gamma=0.1)
    assert lr_factor(29, 100, 10, step) == 1.0 and lr_factor(30, 100, 10, step) == pytest.approx(
        0.1
    )
    one = TrainSpec(schedule="onecycle")
    assert lr_factor(0, 100, 10, one) == pytest.approx(1 / 25)
    assert lr_factor(30, 100, 10, one) == pytest.approx(1.0)
    cfg = run_config_from_dict(
        TINY, overrides=["quant.default=2/4-mix", "train.mix_prob_schedule={start: 0.2, end: 0.8}"]
    )
    probs = [quant_for_epoch(cfg.quant, cfg.train, e).default.mix_prob for e in range(2)]
    assert probs == [0.2, 0.8]
    assert MixProbSchedule(0.5, 0.5).at(3, 10) == 0.5


# --- the loop, resume, checkpoints -----------------------------------------------------------


def test_train_writes_metrics_config_and_checkpoint(full_run):
    rows = full_run.metrics
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["train_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
        assert row["fp32_activation_bytes"] > 4 * row["saved_activation_bytes"] > 0
        assert row["step_time_s"] > 0 and row["lr"] > 0 and row["peak_cuda_mem_bytes"] is None
    resolved = yaml.safe_load((full_run.run_dir / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["model"]["num_classes"] == 10
    assert load_run_config(full_run.run_dir / "config.yaml") == full_run.config.replace(
        source=str(full_run.run_dir / "config.yaml")
    )
    state = load_checkpoint(full_run.run_dir / "checkpoint.pt")
    assert state["epoch"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(state)


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(full_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save = engine.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_config(), run_dir, progress=False)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    assert len(read_metrics(run_dir)) == 1
    resumed = train(_config(), run_dir, resume=True, progress=False)
    _same_training(resumed.metrics, full_run.metrics)
    final = full_run.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, final[key]), key


def test_resume_can_extend_the_epochs(full_run, tmp_path):
    run_dir = tmp_path / "run"
    train(_config("train.epochs=1"), run_dir, progress=False)
    rows = train(_config("train.epochs=3"), run_dir, resume=True, progress=False).metrics
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["lr"] < rows[-2]["lr"]  # the lr follows the 3-epoch schedule


def test_run_directory_guards(full_run):
    with pytest.raises(QbackpropUserError, match="--resume"):
        train(_config(), full_run.run_dir, progress=False)
    with pytest.raises(ConfigError, match="train.lr"):
        train(_config("train.lr=0.1"), full_run.run_dir, resume=True, progress=False)
    with pytest.raises(QbackpropUserError, match="no checkpoint"):
        train(_config(), full_run.run_dir / "missing", resume=True, progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def killed_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_bf16_autocast_on_cpu(tmp_path):
    cfg = _config("train.amp=bf16", "train.epochs=1", "train.max_steps_per_epoch=1")
    rows = train(cfg, tmp_path / "bf16", progress=False).metrics
    assert len(rows) == 1 and rows[0]["train_loss"] == rows[0]["train_loss"]  # finite, not NaN
    with pytest.raises(ConfigError, match="fp16"):
        train(_config("train.amp=fp16"), tmp_path / "fp16", progress=False)


# --- sweeps and plots ------------------------------------------------------------------------


def test_bit_sweep_summary_and_plots(tmp_path):
    runs = plan_bit_sweep(_config("train.epochs=1"), bits=[2, 32], seeds=2)
    assert sorted(r.name for r in runs) == sorted(
        ["b2-stochastic-bs512-seed0", "b2-stochastic-bs512-seed1", "fp32-seed0", "fp32-seed1"]
    )
    summary = run_sweep(runs, tmp_path, progress=False)
    assert [(r["group"], r["seeds"]) for r in summary] == [("b2-stochastic-bs512", 2), ("fp32", 2)]
    two_bit, fp32 = summary
    assert fp32["saved_bytes_mean"] == fp32["fp32_bytes"] and fp32["saved_bytes_std"] == 0
    assert two_bit["memory_ratio"] > 4 and two_bit["final_acc_std"] >= 0
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"final_acc_mean", "final_acc_std", "best_acc_mean", "saved_bytes_std"} <= set(header)
    names = {p.name for p in plot(tmp_path)}
    assert names == {"test_acc_vs_epoch.png", "final_acc_vs_bits.png", "memory_vs_bits.png"}
    assert all((tmp_path / "plots" / n).stat().st_size > 1000 for n in names)


def test_plot_single_run(full_run, tmp_path):
    written = plot(full_run.run_dir, tmp_path)
    assert sorted(p.name for p in written) == ["accuracy.png", "loss.png"]
    with pytest.raises(QbackpropUserError, match="nothing to plot"):
        plot(tmp_path / "empty")


def test_layer_sweep_quantizes_one_block_at_a_time():
    cfg = _config()
    blocks = discover_blocks(cfg)
    assert list(blocks)[:2] == ["stem", "blocks.0"] and {"head", "classifier"} <= set(blocks)
    for block in ("stem", "blocks.1", "classifier"):
        model = cfg.model.build()
        convert_model(model, layer_quant(cfg.quant, blocks[block], 4))
        active = {r.name for r in conversion_report(model) if r.converted and r.spec.enabled}
        assert active and all(
            any(n == p or n.startswith(p + ".") for p in blocks[block]) for n in active
        ), (block, active)
        assert {r.spec.bits for r in conversion_report(model) if r.name in active} == {4}


def test_layer_sweep_runs_and_plots_by_block(tmp_path):
    cfg = _config("train.epochs=1", "train.max_steps_per_epoch=1")
    runs = plan_layer_sweep(cfg, bits=[4], blocks=["stem", "classifier"])
    assert [r.group for r in runs] == [
        "fp32",
        "stem-b4-stochastic-bs512",
        "classifier-b4-stochastic-bs512",
    ]
    summary = run_sweep(runs, tmp_path, progress=False)
    assert [r["layer"] for r in summary] == [None, "stem", "classifier"]
    assert summary[0]["memory_ratio"] == 1.0 and summary[1]["memory_ratio"] > 1.0
    assert {p.name for p in plot(tmp_path)} == {"test_acc_vs_epoch.png", "final_acc_by_layer.png"}
    with pytest.raises(ConfigError, match="no block 'blocks.99'"):
        plan_layer_sweep(cfg, blocks=["blocks.99"])


def test_mix_prob_schedule_reconverts_each_epoch(tmp_path):
    cfg = _config("quant.default=2/4-mix", "train.mix_prob_schedule={start: 0.0, end: 1.0}")
    rows = train(cfg, tmp_path / "mix", progress=False).metrics
    assert [r["mix_prob"] for r in rows] == [0.0, 1.0]
    assert rows[0]["saved_activation_bytes"] < rows[1]["saved_activation_bytes"]  # 2 -> 4 bits


def test_classes_are_read_from_an_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog", "fox"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), (40 * i, 80, 120)).save(folder / f"{i}.png")
    raw = {
        **TINY,
        "train": {
            **TINY["train"],
            "dataset": "imagefolder",
            "batch_size": 4,
            "data_root": str(tmp_path / "data"),
            "epochs": 1,
        },
    }
    cfg = run_config_from_dict(raw)
    assert cfg.classes_from_data
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.config.model.num_classes == 3 and len(result.metrics) == 1
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["model"]["num_classes"] == 3


# --- CLI -----------------------------------------------------------------------------------


@pytest.fixture
def run_cli(monkeypatch, capsys):
    original = cli.build_parser

    def build():
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "train" not in sub.choices:  # until cli.py registers them itself
            add_train_parsers(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)

    def run(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_train_bad_overrides_exit_2_naming_the_key(run_cli, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    code, _, err = run_cli("train", cfg, "--out", tmp_path / "r", "train.epocs=3", "train.lr=x")
    assert code == 2 and "Traceback" not in err
    assert 'did you mean "train.epochs"' in err and "train.lr='x'" in err
    assert all(line.startswith("qbackprop: error:") for line in err.splitlines())
    code, _, err = run_cli("sweep", cfg, "--bits", "2,x")
    assert code == 2 and "--bits" in err
    code, out, _ = run_cli("sweep", cfg, "--bits", "2,4", "--seeds", "2", "--dry-run")
    assert code == 0 and "4 runs" in out


def test_cli_train_runs_and_plots(run_cli, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "train", cfg, "--quiet", "--out", out, "train.epochs=1", "train.max_steps_per_epoch=1"
    )
    assert code == 0, err
    assert "test accuracy" in stdout and len(read_metrics(out)) == 1
    code, stdout, _ = run_cli("plot", out)
    assert code == 0 and "accuracy.png" in stdout


# --- DDP -----------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, run_dir, out_dir, overrides=()):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    cfg = _config(
        "train.epochs=1", "train.max_steps_per_epoch=1", "train.num_samples=64", *overrides
    )
    result = train(cfg, run_dir, progress=False)
    torch.save(result.model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    plan = [(r.name, r.spec) for r in conversion_report(result.model)]
    torch.save(plan, os.path.join(out_dir, f"plan{rank}.pt"))


def test_ddp_two_cpu_processes_keep_identical_parameters(tmp_path):
    run_dir = tmp_path / "ddp"
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, _free_port(), str(run_dir), str(tmp_path)), nprocs=2, join=True
    )
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    initial = _config().model.build().state_dict()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # a step was taken
    for key in rank0:
        if "running" in key or "num_batches" in key:
            continue  # BN statistics are per process; DDP syncs them at the next forward
        assert torch.equal(rank0[key], rank1[key]), key
    assert len(read_metrics(run_dir)) == 1  # rank 0 wrote one row, rank 1 nothing


def test_ddp_retune_gives_every_rank_rank0s_plan(tmp_path):
    """Under DDP rank 0 re-tunes on its batch and every rank applies its choice: one plan,
    and the parameters stay identical."""
    overrides = ("train.max_steps_per_epoch=2", "train.retune_every=1", "train.retune_budget=12x")
    torch.multiprocessing.spawn(
        _ddp_worker,
        args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path), overrides),
        nprocs=2,
        join=True,
    )
    plans = [torch.load(tmp_path / f"plan{r}.pt", weights_only=False) for r in (0, 1)]
    assert plans[0] == plans[1]
    assert {spec.bits for _, spec in plans[0]} != {2}  # re-tuned, not the configured 2 bits
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0:
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(rank0[key], rank1[key]), key
    assert [int(r["retunes"]) for r in read_metrics(tmp_path / "ddp")] == [2]


def test_missing_dataset_is_a_user_error(tmp_path):
    cfg = _config("train.dataset=cifar10", f"train.data_root={tmp_path}")
    with pytest.raises(QbackpropUserError, match="download"):
        train(cfg, tmp_path / "run", progress=False)
