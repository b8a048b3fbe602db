#!/usr/bin/env python3
"""Small static-QDQ int8 test graphs for whaled's int8 tract ops (crates/whaled-tract-ops/src/qpointwise.rs,
quantize.rs, qelementwise.rs): float models of the structures the ops match, quantized by onnxruntime's
`quantize_static` exactly as tools/quantize_model.py does (QDQ, per-channel symmetric int8 weights, u8
activations, MinMax), so the graphs are the ones onnxruntime writes (zero points away from 0, rows whose
largest weight is short of 127 steps). Calibration data are seeded random inputs: these are test
fixtures, not shipped weights. Writes `<name>.onnx`, `<name>.input.npy` (another seeded input) and
`cases.json` (name, input shape, the output's quantization step).

The cases:
- `pointwise`: two 1x1 convs in a row (the first's output quantized for the second; the second's
  dequantized as the graph output), with biases;
- `batch2`: a 1x1 conv on a batch of 2;
- `silu-se-residual`: a 1x1 conv, SiLU (Sigmoid, Mul), squeeze-excitation (GlobalAveragePool, 1x1 convs,
  Sigmoid, a per-channel Mul), a 1x1 projection and a residual Add, as in an EfficientNet-B0..B7 block.

Usage: python3 tools/int8_cases.py --out DIR
"""
import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv(nodes, inits, x, cin, cout, rng, name, bias=True):
    w = (rng.standard_normal((cout, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, f"{name}_w"))
    ins = [x, f"{name}_w"]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"{name}_b"))
        ins.append(f"{name}_b")
    nodes.append(helper.make_node("Conv", ins, [name], kernel_shape=[1, 1]))
    return name


def model(name, shape, build, rng):
    nodes, inits = [], []
    out = build(nodes, inits, "x", rng)
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [shape[0], None, shape[2], shape[3]])],
                              inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def pointwise(nodes, inits, x, rng):
    a = conv(nodes, inits, x, 24, 48, rng, "c1")
    return conv(nodes, inits, a, 48, 32, rng, "c2")


def batch2(nodes, inits, x, rng):
    return conv(nodes, inits, x, 16, 24, rng, "c1")


def silu_se_residual(nodes, inits, x, rng):
    e = conv(nodes, inits, x, 16, 32, rng, "expand")
    nodes.append(helper.make_node("Sigmoid", [e], ["e_sig"]))
    nodes.append(helper.make_node("Mul", [e, "e_sig"], ["silu"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["silu"], ["pool"]))
    r = conv(nodes, inits, "pool", 32, 8, rng, "se_reduce")
    nodes.append(helper.make_node("Relu", [r], ["se_act"]))
    g = conv(nodes, inits, "se_act", 8, 32, rng, "se_expand")
    nodes.append(helper.make_node("Sigmoid", [g], ["se_gate"]))
    nodes.append(helper.make_node("Mul", ["silu", "se_gate"], ["scaled"]))
    p = conv(nodes, inits, "scaled", 32, 16, rng, "project")
    nodes.append(helper.make_node("Add", [p, x], ["y"]))
    return "y"


class Reader:
    def __init__(self, shape, rng, n=16):
        self.items = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]

    def get_next(self):
        return self.items.pop() if self.items else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    os.makedirs(args.out, exist_ok=True)
    cases = []
    for i, (name, shape, build) in enumerate([
        ("pointwise", [1, 24, 20, 21], pointwise),
        ("batch2", [2, 16, 9, 13], batch2),
        ("silu-se-residual", [1, 16, 12, 12], silu_se_residual),
    ]):
        rng = np.random.default_rng(100 + i)
        fp32 = os.path.join(args.out, f"{name}.fp32.onnx")
        int8 = os.path.join(args.out, f"{name}.onnx")
        onnx.save(model(name, shape, build, rng), fp32)
        quantize_static(fp32, int8, Reader(shape, rng), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        q = onnx.load(int8)
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        last = next(n for n in q.graph.node if n.output[0] == q.graph.output[0].name)
        assert last.op_type == "DequantizeLinear", last.op_type
        step = float(inits[last.input[1]])
        np.save(os.path.join(args.out, f"{name}.input.npy"), rng.standard_normal(shape).astype(np.float32))
        cases.append({"name": name, "shape": shape, "step": step})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


if __name__ == "__main__":
    main()
