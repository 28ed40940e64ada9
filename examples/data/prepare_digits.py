#!/usr/bin/env python
"""A real image set that needs no download, for the small vision sweep: scikit-learn's bundled
8 x 8 handwritten digits (1,797 images, 10 classes), upsampled to 32 x 32 (bilinear), written as
an ImageFolder root with train/ and val/ (a stratified, seeded 80/20 split).

    python examples/data/prepare_digits.py [--out-dir data/digits] [--size 32]

An existing complete output is kept. It saturates quickly (a small ViT reaches high accuracy in
minutes): a pipeline check of the Table 2 comparison, not a test of the paper's ImageNet claims.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "data", "digits"))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size < 8:
        sys.exit(f"error: --size {args.size} must be >= 8")
    out = os.path.abspath(args.out_dir)
    marker = os.path.join(out, ".complete")
    if os.path.isfile(marker):
        print(f"digits exist: {out}")
        return
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, val = train_test_split(idx, test_size=0.2, random_state=args.seed,
                                  stratify=digits.target)
    for split, ids in (("train", train), ("val", val)):
        for i in sorted(ids):
            label = int(digits.target[i])
            d = os.path.join(out, split, f"digit_{label}")
            os.makedirs(d, exist_ok=True)
            pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)  # values 0..16
            img = Image.fromarray(pixels, mode="L").convert("RGB")
            img.resize((args.size, args.size), Image.BILINEAR).save(
                os.path.join(d, f"{i:04d}.png"))
    with open(marker, "w") as f:
        f.write(f"{len(train)} train, {len(val)} val, {args.size} px\n")
    print(f"wrote {len(train)} train and {len(val)} val images to {out}")


if __name__ == "__main__":
    main()
