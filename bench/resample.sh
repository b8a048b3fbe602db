#!/usr/bin/env bash
# The price of Pillow's exact pixels for docs/BENCHMARKS.md: the upstream identifier's 512x512 stretch
# resize (bilinear) of a camera frame (1920x1080) and of a photographer's frame (4000x3000), made from a
# real whales-dev photo at run time (nothing third-party is committed), through `resampler = "pillow"`
# (src/resample.rs, on the full-size decode) and `resampler = "fast"` (fast_image_resize, with and
# without DCT scaling), beside the B4 embedder's inference (tract, 1 thread) and Pillow 13's own
# decode and resize of the same frames in the same run.
# Usage: bench/resample.sh [PHOTO]   (default: the first whales-dev positive)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-30}
photo=${1:-$(ls ../shared/data/whales-dev/positives/*.jpg | head -1)}
cargo build --release --quiet
python3 tools/gen_test_models.py --out models/generated >/dev/null
bin=target/release/whaled
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The generated B4 stand-in says resampler = "pillow"; a copy of its manifest says "fast".
b4=models/generated/effb4-arcface-random
mkdir -p "$work/fast"
sed 's/^resampler = "pillow"$/resampler = "fast"/' "$b4/model.toml" >"$work/fast/model.toml"
grep -q '^resampler = "fast"$' "$work/fast/model.toml"
ln -s "$PWD/$b4/effb4_arcface_512.onnx" "$work/fast/"

python3 - "$photo" "$work" <<'PY'
import sys
from PIL import Image
photo, out = sys.argv[1], sys.argv[2]
img = Image.open(photo).convert("RGB")
for w, h in ((1920, 1080), (4000, 3000)):
    s = max(w / img.width, h / img.height)
    big = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    l, t = (big.width - w) // 2, (big.height - h) // 2
    big.crop((l, t, l + w, t + h)).save(f"{out}/{w}x{h}.jpg", quality=90)
PY

pillow() { # frame -> "decode_ms resize_ms": Pillow's own, medians
python3 - "$1" "$runs" <<'PY'
import io, sys, time, statistics
from PIL import Image
path, runs = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
def decode():
    im = Image.open(io.BytesIO(data)); im.load(); return im.convert("RGB")
im = decode()
td, tr = [], []
for _ in range(runs):
    t0 = time.perf_counter(); decode(); td.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter(); im.resize((512, 512), Image.BILINEAR); tr.append((time.perf_counter() - t0) * 1e3)
print(f"{statistics.median(td):.2f} {statistics.median(tr):.2f}")
PY
}

field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }
echo "| frame | B4 inference ms | full decode ms | pillow resize ms | % of inference | fast resize ms (full decode) | fast: DCT scale, decode + resize ms | Pillow 13: decode ms, resize ms |"
echo "|---|---|---|---|---|---|---|---|"
for frame in 1920x1080 4000x3000; do
    p=$($bin bench --log-level warn --model "$b4/model.toml" --backend tract --threads 1 --image "$work/$frame.jpg" --runs "$runs")
    f=$($bin bench --log-level warn --model "$work/fast/model.toml" --backend tract --threads 1 --image "$work/$frame.jpg" --runs "$runs")
    read -r pd pr <<<"$(pillow "$work/$frame.jpg")"
    inf=$(echo "$p" | field inference_median_ms)
    pre=$(echo "$p" | field preprocess_full_ms)
    pct=$(python3 -c "print(f'{100 * $pre / $inf:.1f}')")
    echo "| $frame | $inf | $(echo "$p" | field decode_full_ms) | $pre | $pct % | $(echo "$f" | field preprocess_full_ms) \
| $(echo "$f" | field dct_scale): $(echo "$f" | field decode_scaled_ms) + $(echo "$f" | field preprocess_scaled_ms) | $pd, $pr |"
done
