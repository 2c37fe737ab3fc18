"""scripts/accuracy_study.py on a tiny model: every setting trains, the summary and the plot
are written, and a second start resumes instead of training again."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location(
        "accuracy_study", ROOT / "scripts" / "accuracy_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = {
    "model": {"name": "test_resnet", "input_size": [3, 16, 16]},
    "quant": {"default": "2bit-stochastic"},
    "train": {
        "dataset": "synthetic",
        "num_samples": 32,
        "image_size": 16,
        "batch_size": 16,
        "epochs": 1,
        "device": "cpu",
    },
}


def test_study_trains_every_setting_and_summarizes(tmp_path, capsys):
    study = _study()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_digits.yaml").write_text(yaml.safe_dump(TINY))
    args = ["--models", "tiny", "--seeds", "2", "--retune-every", "1", "--quiet"]
    args += ["--configs", str(tmp_path / "configs"), "--out", str(tmp_path / "out")]
    assert study.main(args) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["setting"], r["seeds"]) for r in rows] == [("fp32", 2), ("2bit", 2), ("auto", 2)]
    by = {r["setting"]: r for r in rows}
    assert by["fp32"]["memory_ratio_mean"] == 1.0
    assert by["auto"]["memory_ratio_mean"] >= 11.0  # re-tuned to the 12x target
    assert by["fp32"]["faithful"] == "" and by["2bit"]["faithful"]
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 0
    runs = sorted(p.name for p in (tmp_path / "out" / "tiny").iterdir())
    assert runs == [f"{s}-seed{k}" for s in ("2bit", "auto", "fp32") for k in (0, 1)]
    printed = capsys.readouterr().out
    stamp = (tmp_path / "out" / "tiny" / "fp32-seed0" / "metrics.csv").stat().st_mtime_ns
    assert study.main(args) == 0  # finished runs are read, not trained again
    assert (tmp_path / "out" / "tiny" / "fp32-seed0" / "metrics.csv").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == printed


def test_unknown_setting_is_named():
    study = _study()
    try:
        study.setting_overrides("3bit", "12x", 10)
    except ValueError as exc:
        assert "3bit" in str(exc) and "fp32" in str(exc)
    else:
        raise AssertionError("an unknown setting was accepted")
