#!/usr/bin/env python3
"""Expand -> depthwise test cases for whaled's fused tract op (crates/whaled-tract-ops/src/expand.rs).

Writes, under --out, one small ONNX model per case (a 1x1 "expand" convolution, its activation, a
depthwise convolution and its activation, on a random input), its input and onnxruntime's output on it
(the independent reference), and `cases.json` describing them, with how many fused ops whaled is
expected to put in the plan. The cases: the EfficientNet-Lite0 blocks whose expanded activation is
large (16 -> 96 at 112x112 into a stride-2 3x3, 24 -> 144 at 56x56 into a 3x3 and a TF-padded stride-2
5x5, 40 -> 240 at 28x28 into a 5x5), a 14x14 block with 60 channel blocks, odd sizes without
activations, ReLU, SiLU (the EfficientNet-B0's 112x112 and 28x28 blocks), two blocks in a row, and a network's
first block (the 3x3 stride-2 stem conv into the depthwise conv, ReLU6 and SiLU; the stem's product run
direct, and through its im2col matrix at 12x12, each case saying which); blocks whose depthwise conv
takes the depthwise op's blocked path (7x7 planes, and on AVX-512 stride-1 5x5 layers up to 32 wide),
in one group and in two; and pairs whaled must leave apart (an expanded activation also used by a
residual add, after ReLU6 and after SiLU, and a batch of 2).

Usage: python3 tools/expand_cases.py --out DIR
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort

from onnx_build import Graph
from stem_cases import stem_path


def block(g, x, cin, cexp, hw, k, stride, act, rng, same="torch", residual=False, stem=False):
    """expand 1x1 (cin -> cexp) + act, depthwise k x k + act; returns (y, out_hw). With `stem`, the
    expand is a network's first conv instead (3x3, stride 2, TF padding)."""
    ek = 3 if stem else 1
    w = (rng.standard_normal((cexp, cin, ek, ek)) / np.sqrt(cin * ek * ek)).astype(np.float32)
    b = (rng.standard_normal(cexp) * 0.1).astype(np.float32)
    e, hw = g.conv(x, w, b, hw, stride=2, same="tf") if stem else g.conv(x, w, b, hw)
    e = g.activation(e, act)
    dw = (rng.standard_normal((cexp, 1, k, k)) / k).astype(np.float32)
    db = (rng.standard_normal(cexp) * 0.1).astype(np.float32)
    y, out_hw = g.conv(e, dw, db, hw, stride=stride, groups=cexp, same=same)
    y = g.activation(y, act)
    if residual:
        # The expanded activation is also read by an add: the pair must stay apart.
        y = g.add(y, e)
    return y, out_hw


def blocked_path(out_hw, k, stride):
    """Where whaled's depthwise op computes a square k x k conv with this output channel-blocked:
    "always" (output rows under 12 wide), "avx512" (stride 1, k 5 or 7, rows under 33 wide: where the
    register-row kernel runs), or None (the plane path). crates/whaled-tract-ops/src/depthwise.rs,
    `Geometry::blocked`."""
    if out_hw[1] < 12:
        return "always"
    if out_hw[1] < 33 and stride == 1 and k in (5, 7):
        return "avx512"
    return None


def cases():
    """(name, batch, cin, hw, [(cexp, k, stride, act, same, residual[, stem]), ...], fused ops expected:
    one count, or (x86_64, aarch64))."""
    return [
        ("lite0-112-s2", 1, 16, (112, 112), [(96, 3, 2, "relu6", "torch", False)], 1),
        ("lite0-56-s1", 1, 24, (56, 56), [(144, 3, 1, "relu6", "torch", False)], 1),
        ("lite0-56-k5-s2-tf", 1, 24, (56, 56), [(144, 5, 2, "relu6", "tf", False)], 1),
        ("lite0-28-k5", 1, 40, (28, 28), [(240, 5, 1, "relu6", "torch", False)], 1),
        ("14-k3-60-blocks", 1, 80, (14, 14), [(480, 3, 1, "relu6", "torch", False)], 1),
        ("odd-no-activation", 1, 5, (23, 37), [(24, 3, 1, None, "torch", False)], 1),
        ("odd-relu-s2", 1, 7, (31, 29), [(40, 3, 2, "relu", "tf", False)], 1),
        # On aarch64 tract's declutter lays this chain out channel-last (NHWC), where neither of whaled's
        # ops runs: nothing to fuse there (cross/test.sh runs this test under qemu-aarch64).
        ("two-blocks", 1, 8, (40, 40), [(48, 3, 1, "relu6", "torch", False), (16, 5, 2, "relu6", "torch", False)], (2, 0)),
        ("b0-112-silu-s2", 1, 16, (112, 112), [(96, 3, 2, "silu", "torch", False)], 1),
        ("b0-28-silu-k5", 1, 40, (28, 28), [(240, 5, 1, "silu", "tf", False)], 1),
        ("stem-relu6", 1, 3, (224, 224), [(32, 3, 1, "relu6", "torch", False, True)], 1),
        ("stem-silu-odd", 1, 3, (61, 77), [(16, 3, 1, "silu", "tf", False, True)], 1),
        # A 12x12 stem output: the stem runs through its im2col matrix (the two above run direct).
        ("stem-small-im2col", 1, 3, (24, 24), [(16, 3, 1, "relu6", "torch", False, True)], 1),
        ("apart-residual", 1, 8, (20, 20), [(16, 3, 1, "relu6", "torch", True)], 0),
        ("apart-silu-residual", 1, 8, (20, 20), [(16, 3, 1, "silu", "torch", True)], 0),
        # Depthwise planes on the blocked path (7x7; on AVX-512 also stride-1 5x5 and 7x7 planes up to
        # 32 wide): 1448 channels at 7x7 are two groups, the second not a whole number of 16-channel
        # runs; a stride-2 layer into 7x7; 672 channels at 14x14 (two groups); a SiLU at 16x16 with
        # 120 channels.
        ("blocked-7x7-two-groups", 1, 16, (7, 7), [(1448, 3, 1, "relu6", "torch", False)], 1),
        ("blocked-14-k5-s2", 1, 40, (14, 14), [(240, 5, 2, "relu6", "tf", False)], 1),
        ("blocked-14-k5", 1, 112, (14, 14), [(672, 5, 1, "relu6", "torch", False)], 1),
        ("blocked-16-silu-k5", 1, 24, (16, 16), [(120, 5, 1, "silu", "tf", False)], 1),
        ("apart-batch-2", 2, 8, (24, 24), [(32, 3, 1, "relu6", "torch", False)], 0),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    listing = []
    for name, batch, cin, hw, blocks, fused in cases():
        g = Graph("expand", hw, in_name="x", in_channels=cin, batch=batch)
        y, c, out_hw = g.in_name, cin, hw
        paths = []
        for cexp, k, stride, act, same, residual, *stem in blocks:
            y, out_hw = block(g, y, c, cexp, out_hw, k, stride, act, rng, same, residual, bool(stem and stem[0]))
            paths.append(blocked_path(out_hw, k, stride))
            c = cexp
        shape = [batch, cin, hw[0], hw[1]]
        out = [batch, c, out_hw[0], out_hw[1]]
        model = g.finish(y, "y", out, "an expand -> depthwise test case")
        x = rng.standard_normal(shape).astype(np.float32)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {"x": x})[0]
        assert list(ref.shape) == out, (name, ref.shape, out)
        with open(os.path.join(args.out, f"{name}.onnx"), "wb") as f:
            f.write(model.SerializeToString())
        np.save(os.path.join(args.out, f"{name}.input.npy"), x)
        np.save(os.path.join(args.out, f"{name}.ort.npy"), ref)
        x86, arm = fused if isinstance(fused, tuple) else (fused, fused)
        # Which way the stem's product runs (a 3x3 stride 2, its output the stride-1 depthwise conv's).
        path = stem_path(out_hw, 3, 2) if any(b[6:] == (True,) for b in blocks) else None
        listing.append(dict(name=name, input=shape, output=out, fused=x86, fused_aarch64=arm, stem_path=path,
                            depthwise_blocked=paths))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(listing, f, indent=1)
    print(f"wrote {len(listing)} cases under {args.out}")


if __name__ == "__main__":
    main()
