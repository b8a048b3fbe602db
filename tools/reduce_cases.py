#!/usr/bin/env python3
"""Trailing-sum test cases for whaled's substituted tract op (crates/whaled-tract-ops/src/reduce.rs).

Writes, under --out, one single-node ONNX model per case (a reduction over some axes of a random
input), its input and onnxruntime's output on it (the independent reference), and `cases.json`
describing them, with whether whaled is expected to substitute the reduction. The cases: the
squeeze-excitation squeezes of the shipped and generated EfficientNets as torch and TF export them
(GlobalAveragePool, ReduceMean over H and W with and without keepdims, at 112x112, 56x56 and 7x7 with
up to 1152 channels), ReduceSum with its axes as an input over the last one, two or three axes, a batch
of 2; and reductions whaled leaves to tract (over the channel axis, over non-trailing axes, a max).

Usage: python3 tools/reduce_cases.py --out DIR
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort

from onnx_build import Graph


def reduce_model(shape, op, axes, keepdims):
    g = Graph("reduce", (shape[2], shape[3]), in_name="x", in_channels=shape[1], batch=shape[0])
    if op == "GlobalAveragePool":
        y = g.node(op, [g.in_name])
    elif op == "ReduceSum":
        y = g.node(op, [g.in_name, g.ints(axes, "axes")], keepdims=keepdims)
    else:
        y = g.node(op, [g.in_name], axes=list(axes), keepdims=keepdims)
    kept = [a % 4 for a in (axes if axes is not None else [2, 3])]
    out = [1 if i in kept else d for i, d in enumerate(shape)] if keepdims else [d for i, d in enumerate(shape) if i not in kept]
    return g.finish(y, "y", out, "a reduction test case")


def cases():
    """(name, input shape, op, axes, keepdims, substituted)."""
    return [
        ("gap-112", [1, 32, 112, 112], "GlobalAveragePool", None, 1, True),
        ("gap-56", [1, 144, 56, 56], "GlobalAveragePool", None, 1, True),
        ("gap-7", [1, 1152, 7, 7], "GlobalAveragePool", None, 1, True),
        ("mean-hw-keepdims", [1, 96, 28, 28], "ReduceMean", [2, 3], 1, True),
        ("mean-hw-batch-2", [2, 40, 9, 11], "ReduceMean", [2, 3], 0, True),
        ("mean-negative-axes", [1, 24, 10, 13], "ReduceMean", [-1, -2], 1, True),
        ("sum-hw", [1, 16, 20, 20], "ReduceSum", [2, 3], 1, True),
        ("sum-chw", [1, 8, 5, 5], "ReduceSum", [1, 2, 3], 1, True),
        ("sum-last", [1, 4, 6, 70], "ReduceSum", [3], 1, True),
        ("tract-sum-channels", [1, 8, 6, 6], "ReduceSum", [1], 1, False),
        ("tract-sum-c-w", [1, 8, 6, 6], "ReduceSum", [1, 3], 1, False),
        ("tract-max-hw", [1, 8, 6, 6], "ReduceMax", [2, 3], 1, False),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    listing = []
    for name, shape, op, axes, keepdims, substituted in cases():
        model = reduce_model(shape, op, axes, keepdims)
        # Activations after a SiLU: mostly positive, some negative.
        x = (rng.standard_normal(shape) + 0.5).astype(np.float32)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
        with open(os.path.join(args.out, f"{name}.onnx"), "wb") as f:
            f.write(model.SerializeToString())
        np.save(os.path.join(args.out, f"{name}.input.npy"), x)
        np.save(os.path.join(args.out, f"{name}.ort.npy"), y)
        listing.append(dict(name=name, input=shape, output=list(y.shape), op=op, axes=axes, keepdims=keepdims,
                            substituted=substituted))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(listing, f, indent=1)
    print(f"wrote {len(listing)} cases under {args.out}")


if __name__ == "__main__":
    main()
