#!/usr/bin/env python3
"""Evidence for issue 21 part 3 ("find the animal, then identify the animal"): can the marine gate give a
spatial answer, and does it find small and distant animals better than the whole-frame gate?

The gate (default models/marine-gate-v2) is fully convolutional up to its global pool: every op is a
Conv with explicit pads, Clip or Add. This script runs it on the WHOLE frame at a larger input that keeps
the aspect ratio (the longer side `--long`, default 640: a 1920x1080 frame becomes 640x360 and the last
feature map 20x12 cells of 32 px) and applies the 7-class head to every cell: a map of P(cetacean)
(a class-activation map of the fine-tuned head). From the map:
  - frame score = the largest cell probability (whole-frame gate: the manifest's centre crop, which on a
    16:9 frame never sees the left and right 22 %);
  - box = the cells whose probability is at least `--rel` x the peak, 4-connected to the peak cell,
    their extent in frame pixels (each cell covers its 32x32 input block).

Sets:
  (a) composites: every marine-dev/ocean photo cover-resized to a 1920x1080 canvas, a whales-extra photo
      pasted into it with its longer side 48, 96, 192 or 400 px at a seeded random place below the top
      40 % of the frame (the pasted rectangle is the known box; the animal fills part of it);
  (b) marine-dev (the gate's own training images: in-sample for it, so TNR figures are optimistic for
      both methods alike) for the thresholds and the hard negatives' TNR.
Thresholds: for each method, the highest keeping marine-dev TPR >= 0.97 on its own scores
(train_prefilter.threshold_rule, the shipped gates' rule; here in-sample for both, so the comparison is
like for like).

Usage: python3 tools/localise_eval.py [--data ../shared/data] [--long 640] [--out /tmp/loc.json]
       python3 tools/localise_eval.py --write /tmp/composites   (evidence (a)'s frames, for `whaled eval`)
       python3 tools/localise_eval.py --boxes models/localisation/marine-dev-boxes.csv [--long 640]
         (evidence (b): real photos against boxes drawn by looking at them)
"""
import argparse
import csv
import glob
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import preprocess_ref  # noqa: E402
import train_prefilter as tp  # noqa: E402

SIZES = (48, 96, 192, 400)


def sessions(model_path):
    """(whole-frame session, fully convolutional feature-map session, head weight [C, F], head bias [C])."""
    m = onnx.load(model_path)
    g = m.graph
    pool = next(n for n in g.node if n.op_type == "GlobalAveragePool")
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    w, b = inits[gemm.input[1]], inits[gemm.input[2]]
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    w = w if trans_b else w.T
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    whole = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    fcn = onnx.load(model_path)
    d = fcn.graph.input[0].type.tensor_type.shape.dim
    d[2].dim_param, d[3].dim_param = "h", "w"
    del fcn.graph.output[:]
    fcn.graph.output.extend([onnx.helper.make_tensor_value_info(pool.input[0], onnx.TensorProto.FLOAT, None)])
    conv = ort.InferenceSession(fcn.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return whole, conv, w, b


def prob_map(conv, w, b, img, long_side, window=1):
    s = long_side / max(img.size)
    size = (max(32, round(img.width * s)), max(32, round(img.height * s)))
    x = np.asarray(img.resize(size, Image.BICUBIC), np.float32) / 255.0
    x = ((x - 0.5) / 0.5).transpose(2, 0, 1)[None]
    f = conv.run(None, {"input": x})[0][0]  # [F, h, w]
    if window > 1:
        # Average the features over window x window cells (stride 1, edges clipped) before the head: a
        # local version of the global pool the head was trained on.
        c = np.pad(f, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
        h, w_ = f.shape[1:]
        r = window // 2
        y0 = np.clip(np.arange(h) - r, 0, h)
        y1 = np.clip(np.arange(h) + window - r, 0, h)
        x0 = np.clip(np.arange(w_) - r, 0, w_)
        x1 = np.clip(np.arange(w_) + window - r, 0, w_)
        tot = c[:, y1][:, :, x1] - c[:, y0][:, :, x1] - c[:, y1][:, :, x0] + c[:, y0][:, :, x0]
        f = tot / ((y1 - y0)[:, None] * (x1 - x0)[None, :])[None]
    logits = np.einsum("cf,fhw->chw", w, f) + b[:, None, None]
    logits -= logits.max(axis=0, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=0, keepdims=True)
    return p[0], (img.width / size[0], img.height / size[1])


def whole_score(whole, img):
    lo = whole.run(None, {"input": preprocess_ref.lite0_image(img)})[0][0]
    p = np.exp(lo - lo.max())
    return float(p[0] / p.sum())


def box_from(pm, scale, rel):
    h, w = pm.shape
    peak = np.unravel_index(np.argmax(pm), pm.shape)
    keep = pm >= rel * pm[peak]
    seen, stack = {peak}, [peak]
    while stack:
        y, x = stack.pop()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            q = (y + dy, x + dx)
            if 0 <= q[0] < h and 0 <= q[1] < w and q not in seen and keep[q]:
                seen.add(q)
                stack.append(q)
    ys = [c[0] for c in seen]
    xs = [c[1] for c in seen]
    sx, sy = scale
    return (min(xs) * 32 * sx, min(ys) * 32 * sy, (max(xs) + 1) * 32 * sx, (max(ys) + 1) * 32 * sy)


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def drawn_boxes(args, conv, w, b):
    """Evidence (b): the map's box on real photos against boxes drawn by looking at them (one box around
    every cetacean in the photo), beside the whole frame, which is every Detection's bbox today."""
    rows = list(csv.DictReader(open(args.boxes)))
    mapped, whole_frame = [], []
    for r in rows:
        # relpath is relative to the CSV (as `whaled eval` reads it): ../../../shared/data/marine-dev/...
        img = Image.open(os.path.join(os.path.dirname(os.path.abspath(args.boxes)), r["relpath"])).convert("RGB")
        assert img.size == (int(r["width"]), int(r["height"])), r["relpath"]
        x, y, bw, bh = (int(r[k]) for k in ("x", "y", "w", "h"))
        gt = (x, y, x + bw, y + bh)
        pm, scale = prob_map(conv, w, b, img, args.long, args.window)
        mapped.append(iou(box_from(pm, scale, args.rel), gt))
        whole_frame.append(iou((0, 0, img.width, img.height), gt))
    for name, v in (("whole frame (today's bbox)", whole_frame), (f"map box (long {args.long}, rel {args.rel})", mapped)):
        v = np.array(v)
        print(f"{name}: {len(v)} photos, IoU >= 0.5 on {np.mean(v >= 0.5):.0%}, median IoU {np.median(v):.2f}")
    if args.out:
        json.dump({"whole_frame": whole_frame, "map": mapped, "photos": [r["relpath"] for r in rows]}, open(args.out, "w"))


def composites(data, seed):
    """Evidence (a)'s frames, in a fixed order: for each marine-dev `ocean` photo (cover-resized to a
    1920x1080 canvas), a whales-extra photo pasted at each of SIZES px (longer side) at a seeded place below
    the top 40 %, then the empty canvas. Yields (ocean path, empty canvas, size, whale file, canvas,
    (x0, y0, x1, y1)); size 0 (and canvas None) for the empty canvas."""
    rng = np.random.default_rng(seed)
    whales = sorted(glob.glob(os.path.join(data, "whales-extra", "*.jpg")))
    oceans = sorted(glob.glob(os.path.join(data, "marine-dev", "ocean", "*.jpg")))
    for i, o in enumerate(oceans):
        canvas0 = tp.sea_frame(o, (1920, 1080))
        for j, size in enumerate(SIZES):
            path = whales[(i + j) % len(whales)]
            whale = Image.open(path).convert("RGB")
            s = size / max(whale.size)
            pw, ph = max(1, round(whale.width * s)), max(1, round(whale.height * s))
            # Below the top 40 % of the frame, where the sea is in most of these photos (not in the sky).
            x, y = int(rng.integers(0, 1920 - pw)), int(rng.integers(min(432, 1080 - ph), 1080 - ph + 1))
            canvas = canvas0.copy()
            canvas.paste(whale.resize((pw, ph), Image.BICUBIC), (x, y))
            yield o, canvas0, size, os.path.basename(path), canvas, (x, y, x + pw, y + ph)
        yield o, canvas0, 0, None, None, None


def write_composites(data, seed, out_dir):
    """Writes evidence (a)'s frames as JPEGs (quality 95) and one `whaled eval` manifest per whale size
    (`composites-<size>.csv`: relpath, label, x, y, w, h; the empty canvases as negatives in every one),
    so that the figures come from whaled's own decode, map and box."""
    os.makedirs(out_dir, exist_ok=True)
    rows = {size: [] for size in SIZES}
    empties = []
    for o, canvas0, size, whale, canvas, gt in composites(data, seed):
        stem = os.path.splitext(os.path.basename(o))[0]
        if size == 0:
            name = f"{stem}-empty.jpg"
            canvas0.save(os.path.join(out_dir, name), quality=95)
            empties.append(name)
            continue
        name = f"{stem}-{size}.jpg"
        canvas.save(os.path.join(out_dir, name), quality=95)
        x0, y0, x1, y1 = gt
        rows[size].append((name, "cetacean", x0, y0, x1 - x0, y1 - y0))
    for size, r in rows.items():
        with open(os.path.join(out_dir, f"composites-{size}.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["relpath", "label", "x", "y", "w", "h"])
            wr.writerows(r)
            wr.writerows((name, "non_cetacean", "", "", "", "") for name in empties)
    print(f"wrote {sum(map(len, rows.values()))} composites and {len(empties)} empty canvases to {out_dir}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--model", default="models/marine-gate-v2/marine_gate_v2_fp32.onnx")
    ap.add_argument("--long", type=int, default=640)
    ap.add_argument("--rel", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=1, help="average the features over this many cells square before the head")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out")
    ap.add_argument("--boxes", help="only evidence (b): IoU against hand-drawn boxes (models/localisation/marine-dev-boxes.csv)")
    ap.add_argument("--write", metavar="DIR", help="only write evidence (a)'s frames and whaled eval manifests to DIR")
    args = ap.parse_args()
    if args.write:
        return write_composites(args.data, args.seed, args.write)
    whole, conv, w, b = sessions(args.model)
    if args.boxes:
        return drawn_boxes(args, conv, w, b)
    rows = list(csv.DictReader(open(os.path.join(args.data, "marine-dev", "manifest.csv"))))
    md_whole, md_map, md_pos, md_cat = [], [], [], []
    for r in rows:
        img = Image.open(os.path.join(args.data, "marine-dev", r["relpath"])).convert("RGB")
        md_whole.append(whole_score(whole, img))
        md_map.append(float(prob_map(conv, w, b, img, args.long, args.window)[0].max()))
        md_pos.append(r["label"] == "cetacean")
        md_cat.append(r["relpath"].split("/")[0])
    md_whole, md_map, md_pos, md_cat = map(np.array, (md_whole, md_map, md_pos, md_cat))
    t_whole, t_map = tp.threshold_rule(md_whole, md_pos), tp.threshold_rule(md_map, md_pos)

    comp = []
    for o, canvas0, size, whale, canvas, gt in composites(args.data, args.seed):
        if size == 0:
            empty_map = float(prob_map(conv, w, b, canvas0, args.long, args.window)[0].max())
            comp.append({"ocean": os.path.basename(o), "size": 0, "map": empty_map, "whole": whole_score(whole, canvas0)})
            continue
        pm, scale = prob_map(conv, w, b, canvas, args.long, args.window)
        box = box_from(pm, scale, args.rel)
        comp.append({"ocean": os.path.basename(o), "whale": whale, "size": size, "gt": list(gt),
                     "box": [round(v) for v in box], "iou": iou(box, gt), "map": float(pm.max()),
                     "whole": whole_score(whole, canvas)})

    out = {"long": args.long, "rel": args.rel, "window": args.window, "threshold_whole": t_whole, "threshold_map": t_map}
    print(f"thresholds (marine-dev TPR >= 0.97, in-sample): whole-frame {t_whole:.4f}, map max {t_map:.4f}")
    print("| set | n | whole-frame gate | map max | map box IoU >= 0.5 | median IoU |")
    print("|---|---|---|---|---|---|")
    for size in SIZES:
        c = [r for r in comp if r["size"] == size]
        tw = np.mean([r["whole"] >= t_whole for r in c])
        tm = np.mean([r["map"] >= t_map for r in c])
        hit = np.mean([r["iou"] >= 0.5 for r in c])
        print(f"| composites, whale {size} px | {len(c)} | TPR {tw:.3f} | TPR {tm:.3f} | {hit:.3f} | "
              f"{np.median([r['iou'] for r in c]):.2f} |")
        out[f"composite_{size}"] = {"tpr_whole": tw, "tpr_map": tm, "iou_ge_0.5": hit}
    e = [r for r in comp if r["size"] == 0]
    print(f"| empty sea canvases | {len(e)} | TNR {np.mean([r['whole'] < t_whole for r in e]):.3f} | "
          f"TNR {np.mean([r['map'] < t_map for r in e]):.3f} | | |")
    for cat in sorted(set(md_cat)):
        sel = md_cat == cat
        if cat == "positives":
            print(f"| marine-dev {cat} | {sel.sum()} | TPR {np.mean(md_whole[sel] >= t_whole):.3f} | "
                  f"TPR {np.mean(md_map[sel] >= t_map):.3f} | | |")
        else:
            print(f"| marine-dev {cat} | {sel.sum()} | TNR {np.mean(md_whole[sel] < t_whole):.3f} | "
                  f"TNR {np.mean(md_map[sel] < t_map):.3f} | | |")
    neg = ~md_pos
    print(f"| marine-dev all negatives | {neg.sum()} | TNR {np.mean(md_whole[neg] < t_whole):.3f} | "
          f"TNR {np.mean(md_map[neg] < t_map):.3f} | | |")
    if args.out:
        out["composites"] = comp
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
