#!/usr/bin/env python3
"""Stem-convolution test cases for whaled's substituted tract op (crates/whaled-tract-ops/src/stem.rs).

Writes, under --out, one single-node ONNX model per case (a dense Conv with random weights and bias over
a few input channels, sometimes followed by ReLU / ReLU6), its random input and onnxruntime's output on
it (the independent reference), and `cases.json` describing them, with whether whaled is expected to
substitute the conv. The cases: the stems of the shipped and generated models (Lite0's 3x3 stride 2
with TF-style asymmetric padding and ReLU6, B0's and B4's with PyTorch's symmetric padding), auto_pad
SAME_UPPER, a 5x5, dilation, unequal strides, one and four input channels, without bias; ResNet-class
3x3 convolutions (64-512 input channels, stride 1 and 2, one at 56x56), ResNet-18's 7x7 stem (at 48 and
224), a ViT patch embedding; output rows of 130 (whaled's, direct); convolutions whaled leaves to tract
(a batch of 2, output channels not a multiple of 8, more than 16384 input channels x taps, output rows
of 128 or more where the op would not run direct), which must still be right; then random small
geometries. Each substituted case says which way whaled's op runs it ("direct" or "im2col", where every
vector width agrees).

Usage: python3 tools/stem_cases.py --out DIR [--random N] [--seed S]
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort

from onnx_build import Graph


def conv_model(cin, cout, h, w, kernel, stride, dilation, pads, auto_pad, batch, rng, with_bias=True, post=None):
    wgt = rng.standard_normal((cout, cin, kernel[0], kernel[1])).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    attrs = dict(kernel_shape=list(kernel), strides=list(stride), dilations=list(dilation))
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    g = Graph("stem", (h, w), in_name="x", in_channels=cin, batch=batch)
    y = g.node("Conv", [g.in_name, g.const(wgt)] + ([g.const(bias, "b")] if with_bias else []), **attrs)
    return g.finish(g.activation(y, post), "y", [batch, cout, None, None], "a stem conv test case")


def fixed_cases():
    """(name, cin, cout, h, w, kernel, stride, dilation, pads, auto_pad, batch, post, with_bias, substituted)."""
    same = lambda k: [k // 2] * 4
    return [
        ("lite0-stem-tf", 3, 32, 224, 224, (3, 3), (2, 2), (1, 1), [0, 0, 1, 1], None, 1, "relu6", True, True),
        ("b0-stem-torch", 3, 32, 97, 131, (3, 3), (2, 2), (1, 1), same(3), None, 1, "relu", True, True),
        ("b4-stem-torch", 3, 48, 128, 128, (3, 3), (2, 2), (1, 1), same(3), None, 1, None, True, True),
        ("same-upper", 3, 16, 33, 30, (3, 3), (2, 2), (1, 1), None, "SAME_UPPER", 1, None, True, True),
        ("5x5-s1", 3, 8, 20, 21, (5, 5), (1, 1), (1, 1), same(5), None, 1, None, False, True),
        ("dilated-unequal", 2, 24, 19, 23, (3, 5), (2, 1), (2, 1), [2, 1, 0, 3], None, 1, "relu6", True, True),
        ("one-channel", 1, 16, 12, 12, (3, 3), (1, 1), (1, 1), same(3), None, 1, None, True, True),
        ("four-channels", 4, 8, 10, 17, (3, 3), (3, 3), (1, 1), [1, 1, 1, 1], None, 1, None, True, True),
        ("tract-batch-2", 3, 16, 11, 9, (3, 3), (2, 2), (1, 1), same(3), None, 2, None, True, False),
        ("tract-cout-12", 3, 12, 11, 9, (3, 3), (2, 2), (1, 1), same(3), None, 1, None, True, False),
        # ResNet-class convolutions (many input channels), a ResNet stem and a ViT patch embedding.
        ("resnet-3x3", 64, 64, 14, 14, (3, 3), (1, 1), (1, 1), same(3), None, 1, "relu", True, True),
        ("resnet-3x3-s2", 128, 256, 9, 9, (3, 3), (2, 2), (1, 1), same(3), None, 1, None, True, True),
        ("resnet-3x3-7x7", 512, 64, 7, 7, (3, 3), (1, 1), (1, 1), same(3), None, 1, "relu", True, True),
        ("resnet-stem-7x7", 3, 64, 48, 48, (7, 7), (2, 2), (1, 1), same(7), None, 1, "relu", True, True),
        # Full-size ones the op runs direct: ResNet-18's stem and a 56x56 3x3.
        ("resnet-stem-7x7-224", 3, 64, 224, 224, (7, 7), (2, 2), (1, 1), same(7), None, 1, "relu", True, True),
        ("resnet-3x3-56", 64, 64, 56, 56, (3, 3), (1, 1), (1, 1), same(3), None, 1, None, True, True),
        ("vit-patch-16", 3, 64, 64, 48, (16, 16), (16, 16), (1, 1), [0, 0, 0, 0], None, 1, None, True, True),
        # More than 16384 input channels x taps (MAX_ROWS): tract's.
        ("tract-rows", 1821, 8, 4, 4, (3, 3), (1, 1), (1, 1), same(3), None, 1, None, True, False),
        # Output rows of 128 or more: whaled's where it runs direct (the B4's stem at 512), else tract's
        # own direct convolution (as fast there as an im2col): a 15-wide kernel at stride 1 computes 156
        # columns per row for 142.
        ("wide-130-direct", 3, 16, 33, 260, (3, 3), (2, 2), (1, 1), same(3), None, 1, "relu6", True, True),
        ("tract-direct-wide", 1, 8, 4, 142, (3, 15), (1, 1), (1, 1), [1, 7, 1, 7], None, 1, None, True, False),
    ]


def stem_path(out_hw, kernel_w, stride_w, dilation_w=1):
    """Which way whaled's op runs a substituted conv with output `out_hw` (stem.rs, `direct_suits`):
    "direct" where computing every output row `phase_width` long (whole vectors) adds at most 5 % to the
    output's columns, else "im2col"; None where 16, 8 and 4 lanes (AVX-512, AVX2, NEON) disagree."""
    oh, ow = out_hw
    qw = ow + (kernel_w - 1) * dilation_w // stride_w
    ways = {"direct" if -(-oh * qw // lanes) * lanes * 100 <= oh * ow * 105 else "im2col" for lanes in (16, 8, 4)}
    return ways.pop() if len(ways) == 1 else None


def random_cases(n, rng):
    out = []
    while len(out) < n:
        cin = int(rng.integers(1, 5))
        cout = 8 * int(rng.integers(1, 7))
        h, w = (int(v) for v in rng.integers(3, 41, 2))
        kernel = tuple(int(v) for v in rng.integers(2, 5, 2))
        stride = tuple(int(v) for v in rng.integers(1, 3, 2))
        pads = [int(rng.integers(0, kernel[i % 2])) for i in range(4)]
        if cin * kernel[0] * kernel[1] > 80 or any(s + pads[a] + pads[a + 2] < kernel[a] for a, s in enumerate((h, w))):
            continue
        post = [None, "relu", "relu6"][len(out) % 3]
        out.append((f"random-{len(out)}", cin, cout, h, w, kernel, stride, (1, 1), pads, None, 1, post, len(out) % 4 != 1, True))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=12)
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    listing = []
    for (name, cin, cout, h, w, kernel, stride, dilation, pads, auto_pad, batch, post, with_bias,
         substituted) in fixed_cases() + random_cases(args.random, rng):
        model = conv_model(cin, cout, h, w, kernel, stride, dilation, pads, auto_pad, batch, rng,
                           with_bias=with_bias, post=post)
        x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
        onnx.save(model, os.path.join(args.out, f"{name}.onnx"))
        np.save(os.path.join(args.out, f"{name}.input.npy"), x)
        np.save(os.path.join(args.out, f"{name}.ort.npy"), y)
        listing.append(dict(name=name, input=[batch, cin, h, w], output=list(y.shape), kernel=list(kernel),
                            stride=list(stride), dilation=list(dilation), pads=pads, auto_pad=auto_pad, post=post,
                            with_bias=with_bias, substituted=substituted,
                            path=stem_path(y.shape[2:], kernel[1], stride[1], dilation[1]) if substituted else None,
                            fused=substituted and post in ("relu", "relu6")))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(listing, f, indent=1)
    print(f"wrote {len(listing)} cases under {args.out}")


if __name__ == "__main__":
    main()
