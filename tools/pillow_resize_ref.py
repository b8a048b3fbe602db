#!/usr/bin/env python3
"""Pillow's resize on real-sized frames: the reference tests/pillow_resize.rs compares whaled's
`resampler = "pillow"` against, byte for byte.

Each input frame is built from real photos (the first given photo tiled with its mirror images up to the
frame's size, so the content has real edges and textures at every size; a small photo is first shrunk
by Pillow to the requested size instead), written as raw RGB. The expected output is Pillow's own
`Image.resize((w, h), filter)` (what torchvision's `Resize` calls on a PIL image), for the centre-crop
cases followed by `Image.crop` at torchvision's `CenterCrop` offsets: `Resize(short)` makes the shorter
side `short` and the longer `int(short * long / short_in)` (torchvision's `_compute_resized_output_size`),
`CenterCrop(size)` takes `int(round((dim - size) / 2.0))`.

Writes DIR/cases.json: [{"name", "input", "width", "height", "filter", "mode": "stretch"|"center_crop",
"out_width", "out_height", "short" and "crop_pct" (center_crop), "resized": [w, h], "crop": [left, top, w, h],
"expected"}], the .rgb files beside it.

Usage: python3 tools/pillow_resize_ref.py --out DIR PHOTO [PHOTO ...]
"""
import argparse
import json
import os

from PIL import Image

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos3": Image.LANCZOS}

# (name, input size, filter, mode, output size (stretch) or (short, size, crop_pct) (center_crop): timm's
# eval transform is Resize(floor(size / crop_pct)) + CenterCrop(size))
CASES = [
    ("4000x3000-to-512-bilinear", (4000, 3000), "bilinear", "stretch", (512, 512)),
    ("3000x4000-portrait-to-512-bilinear", (3000, 4000), "bilinear", "stretch", (512, 512)),
    ("1999x1333-odd-to-512-bilinear", (1999, 1333), "bilinear", "stretch", (512, 512)),
    ("1920x1080-to-512-bilinear", (1920, 1080), "bilinear", "stretch", (512, 512)),
    ("1920x1080-to-512-bicubic", (1920, 1080), "bicubic", "stretch", (512, 512)),
    ("1920x1080-to-512-lanczos3", (1920, 1080), "lanczos3", "stretch", (512, 512)),
    ("300x200-up-to-512-bilinear", (300, 200), "bilinear", "stretch", (512, 512)),
    ("300x200-up-to-512-bicubic", (300, 200), "bicubic", "stretch", (512, 512)),
    ("513x511-to-512-bilinear", (513, 511), "bilinear", "stretch", (512, 512)),
    ("700x512-width-only-bilinear", (700, 512), "bilinear", "stretch", (512, 512)),
    ("1024x683-to-380x250-bicubic", (1024, 683), "bicubic", "stretch", (380, 250)),
    ("640x480-center-crop-224-bicubic", (640, 480), "bicubic", "center_crop", (256, 224, 0.875)),
    ("1920x1080-center-crop-224-bicubic", (1920, 1080), "bicubic", "center_crop", (256, 224, 0.875)),
    ("333x1001-portrait-center-crop-260-bicubic", (333, 1001), "bicubic", "center_crop", (292, 260, 0.89)),
    ("200x150-up-center-crop-224-bicubic", (200, 150), "bicubic", "center_crop", (256, 224, 0.875)),
    # Pillow >= 10.1 runs the vertical pass first when the height loses more than twice as many pixels as
    # the width (each pass rounds to 8 bits, so the order shows in the bytes): both sides of the rule.
    ("333x1001-to-292x877-vertical-first-bicubic", (333, 1001), "bicubic", "stretch", (292, 877)),
    ("1024x1024-to-900x775-vertical-first-bilinear", (1024, 1024), "bilinear", "stretch", (900, 775)),
    ("1024x1024-to-900x776-horizontal-first-bilinear", (1024, 1024), "bilinear", "stretch", (900, 776)),
    ("512x700-height-only-bilinear", (512, 700), "bilinear", "stretch", (512, 512)),
    ("4000x3000-center-crop-224-bilinear", (4000, 3000), "bilinear", "center_crop", (256, 224, 0.875)),
]


def frame(photo, size):
    """A real-content frame of exactly `size`: the photo tiled with its mirrors, or shrunk to it."""
    w, h = size
    if photo.width >= w and photo.height >= h:
        return photo.crop((0, 0, w, h))
    if photo.width * 2 >= w * 3 and photo.height * 2 >= h * 3:
        return photo.resize(size, Image.BICUBIC)
    row = Image.new("RGB", (photo.width * 2, photo.height * 2))
    row.paste(photo, (0, 0))
    row.paste(photo.transpose(Image.FLIP_LEFT_RIGHT), (photo.width, 0))
    row.paste(photo.transpose(Image.FLIP_TOP_BOTTOM), (0, photo.height))
    row.paste(photo.transpose(Image.ROTATE_180), (photo.width, photo.height))
    out = Image.new("RGB", size)
    for y in range(0, h, row.height):
        for x in range(0, w, row.width):
            out.paste(row, (x, y))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("photos", nargs="+")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    photos = [Image.open(p).convert("RGB") for p in args.photos]
    cases = []
    for i, (name, size, filt, mode, spec) in enumerate(CASES):
        src = frame(photos[i % len(photos)], size)
        if mode == "stretch":
            resized = spec
            out = src.resize(resized, FILTERS[filt])
            crop = (0, 0) + resized
        else:
            short, crop_size, crop_pct = spec
            assert short == int(crop_size / crop_pct), name  # timm: math.floor(img_size / crop_pct)
            w, h = size
            s, l = (w, h) if w <= h else (h, w)
            new_long = int(short * l / s)
            resized = (short, new_long) if w <= h else (new_long, short)
            left = int(round((resized[0] - crop_size) / 2.0))
            top = int(round((resized[1] - crop_size) / 2.0))
            crop = (left, top, crop_size, crop_size)
            out = src.resize(resized, FILTERS[filt]).crop((left, top, left + crop_size, top + crop_size))
        inp, exp = f"{name}.in.rgb", f"{name}.out.rgb"
        with open(os.path.join(args.out, inp), "wb") as f:
            f.write(src.tobytes())
        with open(os.path.join(args.out, exp), "wb") as f:
            f.write(out.tobytes())
        case = {"name": name, "input": inp, "width": size[0], "height": size[1], "filter": filt, "mode": mode,
                "out_width": out.width, "out_height": out.height, "resized": list(resized), "crop": list(crop),
                "expected": exp}
        if mode == "center_crop":
            case["short"], case["crop_pct"] = spec[0], spec[2]
        cases.append(case)
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(f"{len(cases)} cases in {args.out}")


if __name__ == "__main__":
    main()
