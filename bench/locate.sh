#!/usr/bin/env bash
# The price of `[prefilter] locate = "gate_map"` for docs/BENCHMARKS.md (issue 21 part 3, evidence (d)):
# `whaled identify` on 1920x1080 JPEG frames (evidence (a)'s composites, written at run time from
# ../shared/data by tools/localise_eval.py --write: a whale pasted at 400 px into a sea photo) with every
# frame passed (threshold 0), on tract and onnxruntime, 1 thread: the medians of the Detection's
# `timings` (decode, gate, locate) with the map at a longer side of 640, 960 and 1280 and without it.
# Usage: bench/locate.sh [FRAMES]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
cargo build --release --quiet --features onnxruntime --bin whaled
bin=target/release/whaled
ort=$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 tools/localise_eval.py --data ../shared/data --write "$work/comp" >/dev/null
mapfile -t frames < <(ls "$work"/comp/*-400.jpg | head -"$n")
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; ${#frames[@]} frames 1920x1080"
echo "| backend | locate | decode ms | gate ms | locate ms | total ms |"
echo "|---|---|---|---|---|---|"
for backend in tract onnxruntime; do
    for long in frame 640 960 1280; do
        cfg="$work/$backend-$long.toml"
        printf '[inference]\nbackend = "%s"\nthreads = 1\n[inference.onnxruntime]\nlibrary = "%s"\n[prefilter]\nthreshold = 0.0\n' \
            "$backend" "$ort" >"$cfg"
        if [ "$long" != frame ]; then printf 'locate = "gate_map"\nlocate_long_side = %s\n' "$long" >>"$cfg"; fi
        "$bin" identify --config "$cfg" "${frames[@]}" 2>/dev/null | python3 -c '
import json, statistics, sys
t = [json.loads(l)["timings"] for l in sys.stdin]
m = lambda k: statistics.median(x[k] for x in t)
cols = " | ".join("%.1f" % m(k) for k in ("decode_ms", "prefilter_ms", "locate_ms", "total_ms"))
print("| %s | %s | %s |" % (sys.argv[1], sys.argv[2], cols))
' "$backend" "$long"
    done
done
