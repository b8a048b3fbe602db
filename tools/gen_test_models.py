#!/usr/bin/env python3
"""Generate whaled's test and benchmark models: real architectures, RANDOM weights, fully deterministic.

  efficientnet-b0-random/   EfficientNet-B0 224 ImageNet-shaped classifier (1000 logits), a pre-filter
  resnet18-random/          ResNet-18 224 classifier (1000 logits), a ResNet-class pre-filter
  effb4-arcface-random/     the upstream identification network at 512x512: timm efficientnet_b4 backbone
                            -> global average pool -> Linear(1792 -> 512) -> L2 normalise; plus a random
                            15,587 x 512 ArcFace head (`head.npy`), `encoder_classes.npy` (12-hex ids) and
                            `species_map.csv` in the upstream formats, 13,837 active slots.
  zeroshot-random/          a `role = "zero_shot"` model in upstream's CLIP-rule shape: a small conv image
                            encoder (224x224 -> 512-d `image_embeds`), its random text encoder
                            (`text_encoder.onnx`, token ids [N, 77] -> `text_embeds` [N, 512]), a word-level
                            `tokenizer.json`, upstream's 24 prompts (`prompts.txt`, 10 positive first) and the
                            `text_embeddings.npy` that tools/text_embeddings.py makes from them, plus
                            `samples/zs_*.png` (224x224 synthetic frames that score on both sides of 0.52).
  *-mini/                   reduced twins of the model zoo (same op kinds, narrow and shallow) for CI parity:
                            vit-l32-448-mini, vit-b16-mini, efficientnet-b5-mini, resnet101-mini,
                            resnet54-mini, swin-t-mini (1000 logits each).

Only on request (`--only zoo`, or one by name), 110-350 MB each: the seed's model table at full size, each
a 1000-logit classifier with a pre-filter manifest (models/README.md, "The model zoo"; bench/zoo.sh):
  vit-l32-448-random/       ViT-L/32 at 448 as upstream's custom 6-layer ViT (width 1024, 16 heads, MLP 4096)
  vit-b16-random/           ViT-B/16 224
  efficientnet-b5-random/   timm efficientnet_b5 at 456
  resnet101-random/         ResNet-101 224 (bottlenecks 3-4-23-3)
  resnet54-random/          "ResNet-54": basic blocks 3-4-16-3 = 54 weighted layers, 224
  swin-t-random/            Swin-T 224 (window 7, shifted windows, relative position bias, patch merging)

Every weight is drawn from a seeded numpy generator: the same command writes the same bytes. These models
identify nothing; they exist so tests and benchmarks run the real topologies. Needs numpy + onnx; the
zero-shot model also needs onnxruntime, tokenizers and pillow (requirements-dev.txt).

Usage: python3 tools/gen_test_models.py --out models/generated [--only NAME ...]
"""
import argparse
import hashlib
import os
import re

import numpy as np
import onnx

import onnx_build as ob

SPECIES = ["humpback_whale", "blue_whale", "fin_whale", "beluga", "killer_whale", "bottlenose_dolphin",
           "common_dolphin", "dusky_dolphin", "false_killer_whale", "gray_whale", "minke_whale",
           "sperm_whale", "southern_right_whale", "spinner_dolphin", "melon_headed_whale"]


class Init:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def conv(self, cout, cin, k, groups=1, gain=1.0):
        fan_in = cin // groups * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k)) * gain * np.sqrt(2.0 / fan_in)
        b = self.rng.standard_normal(cout) * 0.05
        return w.astype(np.float32), b.astype(np.float32)

    def linear(self, cout, cin, gain=1.0):
        w = self.rng.standard_normal((cout, cin)) * gain / np.sqrt(cin)
        return w.astype(np.float32), (self.rng.standard_normal(cout) * 0.01).astype(np.float32)

    def norm(self, c):
        """LayerNorm weight and bias: near 1 and near 0, random so that both inputs matter."""
        return ((1.0 + self.rng.standard_normal(c) * 0.1).astype(np.float32),
                (self.rng.standard_normal(c) * 0.05).astype(np.float32))

    def table(self, shape, std):
        """A free parameter (class token, position embedding, relative position bias table)."""
        return (self.rng.standard_normal(shape) * std).astype(np.float32)


def efficientnet(name, size, width, depth, rng, head, proj_gain=0.5):
    """timm `efficientnet_bX` topology (PyTorch padding, SiLU, squeeze-excite from the block input).

    `proj_gain` scales each block's 1x1 projection. At 0.5 (B0, B4, B5) the random network's output barely
    depends on its input (every block shrinks the signal, the biases stay); the shallow CI twin of B5
    uses 1.5 so that its parity check compares input-dependent outputs (2.0 and up overflow)."""
    g = ob.Graph(name, (size, size))
    stem = ob.round_channels(32, width)
    x, hw = g.conv(g.in_name, *rng.conv(stem, 3, 3), (size, size), stride=2)
    x = g.silu(x)
    cin = stem
    for k, s, e, c, r in ob.B0_STAGES:
        cout = ob.round_channels(c, width)
        for i in range(int(np.ceil(r * depth))):
            stride = s if i == 0 else 1
            inp = x
            mid = cin * e
            if e != 1:
                x, hw = g.conv(x, *rng.conv(mid, cin, 1), hw)
                x = g.silu(x)
            x, hw = g.conv(x, *rng.conv(mid, mid, k, groups=mid), hw, stride=stride, groups=mid)
            x = g.silu(x)
            rd = max(1, int(cin * 0.25))
            se = g.gap(x)
            se, _ = g.conv(se, *rng.conv(rd, mid, 1), (1, 1))
            se = g.silu(se)
            se, _ = g.conv(se, *rng.conv(mid, rd, 1), (1, 1))
            x = g.node("Mul", [x, g.node("Sigmoid", [se])])
            x, hw = g.conv(x, *rng.conv(cout, mid, 1, gain=proj_gain), hw)
            if stride == 1 and cin == cout:
                x = g.add(x, inp)
            cin = cout
    feat = ob.round_channels(1280, width)
    x, hw = g.conv(x, *rng.conv(feat, cin, 1), hw)
    x = g.silu(x)
    x = g.flatten(g.gap(x))
    if head == "classifier":
        x = g.gemm(x, *rng.linear(1000, feat, gain=4.0))
        return g.finish(x, "logits", [1, 1000], f"{name}: RANDOM WEIGHTS, real topology; 1000 logits.")
    x = g.l2norm(g.gemm(x, *rng.linear(512, feat)))
    return g.finish(x, "embedding", [1, 512],
                    f"{name}: RANDOM WEIGHTS, upstream effb4-arcface topology; L2-normalised 512-d embedding.")


def resnet18(rng):
    g = ob.Graph("resnet18_random", (224, 224))
    x, hw = g.conv(g.in_name, *rng.conv(64, 3, 7), (224, 224), stride=2)
    x, hw = ob.maxpool(g, g.relu(x), hw)
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            s = stride if i == 0 else 1
            inp, in_hw = x, hw
            y, hw = g.conv(x, *rng.conv(cout, cin, 3), hw, stride=s)
            y, hw = g.conv(g.relu(y), *rng.conv(cout, cout, 3, gain=0.5), hw)
            if s != 1 or cin != cout:
                inp, _ = g.conv(inp, *rng.conv(cout, cin, 1), in_hw, stride=s)
            x = g.relu(g.add(y, inp))
            cin = cout
    x = g.gemm(g.flatten(g.gap(x)), *rng.linear(1000, 512, gain=0.3))
    return g.finish(x, "logits", [1, 1000], "resnet18_random: RANDOM WEIGHTS, real topology; 1000 logits.")


# ---------------------------------------------------------------------------------------------------------
# The seed's model table ("the zoo"): ViT-L/32 448 (upstream's custom 6-layer ViT), ViT-B/16, EfficientNet-B5,
# EfficientNet-B0 (above), ResNet-101, "ResNet-54", Swin-T. Full-size models only on request (`--only zoo`);
# their reduced "-mini" twins (same op kinds, narrow and shallow) are in the default set for CI parity.


def resnet(name, size, block, layers, base, rng, classes=1000):
    """torchvision-style ResNet (v1.5: stride on the 3x3 of a bottleneck), BatchNorm folded.

    `block` is "basic" (two 3x3 convs, expansion 1) or "bottleneck" (1x1, 3x3, 1x1, expansion 4); `layers`
    the blocks per stage; `base` the first stage's width (64 in the real networks). A 1x1 projection
    shortcut wherever the shape changes. Residual branches end with gain 1/sqrt(total blocks) so random
    activations stay O(1) however deep the network is."""
    g = ob.Graph(name, (size, size))
    x, hw = g.conv(g.in_name, *rng.conv(base, 3, 7), (size, size), stride=2)
    x, hw = ob.maxpool(g, g.relu(x), hw)
    expansion = 4 if block == "bottleneck" else 1
    gain = 1.0 / np.sqrt(sum(layers))
    cin = base
    for stage, n in enumerate(layers):
        width = base * 2 ** stage
        cout = width * expansion
        for i in range(n):
            s = 2 if stage > 0 and i == 0 else 1
            inp, in_hw = x, hw
            if block == "bottleneck":
                y, hw = g.conv(x, *rng.conv(width, cin, 1), hw)
                y, hw = g.conv(g.relu(y), *rng.conv(width, width, 3), hw, stride=s)
                y, hw = g.conv(g.relu(y), *rng.conv(cout, width, 1, gain=gain), hw)
            else:
                y, hw = g.conv(x, *rng.conv(cout, cin, 3), hw, stride=s)
                y, hw = g.conv(g.relu(y), *rng.conv(cout, cout, 3, gain=gain), hw)
            if s != 1 or cin != cout:
                inp, _ = g.conv(inp, *rng.conv(cout, cin, 1), in_hw, stride=s)
            x = g.relu(g.add(y, inp))
            cin = cout
    x = g.gemm(g.flatten(g.gap(x)), *rng.linear(classes, cin, gain=0.5))
    return g.finish(x, "logits", [1, classes], f"{name}: RANDOM WEIGHTS, real topology; {classes} logits.")


def attention(g, x, tokens, dim, heads, rng, batch=1, bias=None, mask=None, windows=1):
    """timm multi-head self-attention on x [batch, tokens, dim]: one qkv Linear -> Reshape -> Transpose ->
    Split into q, k, v -> q*scale @ k^T (+ relative position bias [heads, N, N]) (+ shifted-window mask
    [windows, N, N], added per window) -> Softmax -> @ v -> Transpose -> Reshape -> proj Linear."""
    hd = dim // heads
    qkv = g.linear(x, *rng.linear(3 * dim, dim))
    qkv = g.transpose(g.reshape(qkv, [batch, tokens, 3, heads, hd]), [2, 0, 3, 1, 4])
    q, k, v = (g.node("Squeeze", [t, g.ints([0], "axes")])
               for t in g.nodes_out("Split", [qkv, g.ints([1, 1, 1], "split")], 3, axis=0))
    q = g.node("Mul", [q, g.scalar(hd ** -0.5, kind="scale")])
    a = g.node("MatMul", [q, g.transpose(k, [0, 1, 3, 2])])
    if bias is not None:
        a = g.add(a, bias)
    if mask is not None:
        a = g.reshape(a, [1, windows, heads, tokens, tokens])
        a = g.add(a, g.const(mask.reshape(1, windows, 1, tokens, tokens).astype(np.float32), "mask"))
        a = g.reshape(a, [batch, heads, tokens, tokens])
    y = g.node("MatMul", [g.softmax(a, -1), v])
    y = g.reshape(g.transpose(y, [0, 2, 1, 3]), [batch, tokens, dim])
    return g.linear(y, *rng.linear(dim, dim, gain=0.5))


def mlp(g, x, dim, hidden, rng):
    """Linear -> GELU (Erf) -> Linear, the transformer feed-forward block."""
    return g.linear(g.gelu(g.linear(x, *rng.linear(hidden, dim))), *rng.linear(dim, hidden, gain=0.5))


def vit(name, size, patch, dim, depth, heads, hidden, rng, classes=1000):
    """timm VisionTransformer: Conv patch embedding -> class token (Concat) + position embedding -> `depth`
    pre-norm blocks (LayerNorm -> attention -> residual, LayerNorm -> MLP with GELU -> residual) ->
    LayerNorm -> class token (Gather) -> Linear head. LayerNorm eps 1e-6 as timm."""
    g = ob.Graph(name, (size, size))
    x, hw = g.patch_conv(g.in_name, *rng.conv(dim, 3, patch), (size, size))
    n = hw[0] * hw[1]
    x = g.transpose(g.reshape(x, [1, dim, n]), [0, 2, 1])
    x = g.concat([g.const(rng.table((1, 1, dim), 0.5), "cls_token"), x], 1)
    x = g.add(x, g.const(rng.table((1, n + 1, dim), 0.5), "pos_embed"))
    for _ in range(depth):
        x = g.add(x, attention(g, g.layernorm(x, *rng.norm(dim), 1e-6), n + 1, dim, heads, rng))
        x = g.add(x, mlp(g, g.layernorm(x, *rng.norm(dim), 1e-6), dim, hidden, rng))
    x = g.layernorm(x, *rng.norm(dim), 1e-6)
    x = g.node("Gather", [x, g.scalar(0, np.int64, "index")], axis=1)
    x = g.gemm(x, *rng.linear(classes, dim, gain=3.0))
    return g.finish(x, "logits", [1, classes], f"{name}: RANDOM WEIGHTS, real topology; {classes} logits.")


def relative_position_index(w):
    """Swin's relative_position_index [w*w, w*w] into the (2w-1)^2-row bias table (as in timm)."""
    coords = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (w - 1)
    return (rel[:, :, 0] * (2 * w - 1) + rel[:, :, 1]).astype(np.int64)


def shifted_window_mask(h, w, win, shift):
    """Swin's attention mask for the cyclically shifted windows: [windows, win*win, win*win], 0 within a
    region and -100 between regions that the shift brought together (as in timm)."""
    img = np.zeros((h, w))
    cnt = 0
    for hs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
        for ws in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    windows = img.reshape(h // win, win, w // win, win).transpose(0, 2, 1, 3).reshape(-1, win * win)
    return np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0).astype(np.float32)


def swin(name, size, embed, depths, heads, window, rng, classes=1000):
    """timm SwinTransformer (v1): Conv 4x4 patch embedding + LayerNorm; stages of blocks with (shifted)
    window attention: LayerNorm -> Reshape [1,H,W,C] -> cyclic shift (Slice + Concat on H and W, every
    second block, none where the stage is no larger than the window) -> window partition (Reshape /
    Transpose) -> attention with relative position bias (Gather from the bias table) and the shift mask
    -> window reverse -> shift back -> residual; LayerNorm -> MLP (GELU) -> residual. Patch merging
    between stages: four strided Slices -> Concat -> LayerNorm -> Linear(4C -> 2C, no bias). Then
    LayerNorm -> mean over tokens (ReduceMean) -> Linear head."""
    g = ob.Graph(name, (size, size))
    x, (h, w) = g.patch_conv(g.in_name, *rng.conv(embed, 3, 4), (size, size))
    dim = embed
    x = g.layernorm(g.transpose(g.reshape(x, [1, dim, h * w]), [0, 2, 1]), *rng.norm(dim))
    for stage, (depth, nh) in enumerate(zip(depths, heads)):
        win = min(window, h)
        n, nw = win * win, (h // win) * (w // win)
        index = g.ints(relative_position_index(win).reshape(-1), "rel_index")
        for i in range(depth):
            shift = win // 2 if i % 2 == 1 and h > window else 0
            table = g.const(rng.table(((2 * win - 1) ** 2, nh), 0.5), "rel_table")
            bias = g.transpose(g.reshape(g.node("Gather", [table, index], axis=0), [n, n, nh]), [2, 0, 1])
            y = g.reshape(g.layernorm(x, *rng.norm(dim)), [1, h, w, dim])
            if shift:
                y = g.roll(g.roll(y, -shift, 1, h), -shift, 2, w)
            y = g.transpose(g.reshape(y, [1, h // win, win, w // win, win, dim]), [0, 1, 3, 2, 4, 5])
            y = attention(g, g.reshape(y, [nw, n, dim]), n, dim, nh, rng, batch=nw, bias=bias,
                          mask=shifted_window_mask(h, w, win, shift) if shift else None, windows=nw)
            y = g.transpose(g.reshape(y, [1, h // win, w // win, win, win, dim]), [0, 1, 3, 2, 4, 5])
            y = g.reshape(y, [1, h, w, dim])
            if shift:
                y = g.roll(g.roll(y, shift, 1, h), shift, 2, w)
            x = g.add(x, g.reshape(y, [1, h * w, dim]))
            x = g.add(x, mlp(g, g.layernorm(x, *rng.norm(dim)), dim, 4 * dim, rng))
        if stage + 1 < len(depths):
            y = g.reshape(x, [1, h, w, dim])
            parts = [g.slice(y, [r, c], [h, w], [1, 2], [2, 2]) for r, c in ((0, 0), (1, 0), (0, 1), (1, 1))]
            h, w = h // 2, w // 2
            y = g.reshape(g.concat(parts, 3), [1, h * w, 4 * dim])
            x = g.linear(g.layernorm(y, *rng.norm(4 * dim)), rng.linear(2 * dim, 4 * dim)[0])
            dim *= 2
    x = g.node("ReduceMean", [g.layernorm(x, *rng.norm(dim))], axes=[1], keepdims=0)
    x = g.gemm(x, *rng.linear(classes, dim, gain=3.0))
    return g.finish(x, "logits", [1, classes], f"{name}: RANDOM WEIGHTS, real topology; {classes} logits.")


# name -> (directory, ONNX file, input size, builder, description for the manifest). Each full-size model
# has a "-mini" twin: the same op kinds (and, for the ResNets and EfficientNet, the same block structure),
# narrow and shallow, small enough for CI (tests/parity.rs).
ZOO = {
    "vit-l32": ("vit-l32-448-random", "vit_l32_448.onnx", 448,
                lambda: vit("vit_l32_448_random", 448, 32, 1024, 6, 16, 4096, Init(11)),
                "ViT-L/32 at 448 as upstream's custom 6-layer ViT: patch 32 (14x14 = 196 patches + class token), "
                "width 1024, 16 heads, MLP 4096, pre-norm, GELU, 6 encoder layers, class token -> LayerNorm -> "
                "Linear 1000 logits"),
    "vit-b16": ("vit-b16-random", "vit_b16_224.onnx", 224,
                lambda: vit("vit_b16_random", 224, 16, 768, 12, 12, 3072, Init(12)),
                "ViT-B/16 224: patch 16, width 768, 12 layers, 12 heads, MLP 3072, class token -> 1000 logits"),
    "b5": ("efficientnet-b5-random", "efficientnet_b5_456.onnx", 456,
           lambda: efficientnet("efficientnet_b5_random", 456, 1.6, 2.2, Init(13), "classifier"),
           "EfficientNet-B5 456 classifier (timm efficientnet_b5: width 1.6, depth 2.2)"),
    "resnet101": ("resnet101-random", "resnet101_224.onnx", 224,
                  lambda: resnet("resnet101_random", 224, "bottleneck", [3, 4, 23, 3], 64, Init(14)),
                  "ResNet-101 224 classifier (bottleneck blocks 3-4-23-3)"),
    "resnet54": ("resnet54-random", "resnet54_224.onnx", 224,
                 lambda: resnet("resnet54_random", 224, "basic", [3, 4, 16, 3], 64, Init(15)),
                 "ResNet-54 read as ResNet-34 with its third stage deepened like ResNet-101 deepens ResNet-50: "
                 "basic blocks 3-4-16-3, 1 stem conv + 52 block convs + 1 fc = 54 weighted layers, 224 classifier"),
    "swin-t": ("swin-t-random", "swin_t_224.onnx", 224,
               lambda: swin("swin_t_random", 224, 96, [2, 2, 6, 2], [3, 6, 12, 24], 7, Init(16)),
               "Swin-T 224: patch 4, window 7, embed 96, depths 2-2-6-2, heads 3-6-12-24, shifted windows, "
               "relative position bias, patch merging, 1000 logits"),
}
ZOO_MINI = {
    "vit-l32": ("vit-l32-448-mini", "vit_l32_448_mini.onnx", 448,
                lambda: vit("vit_l32_448_mini", 448, 32, 64, 2, 4, 256, Init(21)),
                "reduced ViT-L/32 448 for CI: patch 32 at 448, width 64, 2 layers, 4 heads, MLP 256"),
    "vit-b16": ("vit-b16-mini", "vit_b16_mini.onnx", 224,
                lambda: vit("vit_b16_mini", 224, 16, 64, 2, 4, 256, Init(22)),
                "reduced ViT-B/16 for CI: patch 16 at 224, width 64, 2 layers, 4 heads, MLP 256"),
    "b5": ("efficientnet-b5-mini", "efficientnet_b5_mini.onnx", 128,
           lambda: efficientnet("efficientnet_b5_mini", 128, 0.5, 0.5, Init(23), "classifier", proj_gain=1.5),
           "reduced EfficientNet-B5 for CI: the same builder at width 0.5, depth 0.5, 128 input, projection gain 1.5"),
    "resnet101": ("resnet101-mini", "resnet101_mini.onnx", 128,
                  lambda: resnet("resnet101_mini", 128, "bottleneck", [3, 4, 23, 3], 8, Init(24)),
                  "reduced ResNet-101 for CI: all 33 bottlenecks, first-stage width 8, 128 input"),
    "resnet54": ("resnet54-mini", "resnet54_mini.onnx", 128,
                 lambda: resnet("resnet54_mini", 128, "basic", [3, 4, 16, 3], 8, Init(25)),
                 "reduced ResNet-54 for CI: all 26 basic blocks, first-stage width 8, 128 input"),
    "swin-t": ("swin-t-mini", "swin_t_mini.onnx", 224,
               lambda: swin("swin_t_mini", 224, 32, [2, 2, 2, 2], [1, 2, 4, 8], 7, Init(26)),
               "reduced Swin-T for CI: patch 4, window 7 at 224, embed 32, depths 2-2-2-2, heads 1-2-4-8"),
}


# ---------------------------------------------------------------------------------------------------------
# Zero-shot (upstream's CLIP rule): image encoder + text embeddings of upstream's 24 prompts.

ZS_PROMPTS = [
    # 10 positive (upstream order)
    "a photo of a whale in the ocean", "an aerial photo of a whale", "a photo of a humpback whale",
    "a photo of a blue whale", "a photo of a killer whale", "a photo of a dolphin swimming",
    "a photo of a beluga whale", "a photo of a marine mammal in the sea", "a photo of a whale fluke or dorsal fin",
    "a photograph of a cetacean",
    # 14 negative
    "a photo of text on a blank page", "a screenshot of a document", "a photo of a person", "a photo of a building",
    "a photo of a car", "a photo of a cat", "a photo of a dog", "a photo of food",
    "a photo of a landscape without animals", "a blank white image", "a photo of a fish",
    "a photo of a boat on water", "a photo of a shark", "an abstract pattern"]
ZS_POSITIVES = 10
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
ZS_CHANNELS = [3, 24, 48, 96, 128]
ZS_DIM, ZS_CONTEXT, ZS_TOKEN_DIM = 512, 77, 64


def _conv_np(x, w, b, stride):
    """float64 reference of ob.Graph.conv (torch padding k//2) on one CHW image."""
    c, h, wd = x.shape
    k = w.shape[2]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p)))
    oh, ow = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
    cols = np.empty((c, k, k, oh, ow))
    for i in range(k):
        for j in range(k):
            cols[:, i, j] = xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return np.einsum("ockl,cklhw->ohw", w.astype(np.float64), cols) + b.astype(np.float64)[:, None, None]


def zs_synthetic_frame(rng, size=224):
    """A photo-like uint8 RGB frame: colour gradient + soft blobs + sensor noise (seeded)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = rng.uniform(0, 255, 3) + rng.uniform(-120, 120, 3) * (xx[..., None] - 0.5) \
        + rng.uniform(-120, 120, 3) * (yy[..., None] - 0.5)
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = rng.uniform(0, 1, 2)
        sd = rng.uniform(0.03, 0.25)
        img = img + rng.uniform(-150, 150, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sd * sd))[..., None]
    img = img + rng.standard_normal((size, size, 3)) * rng.uniform(0, 25)
    return np.clip(img, 0, 255).astype(np.uint8)


def zs_image_encoder(rng):
    """4 stride-2 3x3 convs + ReLU -> GAP (128) -> Gemm -> 512-d `image_embeds` (unnormalised, like CLIP's).

    Pooled ReLU features of random convs share a large common part, which would make every image's
    embedding point the same way; so the Gemm standardises them first (mean/std over 32 seeded synthetic
    frames, computed in float64 numpy, no onnxruntime involved) and different images get clearly
    different embedding directions."""
    convs = [rng.conv(cout, cin, 3) for cin, cout in zip(ZS_CHANNELS[:-1], ZS_CHANNELS[1:])]
    calib = np.random.default_rng(6)
    feats = []
    for _ in range(32):
        x = ((zs_synthetic_frame(calib) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
        for w, b in convs:
            x = np.maximum(_conv_np(x, w, b, 2), 0.0)
        feats.append(x.mean((1, 2)))
    feats = np.array(feats)
    mu, sd = feats.mean(0), feats.std(0) + 1e-3
    proj = rng.rng.standard_normal((ZS_DIM, ZS_CHANNELS[-1])) / np.sqrt(ZS_CHANNELS[-1])
    g = ob.Graph("zeroshot_image_random", (224, 224))
    x, hw = g.in_name, (224, 224)
    for w, b in convs:
        x, hw = g.conv(x, w, b, hw, stride=2)
        x = g.relu(x)
    x = g.gemm(g.flatten(g.gap(x)), proj / sd[None, :], -(proj @ (mu / sd)))
    return g.finish(x, "image_embeds", [1, ZS_DIM],
                    "zeroshot_image_random: RANDOM WEIGHTS; 224x224 CLIP-normalised RGB -> 512-d image_embeds.")


def zs_words():
    return sorted({w for p in ZS_PROMPTS for w in re.findall(r"\w+", p.lower())})


def zs_tokenizer():
    """Word-level tokenizer.json in CLIP's shape: lowercase, <|startoftext|> ... <|endoftext|>, pad id 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    specials = ["<pad>", "<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + zs_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)])
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=ZS_CONTEXT)
    return tok, len(vocab)


def zs_text_encoder(rng, vocab_size):
    """input_ids int64 [N, 77] -> mean of the non-pad (id != 0) token embeddings -> MatMul + bias -> [N, 512].

    The bias (a shared direction as long as a typical projected prompt) plays the part of CLIP's shared
    "a photo of" context: the 24 prompts sit close together, so softmax(100 * cos) spreads its mass over
    several prompts and image scores land across (0, 1) instead of at 0 or 1."""
    from onnx import TensorProto, helper, numpy_helper
    emb = rng.rng.standard_normal((vocab_size, ZS_TOKEN_DIM)).astype(np.float32)
    proj = (rng.rng.standard_normal((ZS_TOKEN_DIM, ZS_DIM)) / np.sqrt(ZS_TOKEN_DIM)).astype(np.float32)
    words = zs_words()
    rows = np.array([emb[[1] + [4 + words.index(w) for w in re.findall(r"\w+", p.lower())] + [2]]
                     .astype(np.float64).mean(0) @ proj for p in ZS_PROMPTS])
    bias = rng.rng.standard_normal(ZS_DIM)
    bias = (bias / np.linalg.norm(bias) * np.linalg.norm(rows, axis=1).mean()).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (emb, "token_embedding"), (proj, "projection"), (bias, "projection_bias"),
        (np.array(0, np.int64), "pad_id"), (np.array([1], np.int64), "axis1"), (np.array([2], np.int64), "axis2"))]
    mk = helper.make_node
    nodes = [
        mk("Equal", ["input_ids", "pad_id"], ["is_pad"]),
        mk("Not", ["is_pad"], ["not_pad"]),
        mk("Cast", ["not_pad"], ["mask"], to=TensorProto.FLOAT),
        mk("Gather", ["token_embedding", "input_ids"], ["tokens"], axis=0),
        mk("Unsqueeze", ["mask", "axis2"], ["mask3"]),
        mk("Mul", ["tokens", "mask3"], ["masked"]),
        mk("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        mk("ReduceSum", ["mask", "axis1"], ["count"], keepdims=1),
        mk("Div", ["summed", "count"], ["mean"]),
        mk("MatMul", ["mean", "projection"], ["projected"]),
        mk("Add", ["projected", "projection_bias"], ["text_embeds"]),
    ]
    graph = helper.make_graph(
        nodes, "zeroshot_text_random",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", ZS_CONTEXT])],
        [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["N", ZS_DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ob.OPSET)], producer_name="whaled-tools",
                              doc_string="zeroshot_text_random: RANDOM WEIGHTS; token ids -> masked mean -> 512-d.")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def zeroshot(d):
    """Writes models/generated/zeroshot-random/ (see the module docstring)."""
    from PIL import Image
    import text_embeddings as te
    os.makedirs(os.path.join(d, "samples"), exist_ok=True)
    rng = Init(8)
    onnx.save(zs_image_encoder(rng), os.path.join(d, "image_encoder.onnx"))
    tok, vocab_size = zs_tokenizer()
    tok.save(os.path.join(d, "tokenizer.json"), pretty=True)
    onnx.save(zs_text_encoder(rng, vocab_size), os.path.join(d, "text_encoder.onnx"))
    with open(os.path.join(d, "prompts.txt"), "w") as f:
        f.write("".join(p + "\n" for p in ZS_PROMPTS))
    # The shipped artefact, made by the same code path as `tools/text_embeddings.py` on a real CLIP encoder.
    prompts = te.read_prompts(os.path.join(d, "prompts.txt"))
    emb = te.encode_prompts(os.path.join(d, "text_encoder.onnx"), os.path.join(d, "tokenizer.json"), prompts,
                            context=ZS_CONTEXT)
    text_sha = te.write_npy(os.path.join(d, "text_embeddings.npy"), emb)
    samples = np.random.default_rng(9)
    for i in range(6):
        Image.fromarray(zs_synthetic_frame(samples)).save(os.path.join(d, "samples", f"zs_{i}.png"))
    open(os.path.join(d, "model.toml"), "w").write(ZEROSHOT_MANIFEST.format(
        sha=sha256(os.path.join(d, "image_encoder.onnx")), text_sha=text_sha,
        snippet=te.manifest_snippet("text_embeddings.npy", text_sha, ZS_POSITIVES).split("\n", 1)[1]))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


PREFILTER_MANIFEST = """# GENERATED by tools/gen_test_models.py -- RANDOM WEIGHTS: detects nothing; for tests and benchmarks.
name = "{name}"
role = "prefilter"
description = "{desc} (random weights, real topology)"
random_weights = true
license = "Apache-2.0 (generated)"

[[variants]]
name = "fp32"
file = "{file}"
sha256 = "{sha}"

[input]
name = "input"
width = 224
height = 224
layout = "nchw"
resize = "center_crop"
crop_fraction = 0.875
interpolation = "bilinear"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[output]
name = "logits"
classes = 1000
kind = "logits"

[prefilter]
positive_classes = [147, 148]
threshold = 0.5
"""

EMBEDDER_MANIFEST = """# GENERATED by tools/gen_test_models.py -- RANDOM WEIGHTS: identifies nobody; for tests and benchmarks.
name = "effb4-arcface-random"
role = "embedder"
description = "Upstream identification topology: efficientnet_b4 -> avg pool -> Linear(1792,512) -> L2 (random weights)"
random_weights = true
license = "Apache-2.0 (generated)"

[[variants]]
name = "fp32"
file = "effb4_arcface_512.onnx"
sha256 = "{sha}"

[input]
name = "input"
width = 512
height = 512
layout = "nchw"
resize = "stretch"
interpolation = "bilinear"
# As tools/export_upstream.py writes it: Pillow's resize, byte for byte.
resampler = "pillow"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[output]
name = "embedding"
dim = 512
kind = "embedding"

[embedder]
head = "head.npy"
labels = "encoder_classes.npy"
species_map = "species_map.csv"
active_slots = 13837
scale = 30.0
top_k = 5
min_confidence = 0.05
model_version = "effb4-arcface-random"
"""


ZOO_MANIFEST = """# GENERATED by tools/gen_test_models.py -- RANDOM WEIGHTS: detects nothing; for tests and benchmarks.
# One of the seed's model-table architectures (models/README.md, "The model zoo"); a 1000-logit classifier
# head stands in for whatever head upstream trained (it is < 0.1% of the compute).
name = "{name}"
role = "prefilter"
description = "{desc} (random weights, real topology)"
random_weights = true
license = "Apache-2.0 (generated)"

[[variants]]
name = "fp32"
file = "{file}"
sha256 = "{sha}"

[input]
name = "input"
width = {size}
height = {size}
layout = "nchw"
resize = "stretch"
interpolation = "bilinear"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[output]
name = "logits"
classes = 1000
kind = "logits"

[prefilter]
positive_classes = [147, 148]
threshold = 0.5
"""


ZEROSHOT_MANIFEST = """# GENERATED by tools/gen_test_models.py -- RANDOM WEIGHTS: recognises nothing; for tests and benchmarks.
# Upstream's CLIP zero-shot rule with generated encoders. text_embeddings.npy was made by
# tools/text_embeddings.py from text_encoder.onnx + tokenizer.json + prompts.txt (kept here for that).
name = "zeroshot-random"
role = "zero_shot"
description = "Zero-shot gate: small conv image encoder + upstream's 24 prompts through a random text encoder (random weights)"
random_weights = true
license = "Apache-2.0 (generated)"

[[variants]]
name = "fp32"
file = "image_encoder.onnx"
sha256 = "{sha}"

[input]
name = "input"
width = 224
height = 224
layout = "nchw"
resize = "stretch"
interpolation = "bicubic"
mean = [0.48145466, 0.4578275, 0.40821073]
std = [0.26862954, 0.26130258, 0.27577711]

[output]
name = "image_embeds"
kind = "embedding"
dim = 512

[zero_shot]
{snippet}"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/generated")
    names = ["b0", "resnet18", "b4", "zeroshot", "zoo", "zoo-mini"] + list(ZOO) + [k + "-mini" for k in ZOO_MINI]
    ap.add_argument("--only", choices=names, action="append",
                    help="what to write (repeatable); default: b0 resnet18 b4 zeroshot zoo-mini. `zoo` = every "
                         "full-size model of the seed's table (hundreds of MB each), or one by name (vit-l32, "
                         "vit-b16, b5, resnet101, resnet54, swin-t); `zoo-mini` = their reduced CI twins")
    args = ap.parse_args()
    only = set(args.only or ["b0", "resnet18", "b4", "zeroshot", "zoo-mini"])
    if "zoo" in only:
        only |= set(ZOO)
    if "zoo-mini" in only:
        only |= {k + "-mini" for k in ZOO_MINI}

    def save(sub, fname, model):
        d = os.path.join(args.out, sub)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, fname)
        onnx.save(model, path)
        return d, path

    if "b0" in only:
        d, p = save("efficientnet-b0-random", "efficientnet_b0_224.onnx",
                    efficientnet("efficientnet_b0_random", 224, 1.0, 1.0, Init(1), "classifier"))
        open(os.path.join(d, "model.toml"), "w").write(PREFILTER_MANIFEST.format(
            name="efficientnet-b0-random", desc="EfficientNet-B0 224 classifier", file=os.path.basename(p), sha=sha256(p)))
    if "resnet18" in only:
        d, p = save("resnet18-random", "resnet18_224.onnx", resnet18(Init(2)))
        open(os.path.join(d, "model.toml"), "w").write(PREFILTER_MANIFEST.format(
            name="resnet18-random", desc="ResNet-18 224 classifier", file=os.path.basename(p), sha=sha256(p)))
    if "b4" in only:
        d, p = save("effb4-arcface-random", "effb4_arcface_512.onnx",
                    efficientnet("effb4_arcface_random", 512, 1.4, 1.8, Init(3), "embedding"))
        rng = np.random.default_rng(4)
        head = rng.standard_normal((15587, 512)).astype(np.float32)
        head /= np.linalg.norm(head, axis=1, keepdims=True)
        np.save(os.path.join(d, "head.npy"), head)
        ids = np.array(sorted({"".join(rng.choice(list("0123456789abcdef"), 12)) for _ in range(15600)})[:15587])
        assert len(ids) == 15587 and ids.dtype == np.dtype("<U12")
        np.save(os.path.join(d, "encoder_classes.npy"), ids)
        with open(os.path.join(d, "species_map.csv"), "w") as f:
            f.write("individual_id,species\n")
            for i in ids:
                f.write(f"{i},{SPECIES[int(rng.integers(len(SPECIES)))]}\n")
        open(os.path.join(d, "model.toml"), "w").write(EMBEDDER_MANIFEST.format(sha=sha256(p)))
    if "zeroshot" in only:
        zeroshot(os.path.join(args.out, "zeroshot-random"))
    for key, (table, suffix) in [(k, (ZOO, "")) for k in ZOO] + [(k, (ZOO_MINI, "-mini")) for k in ZOO_MINI]:
        if key + suffix not in only:
            continue
        sub, fname, size, build, desc = table[key]
        d, p = save(sub, fname, build())
        open(os.path.join(d, "model.toml"), "w").write(ZOO_MANIFEST.format(
            name=sub, desc=desc, file=fname, size=size, sha=sha256(p)))
    print(f"wrote {sorted(only - {'zoo', 'zoo-mini'})} under {args.out}")


if __name__ == "__main__":
    main()
