#!/usr/bin/env python3
"""Dump timm's own state_dict key list of a backbone to tools/timm_keys/<model>.tsv (DEV-TIME ONLY).

Needs torch + timm (the exporter does not; it reads the .tsv this writes). The .tsv is the expected
key set and shapes that tools/export_upstream.py checks a checkpoint against, so it comes from timm's
definition of the network, not from our ONNX builder.

  /tmp/tv/bin/python tools/dump_timm_keys.py efficientnet_b4 --out tools/timm_keys/efficientnet_b4.tsv

The model is built as upstream builds it: timm.create_model(name, pretrained=False, num_classes=0,
global_pool=""). With --compare tf_efficientnet_b4 it also checks that the other variant has the
identical key list and shapes (true for efficientnet_b4 vs tf_efficientnet_b4 in timm 1.0.9: they
differ only in padding and BatchNorm eps, which the keys cannot show).
"""
import argparse
import sys

import timm
import torch


def keys(name):
    m = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    return [(k, tuple(v.shape)) for k, v in m.state_dict().items()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", action="append", default=[], help="another timm model that must have the same keys")
    args = ap.parse_args()
    ks = keys(args.model)
    for other in args.compare:
        if keys(other) != ks:
            sys.exit(f"{other} does not have the same state_dict keys/shapes as {args.model}")
        print(f"{other}: identical keys and shapes")
    with open(args.out, "w") as f:
        f.write(f"# timm {timm.__version__} (torch {torch.__version__.split('+')[0]}): "
                f"timm.create_model({args.model!r}, num_classes=0, global_pool='').state_dict(); "
                f"written by: python tools/dump_timm_keys.py {args.model} --out {args.out}"
                + "".join(f" --compare {c}" for c in args.compare) + "\n")
        for k, shape in ks:
            f.write(f"{k}\t{','.join(str(s) for s in shape)}\n")
    print(f"{len(ks)} keys -> {args.out}")


if __name__ == "__main__":
    main()
