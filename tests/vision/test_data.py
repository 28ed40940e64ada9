"""Vision data: folder and Hugging Face sources give the same samples, unreadable images fail in
one line naming the file, the repeated-augmentation stream is deterministic, resumable and
independent of the process layout and of data-loader workers, mixup is seeded, and evaluation
metrics (top-1/top-5, padded batches) are exact."""
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_selfroute.data import vision

REPO = Path(__file__).resolve().parents[2]


def pixels(source, i):
    img, label = source.load(i)
    return np.asarray(img), label


def test_hf_saved_dataset_yields_the_same_samples_as_the_folder(image_root, tmp_path):
    splits = {}
    for split, hf_name in (("train", "train"), ("val", "validation")):
        files = sorted((image_root / split).glob("*/*.png"))  # class order = sorted names
        classes = sorted(p.name for p in (image_root / "train").iterdir())
        splits[hf_name] = datasets.Dataset.from_dict(
            {"image": [Image.open(f).copy() for f in files],
             "label": [classes.index(f.parent.name) for f in files]},
            features=datasets.Features(image=datasets.Image(),
                                       label=datasets.ClassLabel(names=classes)))
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    for split in ("train", "val"):
        folder = vision.FolderImages(str(image_root), split)
        hf = vision.HFImages(str(tmp_path / "hf"), split)
        assert hf.classes == folder.classes == ["class0", "class1", "class2", "class3"]
        assert len(hf) == len(folder) == (48 if split == "train" else 16)
        for i in range(len(folder)):
            a, b = pixels(folder, i), pixels(hf, i)
            assert a[1] == b[1] and np.array_equal(a[0], b[0]), (split, i)


def test_hf_local_imagefolder_dataset_holds_the_same_samples(image_root):
    folder = vision.FolderImages(str(image_root), "val")
    hf = vision.HFImages(str(image_root), "val")  # datasets' imagefolder builder
    key = lambda s: (s[1], s[0].tobytes())  # noqa: E731
    assert sorted(map(key, (pixels(hf, i) for i in range(len(hf))))) == sorted(
        map(key, (pixels(folder, i) for i in range(len(folder)))))


def test_unreadable_image_is_a_one_line_error_naming_the_file(image_root, tmp_path):
    bad_root = tmp_path / "bad"
    for split in ("train", "val"):
        for d in (image_root / split).iterdir():
            (bad_root / split / d.name).mkdir(parents=True)
            for f in d.iterdir():
                (bad_root / split / d.name / f.name).write_bytes(f.read_bytes())
    bad = bad_root / "train" / "class2" / "img03.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(vision.ImageReadError, match=f"cannot read image {bad}"):
        vision.FolderImages(str(bad_root), "train").load(
            vision.FolderImages(str(bad_root), "train").samples.index((str(bad), 2)))
    # end to end: the data-loader worker's failure reaches the user as one line
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "pretrain_vit.py", "--data-path", str(bad_root), "--img-size", "32",
         "--patch-size", "8", "--num-layers", "1", "--hidden-size", "16",
         "--num-attention-heads", "2", "--batch-size", "48", "--epochs", "1",
         "--num-workers", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert errors == [f"error: [rank 0] cannot read image {bad}: cannot identify image file "
                      f"'{bad}'"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_epoch_order_is_seeded_per_epoch_with_repeats():
    order = vision.EpochOrder(num_images=10, per_epoch=9, seed=7, repeats=3)
    e0, e1 = order.epoch_indices(0).tolist(), order.epoch_indices(1).tolist()
    assert e0 == vision.EpochOrder(10, 9, 7, 3).epoch_indices(0).tolist()
    assert e0 != e1 and e0 != vision.EpochOrder(10, 9, 8, 3).epoch_indices(0).tolist()
    assert all(e0[i] == e0[i + 1] == e0[i + 2] for i in range(0, 9, 3))  # 3 copies each
    assert len(set(e0)) == 3
    assert [order(p) for p in range(9, 18)] == e1
    plain = vision.EpochOrder(10, 10, 7, 1).epoch_indices(3).tolist()
    assert sorted(plain) == list(range(10))


def sampler_batches(world, accum, consumed=0, total=24, mbs=2):
    """Per step: the set of positions each (micro, rank) slot reads, over all ranks."""
    gbs = mbs * world * accum
    per_rank = [list(vision.SlotBatchSampler(total, consumed, mbs, gbs, r, world))
                for r in range(world)]
    steps = []
    for j in range(len(per_rank[0]) // accum):
        steps.append([per_rank[r][j * accum + m] for m in range(accum) for r in range(world)])
    return steps


def test_slot_sampler_spreads_copies_and_ignores_the_layout():
    two_procs = sampler_batches(world=2, accum=2)
    assert two_procs[0] == [[0, 4], [1, 5], [2, 6], [3, 7]]  # stride over the 4 slots
    # 1 process x 4 accumulation steps and 4 processes x 1 read the same micro-batches
    assert sampler_batches(world=1, accum=4) == two_procs == sampler_batches(world=4, accum=1)
    # resuming at a consumed-sample offset continues the same batches
    assert sampler_batches(world=2, accum=2, consumed=8) == two_procs[1:]
    for step, slots in enumerate(two_procs):
        assert sorted(sum(slots, [])) == list(range(8 * step, 8 * step + 8))
    # with repeated augmentation an image's 3 copies fall into 3 different micro-batches
    order = vision.EpochOrder(8, 24, 0, 3)
    for slots in two_procs:
        images = [{order(p) for p in slot} for slot in slots]
        assert all(len(s) == 2 for s in images)


def train_dataset(image_root, reprob=0.25):
    src = vision.FolderImages(str(image_root), "train")
    order = vision.EpochOrder(len(src), 48, seed=3, repeats=3)
    return vision.TrainImages(src, order, vision.train_transform(32, "rand-m9-mstd0.5-inc1",
                                                                 reprob), seed=3)


def test_augmentation_is_seeded_per_sample_and_leaves_global_rng_alone(image_root):
    ds = train_dataset(image_root)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    first = [ds[p]["image"] for p in (5, 50, 6)]
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    again = [ds[p]["image"] for p in (6, 5, 50)]
    assert torch.equal(first[0], again[1]) and torch.equal(first[2], again[0])
    assert torch.equal(first[1], again[2])
    assert not torch.equal(first[0], first[2])
    # copies of one image (repeated augmentation) get different augmentations
    order = ds.order
    p, q = next((p, p + 1) for p in range(47) if order(p) == order(p + 1))
    assert not torch.equal(ds[p]["image"], ds[q]["image"])


def test_loader_batches_do_not_depend_on_workers(image_root):
    ds = train_dataset(image_root)
    collate = vision.TrainCollate(4, mixup=0.8, cutmix=1.0, smoothing=0.1, seed=3)

    def batches(workers):
        sampler = vision.SlotBatchSampler(64, 16, 4, 8, 0, 1)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                             collate_fn=collate, generator=torch.Generator())
        return list(loader)

    a, b = batches(0), batches(2)
    assert len(a) == 12
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
    torch.testing.assert_close(a[0]["target"].sum(1), torch.ones(4, dtype=torch.float32))
    assert sum(bool((x["target"].max(1).values < 0.9).any()) for x in a) >= 6  # mixed
    first = list(vision.SlotBatchSampler(64, 16, 4, 8, 0, 1))[0]
    assert first == [16, 18, 20, 22]
    assert not torch.equal(a[0]["image"], torch.stack([ds[p]["image"] for p in first]))
    plain = vision.TrainCollate(4, mixup=0.0, cutmix=0.0, smoothing=0.1, seed=3)
    samples = [ds[p] for p in range(16, 20)]
    target = plain(samples)["target"]
    for row, s in zip(target, samples, strict=True):
        assert row[s["label"]].item() == pytest.approx(0.9 + 0.1 / 4)
        assert row.sum().item() == pytest.approx(1.0)


def test_topk_accuracy_on_known_predictions():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4],    # label 0: top-1
                           [9.0, 8, 7, 6, 5, 4],    # label 4: top-5 only
                           [9.0, 8, 7, 6, 5, 4],    # label 5: neither
                           [1.0, 2, 3, 4, 5, 6],    # label 5: top-1
                           [1.0, 2, 3, 4, 5, 6]])   # label -1: padding, ignored
    labels = torch.tensor([0, 4, 5, 5, -1])
    top1, top5 = vision.topk_correct(logits, labels)
    assert (top1.item(), top5.item()) == (2, 3)
    # fewer classes than 5: top-5 caps at all classes
    assert vision.topk_correct(torch.randn(3, 4), torch.tensor([0, 1, 3]))[1].item() == 3


def test_padded_evaluation_gives_exact_means(image_root):
    src = vision.FolderImages(str(image_root), "val")  # 16 images
    ds = vision.EvalImages(src, vision.eval_transform(32), micro_batch=3, world=2, eval_iters=99)
    assert len(ds) == 18 and [ds[i]["label"] for i in (16, 17)] == [-1, -1]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(18, 4, generator=gen)
    labels = torch.tensor([ds[i]["label"] for i in range(18)])
    sums: dict = {}
    for start in range(0, 18, 3):  # the training loop averages per-micro-batch metrics
        batch = vision.collate_eval([dict(ds[i], sample_index=torch.tensor(i))
                                     for i in range(start, start + 3)])
        for k, v in vision.eval_metrics(logits[start:start + 3], batch["label"],
                                        batch["eval_scale"]).items():
            sums[k] = sums.get(k, 0.0) + float(v) / 6
    ce = torch.nn.functional.cross_entropy(logits[:16], labels[:16])
    top1 = (logits[:16].argmax(1) == labels[:16]).float().mean() * 100
    assert sums["loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert sums["top1"] == pytest.approx(top1.item(), rel=1e-6)
    assert sums["top5"] == pytest.approx(100.0)
    # a fixed shuffled order: every class appears among the first images
    assert len({ds[i]["label"] for i in range(8)}) >= 3


def test_small_images_of_another_size_are_resized():
    """Images of 32 px or less whose size differs from --img-size are resized (bicubic) in
    training and evaluation; same-size images are untouched (eval = ToTensor + Normalize)."""
    rng = np.random.default_rng(1)
    train = vision.train_transform(32, "rand-m9-mstd0.5-inc1", 0.25)
    ev = vision.eval_transform(32)
    for w, h in ((20, 20), (40, 28), (8, 32)):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        assert train(img).shape == (3, 32, 32) and ev(img).shape == (3, 32, 32)
    same = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    want = (torch.tensor(same).permute(2, 0, 1).float() / 255
            - torch.tensor(vision.IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(
                vision.IMAGENET_DEFAULT_STD)[:, None, None]
    torch.testing.assert_close(ev(Image.fromarray(same)), want)


def test_randaugment_posterize_at_full_magnitude_gives_black_not_an_error():
    """DeiT's `...-inc1` policy asks posterize to keep 0 bits at magnitude 10, which Pillow 13
    refuses; after the DeiT transform is built the op returns the all-black image (old Pillow's
    result) and keeps other bit counts as Pillow computes them."""
    from PIL import ImageOps
    from timm.data.auto_augment import AugmentOp

    vision.train_transform(32, "rand-m9-mstd0.5-inc1", 0.25)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        ImageOps.posterize(img, 0)  # the library behaviour that made the loader crash
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert not np.asarray(op(img)).any()
    op2 = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)  # keeps 4 - 2 = 2 bits
    np.testing.assert_array_equal(np.asarray(op2(img)), np.asarray(ImageOps.posterize(img, 2)))


def test_vit_trains_and_evaluates_on_images_of_another_small_size(tmp_path):
    """pretrain_vit.py --img-size 32 on 20 px images: trains and evaluates (it died with a
    tensor-shape error at evaluation before)."""
    from tests.vision.conftest import make_image_folder

    root = make_image_folder(tmp_path / "img", per_class=2, val_per_class=1)
    for f in root.rglob("*.png"):
        Image.open(f).resize((20, 20)).save(f)
    r = subprocess.run(
        [sys.executable, "pretrain_vit.py", "--data-path", str(root), "--img-size", "32",
         "--patch-size", "8", "--num-layers", "2", "--hidden-size", "16",
         "--num-attention-heads", "2", "--batch-size", "4", "--epochs", "1", "--num-workers",
         "0", "--no-repeated-aug", "--num-experts", "2", "--router-type", "self"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "validation at iteration" in r.stdout
