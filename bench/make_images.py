"""Makes the benchmark's workload: JPEGs of realistic sizes (longer side 1024-1600 px) cut
and scaled from the sample photos in tests/fixtures/images, with varied crops, aspect
ratios and qualities. Deterministic for a given --seed.

    .venv/bin/python bench/make_images.py --out /tmp/images --count 240
"""

import argparse
import io
import os
import random

from PIL import Image

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "images")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=240)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sources = [
        Image.open(os.path.join(FIXTURES, name)).convert("RGB")
        for name in sorted(os.listdir(FIXTURES))
        if name.endswith((".png", ".jpg"))
    ]
    os.makedirs(args.out, exist_ok=True)
    total = 0
    for i in range(args.count):
        source = sources[i % len(sources)]
        w, h = source.size
        # A crop of 60-100% of each side, then scaled so the longer side is 1024-1600 px.
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = source.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        longer = rng.randint(1024, 1600)
        scale = longer / max(cw, ch)
        image = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(80, 92))
        with open(os.path.join(args.out, f"{i:04d}.jpg"), "wb") as f:
            f.write(buffer.getvalue())
        total += buffer.tell()
    print(f"{args.count} JPEGs, {total / args.count / 1024:.0f} KiB on average, in {args.out}")


if __name__ == "__main__":
    main()
