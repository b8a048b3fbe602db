#!/usr/bin/env python3
"""Independent reference for whaled's zero-shot gate stage (`role = "zero_shot"`, upstream's CLIP rule).

  python3 tools/zeroshot_ref.py --model models/generated/zeroshot-random/model.toml IMG.png ...
  python3 tools/zeroshot_ref.py --vectors          # the rule on known vectors (the Rust unit-test cases)

For each image, one JSON line: {"image": name, "score": s, "passed": bool, "cosines": [one per prompt]}.

The rule: the image embedding (onnxruntime, the manifest's fp32 variant) and every row of
`text_embeddings.npy` are L2-normalised; cos = text_n @ image_n; p = softmax(scale * cos) over ALL
prompts; score = sum of p over the first `positives` rows; passed = score >= threshold. Computed in
float64 numpy.

Preprocessing: RGB, resize to the manifest's width x height (`stretch`: the whole frame, Pillow with the
manifest's interpolation; an image already that size is used as is, so 224x224 PNGs are exact;
`center_crop`: shorter side to size/crop_fraction then a centre crop), x/255, (x - mean)/std, NCHW
float32. Resized inputs follow Pillow's resampling, not whaled's, so compare them loosely.
"""
import argparse
import hashlib
import json
import os
import sys
import tomllib

import numpy as np

INTERP = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST", "lanczos": "LANCZOS"}


def zero_shot_score(image_emb, text_emb, positives, scale):
    """(score, cosines) of upstream's rule, float64. text_emb rows need not be normalised."""
    img = np.asarray(image_emb, np.float64).reshape(-1)
    txt = np.asarray(text_emb, np.float64)
    if txt.ndim != 2 or txt.shape[1] != img.shape[0]:
        raise ValueError(f"text embeddings {txt.shape} do not match image dim {img.shape[0]}")
    if not 0 < positives <= txt.shape[0]:
        raise ValueError(f"positives {positives} not in 1..{txt.shape[0]}")
    img = img / np.linalg.norm(img)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    cos = txt @ img
    logits = scale * cos
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return float(p[:positives].sum()), cos


def load_manifest(path):
    with open(path, "rb") as f:
        m = tomllib.load(f)
    if m.get("role") != "zero_shot":
        raise SystemExit(f"{path}: role is {m.get('role')!r}, not \"zero_shot\"")
    return m


def _check_sha(path, want):
    with open(path, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if want and got != want:
        raise SystemExit(f"{path}: sha256 {got} != manifest {want}")


def preprocess(path, inp):
    from PIL import Image
    img = Image.open(path).convert("RGB")
    w, h = inp["width"], inp["height"]
    resample = getattr(Image, INTERP[inp.get("interpolation", "bilinear")])
    mode = inp.get("resize", "stretch")
    if mode == "stretch":
        if img.size != (w, h):
            img = img.resize((w, h), resample)
    elif mode == "center_crop":
        frac = inp.get("crop_fraction", 1.0)
        short = round(min(w, h) / frac)
        iw, ih = img.size
        s = short / min(iw, ih)
        nw, nh = max(short, round(iw * s)), max(short, round(ih * s))
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), resample)
        left, top = (nw - w) // 2, (nh - h) // 2
        img = img.crop((left, top, left + w, top + h))
    else:
        raise SystemExit(f"resize {mode!r} not supported by this reference")
    x = np.asarray(img, np.float32) / np.float32(255.0)
    x = (x - np.array(inp["mean"], np.float32)) / np.array(inp["std"], np.float32)
    if inp.get("layout", "nchw") == "nchw":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None], np.float32)


class ZeroShotRef:
    def __init__(self, manifest_path, variant=None):
        import onnxruntime as ort
        self.m = load_manifest(manifest_path)
        d = os.path.dirname(os.path.abspath(manifest_path))
        variants = self.m["variants"]
        v = next((v for v in variants if v["name"] == variant), None) if variant else \
            next((v for v in variants if v["name"] == "fp32"), variants[0])
        if v is None:
            raise SystemExit(f"no variant {variant!r}")
        onnx_path = os.path.join(d, v["file"])
        _check_sha(onnx_path, v.get("sha256"))
        zs = self.m["zero_shot"]
        te_path = os.path.join(d, zs["text_embeddings"])
        _check_sha(te_path, zs.get("text_embeddings_sha256"))
        self.text = np.load(te_path)
        if self.text.dtype != np.float32 or self.text.ndim != 2:
            raise SystemExit(f"{te_path}: {self.text.dtype} {self.text.shape}; expected float32 [prompts, dim]")
        self.positives, self.scale, self.threshold = int(zs["positives"]), float(zs["scale"]), float(zs["threshold"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

    def embed(self, x):
        return self.sess.run([self.m["output"]["name"]], {self.m["input"]["name"]: x})[0]

    def score_image(self, path):
        emb = self.embed(preprocess(path, self.m["input"]))
        score, cos = zero_shot_score(emb, self.text, self.positives, self.scale)
        return {"image": os.path.basename(path), "score": score, "passed": score >= self.threshold,
                "cosines": [float(c) for c in cos]}


# Known-vector cases (dim 4, 5 prompts, 2 positive): the Rust unit test's fixtures.
VECTOR_CASES = [
    {"name": "scale100", "image": [0.3, -1.2, 0.5, 2.0],
     "text": [[1.0, 0.0, 0.5, 1.5], [0.2, -0.8, 0.1, 1.0], [2.0, 1.0, -1.0, 0.0],
              [-0.5, 0.5, 0.5, 0.5], [0.0, -1.0, 1.0, 1.0]],
     "positives": 2, "scale": 100.0},
    {"name": "scale10", "image": [0.3, -1.2, 0.5, 2.0],
     "text": [[1.0, 0.0, 0.5, 1.5], [0.2, -0.8, 0.1, 1.0], [2.0, 1.0, -1.0, 0.0],
              [-0.5, 0.5, 0.5, 0.5], [0.0, -1.0, 1.0, 1.0]],
     "positives": 2, "scale": 10.0},
    {"name": "scale10_close", "image": [1.0, 1.0, 0.0, -0.5],
     "text": [[3.0, 2.5, 0.5, -1.0], [1.0, 1.2, -0.2, -0.4], [0.9, 1.1, 0.1, -0.6],
              [2.0, 2.0, 0.3, -0.8], [0.5, 0.4, 0.2, -0.3]],
     "positives": 2, "scale": 10.0},
    {"name": "scale100_close", "image": [1.0, 1.0, 0.0, -0.5],
     "text": [[3.0, 2.5, 0.5, -1.0], [1.0, 1.2, -0.2, -0.4], [0.9, 1.1, 0.1, -0.6],
              [2.0, 2.0, 0.3, -0.8], [0.5, 0.4, 0.2, -0.3]],
     "positives": 2, "scale": 100.0},
]


def vector_cases():
    out = []
    for c in VECTOR_CASES:
        score, cos = zero_shot_score(c["image"], c["text"], c["positives"], c["scale"])
        out.append({**c, "score": float(f"{score:.15g}"), "cosines": [float(f"{x:.15g}") for x in cos]})
    return out


def _self_check():
    """The rule's invariants on the known vectors (fails loudly if the reference is broken)."""
    for c in VECTOR_CASES:
        s, cos = zero_shot_score(c["image"], c["text"], c["positives"], c["scale"])
        s2, _ = zero_shot_score(np.array(c["image"]) * 7.0, np.array(c["text"]) * np.arange(1, 6)[:, None],
                                c["positives"], c["scale"])
        assert abs(s - s2) < 1e-12, "score must not depend on vector lengths"
        # direct, unshifted softmax with normalised vectors
        img = np.array(c["image"]) / np.linalg.norm(c["image"])
        t = np.array(c["text"]) / np.linalg.norm(c["text"], axis=1, keepdims=True)
        e = np.exp(c["scale"] * (t @ img))
        assert abs(s - e[:c["positives"]].sum() / e.sum()) < 1e-12 and np.all(np.abs(cos) <= 1 + 1e-12)
    s, _ = zero_shot_score([1.0, 0.0], [[1.0, 0.0], [1.0, 0.0]], 1, 100.0)
    assert abs(s - 0.5) < 1e-15, "two identical prompts share the mass equally"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a role = \"zero_shot\" model.toml")
    ap.add_argument("--variant", default=None, help="variant name (default fp32, else the first)")
    ap.add_argument("--vectors", action="store_true", help="print the known-vector cases (JSON lines)")
    ap.add_argument("images", nargs="*")
    args = ap.parse_args(argv)
    if args.vectors:
        _self_check()
        for c in vector_cases():
            print(json.dumps(c))
        return 0
    if not args.model or not args.images:
        ap.error("--model and at least one image (or --vectors)")
    ref = ZeroShotRef(args.model, args.variant)
    for p in args.images:
        print(json.dumps(ref.score_image(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
