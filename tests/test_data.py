"""Tests for qbackprop.train.data: every dataset builder, missing-data errors and the loaders."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import datasets as tv_datasets

from qbackprop.errors import DatasetNotFoundError
from qbackprop.train.data import (
    DATASETS,
    DataSpec,
    build_datasets,
    build_loaders,
    num_classes,
)

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
TINY_STATS = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def unnormalize(image: torch.Tensor, stats: tuple) -> torch.Tensor:
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in stats)
    return image * std + mean


# --- DataSpec ---------------------------------------------------------------------------------


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as info:
        DataSpec("mnist")
    for name in DATASETS:
        assert name in str(info.value)


def test_every_problem_reported_at_once():
    with pytest.raises(ValueError) as info:
        DataSpec("cifar100", image_size=3, augment="yes", num_classes=10)
    message = str(info.value)
    assert "image_size" in message and "augment" in message and "num_classes" in message


def test_num_classes_and_image_size_derived():
    assert DataSpec("cifar100").num_classes == 100
    assert num_classes(DataSpec("digits")) == 10
    assert num_classes(DataSpec("synthetic", num_classes=7)) == 7
    assert DataSpec("tinyimagenet").resolved_image_size == 64
    assert DataSpec("cifar10", image_size=48).resolved_image_size == 48
    assert DataSpec("tinyimagenet").num_classes is None  # read from disk later


# --- digits ------------------------------------------------------------------------------------


def test_digits_shapes_labels_and_fixed_disjoint_split():
    train, test = build_datasets(DataSpec("digits"))
    train2, test2 = build_datasets(DataSpec("digits"))
    assert (len(train), len(test)) == (1437, 360)
    assert torch.equal(train.indices, train2.indices) and torch.equal(test.indices, test2.indices)
    train_idx, test_idx = set(train.indices.tolist()), set(test.indices.tolist())
    assert not train_idx & test_idx and train_idx | test_idx == set(range(1797))
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey as RGB
    assert set(train.targets.tolist()) == set(range(10)) == set(test.targets.tolist())
    assert isinstance(label, int)


def test_digits_images_match_sklearn_source():
    from sklearn.datasets import load_digits

    digits = load_digits()
    _, test = build_datasets(DataSpec("digits", image_size=8, augment=False))
    for i in range(5):
        image, label = test[i]
        source = int(test.indices[i])
        raw = image[0] * test.std[0] + test.mean[0]
        assert label == digits.target[source]
        torch.testing.assert_close(raw, torch.tensor(digits.images[source] / 16.0).float())


def test_digits_augmentation_only_on_train():
    train, test = build_datasets(DataSpec("digits"))
    torch.manual_seed(0)
    draws = torch.stack([train[0][0] for _ in range(8)])
    assert draws.shape == (8, 3, 32, 32)
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(test[0][0], test[0][0])
    assert torch.equal(
        build_datasets(DataSpec("digits", augment=False))[0][0][0],
        build_datasets(DataSpec("digits", augment=False))[0][0][0],
    )


# --- CIFAR: fake data in the real on-disk format ------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str``, as the cPickle that wrote the real CIFAR files did.

    Loaded with ``encoding="latin1"`` (torchvision) the keys come back as ``"data"``; with
    ``encoding="bytes"`` (the CIFAR website's recipe) as ``b"data"``, exactly as for the real files.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_py2_pickle(path: Path, content: dict) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(content)
    path.write_bytes(buffer.getvalue())


def _batch(rng: np.random.Generator, n: int, label_key: bytes, n_classes: int) -> dict:
    return {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, n_classes, size=n).tolist(),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _write_cifar(root: Path, name: str) -> dict[str, dict]:
    """Write a tiny CIFAR tree as torchvision expects it; returns the batches by file name."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, label_key, n_classes = root / "cifar-10-batches-py", b"labels", 10
        splits = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        folder, label_key, n_classes = root / "cifar-100-python", b"fine_labels", 100
        splits = {"train": 6, "test": 3}
        names = [f"f{i}".encode() for i in range(100)]
        meta = ("meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    folder.mkdir(parents=True)
    batches = {}
    for file_name, n in splits.items():
        batches[file_name] = _batch(rng, n, label_key, n_classes)
        if name == "cifar100":
            batches[file_name][b"coarse_labels"] = [0] * n
        _write_py2_pickle(folder / file_name, batches[file_name])
    _write_py2_pickle(folder / meta[0], meta[1])
    return batches


def _accept_fake_md5s(monkeypatch, cls: type, folder: Path) -> None:
    """Point the class's checksums at the fake files: the real integrity check still runs."""

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", cls.meta | {"md5": md5(cls.meta["filename"])})


@pytest.mark.parametrize(
    "name, cls, stats, train_files, test_file, label_key",
    [
        (
            "cifar10",
            tv_datasets.CIFAR10,
            CIFAR10_STATS,
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            b"labels",
        ),
        ("cifar100", tv_datasets.CIFAR100, CIFAR100_STATS, ["train"], "test", b"fine_labels"),
    ],
)
def test_cifar_reads_real_format(
    tmp_path, monkeypatch, name, cls, stats, train_files, test_file, label_key
):
    batches = _write_cifar(tmp_path, name)
    raw = (tmp_path / cls.base_folder / test_file).read_bytes()
    assert label_key in pickle.loads(raw, encoding="bytes")  # keys as on the CIFAR website
    # The fake files fail torchvision's md5 check: reported as missing or corrupted.
    with pytest.raises(DatasetNotFoundError, match=cls.base_folder):
        build_datasets(DataSpec(name, root=str(tmp_path)))
    _accept_fake_md5s(monkeypatch, cls, tmp_path / cls.base_folder)

    train, test = build_datasets(DataSpec(name, root=str(tmp_path), augment=False))
    expected_train = np.concatenate([batches[f][b"data"] for f in train_files])
    assert len(train) == len(expected_train) and len(test) == 3
    assert train.targets == sum((batches[f][label_key] for f in train_files), [])
    assert len(train.classes) == (10 if name == "cifar10" else 100)
    for dataset, data, labels in (
        (train, expected_train, train.targets),
        (test, batches[test_file][b"data"], batches[test_file][label_key]),
    ):
        for i in (0, len(dataset) - 1):
            image, label = dataset[i]
            want = torch.tensor(data[i].reshape(3, 32, 32) / 255.0, dtype=torch.float32)
            torch.testing.assert_close(unnormalize(image, stats), want, atol=1e-5, rtol=0)
            assert label == labels[i]
    resized, _ = build_datasets(DataSpec(name, root=str(tmp_path), image_size=16))
    assert resized[0][0].shape == (3, 16, 16)


# --- Tiny ImageNet -----------------------------------------------------------------------------

TINY_COLORS = {"n03000001": (200, 30, 30), "n01000001": (30, 200, 30), "n02000001": (30, 30, 200)}


def _write_tiny(root: Path) -> list[tuple[str, str]]:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_COLORS) + "\n")  # unsorted, like the real one
    for wnid, color in TINY_COLORS.items():
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(2):
            Image.new("RGB", (64, 64), color).save(images / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    val = [("val_0.JPEG", "n02000001"), ("val_1.JPEG", "n03000001"), ("val_2.JPEG", "n01000001")]
    val.append(("val_3.JPEG", "n02000001"))
    lines = [f"{f}\t{w}\t0\t0\t63\t63" for f, w in val]
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for filename, wnid in val:
        Image.new("RGB", (64, 64), TINY_COLORS[wnid]).save(base / "val" / "images" / filename)
    # Some real Tiny ImageNet images are greyscale; they must come back as RGB.
    Image.new("L", (64, 64), 128).save(base / "train" / "n01000001" / "images" / "grey.JPEG")
    return val


def test_tinyimagenet_classes_lengths_and_val_labels(tmp_path):
    val = _write_tiny(tmp_path)
    spec = DataSpec("tinyimagenet", root=str(tmp_path), augment=False)
    train, test = build_datasets(spec)
    classes = sorted(TINY_COLORS)
    assert train.classes == test.classes == classes and num_classes(spec) == 3
    assert (len(train), len(test)) == (7, 4)
    assert test.targets == [classes.index(wnid) for _, wnid in val]
    for i in range(len(test)):
        image, label = test[i]
        assert image.shape == (3, 64, 64)
        color = unnormalize(image, TINY_STATS).mean(dim=(1, 2)) * 255
        want = torch.tensor(TINY_COLORS[classes[label]]).float()
        torch.testing.assert_close(color, want, atol=4, rtol=0)
    assert all(train[i][0].shape == (3, 64, 64) for i in range(len(train)))
    assert sorted(train.targets) == [0, 0, 0, 1, 1, 2, 2]


def test_tinyimagenet_resized_and_augmented(tmp_path):
    _write_tiny(tmp_path)
    train, test = build_datasets(DataSpec("tinyimagenet", root=str(tmp_path), image_size=32))
    assert train[0][0].shape == test[0][0].shape == (3, 32, 32)


# --- imagefolder and synthetic -----------------------------------------------------------------


def test_imagefolder_shapes_and_labels_follow_train_classes(tmp_path):
    for cls, color in (("cat", (250, 0, 0)), ("dog", (0, 0, 250))):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20 + 5 * i, 30), color).save(tmp_path / "train" / cls / f"{i}.png")
    (tmp_path / "val" / "dog").mkdir(parents=True)  # val lacks "cat": dog must stay label 1
    Image.new("RGB", (40, 40), (0, 0, 250)).save(tmp_path / "val" / "dog" / "0.png")
    spec = DataSpec("imagefolder", root=str(tmp_path), image_size=16)
    train, test = build_datasets(spec)
    assert num_classes(spec) == 2 and train.classes == test.classes == ["cat", "dog"]
    assert (len(train), len(test)) == (4, 1)
    assert [train[i][0].shape for i in range(4)] == [(3, 16, 16)] * 4
    image, label = test[0]
    assert image.shape == (3, 16, 16) and label == 1
    assert unnormalize(image, IMAGENET_STATS)[2].mean() > 0.9


def test_synthetic_shapes_labels_and_learnable(tmp_path):
    spec = DataSpec("synthetic", num_samples=200, num_classes=4, augment=False)
    train, test = build_datasets(spec)
    assert (len(train), len(test)) == (200, 50) and num_classes(spec) == 4
    assert train[0][0].shape == (3, 32, 32)
    assert set(train.targets.tolist()) == set(range(4))
    assert torch.equal(train.images, build_datasets(spec)[0].images)  # fixed seed
    # Nearest class mean separates the classes: the signal is learnable.
    means = torch.stack([train.images[train.targets == c].mean(0) for c in range(4)])
    distances = torch.cdist(test.images.flatten(1), means.flatten(1))
    accuracy = (distances.argmin(1) == test.targets).float().mean()
    assert accuracy > 0.9


# --- missing data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("tinyimagenet", "tiny-imagenet-200"),
        ("imagefolder", "train"),
    ],
)
def test_missing_data_names_the_path(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(DataSpec(name, root=str(tmp_path)))
    assert str(tmp_path / expected) in str(info.value)
    if name in ("cifar10", "cifar100", "tinyimagenet"):
        assert "download: true" in str(info.value)
    if name == "tinyimagenet":
        assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in str(info.value)
    if name in ("tinyimagenet", "imagefolder"):
        with pytest.raises(DatasetNotFoundError):
            num_classes(DataSpec(name, root=str(tmp_path)))


# --- loaders -----------------------------------------------------------------------------------


def test_loaders_shapes_and_seeded_order():
    spec = DataSpec("digits", augment=False)
    train_loader, test_loader = build_loaders(spec, 32, seed=3)
    x, y = next(iter(train_loader))
    assert x.shape == (32, 3, 32, 32) and y.shape == (32,)
    assert len(train_loader) == 1437 // 32 and len(test_loader) == -(-360 // 32)
    x2, y2 = next(iter(build_loaders(spec, 32, seed=3)[0]))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, y3 = next(iter(build_loaders(spec, 32, seed=4)[0]))
    assert not torch.equal(y, y3)
    _, test_y = next(iter(test_loader))
    assert torch.equal(test_y, test_loader.dataset.targets[:32])  # not shuffled


def test_distributed_loader_uses_seeded_sampler(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        spec = DataSpec("synthetic", num_samples=64)
        train_loader, _ = build_loaders(spec, 8, distributed=True, seed=5)
        assert isinstance(train_loader.sampler, DistributedSampler)
        first = list(train_loader.sampler)
        again = list(build_loaders(spec, 8, distributed=True, seed=5)[0].sampler)
        train_loader.sampler.set_epoch(1)
        assert first == again and list(train_loader.sampler) != first
        assert len(train_loader) == 8
    finally:
        dist.destroy_process_group()
