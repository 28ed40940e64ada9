"""A small ImageNet-style tree generated per test session: 4 classes told apart by colour and
stripe pattern, 12 training and 4 validation 32x32 PNGs each."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]


def make_image_folder(root: Path, per_class: int = 12, val_per_class: int = 4) -> Path:
    """root/train/class{c}/img{i}.png and root/val/... with class-dependent colour/stripes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, colour in enumerate(COLOURS):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.array(colour, dtype=np.float64)[None, None] + rng.normal(0, 30, (32, 32, 3))
                if c % 2:  # horizontal stripes on odd classes
                    a[::4] = 255 - a[::4]
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))
