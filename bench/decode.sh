#!/usr/bin/env bash
# Frame -> model input cost for docs/BENCHMARKS.md: a 1920x1080 MJPEG frame (4:2:2, quality 85, made
# from real photos in ../shared/data at run time; nothing third-party is committed) decoded and resized
# to the pre-filter's 224x224 and the identification model's 512x512, with and without libjpeg-turbo's
# DCT scaling, beside the bare model inference time (tract, 1 thread) and the upstream Python path
# (Pillow decode + resize + numpy normalise) timed on the same frames in the same run.
# Usage: bench/decode.sh [DATA_DIR]   (default ../shared/data/whales-dev)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/whales-dev}
runs=${RUNS:-30}
cargo build --release --quiet
python3 tools/gen_test_models.py --out models/generated >/dev/null
bin=target/release/whaled
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Two frames: the first positive and the first negative of the manifest, cover-resized to 1920x1080.
python3 - "$data" "$work" <<'PY'
import csv, sys
from PIL import Image
data, out = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(f"{data}/manifest.csv")))
for kind in ("cetacean", "negative"):
    row = next(r for r in rows if (r["label"] == "cetacean") == (kind == "cetacean"))
    img = Image.open(f"{data}/{row['relpath']}").convert("RGB")
    s = max(1920 / img.width, 1080 / img.height)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    l, t = (img.width - 1920) // 2, (img.height - 1080) // 2
    img.crop((l, t, l + 1920, t + 1080)).save(f"{out}/{kind}.jpg", quality=85, subsampling=1)
PY

upstream() { # size -> median ms of the Pillow/numpy path upstream runs (decode, resize, normalise)
python3 - "$1" "$2" "$runs" <<'PY'
import io, sys, time, statistics
sys.path.insert(0, "tools")
import preprocess_ref as ref
path, size, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jpeg = open(path, "rb").read()
f = (lambda b: ref.lite0(io.BytesIO(b))) if size == 224 else (lambda b: ref.stretch(io.BytesIO(b), size))
for _ in range(3): f(jpeg)
t = []
for _ in range(runs):
    t0 = time.perf_counter(); f(jpeg); t.append((time.perf_counter() - t0) * 1e3)
print(f"{statistics.median(t):.2f}")
PY
}

field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }
echo "| frame | model input | inference ms | full decode ms | + resize ms | overhead | DCT scale -> size | scaled decode ms | + resize ms | overhead | upstream Pillow path ms |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for kind in cetacean negative; do
    for spec in efficientnet-lite0:224 models/generated/effb4-arcface-random:512; do
        model=${spec%%:*}; size=${spec##*:}
        r=$($bin bench --log-level warn --model "$model" --backend tract --threads 1 --image "$work/$kind.jpg" --runs "$runs")
        up=$(upstream "$work/$kind.jpg" "$size")
        echo "| $kind 1920x1080 | ${size}x${size} ($(echo "$r" | field model)) | $(echo "$r" | field inference_median_ms) \
| $(echo "$r" | field decode_full_ms) | $(echo "$r" | field preprocess_full_ms) | $(echo "$r" | field overhead_full_pct) % \
| $(echo "$r" | field dct_scale) -> $(echo "$r" | field decoded) | $(echo "$r" | field decode_scaled_ms) \
| $(echo "$r" | field preprocess_scaled_ms) | $(echo "$r" | field overhead_scaled_pct) % | $up |"
    done
done
