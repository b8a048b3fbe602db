"""Reference preprocessing in numpy + Pillow, for calibration and for cross-checking whaled's Rust path.

`lite0`: shorter side -> 224/0.875 = 256 (bicubic), centre crop 224, (x/255 - 0.5)/0.5, NCHW.
`stretch`: the upstream identification preprocessing: whole frame -> size x size bilinear, ImageNet mean/std.
"""
import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _to_nchw(img, mean, std):
    x = np.asarray(img, np.float32) / 255.0
    x = (x - mean) / std
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def lite0(path, size=224, crop=0.875):
    return lite0_image(Image.open(path).convert("RGB"), size, crop)


def lite0_image(img, size=224, crop=0.875):
    """`lite0` of an already opened RGB image (tools/train_prefilter.py opens it at whaled's DCT scale)."""
    short = round(size / crop)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return _to_nchw(img, np.float32(0.5), np.float32(0.5))


def stretch(path, size=512):
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return _to_nchw(img, IMAGENET_MEAN, IMAGENET_STD)
