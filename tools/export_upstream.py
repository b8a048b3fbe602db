#!/usr/bin/env python3
"""Export the upstream identification checkpoint to the files whaled loads (numpy + onnx only; no torch).

Input: the PyTorch Lightning checkpoint `efficientnet_b4_512_fold0.ckpt` (torch zip format; state_dict
keys `model.*` = timm efficientnet_b4 with num_classes=0, global_pool="", plus `embedding.weight`
[512,1792], `embedding.bias` [512], `arc.weight` [15587,512]), `encoder_classes.npy` and
`species_map.csv` (Hugging Face `0x0000dead/ecomarineai-cetacean-effb4`, CC-BY-NC-4.0).

Output, in --out:
  embedder.onnx        input `input` [1,3,512,512] f32 -> backbone (BatchNorm folded) -> average pool ->
                       Linear -> LpNormalization: output `embedding` [1,512]
  head.npy             arc.weight with rows L2-normalised, float32, C order
  encoder_classes.npy  copied byte for byte
  species_map.csv      copied byte for byte
  model.toml           whaled's embedder manifest, with the SHA-256 of every file above

Rules (each failure is a message and exit status 2, never a traceback):
  * Every state_dict key is used exactly once: `model.` + each key of timm's own key list
    (tools/timm_keys/efficientnet_b4.tsv, written by tools/dump_timm_keys.py from timm 1.0.9), plus
    embedding.weight, embedding.bias, arc.weight. num_batches_tracked is consumed deliberately (not
    needed at inference). Missing, extra and misshaped keys are all listed (expected vs got).
  * Architecture: keys cannot tell efficientnet_b4 from tf_efficientnet_b4(_ns) (same keys and shapes;
    they differ in padding and BatchNorm eps). Chosen by --arch; else by a string in the checkpoint's
    hyper_parameters naming a timm model (model_name, backbone, arch, ...); else efficientnet_b4 (the
    upstream running code), and the summary says it was the default.
  * encoder_classes: 1-D, one unique id per arc.weight row; species_map: a row for every active id;
    active_slots <= rows.

Usage:
  python3 tools/export_upstream.py --ckpt efficientnet_b4_512_fold0.ckpt --classes encoder_classes.npy \\
      --species species_map.csv --out models/effb4-arcface [--arch efficientnet_b4] \\
      [--name effb4-arcface-v1] [--active-slots 13837] [--verify]
--verify (needs onnxruntime + pillow) also runs the exported ONNX and tools/effnet_ref.py (independent
numpy float64 forward) on a fixed synthetic image and reports their largest difference.
"""
import argparse
import collections
import csv
import hashlib
import os
import re
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch_legacy  # noqa: E402

KEYS_TSV = os.path.join(HERE, "timm_keys", "efficientnet_b4.tsv")
SIZE = 512
FEATURES = 1792

# name -> (padding, BatchNorm eps). timm 1.0.9: tf_* set pad_type="same", bn_eps=1e-3 (BN_EPS_TF_DEFAULT).
ARCHES = collections.OrderedDict([
    ("efficientnet_b4", ("torch", 1e-5)),
    ("tf_efficientnet_b4", ("tf", 1e-3)),
    ("tf_efficientnet_b4_ns", ("tf", 1e-3)),
])
DEFAULT_ARCH = "efficientnet_b4"
# timm EfficientNet-B arch_def: stride of the first block of each of the 7 stages.
STAGE_STRIDES = [1, 2, 2, 2, 1, 2, 1]
# (stem width, head width) of timm's EfficientNet-B family, to name a checkpoint that is not B4.
WIDTHS = {"b0": (32, 1280), "b1": (32, 1280), "b2": (32, 1408), "b3": (40, 1536), "b4": (48, 1792),
          "b5": (48, 2048), "b6": (56, 2304), "b7": (64, 2560), "b8": (72, 2816)}
HP_KEYS = ("model_name", "backbone", "backbone_name", "arch", "architecture", "timm_model", "encoder",
           "encoder_name", "base_model", "model", "net", "network")


class UserError(Exception):
    pass


def fail(msg):
    raise UserError(msg)


def supported():
    return ", ".join(ARCHES)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def timm_keys(path=KEYS_TSV):
    keys = collections.OrderedDict()
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            k, shape = line.rstrip("\n").split("\t")
            keys[k] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return keys


def fmt_shape(s):
    return "[" + ", ".join(str(d) for d in s) + "]"


def listing(title, items, limit=12):
    items = list(items)
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:limit]) + more


# ------------------------------------------------------------------ checks

def check_architecture(sd, expected):
    """A checkpoint of another EfficientNet width: say so instead of listing hundreds of keys."""
    stem, head = sd.get("model.conv_stem.weight"), sd.get("model.conv_head.weight")
    want_stem, want_head = expected["conv_stem.weight"][0], expected["conv_head.weight"][0]
    if stem is None or head is None or stem.ndim != 4 or head.ndim != 4:
        return
    got = (stem.shape[0], head.shape[0])
    if got != (want_stem, want_head):
        like = [f"efficientnet_{b}" for b, w in WIDTHS.items() if w == got]
        fail(f"the checkpoint looks like a different architecture: stem width {got[0]}, head width {got[1]} "
             f"(efficientnet_b4 has {want_stem} / {want_head})"
             + (f"; those widths are timm's {' or '.join(like)}" if like else "")
             + f". Supported: {supported()}")


def account_keys(sd, expected_backbone):
    """Expected keys and shapes; fail listing every missing, extra and misshaped key."""
    expected = collections.OrderedDict(("model." + k, s) for k, s in expected_backbone.items())
    dim = sd["embedding.weight"].shape[0] if "embedding.weight" in sd and sd["embedding.weight"].ndim == 2 else 512
    rows = sd["arc.weight"].shape[0] if "arc.weight" in sd and sd["arc.weight"].ndim == 2 else None
    expected["embedding.weight"] = (dim, FEATURES)
    expected["embedding.bias"] = (dim,)
    expected["arc.weight"] = (rows if rows is not None else "N", dim)
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    misshaped = [f"{k}: expected {fmt_shape(s)}, got {fmt_shape(sd[k].shape)}"
                 for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
    if missing or extra or misshaped:
        parts = []
        if missing:
            parts.append(listing("missing keys", missing))
        if extra:
            parts.append(listing("unexpected keys", extra))
        if misshaped:
            parts.append(listing("misshaped keys", misshaped))
        fail("the checkpoint's state_dict is not the upstream model "
             "(timm efficientnet_b4 backbone under 'model.', embedding.weight/bias, arc.weight):\n"
             + "\n".join(parts))
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            if v.dtype.kind not in "iu":
                fail(f"{k}: expected an integer counter, got dtype {v.dtype}")
        elif v.dtype.kind != "f":
            fail(f"{k}: expected floating-point values, got dtype {v.dtype}")
        elif not np.all(np.isfinite(v)):
            fail(f"{k}: holds {int(np.sum(~np.isfinite(v)))} non-finite values")
    return dim, sd["arc.weight"].shape[0]


class Consumer:
    """Hands out each state_dict entry once; what is never taken is reported."""

    def __init__(self, sd):
        self.sd, self.taken = sd, set()

    def __call__(self, key):
        if key in self.taken:
            raise AssertionError(f"internal error: key {key} used twice")
        self.taken.add(key)
        return np.asarray(self.sd[key], np.float64)

    def left(self):
        return [k for k in self.sd if k not in self.taken]


def hp_arch(hp, depth=0):
    """(key path, model name string) found in hyper_parameters, or None."""
    if not isinstance(hp, dict) or depth > 3:
        return None
    for key in HP_KEYS:
        v = hp.get(key)
        if isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", v.strip()):
            return key, v.strip()
    for key, v in hp.items():
        if isinstance(v, dict):
            found = hp_arch(v, depth + 1)
            if found:
                return f"{key}.{found[0]}", found[1]
    return None


def normalise_arch(name):
    base = name.strip().lower().replace("timm/", "").split(".")[0]  # drop a pretrained tag (.ns_jft_in1k)
    return base if base in ARCHES else None


def choose_arch(cli, hp):
    if cli:
        arch = normalise_arch(cli)
        if arch is None:
            fail(f"unsupported architecture {cli}; supported: {supported()}")
        found = hp_arch(hp)
        note = f"--arch {cli}"
        if found and normalise_arch(found[1]) != arch:
            note += f" (overrides hyper_parameters {found[0]} = {found[1]!r})"
        return arch, note
    found = hp_arch(hp)
    if found:
        arch = normalise_arch(found[1])
        if arch is None:
            fail(f"unsupported architecture {found[1]} (from the checkpoint's hyper_parameters {found[0]}); "
                 f"supported: {supported()}. Pass --arch to override.")
        return arch, f"hyper_parameters {found[0]} = {found[1]!r}"
    return DEFAULT_ARCH, ("DEFAULT: nothing in the checkpoint names the backbone, so efficientnet_b4 "
                          "(the upstream running code); pass --arch tf_efficientnet_b4_ns if the weights "
                          "were trained with that variant")


def read_classes(path, rows):
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            fail(f"{path} is a pickled object array; convert it once (only a file you trust: unpickling runs "
                 f"code) with: python3 -c \"import numpy as np; np.save('encoder_classes_u.npy', "
                 f"np.load('{path}', allow_pickle=True).astype('U'))\"")
        fail(f"{path}: not a readable .npy of ids ({e})")
    except OSError as e:
        fail(f"{path}: not a readable .npy of ids ({e})")
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        fail(f"{path}: expected a 1-D array of string ids, got shape {ids.shape} dtype {ids.dtype}")
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids.tolist()]
    if len(ids) != rows:
        fail(f"{path} has {len(ids)} ids but arc.weight has {rows} rows (one id per row expected)")
    seen = {}
    for i, x in enumerate(ids):
        if x in seen:
            fail(f"{path}: id {x!r} appears twice (slots {seen[x]} and {i})")
        seen[x] = i
    return ids


def read_species(path, ids, active):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "individual_id" not in reader.fieldnames or "species" not in reader.fieldnames:
                fail(f"{path}: expected a header with individual_id,species (got {reader.fieldnames})")
            species = {}
            for row in reader:
                i, s = row["individual_id"], row["species"]
                if i in species and species[i] != s:
                    fail(f"{path}: id {i} is listed with two species ({species[i]!r}, {s!r})")
                species[i] = s
    except OSError as e:
        fail(f"{path}: {e}")
    for slot, i in enumerate(ids[:active]):
        if i not in species:
            fail(f"{path} has no row for active id {i} (slot {slot}); every one of the first {active} ids needs one")
    return species


# ------------------------------------------------------------------ graph

def build_onnx(take, arch, dim, keys):
    import onnx_build as ob
    pad, eps = ARCHES[arch]
    g = ob.Graph(f"{arch}_arcface_embedder", (SIZE, SIZE))

    def conv_bn(x, hw, conv, bn, stride=1, groups=1):
        w = take(f"model.{conv}.weight")
        take(f"model.{bn}.num_batches_tracked")  # training-time counter: deliberately unused
        w, b = ob.fold_bn(w, take(f"model.{bn}.weight"), take(f"model.{bn}.bias"),
                          take(f"model.{bn}.running_mean"), take(f"model.{bn}.running_var"), eps)
        return g.conv(x, w, b, hw, stride=stride, groups=groups, same=pad)

    def conv_bias(x, conv):
        y, _ = g.conv(x, take(f"model.{conv}.weight"), take(f"model.{conv}.bias"), (1, 1))
        return y

    def se(x, p):
        s = g.gap(x)
        s = g.silu(conv_bias(s, f"{p}.se.conv_reduce"))
        s = conv_bias(s, f"{p}.se.conv_expand")
        return g.node("Mul", [x, g.node("Sigmoid", [s])])

    blocks = sorted({(int(k.split(".")[1]), int(k.split(".")[2])) for k in keys if k.startswith("blocks.")})
    x, hw = conv_bn(g.in_name, (SIZE, SIZE), "conv_stem", "bn1", stride=2)
    x = g.silu(x)
    cin = keys["conv_stem.weight"][0]
    for s, i in blocks:
        p = f"blocks.{s}.{i}"
        stride = STAGE_STRIDES[s] if i == 0 else 1
        inp = x
        if f"{p}.conv_pwl.weight" in keys:  # InvertedResidual
            mid = keys[f"{p}.conv_pw.weight"][0]
            x, hw = conv_bn(x, hw, f"{p}.conv_pw", f"{p}.bn1")
            x = g.silu(x)
            x, hw = conv_bn(x, hw, f"{p}.conv_dw", f"{p}.bn2", stride=stride, groups=mid)
            x = se(g.silu(x), p)
            x, hw = conv_bn(x, hw, f"{p}.conv_pwl", f"{p}.bn3")
            cout = keys[f"{p}.conv_pwl.weight"][0]
        else:  # DepthwiseSeparable
            x, hw = conv_bn(x, hw, f"{p}.conv_dw", f"{p}.bn1", stride=stride, groups=cin)
            x = se(g.silu(x), p)
            x, hw = conv_bn(x, hw, f"{p}.conv_pw", f"{p}.bn2")
            cout = keys[f"{p}.conv_pw.weight"][0]
        if stride == 1 and cin == cout:
            x = g.add(x, inp)
        cin = cout
    x, hw = conv_bn(x, hw, "conv_head", "bn2")
    x = g.silu(x)
    x = g.flatten(g.gap(x))
    x = g.gemm(x, take("embedding.weight"), take("embedding.bias"))
    x = g.l2norm(x)
    return g.finish(x, "embedding", [1, dim],
                    f"Upstream cetacean identification embedder (effb4-arcface): timm {arch} backbone, "
                    f"BatchNorm folded, global average pool, Linear({FEATURES}->{dim}), L2 normalise. "
                    f"Input 1x3x{SIZE}x{SIZE} RGB, whole frame stretched, ImageNet mean/std. "
                    "Weights: Hugging Face 0x0000dead/ecomarineai-cetacean-effb4, CC-BY-NC-4.0.")


MANIFEST = """# GENERATED by tools/export_upstream.py from {ckpt} ({arch}) -- upstream weights, CC-BY-NC-4.0.
name = "{name}"
role = "embedder"
description = "Upstream identification model: timm {arch} -> avg pool -> Linear({features},{dim}) -> L2 ({ckpt})"
random_weights = false
license = "CC-BY-NC-4.0 (upstream weights)"

[[variants]]
name = "fp32"
file = "embedder.onnx"
sha256 = "{onnx_sha}"

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
name = "embedding"
dim = {dim}
kind = "embedding"

[embedder]
head = "head.npy"
head_sha256 = "{head_sha}"
labels = "encoder_classes.npy"
labels_sha256 = "{labels_sha}"
species_map = "species_map.csv"
species_map_sha256 = "{species_sha}"
active_slots = {active}
scale = 30.0
top_k = 5
min_confidence = 0.05
model_version = "{name}"
"""


def verify(onnx_path, sd, arch):
    import onnxruntime as ort
    import effnet_ref
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    img = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), xx * yy], 0)
    img = ((img - img.min()) / np.ptp(img) + 0.05 * rng.standard_normal(img.shape)).clip(0, 1)
    x = ((img.transpose(1, 2, 0) - effnet_ref.MEAN) / effnet_ref.STD).transpose(2, 0, 1)[None].astype(np.float32)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"input": x})[0][0].astype(np.float64)
    want = effnet_ref.embed(sd, arch, x)
    return float(np.abs(got - want).max()), float(got @ want)


def export(args):
    t0 = time.time()
    if not os.path.isfile(args.ckpt):
        fail(f"{args.ckpt}: no such file")
    expected_backbone = timm_keys()
    try:
        sd, hp = torch_legacy.load_checkpoint(args.ckpt)
    except Exception as e:  # noqa: BLE001 -- any parse failure is the user's file, not our bug
        fail(f"{args.ckpt}: cannot read as a PyTorch checkpoint: {type(e).__name__}: {e}")
    t_load = time.time() - t0
    arch, why = choose_arch(args.arch, hp)
    check_architecture(sd, expected_backbone)
    dim, rows = account_keys(sd, expected_backbone)
    active = args.active_slots
    if not 0 < active <= rows:
        fail(f"--active-slots {active}: must be between 1 and the {rows} rows of arc.weight")
    ids = read_classes(args.classes, rows)
    read_species(args.species, ids, active)

    take = Consumer(sd)
    model = build_onnx(take, arch, dim, expected_backbone)
    arc = take("arc.weight")
    left = take.left()
    if left:
        raise AssertionError("internal error: state_dict keys not used by the exporter: " + ", ".join(left))
    norms = np.linalg.norm(arc, axis=1)
    if np.any(norms == 0):
        fail(f"arc.weight row {int(np.argmax(norms == 0))} is all zeros; it cannot be L2-normalised")
    head = np.ascontiguousarray((arc / norms[:, None]).astype(np.float32))

    import onnx
    os.makedirs(args.out, exist_ok=True)
    paths = {n: os.path.join(args.out, n) for n in
             ("embedder.onnx", "head.npy", "encoder_classes.npy", "species_map.csv", "model.toml")}
    onnx.save(model, paths["embedder.onnx"])
    np.save(paths["head.npy"], head)
    for src, name in ((args.classes, "encoder_classes.npy"), (args.species, "species_map.csv")):
        if os.path.abspath(src) != os.path.abspath(paths[name]):
            shutil.copyfile(src, paths[name])
    shas = {n: sha256(p) for n, p in paths.items() if n != "model.toml"}
    with open(paths["model.toml"], "w") as f:
        f.write(MANIFEST.format(ckpt=os.path.basename(args.ckpt), arch=arch, name=args.name, features=FEATURES,
                                dim=dim, size=SIZE, active=active, onnx_sha=shas["embedder.onnx"],
                                head_sha=shas["head.npy"], labels_sha=shas["encoder_classes.npy"],
                                species_sha=shas["species_map.csv"]))

    n_backbone = sum(v.size for k, v in sd.items() if k.startswith("model.") and not k.endswith("num_batches_tracked"))
    print(f"checkpoint      {args.ckpt} (read in {t_load:.1f} s; {len(sd)} keys, all used: "
          f"{sum(k.endswith('num_batches_tracked') for k in sd)} of them num_batches_tracked, deliberately ignored)")
    print(f"architecture    {arch}  [{why}]  padding {ARCHES[arch][0]}, BatchNorm eps {ARCHES[arch][1]:g}")
    print(f"parameters      backbone {n_backbone:,}, embedding {sd['embedding.weight'].size + sd['embedding.bias'].size:,}, "
          f"arc.weight {rows:,} x {dim} ({active:,} active slots)")
    for n in ("embedder.onnx", "head.npy", "encoder_classes.npy", "species_map.csv"):
        print(f"sha256          {shas[n]}  {n} ({os.path.getsize(paths[n]):,} bytes)")
    print(f"manifest        {paths['model.toml']} (name/model_version {args.name!r})")
    if args.verify:
        diff, cos = verify(paths["embedder.onnx"], sd, arch)
        print(f"verify          onnxruntime vs numpy float64 reference (tools/effnet_ref.py), synthetic image: "
              f"max |diff| {diff:.2e}, cosine {cos:.8f}")
        if diff > 1e-3:
            fail(f"the exported ONNX disagrees with the numpy reference (max |diff| {diff:.2e})")
    print(f"done in {time.time() - t0:.1f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="Lightning checkpoint (efficientnet_b4_512_fold0.ckpt)")
    ap.add_argument("--classes", required=True, help="encoder_classes.npy")
    ap.add_argument("--species", required=True, help="species_map.csv")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--arch", help=f"backbone variant: {supported()} (default: from the checkpoint, else "
                                   f"{DEFAULT_ARCH})")
    ap.add_argument("--name", default="effb4-arcface-v1", help="manifest name and model_version")
    ap.add_argument("--active-slots", type=int, default=13837)
    ap.add_argument("--verify", action="store_true", help="compare the ONNX with tools/effnet_ref.py (needs onnxruntime)")
    args = ap.parse_args(argv)
    try:
        export(args)
    except UserError as e:
        print(f"export_upstream: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
