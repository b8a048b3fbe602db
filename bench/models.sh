#!/usr/bin/env bash
# Model latency matrix for docs/BENCHMARKS.md: every shipped and generated model, tract vs onnxruntime,
# 1 and 2 intra-op threads, median of 20 runs after 3 warm-ups on a synthetic 1920x1080 frame.
# Usage: bench/models.sh            (builds release with the onnxruntime feature first)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features onnxruntime --quiet
python3 tools/gen_test_models.py --out models/generated >/dev/null
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')}"
bin=target/release/whaled
runs=${RUNS:-20}

field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }

echo "| model | variant | threads | preprocess ms | tract ms | onnxruntime ms | tract / onnxruntime |"
echo "|---|---|---|---|---|---|---|"
for spec in efficientnet-lite0:fp32 efficientnet-lite0:int8 \
            models/generated/efficientnet-b0-random:fp32 models/generated/resnet18-random:fp32 \
            models/generated/effb4-arcface-random:fp32; do
    model=${spec%%:*}; variant=${spec##*:}
    for threads in 1 2; do
        t=$($bin bench --log-level warn --model "$model" --variant "$variant" --backend tract --threads "$threads" --runs "$runs")
        o=$($bin bench --log-level warn --model "$model" --variant "$variant" --backend onnxruntime --threads "$threads" --runs "$runs")
        tm=$(echo "$t" | field inference_median_ms); om=$(echo "$o" | field inference_median_ms)
        pm=$(echo "$t" | field preprocess_median_ms)
        name=$(echo "$t" | field model)
        ratio=$(python3 -c "print(f'{$tm/$om:.2f}x')")
        echo "| $name | $variant | $threads | $pm | $tm | $om | $ratio |"
    done
done
