#!/usr/bin/env python3
"""Write the demo frames in tests/photos/: synthetic sea scenes (no third-party photos may be committed).

Each frame is a sky/sea gradient with waves and, in some, a dark rounded back and a dorsal fin breaking
the surface. They exercise the whole path (decode, pre-filter, JSON); they are not whale photos, so the
pre-filter scores them low (one of the three passes the shipped threshold). Deterministic: same bytes every run.
"""
import os

import numpy as np
from PIL import Image, ImageDraw


def scene(seed, w=960, h=540, animal=True):
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None]
    x = np.linspace(0, 1, w)[None, :]
    horizon = 0.35
    sky = np.stack([170 + 40 * y, 200 + 30 * y, 235 + 0 * y], -1) * np.ones((1, w, 1))
    waves = np.sin(x * 60 + y * 25 + rng.uniform(0, 6)) * np.sin(x * 13 - y * 40) * 12
    sea = np.stack([20 + 30 * y + waves, 70 + 50 * y + waves, 110 + 50 * y + waves / 2], -1)
    img = np.where(y[..., None] < horizon, sky, sea).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    if animal:
        d = ImageDraw.Draw(im)
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.55, 0.75) * h
        bw, bh = w * 0.28, h * 0.07
        d.ellipse([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], fill=(38, 42, 48))
        d.polygon([(cx, cy - bh / 2), (cx + bw * 0.08, cy - bh * 2.2), (cx + bw * 0.16, cy - bh / 2)], fill=(30, 33, 38))
    return im


def main():
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "photos")
    os.makedirs(out, exist_ok=True)
    for i, animal in enumerate([True, True, False]):
        scene(i, animal=animal).save(os.path.join(out, f"synthetic_{i}.jpg"), quality=85)


if __name__ == "__main__":
    main()
