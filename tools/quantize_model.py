#!/usr/bin/env python3
"""Writes a model's int8 variant: onnxruntime's static quantization (QDQ, per-channel symmetric int8
weights, u8 activations, MinMax calibration) of the fp32 file a whaled model.toml names, calibrated on
real photos, never noise, preprocessed as the manifest's [input] says. Adds or updates the `int8`
[[variants]] entry (file and SHA-256) in the model.toml.

Calibration photos (deterministic: the same photos give the same file, MinMax has no randomness):
- `--set gate` (the pre-filter): every 4th photo of marine-dev (all seven categories, 33 sources) and
  every 2nd of whales-dev, each as the manifest's view, its mirror image, a tight (centre half) and a
  whole-frame view, as tools/convert_lite0.py does for the ImageNet Lite0;
- `--set whales` (the identification model, which only ever sees frames the gate passed): every
  cetacean of whales-dev and every 8th photo of whales-extra, as the manifest's view and its mirror.

The quality checks run on whaled itself, against the fp32 file (models/README.md, "int8 on tract").

    python3 tools/quantize_model.py --model models/marine-gate-v2/model.toml --set gate
    python3 tools/quantize_model.py --model /path/to/exported/model.toml --set whales
"""
import argparse
import csv
import hashlib
import os
import re
import sys
import tomllib

import numpy as np
from PIL import Image

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def photos(data, which):
    def rows(name):
        with open(os.path.join(data, name, "manifest.csv")) as f:
            return [(os.path.join(data, name, r["relpath"]), r["label"]) for r in csv.DictReader(f)]
    if which == "gate":
        return ([p for i, (p, _) in enumerate(rows("marine-dev")) if i % 4 == 0]
                + [p for i, (p, _) in enumerate(rows("whales-dev")) if i % 2 == 0])
    extra = os.path.join(data, "whales-extra")
    extra_photos = sorted(os.path.join(extra, f) for f in os.listdir(extra) if f.lower().endswith(".jpg"))
    return [p for p, label in rows("whales-dev") if label == "cetacean"] + extra_photos[::8]


def view(img, spec, crop=None):
    """The manifest's input view of a PIL image; `crop` overrides a centre crop's fraction."""
    w, h = spec["width"], spec["height"]
    how = RESAMPLE[spec.get("interpolation", "bilinear")]
    if spec.get("resize", "stretch") == "center_crop" or crop is not None:
        frac = crop if crop is not None else spec.get("crop_fraction", 1.0)
        short = round(min(w, h) / frac)
        iw, ih = img.size
        s = short / min(iw, ih)
        img = img.resize((max(short, round(iw * s)), max(short, round(ih * s))), how)
        iw, ih = img.size
        left, top = (iw - w) // 2, (ih - h) // 2
        img = img.crop((left, top, left + w, top + h))
    else:
        img = img.resize((w, h), how)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


class CalibReader:
    def __init__(self, paths, spec, which):
        self.paths, self.spec, self.which = list(paths), spec, which
        self.pending = []

    def get_next(self):
        while not self.pending and self.paths:
            img = Image.open(self.paths.pop(0)).convert("RGB")
            x = view(img, self.spec)
            self.pending = [x, x[:, :, :, ::-1].copy()]
            if self.which == "gate":
                self.pending += [view(img, self.spec, crop=0.5), view(img, self.spec, crop=1.0)]
        return {self.spec["name"]: self.pending.pop(0)} if self.pending else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--model", required=True, help="the model.toml whose fp32 variant to quantize")
    ap.add_argument("--set", choices=["gate", "whales"], required=True, help="calibration photos (see above)")
    ap.add_argument("--data", default=os.path.join(here, "..", "shared", "data"))
    args = ap.parse_args()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    manifest = tomllib.load(open(args.model, "rb"))
    fp32_name = next(v["file"] for v in manifest["variants"] if v["name"] == "fp32")
    root = os.path.dirname(os.path.abspath(args.model))
    fp32 = os.path.join(root, fp32_name)
    int8_name = re.sub(r"(_fp32)?\.onnx$", "", fp32_name) + "_int8.onnx"
    int8 = os.path.join(root, int8_name)
    paths = photos(args.data, args.set)
    print(f"calibrating {fp32_name} on {len(paths)} photos", file=sys.stderr)
    quantize_static(fp32, int8, CalibReader(paths, manifest["input"], args.set), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    text = open(args.model).read()
    with open(int8, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    text, n = re.subn(r'(name = "int8"\nfile = ")[^"]+("\nsha256 = ")[0-9a-f]*(")',
                      rf"\g<1>{int8_name}\g<2>{digest}\g<3>", text)
    if n == 0:
        entry = (f'\n# Static QDQ int8 of the fp32 file, calibrated on real photos: tools/quantize_model.py --set '
                 f'{args.set}.\n[[variants]]\nname = "int8"\nfile = "{int8_name}"\nsha256 = "{digest}"\n')
        ends = [m.end() for m in re.finditer(r'\[\[variants\]\]\nname = "[^"]+"\nfile = "[^"]+"\n(sha256 = "[0-9a-f]*"\n)?', text)]
        text = text[:ends[-1]] + entry + text[ends[-1]:]
    open(args.model, "w").write(text)
    print(f"{digest}  {int8}  ({os.path.getsize(int8)} bytes)")


if __name__ == "__main__":
    main()
