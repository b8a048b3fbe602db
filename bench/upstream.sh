#!/usr/bin/env bash
# whaled against the upstream's own per-image path, side by side in one run (issue 23's first goal):
# `whaled identify` (the shipped marine gate + the B4 ArcFace identifier, tract and onnxruntime) vs
# PyTorch + timm (tools/upstream_path.py: Pillow decode and resize, efficientnet_b4, head, softmax),
# both on one core, on the same Lightning checkpoint and the same 12 whales-dev photos.
#
# The checkpoint is tools/make_synthetic_ckpt.py's stand-in (the upstream's exact key set and shapes,
# 15,587 arc rows; random weights calibrated like trained BatchNorm statistics; rows planted so each
# photo has a real top-5), exported by tools/export_upstream.py as the README says. The gate runs at
# threshold 0 so every photo goes through both models. Each side runs as its own process, timed from
# outside (wall clock, peak RSS from wait4), with 12 photos and with 1: per photo = (T12 - T1) / 11,
# first result = T1 (start-up and model loading included); "in process" is the median of each photo's
# own time, file to answer, as each side reports it. Median of RUNS (default 3) runs each. The
# top-1 identities of the two paths are compared (they must agree: the same weights, Pillow's pixels).
#
# Usage: bench/upstream.sh
#   TORCH_PYTHON=/path/to/python   a python with torch + timm (else a throwaway venv is made and torch,
#                                  timm 1.0.31 and pillow are installed into it: a large download)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features onnxruntime --quiet
ort=${ORT_DYLIB_PATH:-$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
torch_py=${TORCH_PYTHON:-}
if [ -z "$torch_py" ]; then
    echo "== a throwaway venv with torch + timm (set TORCH_PYTHON to reuse one)"
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install --quiet torch timm==1.0.31 pillow numpy
    torch_py=$work/venv/bin/python
fi
"$torch_py" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")'

photos=$(python3 - <<'PY'
import csv
rows = [r for r in csv.DictReader(open("../shared/data/whales-dev/manifest.csv")) if r["label"] == "cetacean"]
print(" ".join(f"../shared/data/whales-dev/{r['relpath']}" for r in rows[:12]))
PY
)
echo "== the stand-in checkpoint and its export"
# shellcheck disable=SC2086
python3 tools/make_synthetic_ckpt.py --out "$work/synth" --photos $photos >/dev/null
python3 tools/export_upstream.py --ckpt "$work/synth/efficientnet_b4_512_fold0.ckpt" --classes "$work/synth/encoder_classes.npy" \
    --species "$work/synth/species_map.csv" --out "$work/model" >/dev/null
for backend in tract onnxruntime; do
    cat > "$work/$backend.toml" <<TOML
[inference]
backend = "$backend"
threads = 1
[inference.onnxruntime]
library = "$ort"
[prefilter]
threshold = 0.0
[identification]
model = "$work/model/model.toml"
TOML
done

echo "== $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(date -u +%FT%TZ); $(python3 -c 'import PIL; print("Pillow", PIL.__version__)') here, $("$torch_py" -c 'import PIL; print("Pillow", PIL.__version__)') in the torch venv"
# shellcheck disable=SC2086
python3 - "$torch_py" "$work" "${RUNS:-3}" $photos <<'PY'
import json, os, statistics, subprocess, sys, time
torch_py, work, runs, photos = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
whaled = os.path.abspath("target/release/whaled")
sides = {
    "PyTorch + timm (upstream path)": lambda ps: [torch_py, "tools/upstream_path.py", "--ckpt",
        f"{work}/synth/efficientnet_b4_512_fold0.ckpt", "--classes", f"{work}/synth/encoder_classes.npy", *ps],
    "whaled identify, tract": lambda ps: [whaled, "identify", "--log-level", "warn", "--config", f"{work}/tract.toml", *ps],
    "whaled identify, onnxruntime": lambda ps: [whaled, "identify", "--log-level", "warn", "--config", f"{work}/onnxruntime.toml", *ps],
}
env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAYON_NUM_THREADS="1")

def measured(cmd):
    """wall seconds, peak RSS in MB (this child alone), stdout"""
    t = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, env, file_actions=[(os.POSIX_SPAWN_OPEN, 1, f"{work}/out.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
                                                         (os.POSIX_SPAWN_OPEN, 2, f"{work}/err.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)])
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        sys.exit(f"{cmd[0]} failed ({status}): {open(f'{work}/err.txt').read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, open(f"{work}/out.txt").read()

results, tops = {}, {}
for name, make in sides.items():
    t12, t1, rss, inside = [], [], [], []
    for _ in range(runs):
        w, r, out = measured(make(photos))
        t12.append(w); rss.append(r)
        lines = [json.loads(l) for l in out.splitlines() if l.strip()]
        # In process: each photo's time from opening the file to the answer (whaled: timings.total_ms).
        inside += [l["ms"] if "ms" in l else l["timings"]["total_ms"] for l in lines]
        w, _, _ = measured(make(photos[:1]))
        t1.append(w)
    a, b = statistics.median(t12), statistics.median(t1)
    results[name] = ((a - b) / (len(photos) - 1) * 1000, statistics.median(inside), b, max(rss))
    if name.startswith("PyTorch"):
        tops[name] = [(l["top5"][0][0], l["top5"][0][1]) for l in lines]
    else:  # the Detection JSON: class_animal is the individual, probability its (4 dp) softmax
        tops[name] = [(l["class_animal"], l["probability"]) for l in lines]

base = results["PyTorch + timm (upstream path)"]
print(f"{'path':34} {'ms/photo':>9} {'vs PyTorch':>11} {'in process':>11} {'vs PyTorch':>11} {'first result':>13} {'peak RSS':>9} {'of PyTorch':>11}")
for name, (ms, inside, first, rss) in results.items():
    print(f"{name:34} {ms:9.1f} {base[0] / ms:10.2f}x {inside:10.1f} {base[1] / inside:10.2f}x {first:12.2f}s {rss:7.0f}MB {rss / base[3]:10.2f}")
ref_name = "PyTorch + timm (upstream path)"
ref = tops[ref_name]
for name, t in tops.items():
    if name in ref_name:
        continue
    same = sum(x[0] == y[0] for x, y in zip(t, ref))
    dp = max(abs(x[1] - y[1]) for x, y in zip(t, ref))
    print(f"{name}: top-1 individual equal to PyTorch's on {same}/{len(ref)} photos, max |p - p_torch| {dp:.4f} (4 dp)")
PY
