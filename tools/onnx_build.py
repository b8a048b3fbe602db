"""A tiny ONNX graph builder for the networks whaled ships and tests with.

Builds EfficientNet / EfficientNet-Lite / ResNet topologies, and the transformer parts of ViT and Swin
(LayerNormalization, MatMul attention, Softmax, GELU through Erf, window partition and cyclic shift
through Reshape/Transpose/Slice/Concat), directly with `onnx.helper` + numpy, so that neither converting
the pretrained pre-filter nor generating the test models needs torch. BatchNorm is folded into the
preceding convolution (what every exporter's optimiser does anyway). The transformer ops are written the
way `torch.onnx.export` at opset 17 writes them (LayerNormalization, Erf-based GELU, MatMul + Add
linears, Split for q/k/v).
"""
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Graph:
    def __init__(self, name, in_hw, in_name="input", in_channels=3, batch=1):
        self.name = name
        self.nodes, self.inits = [], []
        self.count = 0
        self.in_name = in_name
        self.h, self.w = in_hw
        self.input = helper.make_tensor_value_info(in_name, TensorProto.FLOAT,
                                                   [batch, in_channels, in_hw[0], in_hw[1]])

    def _n(self, kind):
        self.count += 1
        return f"{kind}_{self.count}"

    def const(self, arr, kind="w"):
        name = self._n(kind)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self._n(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def nodes_out(self, op, inputs, n, **attrs):
        """A node with `n` outputs (Split); returns their names."""
        name = self._n(op.lower())
        outs = [f"{name}_{i}" for i in range(n)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    def scalar(self, value, dtype=np.float32, kind="c"):
        """A rank-0 constant (`const` would make it rank 1: np.ascontiguousarray promotes 0-d arrays)."""
        name = self._n(kind)
        self.inits.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def ints(self, values, kind="shape"):
        """An int64 constant (shapes, axes, indices)."""
        return self.const(np.array(values, np.int64), kind)

    def conv(self, x, w, b, hw, stride=1, groups=1, same="torch"):
        """Convolution with bias. `same="tf"` pads like TensorFlow SAME (asymmetric at stride 2)."""
        k = w.shape[2]
        h, wd = hw
        if same == "tf":
            pads = []
            for size in (h, wd):
                out = math.ceil(size / stride)
                total = max((out - 1) * stride + k - size, 0)
                pads.append((total // 2, total - total // 2))
            onnx_pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
            oh, ow = math.ceil(h / stride), math.ceil(wd / stride)
        else:
            p = k // 2
            onnx_pads = [p, p, p, p]
            oh, ow = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
        y = self.node("Conv", [x, self.const(w.astype(np.float32)), self.const(b.astype(np.float32), "b")],
                      kernel_shape=[k, k], strides=[stride, stride], pads=onnx_pads, group=groups)
        return y, (oh, ow)

    def relu6(self, x):
        return self.node("Clip", [x, self.const(np.array(0.0, np.float32), "lo"),
                                  self.const(np.array(6.0, np.float32), "hi")])

    def relu(self, x):
        return self.node("Relu", [x])

    def silu(self, x):
        return self.node("Mul", [x, self.node("Sigmoid", [x])])

    def activation(self, x, kind):
        """`kind` ("relu", "relu6", "silu") applied to `x`, or `x` itself for None."""
        return {None: lambda v: v, "relu": self.relu, "relu6": self.relu6, "silu": self.silu}[kind](x)

    def add(self, a, b):
        return self.node("Add", [a, b])

    def gap(self, x):
        return self.node("GlobalAveragePool", [x])

    def flatten(self, x):
        return self.node("Flatten", [x], axis=1)

    def gemm(self, x, w, b):
        """y = x @ w.T + b, w shaped [out, in] like torch.nn.Linear."""
        return self.node("Gemm", [x, self.const(w.astype(np.float32)), self.const(b.astype(np.float32), "b")],
                         transB=1)

    def patch_conv(self, x, w, b, hw):
        """Non-overlapping patch embedding: kernel = stride = patch size, no padding (ViT, Swin)."""
        k = w.shape[2]
        y = self.node("Conv", [x, self.const(w.astype(np.float32)), self.const(b.astype(np.float32), "b")],
                      kernel_shape=[k, k], strides=[k, k], pads=[0, 0, 0, 0])
        return y, (hw[0] // k, hw[1] // k)

    def reshape(self, x, shape):
        """Reshape to a static shape (-1 allowed once)."""
        return self.node("Reshape", [x, self.ints(shape)])

    def transpose(self, x, perm):
        """Permute the axes (torch's permute)."""
        return self.node("Transpose", [x], perm=list(perm))

    def concat(self, xs, axis):
        """Concatenate along `axis`."""
        return self.node("Concat", list(xs), axis=axis)

    def slice(self, x, starts, ends, axes, steps=None):
        """ONNX Slice (opset 13+: starts/ends/axes/steps as int64 inputs)."""
        ins = [x, self.ints(starts, "starts"), self.ints(ends, "ends"), self.ints(axes, "axes")]
        if steps is not None:
            ins.append(self.ints(steps, "steps"))
        return self.node("Slice", ins)

    def roll(self, x, shift, axis, size):
        """torch.roll(x, shift, axis) on an axis of static length `size`, as Slice + Concat (how torch.onnx
        exports it): the last `shift` elements move to the front (a negative shift moves the first ones
        to the back)."""
        s = shift % size
        if s == 0:
            return x
        tail = self.slice(x, [size - s], [size], [axis])
        head = self.slice(x, [0], [size - s], [axis])
        return self.concat([tail, head], axis)

    def linear(self, x, w, b=None):
        """torch.nn.Linear on the last axis of an N-d tensor: MatMul by w.T (w shaped [out, in]) + bias."""
        y = self.node("MatMul", [x, self.const(np.ascontiguousarray(w.T).astype(np.float32))])
        if b is not None:
            y = self.add(y, self.const(b.astype(np.float32), "b"))
        return y

    def layernorm(self, x, gamma, beta, eps=1e-5):
        """LayerNormalization over the last axis (ONNX opset 17 op; what torch.onnx writes at opset 17)."""
        return self.node("LayerNormalization", [x, self.const(gamma.astype(np.float32), "gamma"),
                                                self.const(beta.astype(np.float32), "beta")],
                         axis=-1, epsilon=float(eps))

    def gelu(self, x):
        """Exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))), as torch.onnx writes it before opset 20."""
        e = self.node("Erf", [self.node("Div", [x, self.scalar(math.sqrt(2.0))])])
        e = self.add(e, self.scalar(1.0))
        return self.node("Mul", [self.node("Mul", [x, e]), self.scalar(0.5)])

    def softmax(self, x, axis=-1):
        """Softmax over one axis (opset 13+ semantics: that axis alone)."""
        return self.node("Softmax", [x], axis=axis)

    def l2norm(self, x):
        return self.node("LpNormalization", [x], axis=1, p=2)

    def finish(self, out, out_name, out_shape, doc):
        self.nodes.append(helper.make_node("Identity", [out], [out_name], name="output_identity"))
        graph = helper.make_graph(self.nodes, self.name, [self.input],
                                  [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="whaled-tools", doc_string=doc)
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def fold_bn(w, gamma, beta, mean, var, eps, conv_bias=None):
    """Fold an inference-mode BatchNorm into the convolution before it."""
    scale = gamma / np.sqrt(var + eps)
    w2 = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    b = conv_bias if conv_bias is not None else np.zeros_like(mean)
    return w2.astype(np.float32), ((b - mean) * scale + beta).astype(np.float32)


def round_channels(c, mult, divisor=8):
    """timm/EfficientNet channel rounding."""
    c *= mult
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    if new < 0.9 * c:
        new += divisor
    return int(new)


# EfficientNet-B0 stages: (kernel, stride, expand, out_channels, repeats)
B0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
             (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]


def maxpool(g, x, hw, k=3, stride=2, pad=1):
    y = g.node("MaxPool", [x], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
    return y, ((hw[0] + 2 * pad - k) // stride + 1, (hw[1] + 2 * pad - k) // stride + 1)
