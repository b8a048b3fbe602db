#!/usr/bin/env python3
"""Pointwise (1x1) convolution test cases for whaled's substituted tract op (crates/whaled-tract-ops/src/pointwise.rs).

Writes, under --out, one small ONNX model per case (a 1x1 Conv with random weights and bias, sometimes
followed by an activation), its random input and onnxruntime's output on it (the independent reference),
and `cases.json` describing them, with whether whaled is expected to substitute the conv. The cases:
the 1x1 layers of the shipped and generated models (Lite0 expansions with ReLU6 and projections,
EfficientNet-B4 at 512 with SiLU, the B0/Lite0 head, a ResNet bottleneck with ReLU), a batch of 2,
a strided 1x1 (ResNet's shortcut: tract makes it a subsampling and a 1x1, which whaled then runs),
convolutions whaled leaves to tract (output channels not a multiple of 8, a padded 1x1, a grouped one), and random shapes: 1-70 input channels, 8-96 output channels, planes 1x1 to 40x40 (every
tile width and tail), with and without bias, ReLU or ReLU6.

Usage: python3 tools/pointwise_cases.py --out DIR [--random N] [--seed S]
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort

from onnx_build import Graph


def conv_model(cin, cout, h, w, batch, rng, with_bias=True, post=None, stride=1, pad=0, group=1, se=False):
    """A 1x1 Conv `x` [batch, cin, h, w] -> `y`, then `post`: "relu", "relu6" (Clip 0..6) or "silu"
    (x * sigmoid(x), which whaled does not fuse). With `se`, the conv's data is the input times a
    squeeze-excitation-like gate computed from it, one factor per channel and image
    (`x * sigmoid(GlobalAveragePool(x))`), as in every EfficientNet block: whaled folds the product
    into the conv's weights where the plane is at least as large as `cout` and the batch is 1."""
    wgt = rng.standard_normal((cout, cin // group, 1, 1)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    g = Graph("pointwise", (h, w), in_name="x", in_channels=cin, batch=batch)
    data = g.in_name
    if se:
        data = g.node("Mul", [data, g.node("Sigmoid", [g.gap(data)])])
    y = g.node("Conv", [data, g.const(wgt)] + ([g.const(bias, "b")] if with_bias else []),
               kernel_shape=[1, 1], strides=[stride, stride], pads=[pad] * 4, group=group)
    return g.finish(g.activation(y, post), "y", [batch, cout, None, None], "a 1x1 conv test case")


def fixed_cases():
    """(name, cin, cout, h, w, batch, post, extra conv attributes, substituted)."""
    return [
        ("lite0-expand-112", 16, 96, 112, 112, 1, "relu6", {}, True),
        ("lite0-project-56", 144, 24, 56, 56, 1, None, {}, True),
        ("lite0-expand-14", 80, 480, 14, 14, 1, "relu6", {}, True),
        ("lite0-expand-7", 192, 1152, 7, 7, 1, "relu6", {}, True),
        ("lite0-head-7", 320, 1280, 7, 7, 1, "relu6", {}, True),
        ("b4-expand-128", 32, 192, 128, 128, 1, "silu", {}, True),
        ("b4-project-16", 1632, 272, 16, 16, 1, None, {}, True),
        ("b4-head-16", 448, 1792, 16, 16, 1, "silu", {}, True),
        ("resnet-reduce-14", 1024, 256, 14, 14, 1, "relu", {}, True),
        ("batch-2", 24, 40, 9, 13, 2, "relu6", {}, True),
        ("batch-2-no-bias", 7, 16, 5, 50, 2, None, {"with_bias": False}, True),
        ("tract-cout-12", 16, 12, 10, 10, 1, None, {}, False),
        ("strided", 64, 128, 14, 14, 1, None, {"stride": 2}, True),
        ("tract-padded", 8, 16, 6, 6, 1, None, {"pad": 1}, False),
        ("tract-grouped", 16, 32, 6, 6, 1, None, {"group": 2}, False),
        # Squeeze-excitation products folded into the weights: the B4's projections at 128x128 and
        # 32x32, a plane just above the output channels, with a fused ReLU, without bias; and left as
        # a product where the plane is smaller than cout (the B4's 16x16 projections) or the batch is 2.
        ("se-b4-project-128", 192, 32, 128, 128, 1, None, {"se": True}, True),
        ("se-b4-project-32", 672, 112, 32, 32, 1, None, {"se": True}, True),
        ("se-plane-above-cout", 13, 40, 7, 6, 1, "relu", {"se": True, "with_bias": False}, True),
        ("se-plane-below-cout", 96, 272, 16, 16, 1, None, {"se": True}, True),
        ("se-batch-2", 24, 16, 9, 9, 2, None, {"se": True}, True),
    ]


def random_cases(n, rng):
    out = []
    for i in range(n):
        cin = int(rng.integers(1, 71))
        cout = 8 * int(rng.integers(1, 13))
        h, w = (int(v) for v in rng.integers(1, 41, 2))
        batch = 2 if i % 7 == 3 else 1
        post = [None, "relu", "relu6"][i % 3]
        out.append((f"random-{i}", cin, cout, h, w, batch, post, {"with_bias": i % 4 != 1}, True))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=30)
    ap.add_argument("--seed", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    listing = []
    for name, cin, cout, h, w, batch, post, extra, substituted in fixed_cases() + random_cases(args.random, rng):
        model = conv_model(cin, cout, h, w, batch, rng, post=post, **extra)
        x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
        onnx.save(model, os.path.join(args.out, f"{name}.onnx"))
        np.save(os.path.join(args.out, f"{name}.input.npy"), x)
        np.save(os.path.join(args.out, f"{name}.ort.npy"), y)
        scaled = extra.get("se", False) and batch == 1 and h * w >= cout
        listing.append(dict(name=name, cin=cin, cout=cout, input=[batch, cin, h, w], output=list(y.shape),
                            post=post, fused=post in ("relu", "relu6") and substituted, substituted=substituted,
                            scaled=scaled,
                            **{k: v for k, v in extra.items()}))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(listing, f, indent=1)
    print(f"wrote {len(listing)} cases under {args.out}")


if __name__ == "__main__":
    main()
