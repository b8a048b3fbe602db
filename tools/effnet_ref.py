#!/usr/bin/env python3
"""Independent numpy (float64) reference of the upstream identification model, for checking exports.

Deliberately shares no code with onnx_build.py / export_upstream.py: its own convolution, depthwise,
BatchNorm, SiLU, squeeze-excite and padding, written from timm 1.0.9's semantics
(timm/models/efficientnet.py, _efficientnet_blocks.py, layers/padding.py) and driven by timm's key names:

  conv_stem (3x3, stride 2) -> bn1 -> SiLU
  blocks.S.I  DepthwiseSeparable (no conv_pwl): conv_dw -> bn1 -> SiLU -> SE -> conv_pw -> bn2 [+ skip]
              InvertedResidual: conv_pw -> bn1 -> SiLU -> conv_dw -> bn2 -> SiLU -> SE -> conv_pwl -> bn3 [+ skip]
              SE: mean over H,W -> conv_reduce (+bias) -> SiLU -> conv_expand (+bias) -> sigmoid -> scale
              stride: the first block of stages 1, 2, 3, 5 is 2 (EfficientNet-B arch_def), others 1;
              skip when stride 1 and in == out channels
  conv_head (1x1) -> bn2 -> SiLU  (num_classes=0, global_pool="": the feature map)
  then upstream: adaptive average pool -> embedding Linear -> L2 normalise.

Arch differences (timm): efficientnet_b4 pads symmetrically (((s-1) + (k-1)) // 2), BatchNorm eps 1e-5;
tf_efficientnet_b4[_ns] pads TensorFlow SAME (dynamic and asymmetric where stride 2, extra row/col at
the bottom/right), BatchNorm eps 1e-3.

API:
  embed(state_dict, arch, x_nchw) -> (512,) float64, L2-normalised (state_dict: ckpt keys `model.*`,
                                     `embedding.*`; x_nchw: 1x3xHxW ImageNet-normalised)
  score(emb, head_rows, classes, species_map, active=13837, scale=30, k=5) -> (top, probs)
  preprocess(path_or_pil) -> 1x3x512x512 float32 (stretch resize, bilinear, ImageNet mean/std)

CLI: python3 tools/effnet_ref.py --ckpt X.ckpt --classes encoder_classes.npy --species species_map.csv IMG...
"""
import math

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
STAGE_STRIDES = [1, 2, 2, 2, 1, 2, 1]  # timm _gen_efficientnet arch_def, s1 s2 s2 s2 s1 s2 s1
ARCHES = {"efficientnet_b4": ("torch", 1e-5), "tf_efficientnet_b4": ("same", 1e-3),
          "tf_efficientnet_b4_ns": ("same", 1e-3)}


def _pads(size, k, stride, mode):
    """(before, after) padding of one spatial axis, as timm computes it."""
    if mode == "same" and not (stride == 1 and (k - 1) % 2 == 0):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        return total // 2, total - total // 2
    p = ((stride - 1) + (k - 1)) // 2
    return p, p


def _pad(x, k, stride, mode):
    (t, b), (l, r) = _pads(x.shape[1], k, stride, mode), _pads(x.shape[2], k, stride, mode)
    xp = np.pad(x, ((0, 0), (t, b), (l, r)))
    oh = (xp.shape[1] - k) // stride + 1
    ow = (xp.shape[2] - k) // stride + 1
    return xp, oh, ow


def conv_full(x, w, stride, mode):
    """Dense KxK convolution of x [C,H,W] by w [O,C,K,K], via im2col + matmul."""
    o, c, k, _ = w.shape
    xp, oh, ow = _pad(x, k, stride, mode)
    cols = np.empty((c, k, k, oh, ow))
    for i in range(k):
        for j in range(k):
            cols[:, i, j] = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
    return (w.reshape(o, -1) @ cols.reshape(c * k * k, -1)).reshape(o, oh, ow)


def conv_depthwise(x, w, stride, mode):
    """Depthwise KxK convolution: w [C,1,K,K], as K*K shifted multiply-adds."""
    c, _, k, _ = w.shape
    xp, oh, ow = _pad(x, k, stride, mode)
    out = np.zeros((c, oh, ow))
    for i in range(k):
        for j in range(k):
            out += w[:, 0, i, j][:, None, None] * xp[:, i:i + stride * (oh - 1) + 1:stride,
                                                     j:j + stride * (ow - 1) + 1:stride]
    return out


def conv_1x1(x, w, bias=None):
    c, h, wd = x.shape
    y = w[:, :, 0, 0] @ x.reshape(c, -1)
    if bias is not None:
        y += bias[:, None]
    return y.reshape(-1, h, wd)


def batchnorm(x, p, sd, eps):
    g, b = sd[p + ".weight"], sd[p + ".bias"]
    m, v = sd[p + ".running_mean"], sd[p + ".running_var"]
    s = g / np.sqrt(v + eps)
    return x * s[:, None, None] + (b - m * s)[:, None, None]


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow for large |x|


def silu(x):
    return x * sigmoid(x)


def squeeze_excite(x, p, sd):
    s = x.mean(axis=(1, 2))
    s = sd[p + ".conv_reduce.weight"][:, :, 0, 0] @ s + sd[p + ".conv_reduce.bias"]
    s = silu(s)
    s = sd[p + ".conv_expand.weight"][:, :, 0, 0] @ s + sd[p + ".conv_expand.bias"]
    return x * sigmoid(s)[:, None, None]


def _blocks(sd):
    """[(stage, index)] in order, from the key names."""
    found = set()
    for key in sd:
        parts = key.split(".")
        if parts[0] == "blocks":
            found.add((int(parts[1]), int(parts[2])))
    return sorted(found)


def features(sd, arch, x_nchw):
    """timm forward_features (num_classes=0, global_pool=''), then the average pool: (1792,) float64."""
    mode, eps = ARCHES[arch]
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    x = np.asarray(x_nchw, np.float64)[0]
    x = silu(batchnorm(conv_full(x, sd["conv_stem.weight"], 2, mode), "bn1", sd, eps))
    for s, i in _blocks(sd):
        p = f"blocks.{s}.{i}"
        stride = STAGE_STRIDES[s] if i == 0 else 1
        shortcut = x
        if p + ".conv_pwl.weight" in sd:  # InvertedResidual
            y = silu(batchnorm(conv_1x1(x, sd[p + ".conv_pw.weight"]), p + ".bn1", sd, eps))
            y = silu(batchnorm(conv_depthwise(y, sd[p + ".conv_dw.weight"], stride, mode), p + ".bn2", sd, eps))
            y = squeeze_excite(y, p + ".se", sd)
            y = batchnorm(conv_1x1(y, sd[p + ".conv_pwl.weight"]), p + ".bn3", sd, eps)
        else:  # DepthwiseSeparableConv
            y = silu(batchnorm(conv_depthwise(x, sd[p + ".conv_dw.weight"], stride, mode), p + ".bn1", sd, eps))
            y = squeeze_excite(y, p + ".se", sd)
            y = batchnorm(conv_1x1(y, sd[p + ".conv_pw.weight"]), p + ".bn2", sd, eps)
        if stride == 1 and y.shape[0] == shortcut.shape[0]:
            y = y + shortcut
        x = y
    x = silu(batchnorm(conv_1x1(x, sd["conv_head.weight"]), "bn2", sd, eps))
    return x.mean(axis=(1, 2))


def backbone_of(state_dict):
    """Split a checkpoint state_dict into (backbone keys without 'model.', embedding W, b)."""
    bb = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    return bb, np.asarray(state_dict["embedding.weight"], np.float64), np.asarray(state_dict["embedding.bias"], np.float64)


def embed(state_dict, arch, x_nchw, return_prenorm=False):
    """L2-normalised embedding (float64) of one 1x3xHxW image under the checkpoint's weights."""
    bb, w, b = backbone_of(state_dict)
    e = w @ features(bb, arch, x_nchw) + b
    n = np.linalg.norm(e)
    return (e / max(n, 1e-12), n) if return_prenorm else e / max(n, 1e-12)


def normalise_rows(head):
    head = np.asarray(head, np.float64)
    return head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)


def score(emb, head_rows, classes, species_map, active=13837, scale=30.0, k=5):
    """Upstream scoring. Returns (top, probs): top = [{class_animal, id_animal, probability (4 dp),
    probability_raw, slot}] best first; probs = the softmax over the active slots (float64)."""
    head = normalise_rows(np.asarray(head_rows)[:active])
    cos = head @ np.asarray(emb, np.float64)
    z = scale * cos
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    top = [{"class_animal": str(classes[i]), "id_animal": species_map.get(str(classes[i]), "unknown"),
            "probability": round(float(p[i]), 4), "probability_raw": float(p[i]), "slot": int(i)}
           for i in order]
    return top, p


def read_species_map(path):
    import csv
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return {row["individual_id"]: row["species"] for row in r}


def preprocess(img, size=512):
    """Whole frame stretched to size x size (bilinear, Pillow), [0,1], ImageNet mean/std, 1x3xHxW f32."""
    from PIL import Image
    im = img if isinstance(img, Image.Image) else Image.open(img)
    im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    a = np.asarray(im, np.float32) / np.float32(255.0)
    a = (a - MEAN.astype(np.float32)) / STD.astype(np.float32)
    return a.transpose(2, 0, 1)[None].astype(np.float32)


def main():
    import argparse
    import json
    import os
    import sys
    import time
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_legacy
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--classes", required=True)
    ap.add_argument("--species", required=True)
    ap.add_argument("--arch", default="efficientnet_b4", choices=sorted(ARCHES))
    ap.add_argument("--active-slots", type=int, default=13837)
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()
    sd, _hp = torch_legacy.load_checkpoint(args.ckpt)
    classes = np.load(args.classes)
    species = read_species_map(args.species)
    for path in args.images:
        t = time.time()
        e = embed(sd, args.arch, preprocess(path))
        top, _ = score(e, sd["arc.weight"], classes, species, active=args.active_slots)
        print(json.dumps({"image": path, "seconds": round(time.time() - t, 2), "top5": top}))


if __name__ == "__main__":
    main()
