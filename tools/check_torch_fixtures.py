#!/usr/bin/env python3
"""Reads the checkpoints in tests/fixtures/torch/ -- written by real torch 2.5.1 `torch.save`, zip and
legacy formats, with a strided view at a storage offset, a transposed tensor, a tensor sharing another's
storage, fp16, bf16 and an int64 scalar, inside a Lightning-shaped dict -- with tools/torch_legacy.py
and compares every tensor with the values torch itself saved in expected.npz. So the reader that the
exporter uses is checked against torch's own output, not only against tools/torch_legacy.py's writer.

The fixtures were made with (torch 2.5.1; not needed to run this check):
    base = torch.arange(40.).reshape(8, 5) / 7
    sd = {"model.view_offset": base[2:, 1:4], "model.transposed": base.t(), "model.shared_a": base[0],
          "model.half": torch.randn(3, 4).half(), "model.bf16": torch.randn(2, 3).bfloat16(),
          "model.num_batches_tracked": torch.tensor(17), "embedding.weight": torch.randn(4, 6)}
    torch.save({"state_dict": sd, "epoch": 3, ..., "hyper_parameters": {"model_name": "efficientnet_b4"}}, F)
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_legacy  # noqa: E402

FIX = os.path.join(HERE, "..", "tests", "fixtures", "torch")


def main():
    exp = np.load(os.path.join(FIX, "expected.npz"))
    for name in ("lightning_zip.ckpt", "lightning_legacy.ckpt"):
        sd, hp = torch_legacy.load_checkpoint(os.path.join(FIX, name))
        if list(sd) != list(exp.files):
            sys.exit(f"{name}: keys {list(sd)} != {exp.files}")
        for k in exp.files:
            got, want = np.asarray(sd[k]), exp[k]
            if got.shape != want.shape or not np.array_equal(got.astype(np.float64), want.astype(np.float64)):
                sys.exit(f"{name}: {k} differs: {got} vs {want}")
        if not hp or hp.get("model_name") != "efficientnet_b4":
            sys.exit(f"{name}: hyper_parameters {hp}")
        print(f"{name}: {len(sd)} tensors equal to torch's")


if __name__ == "__main__":
    main()
