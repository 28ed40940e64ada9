"""ImageNet-1K for DeiT: sources, transforms, the repeated-augmentation sample stream, mixup, and
exact full-set evaluation.

Sources (same samples either way): an ImageFolder tree `root/train/<class>/*`, `root/val/<class>/*`
(classes = sorted train directory names, as torchvision), or a Hugging Face dataset with an image
and a label column: `imagenet-1k` by name, a directory written by `save_to_disk`, or a local
parquet/imagefolder dataset. Unreadable images raise a one-line `ImageReadError` naming the file.

Training order: a global stream of samples; position g lies in epoch g // E (E = iterations per
epoch x global batch) and reads image `order_e[g % E]`, where `order_e` is a permutation seeded by
(seed, epoch), each index repeated 3 times with repeated augmentation (DeiT's RASampler). Step j
reads positions [jG, (j+1)G) (G global batch); micro-batch slot s = micro x W + rank of the
S = G / M slots takes every S-th of them (s, s+S, ...), so an image's 3 copies land on different
slots (different GPUs, as in DeiT) and the batches do not depend on how G splits into processes
and accumulation steps. Augmentation of position g is seeded by (seed, g) and mixup/cutmix of a
micro-batch by (seed, its first position): an epoch-boundary resume is exact and a mid-epoch
resume (at any consumed-sample offset) continues the same stream. Python, NumPy and torch RNG
states are forked around each seeded call, so data loading never disturbs training randomness.

Evaluation: the validation set in a fixed shuffled order (so any prefix is a uniform subset),
padded to whole global micro-batches with ignored copies; every sample carries the scale that
turns per-batch sums into exact means over the evaluated images once the training loop averages
its per-batch metrics.
"""
from __future__ import annotations

import io
import math
import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.mixup import mixup_target
from torch import Tensor
from torchvision import transforms

from megatron_selfroute.seeding import mix_seed

RA_REPEATS = 3  # DeiT's RASampler num_repeats
_VAL_DIRS = ("val", "validation")  # ImageFolder directory names
_VAL_SPLITS = ("validation", "val")  # Hugging Face split names, the usual one first


class ImageReadError(ValueError):
    """An image that cannot be opened or decoded (one line naming it)."""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _decode(open_fn: Callable[[], Image.Image], where: str) -> Image.Image:
    try:
        with open_fn() as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... by format
        raise ImageReadError(f"cannot read image {where}: {_first_line(e)}") from None


class FolderImages:
    """`root/<split>/<class>/<file>` with classes from `root/train` (sorted, as torchvision)."""

    def __init__(self, root: str, split: str) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(f"--data-path {root}: no train/ directory (expected "
                                    "root/train/<class>/*.jpg and root/val/<class>/*)")
        self.classes, class_to_idx = find_classes(train_dir)
        if split == "train":
            split_dir = train_dir
        else:
            found = [os.path.join(root, s) for s in _VAL_DIRS
                     if os.path.isdir(os.path.join(root, s))]
            if not found:
                raise FileNotFoundError(f"--data-path {root}: no val/ directory")
            split_dir = found[0]
        self.samples = make_dataset(split_dir, class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise FileNotFoundError(f"--data-path {root}: no images under {split_dir}")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label of sample `index`."""
        path, label = self.samples[index]
        return _decode(lambda: Image.open(path), path), label


class HFImages:
    """One split of a Hugging Face image-classification dataset (image + label columns)."""

    def __init__(self, name_or_path: str, split: str) -> None:
        import datasets

        self.where = f"--hf-dataset {name_or_path}"
        ds = self._open(datasets, name_or_path, split)
        image_col = next((c for c in ("image", "img") if c in ds.column_names), None)
        label_col = next((c for c in ("label", "labels") if c in ds.column_names), None)
        if image_col is None or label_col is None:
            raise ValueError(f"{self.where}: needs an image and a label column, has "
                             f"{ds.column_names}")
        self.ds = ds.cast_column(image_col, datasets.Image(decode=False))
        self.image_col, self.label_col = image_col, label_col
        feature = ds.features[label_col]
        self.classes = list(feature.names) if hasattr(feature, "names") else None

    def _open(self, datasets, name_or_path: str, split: str):
        wanted = ("train",) if split == "train" else _VAL_SPLITS
        saved = os.path.isdir(name_or_path) and any(
            os.path.isfile(os.path.join(name_or_path, f))
            for f in ("dataset_dict.json", "state.json"))
        if saved:
            d = datasets.load_from_disk(name_or_path)
            if isinstance(d, datasets.Dataset):
                raise ValueError(f"{self.where}: a single saved split; save a DatasetDict with "
                                 "train and validation splits")
            split_name = next((s for s in wanted if s in d), None)
            if split_name is None:
                raise ValueError(f"{self.where}: no split {' or '.join(wanted)} in "
                                 f"{sorted(d)}")
            self.split = split_name
            return d[split_name]
        errors = []
        for split_name in wanted:  # the first spelling that loads
            try:
                ds = datasets.load_dataset(name_or_path, split=split_name)
            except Exception as e:  # unknown split, no such dataset, offline...: one line
                errors.append(_first_line(e))
                continue
            self.split = split_name
            return ds
        raise ValueError(f"{self.where}: cannot load split {' or '.join(wanted)} "
                         f"({'; '.join(errors)})")

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label of row `index` (decoded here, so errors name the file)."""
        row = self.ds[index]
        cell = row[self.image_col]
        where = cell.get("path") or f"{self.where} split {self.split} row {index}"
        if cell.get("bytes") is not None:
            img = _decode(lambda: Image.open(io.BytesIO(cell["bytes"])), where)
        else:
            img = _decode(lambda: Image.open(cell["path"]), where)
        return img, int(row[self.label_col])


def open_images(data_path: Optional[str], hf_dataset: Optional[str], split: str):
    """The `split` ("train" or "val") of an ImageFolder root or a Hugging Face dataset."""
    if hf_dataset:
        return HFImages(hf_dataset, split)
    if not data_path:
        raise ValueError("--data-path (an ImageFolder root) or --hf-dataset is required")
    return FolderImages(data_path, split)


def _posterize(img, bits_to_keep, **_):
    """timm's posterize op, also for 0 bits kept: DeiT's RandAugment (`...-inc1`) asks for 0 at
    magnitude 10 (m9 + mstd 0.5 reaches it for ~2% of draws), which Pillow >= 11 refuses
    ("bits must be between or equal to 1 and 8"), killing the loader; older Pillow returned the
    all-black image, as this does."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


class _ResizeSmall:
    """Images of 32 px or less: resize (bicubic) to img_size x img_size when their size
    differs, as larger sizes are resized by the DeiT transforms (same-size images untouched)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img):
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.BICUBIC)


def train_transform(img_size: int, auto_augment: Optional[str], re_prob: float) -> Callable:
    """DeiT's training transform (timm): random-resized crop (bicubic), flip, RandAugment,
    normalise, random erasing (pixel mode); images of 32 px or less: resized to the size when
    it differs, then a random crop with padding 4."""
    aa = None if not auto_augment or auto_augment.lower() == "none" else auto_augment
    _patch_timm_posterize()
    t = create_transform(img_size, is_training=True, color_jitter=0.3, auto_augment=aa,
                         interpolation="bicubic", re_prob=re_prob, re_mode="pixel", re_count=1)
    if img_size <= 32:
        t.transforms[0] = transforms.RandomCrop(img_size, padding=4)
        t.transforms.insert(0, _ResizeSmall(img_size))
    return t


def eval_transform(img_size: int) -> Callable:
    """DeiT's evaluation transform: resize to 256/224 x size (bicubic), centre crop, normalise;
    images of 32 px or less: resized to the size when it differs."""
    steps: list = [_ResizeSmall(img_size)] if img_size <= 32 else []
    if img_size > 32:
        steps += [transforms.Resize(int(256 / 224 * img_size),
                                    interpolation=transforms.InterpolationMode.BICUBIC),
                  transforms.CenterCrop(img_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN,
                                                          IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU) RNGs for a block, restoring their states after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class EpochOrder:
    """Stream position -> image index: per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, num_images: int, per_epoch: int, seed: int, repeats: int) -> None:
        if per_epoch > num_images * repeats:
            raise ValueError(f"epoch of {per_epoch} samples exceeds {num_images} images x "
                             f"{repeats}")
        self.num_images, self.per_epoch = num_images, per_epoch
        self.seed, self.repeats = seed, repeats
        self._cache: dict[int, Tensor] = {}

    def epoch_indices(self, epoch: int) -> Tensor:
        """Image indices of epoch `epoch`, in stream order."""
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, 0xE90C, epoch))
            perm = torch.randperm(self.num_images, generator=gen)
            if self.repeats > 1:
                perm = perm.repeat_interleave(self.repeats)
            self._cache = {epoch: perm[: self.per_epoch]}  # one epoch at a time
        return self._cache[epoch]

    def __call__(self, position: int) -> int:
        return int(self.epoch_indices(position // self.per_epoch)[position % self.per_epoch])


class TrainImages(torch.utils.data.Dataset):
    """Training samples indexed by stream position (see the module docstring)."""

    def __init__(self, source, order: EpochOrder, transform: Callable, seed: int) -> None:
        self.source, self.order, self.transform, self.seed = source, order, transform, seed

    def __len__(self) -> int:
        return self.order.per_epoch

    def __getitem__(self, position: int) -> dict:
        try:
            img, label = self.source.load(self.order(position))
        except ImageReadError as e:  # reported by forward_step in the main process (one line)
            return {"error": str(e)}
        with seeded(mix_seed(self.seed, 0xA06, position)):
            image = self.transform(img)
        return {"image": image, "label": label, "sample_index": position}


class SlotBatchSampler:
    """This rank's micro-batches of stream positions from `consumed` to `total`."""

    def __init__(self, total: int, consumed: int, micro_batch: int, global_batch: int,
                 rank: int, world: int) -> None:
        if global_batch % (micro_batch * world) or consumed % global_batch:
            raise ValueError(f"global batch {global_batch} / consumed samples {consumed} do not "
                             f"fit micro-batch {micro_batch} x {world} processes")
        self.total, self.consumed = total, consumed
        self.mbs, self.gbs, self.rank, self.world = micro_batch, global_batch, rank, world

    def __len__(self) -> int:
        return (self.total - self.consumed) // self.gbs * (self.gbs // (self.mbs * self.world))

    def __iter__(self) -> Iterator[list[int]]:
        slots = self.gbs // self.mbs
        for start in range(self.consumed, self.total - self.gbs + 1, self.gbs):
            for micro in range(slots // self.world):
                slot = micro * self.world + self.rank
                yield [start + slot + i * slots for i in range(self.mbs)]


def _error_batch(samples: list[dict]) -> Optional[dict]:
    bad = next((s for s in samples if "error" in s), None)
    return {"error": bad["error"]} if bad else None


class TrainCollate:
    """Stack a micro-batch and make soft targets: mixup/cutmix (timm `Mixup`, seeded by the
    batch's first stream position) or label smoothing alone."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float, smoothing: float,
                 seed: int) -> None:
        self.num_classes, self.smoothing, self.seed = num_classes, smoothing, seed
        self.mixup = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                            num_classes=num_classes) if mixup > 0 or cutmix > 0 else None)

    def __call__(self, samples: list[dict]) -> dict:
        error = _error_batch(samples)
        if error:
            return error
        images = torch.stack([s["image"] for s in samples])
        labels = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
        positions = torch.tensor([s["sample_index"] for s in samples], dtype=torch.int64)
        if self.mixup is not None:
            with seeded(mix_seed(self.seed, 0x313, int(positions[0]))):
                images, target = self.mixup(images, labels)
        else:
            target = mixup_target(labels, self.num_classes, 1.0, self.smoothing)
        return {"image": images, "target": target, "sample_index": positions}


class EvalImages(torch.utils.data.Dataset):
    """Validation samples in a fixed shuffled order, padded with ignored copies (label -1) to
    whole global micro-batches; `eval_scale` = evaluated micro-batches / evaluated real images."""

    def __init__(self, source, transform: Callable, micro_batch: int, world: int,
                 eval_iters: int) -> None:
        self.source, self.transform = source, transform
        self.n = len(source)
        step = micro_batch * world
        self.length = math.ceil(self.n / step) * step
        evaluated = min(eval_iters * step, self.length)
        self.scale = (evaluated / micro_batch) / min(evaluated, self.n)
        self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(0)).tolist()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        try:
            img, label = self.source.load(self.perm[index % self.n])
        except ImageReadError as e:
            return {"error": str(e)}
        return {"image": self.transform(img), "label": label if index < self.n else -1,
                "eval_scale": self.scale}


def collate_eval(samples: list[dict]) -> dict:
    """Stack a validation micro-batch (hard labels, -1 = padding)."""
    error = _error_batch(samples)
    if error:
        return error
    return {"image": torch.stack([s["image"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "eval_scale": torch.tensor([s["eval_scale"] for s in samples], dtype=torch.float64),
            "sample_index": torch.stack([s["sample_index"] for s in samples])}


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Per k, how many rows have their label among the k highest logits (label -1 = ignored;
    k is capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = (top == labels.unsqueeze(1)) & (labels >= 0).unsqueeze(1)
    return [hit[:, :k].any(dim=1).sum() for k in ks]


def eval_metrics(logits: Tensor, labels: Tensor, scale: Tensor, prefix: str = "") -> dict:
    """Scaled per-batch sums whose average over the evaluated batches is the exact mean:
    cross-entropy `loss` and top-1/top-5 accuracy in percent."""
    valid = labels >= 0
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    s = scale[0].to(logits.dtype)
    top1, top5 = topk_correct(logits, labels)
    return {f"{prefix}loss": (ce * valid).sum() * s, f"{prefix}top1": 100.0 * top1 * s,
            f"{prefix}top5": 100.0 * top5 * s}
