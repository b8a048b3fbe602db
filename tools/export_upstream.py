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
  * Keys saved through a DataParallel / DistributedDataParallel (`module.`) or torch.compile
    (`_orig_mod.`) wrapper are recognised and the wrapper's prefix removed (the summary says so).
  * A truncated or damaged checkpoint, a file that is not a checkpoint, --classes that is not a .npy
    file and an --out that cannot be written are each named as such.
  * --out is written only when everything passed: the files go to a temporary directory beside it
    (`.<name>.partial-*`), which is renamed to --out at the end; on any failure it is removed and
    nothing is left. --out must not exist yet, or be an empty directory (never overwritten).

Usage:
  python3 tools/export_upstream.py --ckpt efficientnet_b4_512_fold0.ckpt --classes encoder_classes.npy \\
      --species species_map.csv --out models/effb4-arcface [--arch efficientnet_b4] \\
      [--name effb4-arcface-v1] [--active-slots 13837] [--verify [--verify-photo PHOTO]]
--verify (needs onnxruntime + pillow) also runs the exported ONNX and tools/effnet_ref.py (independent
numpy float64 forward) on a photo (default tests/photos/synthetic_0.jpg, natural image statistics),
preprocessed as model.toml says (stretch to 512x512, bilinear, ImageNet mean/std), and requires
max |diff| <= 1e-3 x the reference embedding's largest |value| and cosine >= 0.9999; it reports the peak
BatchNorm activation of the reference forward (float32 follows float64 only while that stays moderate:
a trained B4 stays below ~40 on photos, while a synthetic sin/cos pattern drove one to 4e4).
"""
import argparse
import collections
import csv
import hashlib
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib

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
VERIFY_PHOTO = os.path.join(os.path.dirname(HERE), "tests", "photos", "synthetic_0.jpg")
# --verify: the ONNX (float32) against the float64 reference, relative to the embedding's scale.
VERIFY_REL_TOL = 1e-3
VERIFY_MIN_COSINE = 0.9999
# State dict key components added by wrappers around the model: DataParallel / DDP, torch.compile.
WRAPPERS = ("module", "_orig_mod")
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
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


def read_classes(path):
    """The ids of encoder_classes.npy (checked against arc.weight's rows later, in check_classes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as e:
        fail(f"--classes {path}: cannot read: {e.strerror}")
    if not head.startswith(b"\x93NUMPY"):
        first = head.split(b"\n", 1)[0][:80]
        try:
            text = first.decode("utf-8")
            printable = text.isprintable()
        except UnicodeDecodeError:
            printable = False
        what = (f"it is text (first line {text!r}){', a CSV file' if ',' in text else ''}" if printable and head
                else "empty" if not head else "its first bytes are not numpy's .npy header")
        fail(f"--classes {path}: not a .npy file ({what}); --classes takes encoder_classes.npy, the 1-D numpy "
             "array of individual ids (species_map.csv goes to --species)")
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            fail(f"{path} is a pickled object array; convert it once (only a file you trust: unpickling runs "
                 f"code) with: python3 -c \"import numpy as np; np.save('encoder_classes_u.npy', "
                 f"np.load('{path}', allow_pickle=True).astype('U'))\"")
        fail(f"--classes {path}: not a readable .npy of ids, truncated or damaged? ({e})")
    except (OSError, EOFError) as e:
        fail(f"--classes {path}: not a readable .npy of ids, truncated or damaged? ({e})")
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        fail(f"{path}: expected a 1-D array of string ids, got shape {ids.shape} dtype {ids.dtype}")
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids.tolist()]


def check_classes(path, ids, rows):
    if len(ids) != rows:
        fail(f"{path} has {len(ids)} ids but arc.weight has {rows} rows (one id per row expected)")
    seen = {}
    for i, x in enumerate(ids):
        if x in seen:
            fail(f"{path}: id {x!r} appears twice (slots {seen[x]} and {i})")
        seen[x] = i


# ------------------------------------------------------------------ reading the checkpoint

def read_checkpoint(path):
    """(state_dict, hyper_parameters); a damaged file, or one that is no checkpoint, is named as such."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        fail(f"--ckpt {path}: cannot read: {e.strerror}")
    damaged = f"--ckpt {path}: truncated or damaged checkpoint ({size:,} bytes)"
    again = "; download it again"
    if size == 0:
        fail(f"{damaged}: the file is empty{again}")
    is_zip = head.startswith(b"PK\x03\x04")
    if is_zip and not zipfile.is_zipfile(path):
        fail(f"{damaged}: a zip archive without its end (the central directory is missing; the download "
             f"or copy probably stopped early){again}")
    if not is_zip and not head.startswith(b"\x80"):
        fail(f"--ckpt {path}: not a PyTorch checkpoint (neither torch's zip format nor its legacy pickle "
             f"format; the file starts with {head!r})")
    try:
        return torch_legacy.load_checkpoint(path)
    except (EOFError, zipfile.BadZipFile, zlib.error, struct.error, KeyError) as e:
        fail(f"{damaged}: {type(e).__name__}: {e}{again}")
    except Exception as e:  # noqa: BLE001 -- any parse failure is the user's file, not our bug
        msg = str(e)
        if any(t in msg for t in ("truncated", "exceeds its storage", "storage holds", "bytes missing",
                                  "buffer size", "persistent id")):
            fail(f"{damaged}: {type(e).__name__}: {msg}{again}")
        fail(f"--ckpt {path}: cannot read as a PyTorch checkpoint: {type(e).__name__}: {msg}")


def strip_wrappers(sd):
    """Keys saved through a wrapper (`module.` of DataParallel/DDP, `_orig_mod.` of torch.compile), at
    the start or after `model.`, lose that component. Returns (state_dict, sorted wrapper prefixes seen)."""
    out, seen, origin = collections.OrderedDict(), set(), {}
    for k, v in sd.items():
        parts = k.split(".")
        i = 0
        while i < 2 and i < len(parts) - 1:
            if parts[i] in WRAPPERS:
                seen.add(parts[i] + ".")
                del parts[i]
            elif i == 0 and parts[0] == "model":
                i += 1
            else:
                break
        new = ".".join(parts)
        if new in out:
            fail(f"the state_dict holds both {origin[new]} and {k}, the same weight with and without a "
                 "wrapper prefix; which one is meant is unclear")
        out[new], origin[new] = v, k
    return out, sorted(seen)


# ------------------------------------------------------------------ the output directory

class Staging:
    """--out, written only at the end: the files go to a temporary directory beside it, renamed to --out
    by commit(); cleanup() removes whatever is left (the temporary directory, parents it made)."""

    def __init__(self, out):
        self.arg, self.out = out, os.path.realpath(out)
        self.tmp, self.created = None, []
        if os.path.lexists(self.out):
            if not os.path.isdir(self.out):
                fail(f"--out {out}: exists and is not a directory; name a new directory")
            try:
                entries = os.listdir(self.out)
            except OSError as e:
                fail(f"--out {out}: cannot list it: {e.strerror}")
            if entries:
                fail(f"--out {out}: the directory exists and is not empty ({len(entries)} entries); the "
                     "exporter never overwrites: remove it or name a new directory")
        parent, missing = os.path.dirname(self.out), []
        while not os.path.lexists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            fail(f"--out {out}: {parent} is a file, not a directory")
        try:
            for d in reversed(missing):
                os.mkdir(d)
                self.created.append(d)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.partial-",
                                        dir=os.path.dirname(self.out))
        except OSError as e:
            self.cleanup()
            fail(f"--out {out}: cannot create the output directory there: {e.strerror}"
                 + (f" ({e.filename})" if e.filename else ""))

    def path(self, name):
        return os.path.join(self.tmp, name)

    def commit(self):
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp made it 0700
            os.rename(self.tmp, self.out)  # replaces an empty directory; fails on a non-empty one
        except OSError as e:
            fail(f"--out {self.arg}: cannot move the finished export into place: {e.strerror}")
        self.tmp, self.created = None, []

    def cleanup(self):
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for d in reversed(self.created):
            try:
                os.rmdir(d)
            except OSError:
                pass
        self.created = []


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
        fail(f"--species {path}: cannot read: {e.strerror}")
    except (UnicodeDecodeError, csv.Error) as e:
        fail(f"--species {path}: not a UTF-8 CSV with a header individual_id,species ({e})")
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
# Pillow's own resize, byte for byte (upstream: transforms.Resize((512, 512)) on a PIL image).
resampler = "pillow"
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


def verify_input(photo):
    """The --verify photo as the model's input, preprocessed as the manifest says (read before any work)."""
    try:
        import onnxruntime  # noqa: F401 -- needed by verify()
        import effnet_ref
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        fail(f"--verify needs onnxruntime and pillow ({e}); install them or export without --verify")
    try:
        with Image.open(photo) as im:
            return effnet_ref.preprocess(im, SIZE)  # stretch to 512x512, bilinear, [0,1], ImageNet mean/std
    except (OSError, UnidentifiedImageError) as e:
        fail(f"--verify-photo {photo}: cannot read the image: {e}")


def verify(onnx_path, sd, arch, x):
    """ONNX (onnxruntime, float32) vs tools/effnet_ref.py (numpy float64) on the input `x`. Returns a
    dict: diff (max |diff|), scale (the reference's largest |value|), cosine, peak (largest |BatchNorm
    output| of the reference forward), passed."""
    import onnxruntime as ort
    import effnet_ref
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"input": x})[0][0].astype(np.float64)
    peak = [0.0]
    batchnorm = effnet_ref.batchnorm

    def observed(*a, **kw):  # the reference unchanged; only its activation scale recorded
        y = batchnorm(*a, **kw)
        peak[0] = max(peak[0], float(np.abs(y).max()))
        return y

    effnet_ref.batchnorm = observed
    try:
        want = effnet_ref.embed(sd, arch, x)
    finally:
        effnet_ref.batchnorm = batchnorm
    diff = float(np.abs(got - want).max()) if np.all(np.isfinite(got)) else float("inf")
    scale = float(np.abs(want).max())
    cos = float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-300)) if np.isfinite(diff) else float("nan")
    passed = diff <= VERIFY_REL_TOL * scale and cos >= VERIFY_MIN_COSINE
    return {"diff": diff, "scale": scale, "cosine": cos, "peak": peak[0], "passed": passed}


def export(args):
    t0 = time.time()
    if not os.path.isfile(args.ckpt):
        fail(f"--ckpt {args.ckpt}: no such file")
    if args.verify_photo and not os.path.isfile(args.verify_photo):
        fail(f"--verify-photo {args.verify_photo}: no such file")
    photo = args.verify_photo or VERIFY_PHOTO
    if args.verify and not os.path.isfile(photo):
        fail(f"--verify: its default photo {photo} is missing (run the exporter from a whaled checkout); "
             "pass any photo of a whale with --verify-photo")
    x = verify_input(photo) if args.verify else None
    out = Staging(args.out)
    try:
        export_into(args, out, t0, photo, x)
    finally:
        out.cleanup()


def export_into(args, out, t0, photo, x):
    expected_backbone = timm_keys()
    ids = read_classes(args.classes)
    sd, hp = read_checkpoint(args.ckpt)
    t_load = time.time() - t0
    sd, wrappers = strip_wrappers(sd)
    arch, why = choose_arch(args.arch, hp)
    check_architecture(sd, expected_backbone)
    dim, rows = account_keys(sd, expected_backbone)
    active = args.active_slots
    if not 0 < active <= rows:
        fail(f"--active-slots {active}: must be between 1 and the {rows} rows of arc.weight")
    check_classes(args.classes, ids, rows)
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
    names = ("embedder.onnx", "head.npy", "encoder_classes.npy", "species_map.csv", "model.toml")
    paths = {n: out.path(n) for n in names}
    try:
        onnx.save(model, paths["embedder.onnx"])
        np.save(paths["head.npy"], head)
        shutil.copyfile(args.classes, paths["encoder_classes.npy"])
        shutil.copyfile(args.species, paths["species_map.csv"])
        shas = {n: sha256(p) for n, p in paths.items() if n != "model.toml"}
        with open(paths["model.toml"], "w") as f:
            f.write(MANIFEST.format(ckpt=os.path.basename(args.ckpt), arch=arch, name=args.name,
                                    features=FEATURES, dim=dim, size=SIZE, active=active,
                                    onnx_sha=shas["embedder.onnx"], head_sha=shas["head.npy"],
                                    labels_sha=shas["encoder_classes.npy"], species_sha=shas["species_map.csv"]))
    except OSError as e:
        fail(f"--out {args.out}: writing the export failed: {e.strerror or e}")

    # Learnable parameters only, as timm counts them (BatchNorm running statistics are buffers).
    backbone = [(k, v) for k, v in sd.items() if k.startswith("model.")]
    n_learn = sum(v.size for k, v in backbone if not k.endswith(BN_STATS))
    n_stats = sum(v.size for k, v in backbone if k.endswith(("running_mean", "running_var")))
    print(f"checkpoint      {args.ckpt} (read in {t_load:.1f} s; {len(sd)} keys, all used: "
          f"{sum(k.endswith('num_batches_tracked') for k in sd)} of them num_batches_tracked, deliberately ignored)")
    if wrappers:
        print(f"wrapper         keys saved under {' and '.join(repr(w) for w in wrappers)} (DataParallel / "
              "DistributedDataParallel / torch.compile): prefix removed")
    print(f"architecture    {arch}  [{why}]  padding {ARCHES[arch][0]}, BatchNorm eps {ARCHES[arch][1]:g}")
    print(f"parameters      backbone {n_learn:,} learnable (+ {n_stats:,} BatchNorm running statistics), "
          f"embedding {sd['embedding.weight'].size + sd['embedding.bias'].size:,}, "
          f"arc.weight {rows:,} x {dim} ({active:,} active slots)")
    if args.verify:
        v = verify(paths["embedder.onnx"], sd, arch, x)
        line = (f"max |diff| {v['diff']:.2e} = {v['diff'] / max(v['scale'], 1e-300):.1e} x the largest "
                f"|value| {v['scale']:.3f}, cosine {v['cosine']:.8f}; peak activation {v['peak']:.3g}")
        print(f"verify          onnxruntime vs numpy float64 reference (tools/effnet_ref.py) on "
              f"{os.path.basename(photo)}: {line}: {'passed' if v['passed'] else 'FAILED'}")
        if not v["passed"]:
            hint = (f"; activations reach {v['peak']:.3g} on this photo, where float32 cannot follow float64 (a "
                    "trained B4 stays below ~40 on photos): if the weights are right, try another photo of a "
                    "whale with --verify-photo" if v["peak"] > 1e3 else "")
            fail(f"--verify: the exported ONNX disagrees with the numpy reference on {photo} ({line}; needed "
                 f"max |diff| <= {VERIFY_REL_TOL:g} x the largest |value| and cosine >= {VERIFY_MIN_COSINE}){hint}. "
                 f"Nothing was written to {args.out}")
    out.commit()
    for n in names[:-1]:
        print(f"sha256          {shas[n]}  {n} ({os.path.getsize(os.path.join(out.out, n)):,} bytes)")
    print(f"manifest        {os.path.join(args.out, 'model.toml')} (name/model_version {args.name!r})")
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
    ap.add_argument("--verify", action="store_true",
                    help="compare the ONNX with tools/effnet_ref.py on a photo (needs onnxruntime + pillow)")
    ap.add_argument("--verify-photo", metavar="PHOTO",
                    help=f"the photo --verify uses (implies --verify; default {os.path.relpath(VERIFY_PHOTO)})")
    args = ap.parse_args(argv)
    args.verify = args.verify or bool(args.verify_photo)
    try:
        export(args)
    except UserError as e:
        print(f"export_upstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export_upstream: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
