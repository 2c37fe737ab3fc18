"""Datasets and loaders: digits, CIFAR-10/100, Tiny ImageNet, image folders and synthetic data."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader, find_classes
from torchvision.datasets.utils import download_and_extract_archive

from qbackprop.errors import DatasetNotFoundError, QbackpropUserError
from qbackprop.schema import Problem, boolean, choice, integer, join, option, text, validate

DATASETS = ("digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder", "synthetic")

# Class counts fixed by the dataset itself; the others are read from disk or from the spec.
_FIXED_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
# imagefolder has no native size (its images vary), so it defaults to the ImageNet input size.
_NATIVE_SIZE = {
    "digits": 32,
    "cifar10": 32,
    "cifar100": 32,
    "tinyimagenet": 64,
    "imagefolder": 224,
    "synthetic": 32,
}
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_TINY_STATS = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_TINY_FOLDER = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_SPLIT_SEED = 0  # digits/synthetic splits never change between runs or machines
_TRAIN_FRACTION = 0.8
_MIN_IMAGE_SIZE = 8


def download_problems(name: str, download: Any, path: str) -> list[Problem]:
    if download is True and name == "imagefolder":
        return [Problem(path, True, "false for imagefolder (there is nothing to download)")]
    return []


@dataclass(frozen=True)
class DataSpec:
    """Which dataset to train on and how to prepare it (the ``train:`` section's data keys,
    under these names; ``qbackprop schema data``). ``num_classes``: synthetic: the number of
    classes (default 10); digits/CIFAR: filled in, and checked if given; Tiny ImageNet and
    imagefolder: None (read from disk by ``num_classes(spec)``), or a number that
    ``build_datasets`` checks against the disk.

    Raises:
        ConfigError: a ``ValueError`` listing every invalid field and what is allowed.
    """

    name: str = option(kind=choice(DATASETS), doc="the dataset")
    root: str = option(
        "data",
        text(paths=True, expected="a non-empty path"),
        "folder holding the data (<root>/cifar-10-batches-py, <root>/tiny-imagenet-200, "
        "<root>/train for imagefolder, ...)",
    )
    image_size: int | None = option(
        None,
        integer(
            _MIN_IMAGE_SIZE,
            nullable=True,
            expected=f"null (native size) or an integer >= {_MIN_IMAGE_SIZE}",
        ),
        "square side fed to the model; null: native (digits/CIFAR/synthetic 32, Tiny "
        "ImageNet 64, imagefolder 224)",
    )
    augment: bool = option(
        True, boolean(), "random crop (padding image_size // 8) and horizontal flip, train split"
    )
    download: bool = option(
        False, boolean(), "let torchvision fetch CIFAR / Tiny ImageNet when missing (internet)"
    )
    num_samples: int = option(
        512, integer(1), "synthetic only: training images (the test split has a quarter as many)"
    )
    num_classes: int | None = option(
        None,
        integer(2, nullable=True),
        "class count; null: the dataset's (read from disk if need be)",
    )

    def __post_init__(self) -> None:
        validate(self, "data")
        if self.num_classes is None and self.name in _FIXED_CLASSES:
            object.__setattr__(self, "num_classes", _FIXED_CLASSES[self.name])
        if self.num_classes is None and self.name == "synthetic":
            object.__setattr__(self, "num_classes", 10)

    @staticmethod
    def cross_problems(values: dict, failed: set, path: str) -> list[Problem]:
        name, classes = values.get("name"), values.get("num_classes")
        problems = download_problems(name, values.get("download"), join(path, "download"))
        fixed = _FIXED_CLASSES.get(name)
        if "num_classes" not in failed and fixed and classes not in (None, fixed):
            problems.append(
                Problem(join(path, "num_classes"), classes, f"null or {fixed} for {name}")
            )
        return problems

    @property
    def resolved_image_size(self) -> int:
        """``image_size``, or the dataset's native size when it is ``None``."""
        return self.image_size if self.image_size is not None else _NATIVE_SIZE[self.name]


class TensorImageDataset(Dataset):
    """In-memory images in [0, 1], augmented (optionally) and normalised per item.

    Args:
        images: float tensor ``(N, C, H, W)`` with values in [0, 1].
        labels: int64 tensor ``(N,)``.
        mean: per-channel mean used for normalisation.
        std: per-channel standard deviation used for normalisation.
        augment: random crop (padding ``H // 8``, zero-filled like torchvision) plus flip.
        classes: class names, index = label.
        indices: position of each image in the source data (digits), to audit the split.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        classes: Sequence[str],
        indices: torch.Tensor | None = None,
    ) -> None:
        self.images = images
        self.indices = indices
        self.targets = labels
        self.mean = torch.tensor(mean, dtype=images.dtype).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=images.dtype).view(-1, 1, 1)
        self.augment = augment
        self.classes = list(classes)
        self.padding = images.shape[-1] // 8

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            image = self._random_crop_flip(image)
        return (image - self.mean) / self.std, int(self.targets[index])

    def _random_crop_flip(self, image: torch.Tensor) -> torch.Tensor:
        # torch's global RNG, so DataLoader worker seeding makes this reproducible.
        pad = self.padding
        height, width = image.shape[-2:]
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        image = padded[:, top : top + height, left : left + width]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image


class ImageListDataset(Dataset):
    """Images read from a list of ``(path, label)`` pairs (Tiny ImageNet's train and val).

    Args:
        samples: ``(path, label)`` per image.
        classes: class names (wnids), index = label.
        transform: applied to each RGB PIL image.
    """

    def __init__(
        self, samples: list[tuple[str, int]], classes: Sequence[str], transform: Callable
    ) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(default_loader(path)), label


class _ImageFolderWithClasses(tv_datasets.ImageFolder):
    """ImageFolder using the train split's class list, so val labels match train labels."""

    def __init__(self, root: str, classes: list[str], transform: Callable) -> None:
        self._given_classes = classes
        # A class with no val images is fine; ImageFolder would reject it by default.
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}


def _pil_transform(
    size: int, native: int | None, stats: tuple[Sequence[float], Sequence[float]], augment: bool
) -> T.Compose:
    steps: list[Callable] = [] if size == native else [T.Resize((size, size))]
    if augment:
        steps += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(*stats)]
    return T.Compose(steps)


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    return images.mean(dim=(0, 2, 3)).tolist(), images.std(dim=(0, 2, 3)).tolist()


def _split_tensors(
    images: torch.Tensor, labels: torch.Tensor, spec: DataSpec, classes: Sequence[str]
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Fixed seeded 80/20 split; normalised with the train split's statistics."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_train = int(len(labels) * _TRAIN_FRACTION)
    train_idx, test_idx = order[:n_train], order[n_train:]
    mean, std = _channel_stats(images[train_idx])
    train = TensorImageDataset(
        images[train_idx], labels[train_idx], mean, std, spec.augment, classes, train_idx
    )
    test = TensorImageDataset(
        images[test_idx], labels[test_idx], mean, std, False, classes, test_idx
    )
    return train, test


def _build_digits(spec: DataSpec) -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    size = spec.resolved_image_size
    images = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return _split_tensors(images, labels, spec, [str(i) for i in range(10)])


def _build_synthetic(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """Class-dependent smooth patterns plus pixel noise: learnable, but not from one pixel."""
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    size, n_classes = spec.resolved_image_size, spec.num_classes
    # Low-frequency patterns survive the random-crop shift of the augmentation.
    coarse = torch.rand(n_classes, 3, 4, 4, generator=generator)
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    n_test = max(1, spec.num_samples // 4)
    total = spec.num_samples + n_test
    labels = (torch.arange(total) % n_classes)[torch.randperm(total, generator=generator)]
    noise = 0.25 * torch.randn(total, 3, size, size, generator=generator)
    images = (0.25 + 0.5 * patterns[labels] + noise).clamp(0.0, 1.0)
    classes = [f"class_{i}" for i in range(n_classes)]
    train_images, test_images = images[: spec.num_samples], images[spec.num_samples :]
    mean, std = _channel_stats(train_images)
    train = TensorImageDataset(
        train_images, labels[: spec.num_samples], mean, std, spec.augment, classes
    )
    test = TensorImageDataset(test_images, labels[spec.num_samples :], mean, std, False, classes)
    return train, test


def _build_cifar(spec: DataSpec) -> tuple[Dataset, Dataset]:
    cls = tv_datasets.CIFAR10 if spec.name == "cifar10" else tv_datasets.CIFAR100
    stats = _CIFAR10_STATS if spec.name == "cifar10" else _CIFAR100_STATS
    size, root = spec.resolved_image_size, os.path.expanduser(spec.root)
    try:
        # One download serves both splits; the test split only reads.
        train = cls(
            root,
            train=True,
            download=spec.download,
            transform=_pil_transform(size, 32, stats, spec.augment),
        )
        test = cls(root, train=False, transform=_pil_transform(size, 32, stats, False))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetNotFoundError(_cifar_missing(spec, cls)) from err
    except OSError as err:  # download failed (offline, refused, ...)
        raise DatasetNotFoundError(f"{_cifar_missing(spec, cls)} Download failed: {err}") from err
    return train, test


def _cifar_missing(spec: DataSpec, cls: type) -> str:
    path = os.path.join(os.path.expanduser(spec.root), cls.base_folder)
    files = ", ".join(name for name, _ in cls.train_list + cls.test_list)
    return (
        f"{spec.name} not found (or corrupted) at {path}: expected files {files} and "
        f"{cls.meta['filename']}. Set `train.download: true` to download it when online, or "
        f"extract the torchvision archive {cls.url} into {os.path.expanduser(spec.root)} "
        f"so that {path} exists."
    )


def _tiny_paths(root: str) -> dict[str, str]:
    base = os.path.join(os.path.expanduser(root), _TINY_FOLDER)
    return {
        "base": base,
        "wnids": os.path.join(base, "wnids.txt"),
        "train": os.path.join(base, "train"),
        "val_images": os.path.join(base, "val", "images"),
        "val_annotations": os.path.join(base, "val", "val_annotations.txt"),
    }


def _tiny_missing(root: str, missing: list[str]) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        [f"Tiny ImageNet is incomplete or missing: {path} not found" for path in missing]
        + [
            f"download {_TINY_URL} and unzip it under {os.path.expanduser(root)} (giving "
            f"{_tiny_paths(root)['base']}), or set `train.download: true` when online"
        ]
    )


def _tiny_classes(root: str) -> list[str]:
    """Class index = position in the *sorted* wnids, the order ImageFolder gives ``train/``."""
    paths = _tiny_paths(root)
    missing = [paths[key] for key in ("wnids", "train", "val_images", "val_annotations")]
    missing = [path for path in missing if not os.path.exists(path)]
    if missing:
        raise _tiny_missing(root, missing)
    with open(paths["wnids"]) as f:
        return sorted({line.strip() for line in f if line.strip()})


def _tiny_train_samples(root: str, classes: list[str]) -> list[tuple[str, int]]:
    train_dir = _tiny_paths(root)["train"]
    samples, missing = [], []
    for label, wnid in enumerate(classes):
        image_dir = os.path.join(train_dir, wnid, "images")
        if not os.path.isdir(image_dir):
            missing.append(image_dir)
            continue
        names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith((".jpeg", ".jpg")))
        samples += [(os.path.join(image_dir, name), label) for name in names]
    if missing:
        raise _tiny_missing(root, missing)
    return samples


def _tiny_val_samples(root: str, classes: list[str]) -> list[tuple[str, int]]:
    paths = _tiny_paths(root)
    index = {wnid: i for i, wnid in enumerate(classes)}
    samples = []
    with open(paths["val_annotations"]) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            filename, wnid = line.split("\t")[:2]
            if wnid not in index:
                raise QbackpropUserError(
                    f"{paths['val_annotations']}:{line_no}: wnid {wnid!r} is not in "
                    f"{paths['wnids']}; the dataset looks corrupted, unzip it again"
                )
            samples.append((os.path.join(paths["val_images"], filename), index[wnid]))
    return samples


def _build_tinyimagenet(spec: DataSpec) -> tuple[Dataset, Dataset]:
    base = _tiny_paths(spec.root)["base"]
    if spec.download and not os.path.isdir(base):
        root = os.path.expanduser(spec.root)
        try:
            download_and_extract_archive(_TINY_URL, root, md5=_TINY_MD5)
        except OSError as err:
            raise DatasetNotFoundError(f"download of {_TINY_URL} failed: {err}") from err
    classes = _tiny_classes(spec.root)
    _check_class_count(spec, len(classes), _tiny_paths(spec.root)["wnids"])
    size = spec.resolved_image_size
    train = ImageListDataset(
        _tiny_train_samples(spec.root, classes),
        classes,
        _pil_transform(size, 64, _TINY_STATS, spec.augment),
    )
    test = ImageListDataset(
        _tiny_val_samples(spec.root, classes),
        classes,
        _pil_transform(size, 64, _TINY_STATS, False),
    )
    return train, test


def _imagefolder_dirs(root: str) -> tuple[str, str]:
    root = os.path.expanduser(root)
    train_dir = os.path.join(root, "train")
    test_dirs = [os.path.join(root, name) for name in ("val", "test")]
    test_dir = next((path for path in test_dirs if os.path.isdir(path)), None)
    missing = [] if os.path.isdir(train_dir) else [f"{train_dir} not found"]
    if test_dir is None:
        missing.append(f"neither {test_dirs[0]} nor {test_dirs[1]} found")
    if missing:
        raise DatasetNotFoundError(
            missing
            + ["imagefolder expects <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg"]
        )
    return train_dir, test_dir


def _build_imagefolder(spec: DataSpec) -> tuple[Dataset, Dataset]:
    train_dir, test_dir = _imagefolder_dirs(spec.root)
    size = spec.resolved_image_size
    try:
        train = tv_datasets.ImageFolder(
            train_dir, transform=_pil_transform(size, None, _IMAGENET_STATS, spec.augment)
        )
    except FileNotFoundError as err:  # no class folders or no images in them
        raise DatasetNotFoundError(f"no usable images under {train_dir}: {err}") from err
    _check_class_count(spec, len(train.classes), train_dir)
    unknown = sorted(
        entry.name
        for entry in os.scandir(test_dir)
        if entry.is_dir() and entry.name not in train.class_to_idx
    )
    if unknown:
        raise QbackpropUserError(
            f"{test_dir} has class folders missing from {train_dir}: {', '.join(unknown)}"
        )
    test = _ImageFolderWithClasses(
        test_dir, train.classes, _pil_transform(size, None, _IMAGENET_STATS, False)
    )
    return train, test


def _check_class_count(spec: DataSpec, found: int, where: str) -> None:
    if spec.num_classes is not None and spec.num_classes != found:
        raise QbackpropUserError(
            f"data.num_classes={spec.num_classes} but {where} has {found} classes; "
            "remove num_classes or fix the data"
        )


_BUILDERS: dict[str, Callable[[DataSpec], tuple[Dataset, Dataset]]] = {
    "digits": _build_digits,
    "cifar10": _build_cifar,
    "cifar100": _build_cifar,
    "tinyimagenet": _build_tinyimagenet,
    "imagefolder": _build_imagefolder,
    "synthetic": _build_synthetic,
}


def build_datasets(spec: DataSpec) -> tuple[Dataset, Dataset]:
    """The train and test datasets for ``spec``; each item is ``(float image CxHxW, int label)``.

    Args:
        spec: which dataset, where, at what size, with or without augmentation.

    Returns:
        ``(train, test)``; the test split (Tiny ImageNet: val) is never augmented.

    Raises:
        DatasetNotFoundError: the data is not on disk; the message names the path and how to get it.
    """
    return _BUILDERS[spec.name](spec)


def num_classes(spec: DataSpec) -> int:
    """Number of classes; for Tiny ImageNet and imagefolder read from disk when not given.

    Args:
        spec: the dataset spec.
    """
    if spec.num_classes is not None:
        return spec.num_classes
    if spec.name == "tinyimagenet":
        return len(_tiny_classes(spec.root))
    train_dir, _ = _imagefolder_dirs(spec.root)
    try:
        return len(find_classes(train_dir)[0])
    except FileNotFoundError as err:  # train/ holds no class folders
        raise DatasetNotFoundError(f"no class folders under {train_dir}: {err}") from err


def build_loaders(
    spec: DataSpec,
    batch_size: int,
    *,
    workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders for ``spec``.

    Args:
        spec: the dataset spec.
        batch_size: images per batch (per process when distributed).
        workers: DataLoader worker processes; 0 loads in the main process.
        distributed: shard the train set with a ``DistributedSampler`` (needs an initialised
            process group); call ``loader.sampler.set_epoch(epoch)`` every epoch. The test loader
            is not sharded: every process evaluates the whole test set.
        seed: seeds the train shuffle, so the same seed gives the same batch order.
        drop_last: drop the last incomplete train batch (keeps BatchNorm batches full).

    Returns:
        ``(train_loader, test_loader)``; the test loader is never shuffled and keeps every image.
    """
    train, test = build_datasets(spec)
    common = {"batch_size": batch_size, "num_workers": workers, "persistent_workers": workers > 0}
    if distributed:
        sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=drop_last)
        train_loader = DataLoader(train, sampler=sampler, drop_last=drop_last, **common)
    else:
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(
            train, shuffle=True, generator=generator, drop_last=drop_last, **common
        )
    test_loader = DataLoader(test, shuffle=False, drop_last=False, **common)
    return train_loader, test_loader
