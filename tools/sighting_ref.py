#!/usr/bin/env python3
"""Independent reference for a sighting's aggregated identification (tests/sightings.rs).

For a gallery-only embedder whose input is the image as is (224x224 PNGs, `resize = "stretch"`, mean/std
0.5): embeds the gallery photos and a sighting's identified frames with onnxruntime's Python API, and
applies the documented rule after each identified frame k = 1..n: the mean of the first k frames'
L2-normalised embeddings, re-normalised; each gallery individual scores the cosine of its nearest photo;
probabilities = softmax(30 x cosine) over the individuals; top-5; votes = frames whose own top-1 was
that individual. Prints one JSON object per k.

Usage: python3 tools/sighting_ref.py --onnx M.onnx --gallery ID=PNG ... --frames PNG ...
"""
import argparse
import json

import numpy as np
import onnxruntime as ort
from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--gallery", nargs="+", required=True, help="ID=PNG")
    ap.add_argument("--frames", nargs="+", required=True)
    ap.add_argument("--scale", type=float, default=30.0)
    args = ap.parse_args()
    sess = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def embed(path):
        x = (np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0 - 0.5) / 0.5
        e = sess.run(None, {name: x.transpose(2, 0, 1)[None]})[0][0].astype(np.float64)
        return e / np.linalg.norm(e)

    ids, rows = [], []
    for item in args.gallery:
        i, p = item.split("=", 1)
        ids.append(i)
        rows.append(embed(p))
    rows = np.stack(rows)
    individuals = list(dict.fromkeys(ids))

    def rank(q):
        cos = rows @ q
        best = np.array([max(c for c, i in zip(cos, ids) if i == ind) for ind in individuals])
        z = args.scale * best
        p = np.exp(z - z.max())
        p /= p.sum()
        order = sorted(range(len(individuals)), key=lambda k: (-p[k], k))[:5]
        return [(individuals[k], float(p[k]), float(best[k])) for k in order]

    frames = [embed(p) for p in args.frames]
    votes = {}
    total = np.zeros_like(frames[0])
    for k, e in enumerate(frames, 1):
        top1 = rank(e)[0][0]
        votes[top1] = votes.get(top1, 0) + 1
        total += e
        top = rank(total / np.linalg.norm(total))
        print(json.dumps({"frames": k, "frame_top1": top1,
                          "top": [{"class_animal": i, "probability": p, "cosine": c, "votes": votes.get(i, 0)}
                                  for i, p, c in top]}))


if __name__ == "__main__":
    main()
