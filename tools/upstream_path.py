#!/usr/bin/env python3
"""The upstream's per-image identification path in PyTorch, for bench/upstream.sh (needs torch + timm).

What EcoMarineAI's service runs for one photo (../shared/docs/upstream.md): Pillow decode, RGB,
Resize((512, 512)) bilinear (torchvision on a PIL image: Pillow's resize, antialiased when shrinking),
ToTensor, ImageNet Normalize; timm efficientnet_b4 (num_classes=0, global_pool="") -> average pool ->
Linear(1792 -> 512) -> L2 = the embedding; cosine against the L2-normalised arc.weight rows, the first
`active` slots, x 30, softmax, top-5. The weights come from a Lightning checkpoint (`model.*`,
`embedding.*`, `arc.weight`), loaded strictly.

  python tools/upstream_path.py --ckpt C.ckpt --classes encoder_classes.npy [--threads 1] PHOTO...

Prints one JSON line per photo ({"photo", "ms", "top5": [[id, probability], ...]}) in order, where "ms"
is the photo's time from opening the file to the top-5 (as whaled's Detection `timings.total_ms`);
nothing else on stdout, so the caller can also time the whole process (load included) from outside.
"""
import argparse
import json
import time

import numpy as np
import timm
import torch
from PIL import Image
from torchvision import transforms

ACTIVE = 13837  # the upstream's active slots (upstream.md: "the first 13,837 of the 15,587")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--classes", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("photos", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model = timm.create_model("efficientnet_b4", pretrained=False, num_classes=0, global_pool="")
    model.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, strict=True)
    model.eval()
    embedding = torch.nn.Linear(1792, 512)
    embedding.load_state_dict({"weight": sd["embedding.weight"], "bias": sd["embedding.bias"]})
    arc = torch.nn.functional.normalize(sd["arc.weight"].float(), dim=1)[:ACTIVE]
    classes = np.load(args.classes)
    prep = transforms.Compose([
        transforms.Resize((512, 512), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    with torch.inference_mode():
        for path in args.photos:
            started = time.perf_counter()
            x = prep(Image.open(path).convert("RGB")).unsqueeze(0)
            e = torch.nn.functional.normalize(embedding(model(x).mean((2, 3))), dim=1)
            p = torch.softmax(30.0 * (e @ arc.T), dim=1)[0]
            top = torch.topk(p, 5)
            ms = (time.perf_counter() - started) * 1e3
            print(json.dumps({"photo": path, "ms": ms, "top5": [[str(classes[i]), round(float(v), 4)]
                                                                for v, i in zip(top.values, top.indices)]}), flush=True)


if __name__ == "__main__":
    main()
