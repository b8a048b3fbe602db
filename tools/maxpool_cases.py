#!/usr/bin/env python3
"""Max-pooling test cases for whaled's substituted tract op (crates/whaled-tract-ops/src/maxpool.rs).

Writes, under --out, one single-node ONNX model per case (a MaxPool over a random input), its input and
onnxruntime's output on it (the independent reference), and `cases.json` describing them, with whether
whaled is expected to substitute the pool. The cases: the ResNet stem's 3x3 stride-2 pool (64 planes of
112x112, PyTorch's symmetric padding), a TF-style SAME_UPPER pool, 2x2 stride 2 without padding, a
ceil_mode pool, unequal kernels and strides, dilation, padding wider than half the kernel, negative
inputs (the padding must never win), batch 2; and a pool with an indices output, which stays tract's.

Usage: python3 tools/maxpool_cases.py --out DIR
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from onnx_build import Graph


def pool_model(shape, attrs, indices):
    g = Graph("maxpool", (shape[2], shape[3]), in_name="x", in_channels=shape[1], batch=shape[0])
    if indices:
        # The indices feed the output (an unused indices output is dropped by tract's declutter, and the
        # pool then is an ordinary one): y = max + float(index).
        y, idx = g.nodes_out("MaxPool", [g.in_name], 2, **attrs)
        y = g.node("Add", [y, g.node("Cast", [idx], to=TensorProto.FLOAT)])
    else:
        y = g.node("MaxPool", [g.in_name], **attrs)
    return g, y


def cases():
    """(name, input shape, MaxPool attributes, indices output, substituted, offset added to the input)."""
    return [
        ("resnet-stem-pool", [1, 64, 112, 112], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), False, True, 0.0),
        ("same-upper", [1, 16, 15, 13], dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"), False, True, 0.0),
        ("2x2-s2", [1, 8, 20, 18], dict(kernel_shape=[2, 2], strides=[2, 2]), False, True, 0.0),
        ("ceil-mode", [1, 8, 11, 11], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), False, True, 0.0),
        ("unequal", [1, 5, 17, 23], dict(kernel_shape=[3, 5], strides=[1, 2], pads=[1, 2, 0, 2]), False, True, 0.0),
        ("dilated", [1, 4, 16, 16], dict(kernel_shape=[3, 3], strides=[1, 1], dilations=[2, 2], pads=[2, 2, 2, 2]), False, True, 0.0),
        ("negative-wide-pads", [1, 6, 9, 10], dict(kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]), False, True, -10.0),
        ("batch-2", [2, 12, 14, 14], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), False, True, 0.0),
        ("tract-indices", [1, 4, 8, 8], dict(kernel_shape=[2, 2], strides=[2, 2]), True, False, 0.0),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=29)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    listing = []
    for name, shape, attrs, indices, substituted, offset in cases():
        x = (rng.standard_normal(shape) + offset).astype(np.float32)
        g, y = pool_model(shape, attrs, indices)
        # The output's shape left open (onnx's checker, in Graph.finish, would want it spelled out).
        g.nodes.append(helper.make_node("Identity", [y], ["y"], name="output_identity"))
        graph = helper.make_graph(g.nodes, g.name, [g.input],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="whaled-tools",
                                  doc_string="a max pool test case")
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": x})[0]
        with open(os.path.join(args.out, f"{name}.onnx"), "wb") as f:
            f.write(model.SerializeToString())
        np.save(os.path.join(args.out, f"{name}.input.npy"), x)
        np.save(os.path.join(args.out, f"{name}.ort.npy"), out)
        listing.append(dict(name=name, input=shape, output=list(out.shape), attrs=attrs, indices=indices,
                            substituted=substituted))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(listing, f, indent=1)
    print(f"wrote {len(listing)} cases under {args.out}")


if __name__ == "__main__":
    main()
