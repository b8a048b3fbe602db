#!/usr/bin/env python3
"""Depthwise-convolution test cases for whaled's substituted tract op (crates/whaled-tract-ops/src/depthwise.rs).

Writes, under --out, one single-node ONNX model per case (a grouped Conv with group = channels, random
weights and bias), its random input and onnxruntime's output on it (the independent reference), and
`cases.json` describing them. The cases cover the geometries the shipped and generated models use
(3x3 and 5x5, strides 1 and 2, symmetric "same" padding as PyTorch exports it, TF-style asymmetric SAME
padding as the Lite0 conversion has it, auto_pad SAME_UPPER) plus random shapes, strides up to 3,
dilations up to 3, non-square kernels and padding larger than the kernel's reach; and a batch of 2.

Usage: python3 tools/depthwise_cases.py --out DIR [--random N] [--seed S]
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort

from onnx_build import Graph


def conv_model(c, h, w, kernel, stride, dilation, pads, auto_pad, batch, rng, with_bias=True, post=None):
    """One grouped Conv (group = c) with random weights and (unless `with_bias` is false) bias, input `x`
    [batch, c, h, w], output `y`; `post` "relu" or "relu6" (Clip 0..6) appends that activation, which
    whaled fuses into its op."""
    wgt = rng.standard_normal((c, 1, kernel[0], kernel[1])).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    attrs = dict(group=c, kernel_shape=list(kernel), strides=list(stride), dilations=list(dilation))
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    g = Graph("depthwise", (h, w), in_name="x", in_channels=c, batch=batch)
    y = g.node("Conv", [g.in_name, g.const(wgt)] + ([g.const(bias, "b")] if with_bias else []), **attrs)
    return g.finish(g.activation(y, post), "y", [batch, c, None, None], "a depthwise conv test case")


def fixed_cases():
    """The geometries of the shipped and generated EfficientNets, by name."""
    same = lambda k: [k // 2] * 4  # PyTorch: symmetric k//2
    return [
        ("lite0-3x3-s1", 32, 112, 112, (3, 3), (1, 1), (1, 1), same(3), None, 1),
        ("lite0-3x3-s2-tf", 96, 112, 112, (3, 3), (2, 2), (1, 1), [0, 0, 1, 1], None, 1),
        ("lite0-5x5-s2-tf", 144, 56, 56, (5, 5), (2, 2), (1, 1), [1, 1, 2, 2], None, 1),
        ("lite0-5x5-s1", 240, 28, 28, (5, 5), (1, 1), (1, 1), same(5), None, 1),
        ("b0-3x3-s2-torch", 96, 112, 112, (3, 3), (2, 2), (1, 1), same(3), None, 1),
        ("b4-5x5-s2-torch", 192, 64, 64, (5, 5), (2, 2), (1, 1), same(5), None, 1),
        ("b4-3x3-s1-7x7", 1632, 7, 7, (3, 3), (1, 1), (1, 1), same(3), None, 1),
        ("lite0-5x5-s1-7x7", 1152, 7, 7, (5, 5), (1, 1), (1, 1), same(5), None, 1),
        ("lite0-5x5-s2-14-tf", 672, 14, 14, (5, 5), (2, 2), (1, 1), [1, 1, 2, 2], None, 1),
        ("batch-2-blocked", 37, 10, 9, (5, 5), (2, 2), (1, 1), [2, 1, 2, 2], None, 2),
        ("same-upper-s2-odd", 8, 15, 13, (3, 3), (2, 2), (1, 1), None, "SAME_UPPER", 1),
        ("batch-2", 5, 9, 11, (3, 3), (1, 1), (1, 1), same(3), None, 2),
        ("batch-2-large", 40, 56, 56, (5, 5), (2, 2), (1, 1), same(5), None, 2),
    ]


def random_cases(n, rng):
    """`n` random geometries: sizes 1-40, kernels 1-7 (not always square), strides 1-3, dilations 1-3,
    explicit padding 0..kernel reach + 2 on each side (asymmetric: outputs may lie wholly in the padding);
    only ones with a non-empty output."""
    out = []
    while len(out) < n:
        c = int(rng.integers(1, 24))
        h, w = (int(v) for v in rng.integers(1, 41, 2))
        kernel = tuple(int(v) for v in rng.integers(1, 8, 2))
        stride = tuple(int(v) for v in rng.integers(1, 4, 2))
        dilation = tuple(int(v) for v in rng.integers(1, 4, 2))
        pads = [int(rng.integers(0, (kernel[i % 2] - 1) * dilation[i % 2] + 3)) for i in range(4)]
        for a, size in enumerate((h, w)):
            reach = (kernel[a] - 1) * dilation[a] + 1
            if size + pads[a] + pads[a + 2] < reach:
                break
        else:
            out.append((f"random-{len(out)}", c, h, w, kernel, stride, dilation, pads, None, 1))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=40)
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    listing = []
    for i, (name, c, h, w, kernel, stride, dilation, pads, auto_pad, batch) in enumerate(
            fixed_cases() + random_cases(args.random, rng)):
        # Every fourth random case has no bias input (tract then gives the conv a zero scalar bias); the
        # Lite0 geometries end in ReLU6 as in the model, every fifth random case in ReLU.
        post = "relu6" if name.startswith("lite0") else ("relu" if name.startswith("random") and i % 5 == 0 else None)
        model = conv_model(c, h, w, kernel, stride, dilation, pads, auto_pad, batch, rng,
                           with_bias=not (name.startswith("random") and i % 4 == 0), post=post)
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
        onnx.save(model, os.path.join(args.out, f"{name}.onnx"))
        np.save(os.path.join(args.out, f"{name}.input.npy"), x)
        np.save(os.path.join(args.out, f"{name}.ort.npy"), y)
        listing.append(dict(name=name, post=post, input=[batch, c, h, w], output=list(y.shape), kernel=list(kernel),
                            stride=list(stride), dilation=list(dilation), pads=pads, auto_pad=auto_pad))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(listing, f, indent=1)
    print(f"wrote {len(listing)} cases under {args.out}")


if __name__ == "__main__":
    main()
