#!/usr/bin/env python3
"""Write a SYNTHETIC upstream identification checkpoint in the real format (numpy + pillow only).

No real upstream weights are reachable from CI, so tests exercise tools/export_upstream.py and whaled on
this stand-in: a PyTorch Lightning-shaped checkpoint written by torch_legacy.save_checkpoint in torch
2.5's zip format, with the real key set (timm efficientnet_b4 from tools/timm_keys/efficientnet_b4.tsv
under `model.`, embedding.weight [512,1792], embedding.bias [512], arc.weight [15587,512]),
`encoder_classes.npy` (15,587 unique 12-hex ids, <U12) and `species_map.csv`. Seeded: the same
command writes the same files (the planted rows and the calibration go through BLAS, so another
machine may differ in last bits; reference.json is always computed from the files written).

Weights: He-initialised convolutions, BatchNorm gamma ~1 (0.5 on the projection BNs), small beta,
running_var in [0.5, 1.5], num_batches_tracked int64; then calibrated like a trained network's
BatchNorm statistics (see calibrate(): each convolution rescaled so its outputs have std
sqrt(running_var) on a 1/f-noise picture plus the photos; running_mean = their mean). Random, so it
identifies nobody, but activations stay moderate, float32 inference agrees with the float64 reference
to ~1e-6, and different photos get clearly different embeddings (uncalibrated: cosine 1.000).

--photos P1 P2 ...: each photo is written as a 512x512 RGB PNG into DIR/photos/ (Pillow bilinear
resize; whaled's stretch resize of a 512x512 image is the identity, so those PNGs are the exact model
input), embedded with tools/effnet_ref.py (numpy float64, independent of the exporter), and arc rows
are PLANTED so each photo has a meaningful, spread-out top-5: for photo j, five active slots get rows
at decreasing cosine to its embedding (target probabilities e.g. 0.62/0.18/0.09/0.05/0.03, fitted
exactly; see plant()), built mostly from the part of the embedding orthogonal to the other photos'
embeddings so that photos do not steal each other's answers. When a photo is listed in a manifest.csv
beside it (../shared/data layout), its top-1 slot carries the photo's real individual_id and species. DIR/reference.json then holds, per PNG, the
top-5 computed by effnet_ref.score on the planted head as whaled will see it after export:
  {"<png>": {"top5": [{"class_animal", "id_animal", "probability" (4 dp), "probability_raw"}, ...],
             "embedding_norm_check": {"norm": |e|, "prenorm": |Linear output|}, "embedding": [512 floats],
             "planted_slots": [5 slot numbers]}}
DIR/synthetic.json: seed, largest cosine between photos, planting notes.

--corrupt missing|extra|misshape: a checkpoint with one key removed / one unexpected key added / one key
of the wrong shape, for the exporter's refusal tests; the key is printed and written to DIR/corrupt.json.

Usage:
  python3 tools/make_synthetic_ckpt.py --out /tmp/synth --photos ../shared/data/whales-dev/positives/0*.jpg
  python3 tools/export_upstream.py --ckpt /tmp/synth/efficientnet_b4_512_fold0.ckpt \\
      --classes /tmp/synth/encoder_classes.npy --species /tmp/synth/species_map.csv --out /tmp/synth/model
"""
import argparse
import collections
import csv
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import effnet_ref  # noqa: E402
import torch_legacy  # noqa: E402

ROWS, ACTIVE, DIM, FEATURES, SIZE = 15587, 13837, 512, 1792, 512
CKPT = "efficientnet_b4_512_fold0.ckpt"
ARCH = "efficientnet_b4"
SPECIES = ["humpback_whale", "blue_whale", "fin_whale", "beluga", "killer_whale", "bottlenose_dolphin",
           "common_dolphin", "dusky_dolphin", "false_killer_whale", "gray_whale", "minke_whale",
           "sperm_whale", "southern_right_whale", "spinner_dolphin", "melon_headed_whale"]
# Target top-5 probabilities per photo (cycled): spread, never all ~1 or ~0.
PROFILES = [(0.62, 0.18, 0.09, 0.05, 0.03), (0.45, 0.30, 0.10, 0.06, 0.04),
            (0.78, 0.08, 0.05, 0.03, 0.02), (0.38, 0.22, 0.17, 0.10, 0.06)]
CORRUPT = {"missing": "model.blocks.3.2.bn2.running_var",
           "extra": "model.classifier.weight",
           "misshape": "model.blocks.2.1.conv_dw.weight"}


def timm_keys():
    keys = collections.OrderedDict()
    with open(os.path.join(HERE, "timm_keys", "efficientnet_b4.tsv")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            k, shape = line.rstrip("\n").split("\t")
            keys[k] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return keys


def backbone(rng):
    sd = collections.OrderedDict()
    for k, shape in timm_keys().items():
        leaf = k.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            v = np.array(int(rng.integers(10000, 100000)), np.int64)
        elif leaf == "weight" and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            gain = 1.0 if ".se." not in k else 0.5
            v = rng.standard_normal(shape) * gain * np.sqrt(2.0 / fan_in)
        elif ".se." in k:  # SE conv biases
            v = rng.standard_normal(shape) * 0.05
        elif leaf == "weight":  # BatchNorm gamma; the projection BNs (bn3, DS bn2) smaller: tame residual growth
            proj = k.endswith("bn3.weight") or (k.startswith("blocks.0.") and k.endswith("bn2.weight"))
            v = (0.5 if proj else 1.0) + 0.1 * rng.standard_normal(shape)
        elif leaf == "bias":
            v = 0.05 * rng.standard_normal(shape)
        elif leaf == "running_mean":
            v = 0.05 * rng.standard_normal(shape)
        elif leaf == "running_var":
            v = rng.uniform(0.5, 1.5, shape)
        else:
            raise SystemExit(f"unexpected key {k}")
        sd["model." + k] = v.astype(np.float32) if leaf != "num_batches_tracked" else v
    return sd


def pink_image(rng):
    """A 1/f ("natural image") noise picture, ImageNet-normalised 1x3x512x512: the BatchNorm calibration input."""
    f = np.fft.fftfreq(SIZE)[:, None] ** 2 + np.fft.fftfreq(SIZE)[None, :] ** 2
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        spec = (rng.standard_normal((SIZE, SIZE)) + 1j * rng.standard_normal((SIZE, SIZE))) / f ** 0.75
        spec[0, 0] = 0
        chans.append(np.real(np.fft.ifft2(spec)))
    im = np.stack(chans, -1) @ rng.uniform(0.3, 1.0, (3, 3))
    im = ((im - im.mean()) / im.std() * 0.2 + 0.45).clip(0, 1)
    return ((im - effnet_ref.MEAN) / effnet_ref.STD).transpose(2, 0, 1)[None]


def calibrate(sd, xs):
    """Data-dependent init, as training leaves a network: one forward pass over the calibration images
    `xs` in which every convolution's output channels are rescaled so that their standard deviation
    (pooled over the images) equals the BatchNorm's sqrt(running_var), and running_mean is set to their
    mean. Without it a randomly initialised B4 maps every photo to the same embedding (cosine 1.000
    between photos); calibrated on a noise picture alone, photos unlike it drive activations into the
    thousands, where float32 inference drifts from the float64 reference; so the photos themselves
    (in-distribution, as a trained network's BatchNorm statistics are) join the calibration set."""
    R = effnet_ref
    bb = {k[len("model."):]: v.astype(np.float64) for k, v in sd.items()
          if k.startswith("model.") and not k.endswith("num_batches_tracked")}

    def cbn(xs, conv, bn, kind, stride=1):
        w = bb[conv + ".weight"]
        if kind == "full":
            ys = [R.conv_full(x, w, stride, "torch") for x in xs]
        elif kind == "dw":
            ys = [R.conv_depthwise(x, w, stride, "torch") for x in xs]
        else:
            ys = [R.conv_1x1(x, w) for x in xs]
        pooled = np.concatenate([y.reshape(y.shape[0], -1) for y in ys], axis=1)
        f = np.sqrt(bb[bn + ".running_var"]) / np.maximum(pooled.std(axis=1), 1e-8)
        bb[conv + ".weight"] = w * f[:, None, None, None]
        bb[bn + ".running_mean"] = pooled.mean(axis=1) * f
        return [R.batchnorm(y * f[:, None, None], bn, bb, 1e-5) for y in ys]

    def act(ys):
        return [R.silu(y) for y in ys]

    xs = act(cbn([x[0] for x in xs], "conv_stem", "bn1", "full", 2))
    for s, i in R._blocks(bb):
        p = f"blocks.{s}.{i}"
        stride = R.STAGE_STRIDES[s] if i == 0 else 1
        shortcut = xs
        if p + ".conv_pwl.weight" in bb:
            ys = act(cbn(xs, p + ".conv_pw", p + ".bn1", "pw"))
            ys = [R.squeeze_excite(y, p + ".se", bb) for y in act(cbn(ys, p + ".conv_dw", p + ".bn2", "dw", stride))]
            ys = cbn(ys, p + ".conv_pwl", p + ".bn3", "pw")
        else:
            ys = [R.squeeze_excite(y, p + ".se", bb) for y in act(cbn(xs, p + ".conv_dw", p + ".bn1", "dw", stride))]
            ys = cbn(ys, p + ".conv_pw", p + ".bn2", "pw")
        if stride == 1 and ys[0].shape[0] == shortcut[0].shape[0]:
            ys = [y + r for y, r in zip(ys, shortcut)]
        xs = ys
    cbn(xs, "conv_head", "bn2", "pw")
    for k, v in bb.items():
        if k.endswith(".weight") and v.ndim == 4 or k.endswith("running_mean"):
            sd["model." + k] = v.astype(np.float32)


def ids_and_species(rng):
    seen, ids = set(), []
    while len(ids) < ROWS:
        i = f"{int(rng.integers(0, 1 << 48)):012x}"
        if i not in seen:
            seen.add(i)
            ids.append(i)
    species = [SPECIES[int(s)] for s in rng.integers(0, len(SPECIES), ROWS)]
    return ids, species


def manifest_row(photo):
    """(individual_id, species) of a photo listed in a manifest.csv of the ../shared/data layout."""
    d = os.path.dirname(os.path.abspath(photo))
    for root in (d, os.path.dirname(d)):
        m = os.path.join(root, "manifest.csv")
        if os.path.isfile(m):
            rel = os.path.relpath(os.path.abspath(photo), root)
            with open(m, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("relpath") == rel and row.get("individual_id") and row.get("species"):
                        return row["individual_id"], row["species"]
    return None


def write_photos(photos, out):
    from PIL import Image
    os.makedirs(os.path.join(out, "photos"), exist_ok=True)
    names = []
    for n, p in enumerate(photos):
        stem = os.path.splitext(os.path.basename(p))[0]
        name = f"{stem}.png" if f"{stem}.png" not in names else f"{n:02d}_{stem}.png"
        im = Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        im.save(os.path.join(out, "photos", name), optimize=False)
        names.append(name)
    return names


def plant(arc, embs, rng, profiles, min_self=0.6):
    """Plant five active rows per photo (modifies arc in place); returns (slots [P,5], per-photo notes).

    The active rows that are not planted are first made orthogonal to every photo embedding (a
    P-dimensional projection out of 512), so each contributes exactly exp(0) = 1 to every photo's
    softmax. Photo j's rows are r = a * u_j + sqrt(1 - a^2) * n, n random and orthogonal to all photo
    embeddings, u_j = e_j minus lambda_j times its projection on the other photos' embeddings, with the
    largest lambda_j in [0, 1] that keeps u_j . e_j >= min_self (lambda 1: the other photos see cosine 0;
    smaller: some cross-talk, as between look-alike animals). The a's are then fitted jointly so each
    photo's five rows get its target probabilities (cross-talk included); reference.json is computed
    afterwards on the actual rows, so any residual misfit is in the reference too."""
    E = np.array(embs)
    p = len(E)
    slots = rng.choice(ACTIVE, size=5 * p, replace=False).reshape(p, 5)
    qa, _ = np.linalg.qr(E.T)
    a64 = arc.astype(np.float64)
    a64 -= (a64 @ qa) @ qa.T
    arc[:] = a64.astype(np.float32)
    background = float(ACTIVE - 5 * p)
    U, lams = [], []
    for j in range(p):
        others = np.delete(E, j, axis=0)
        pe = np.zeros(DIM)
        if len(others):
            q, _ = np.linalg.qr(others.T)
            pe = q @ (q.T @ E[j])
        lam = 1.0
        for lam in np.linspace(1.0, 0.0, 101):
            u = E[j] - lam * pe
            if u @ E[j] / np.linalg.norm(u) >= min_self:
                break
        lams.append(float(lam))
        U.append(u / np.linalg.norm(u))
    U = np.array(U)
    G = U @ E.T  # G[j, k] = u_j . e_k
    T = np.array([profiles[j % len(profiles)] for j in range(p)])
    rest = 1.0 - T.sum(axis=1, keepdims=True)
    own = np.diag(G)[:, None]
    a = np.clip(np.log(T / rest * background) / (30.0 * own), -0.99, 0.99)
    for _ in range(200):
        logits = 30.0 * np.einsum("ji,jk->kji", a, G)  # [photo k, photo j, row i]
        z = background + np.exp(logits).sum(axis=(1, 2))
        p_own = np.exp(30.0 * a * own) / z[:, None]
        step = (np.log(T) - np.log(p_own)) / (30.0 * own)
        a = np.clip(a + step, -0.99, 0.99)
        if np.abs(step).max() < 1e-10:
            break
    for j in range(p):
        for i, s in enumerate(slots[j]):
            v = rng.standard_normal(DIM)
            v -= qa @ (qa.T @ v)
            row = a[j, i] * U[j] + np.sqrt(1 - a[j, i] ** 2) * v / np.linalg.norm(v)
            arc[s] = (row * rng.uniform(0.5, 2.0)).astype(np.float32)
    return slots, {"lambda": lams, "self_cosine": np.diag(G).tolist()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--photos", nargs="*", default=[])
    ap.add_argument("--corrupt", choices=sorted(CORRUPT))
    ap.add_argument("--seed", type=int, default=20240912)
    args = ap.parse_args()
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    sd = backbone(rng)
    sd["embedding.weight"] = (rng.standard_normal((DIM, FEATURES)) / np.sqrt(FEATURES)).astype(np.float32)
    sd["embedding.bias"] = (0.01 * rng.standard_normal(DIM)).astype(np.float32)
    arc = rng.standard_normal((ROWS, DIM)).astype(np.float32) * rng.uniform(0.5, 2.0, (ROWS, 1)).astype(np.float32)
    ids, species = ids_and_species(rng)

    reference, info = {}, {}
    names = write_photos(args.photos, args.out) if args.photos and not args.corrupt else []
    if not args.corrupt:
        calib = [pink_image(np.random.default_rng(args.seed + 1))]
        calib += [effnet_ref.preprocess(os.path.join(args.out, "photos", n)) for n in names]
        calibrate(sd, calib)
    if names:
        embs, prenorms = [], []
        for name in names:
            x = effnet_ref.preprocess(os.path.join(args.out, "photos", name))
            e, n = effnet_ref.embed(sd, ARCH, x, return_prenorm=True)
            embs.append(e)
            prenorms.append(n)
        slots, notes = plant(arc, embs, rng, PROFILES)
        for j, p in enumerate(args.photos):
            row = manifest_row(p)
            if row and row[0] not in ids:
                ids[slots[j][0]], species[slots[j][0]] = row
        E = np.array(embs)
        info["pairwise_cosine_max"] = float(np.max(E @ E.T - 2 * np.eye(len(E)))) if len(E) > 1 else None
        info["planting"] = notes
        for j, name in enumerate(names):
            top, _p = effnet_ref.score(embs[j], arc, ids, dict(zip(ids, species)), active=ACTIVE)
            reference[name] = {
                "top5": [{k: t[k] for k in ("class_animal", "id_animal", "probability", "probability_raw")} for t in top],
                "planted_slots": [int(s) for s in slots[j]],
                "embedding_norm_check": {"norm": float(np.linalg.norm(embs[j])), "prenorm": float(prenorms[j])},
                "embedding": [float(f"{v:.8g}") for v in embs[j]],
            }
    sd["arc.weight"] = arc

    corrupt = None
    if args.corrupt:
        key = CORRUPT[args.corrupt]
        if args.corrupt == "missing":
            del sd[key]
        elif args.corrupt == "extra":
            sd[key] = np.zeros((1000, FEATURES), np.float32)
        else:
            sd[key] = np.zeros(sd[key].shape[:2] + (3, 3), np.float32)
        corrupt = {"mode": args.corrupt, "key": key}
        with open(os.path.join(args.out, "corrupt.json"), "w") as f:
            json.dump(corrupt, f, indent=1)

    ckpt = {
        "epoch": 19,
        "global_step": 43220,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "callbacks": {"ModelCheckpoint{'monitor': 'val_map5', 'mode': 'max'}":
                      {"best_model_score": np.array(0.5, np.float32), "best_model_path": CKPT}},
        "hyper_parameters": {"model_name": ARCH, "image_size": SIZE, "embedding_size": DIM,
                             "num_classes": ROWS, "s": 30.0, "m": 0.5, "lr": 0.001,
                             "note": "SYNTHETIC checkpoint from tools/make_synthetic_ckpt.py: random weights"},
    }
    torch_legacy.save_checkpoint(os.path.join(args.out, CKPT), ckpt)
    np.save(os.path.join(args.out, "encoder_classes.npy"), np.array(ids, dtype="<U12"))
    with open(os.path.join(args.out, "species_map.csv"), "w", newline="") as f:
        f.write("individual_id,species\n")
        for i, s in zip(ids, species):
            f.write(f"{i},{s}\n")
    if reference:
        with open(os.path.join(args.out, "reference.json"), "w") as f:
            json.dump(reference, f, indent=1)
    with open(os.path.join(args.out, "synthetic.json"), "w") as f:
        json.dump({"seed": args.seed, "arch": ARCH, "active_slots": ACTIVE, "photos": list(reference),
                   "corrupt": corrupt, **info}, f, indent=1)
    print(f"wrote {args.out}/{CKPT} ({os.path.getsize(os.path.join(args.out, CKPT)):,} bytes), "
          f"encoder_classes.npy, species_map.csv"
          + (f", {len(reference)} photos + reference.json" if reference else "")
          + (f"; CORRUPT ({args.corrupt}): {corrupt['key']}" if corrupt else "")
          + f" in {time.time() - t0:.1f} s")
    for name, r in reference.items():
        print(f"  {name}: " + ", ".join(f"{t['class_animal']} {t['probability']:.4f}" for t in r["top5"]))
    if info.get("pairwise_cosine_max") is not None:
        print(f"  largest cosine between two photos' embeddings: {info['pairwise_cosine_max']:.3f}")


if __name__ == "__main__":
    main()
