#!/usr/bin/env bash
# Gallery search vs the embedder, one core, one run: the median time to find each individual's nearest
# photo among N rows (512-d, 20,000 individuals, random unit vectors: the search does the same work
# whatever the vectors), beside the B4 512x512 embedder's median inference on tract and onnxruntime
# (1 thread). The gallery query must be a small fraction of the embedder (issue 12: "well under").
# Usage: bench/gallery.sh   (builds release with the onnxruntime feature first)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features onnxruntime --quiet
python3 tools/gen_test_models.py --out models/generated --only b4 >/dev/null
ort=${ORT_DYLIB_PATH:-$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')}
bin=$PWD/target/release/whaled
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
for rows in 13837 100000; do
    taskset -c 0 "$bin" --log-level warn gallery bench --rows "$rows" --runs 50
done
for backend in tract onnxruntime; do
    taskset -c 0 "$bin" --log-level warn bench --model models/generated/effb4-arcface-random/model.toml \
        --backend "$backend" --ort-library "$ort" --threads 1 --runs 10 | tr ' ' '\n' | grep -E '^(model|backend|inference_median_ms)=' | paste -sd' '
done
