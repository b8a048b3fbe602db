#!/usr/bin/env bash
# tract before/after whaled's changes to its backend, one run, same frames, the seed's protocol (10
# warm-up, RUNS timed, p50): tract as it comes (WHALED_TRACT_STOCK=1), + the allocator setting alone
# (glibc's own tunables, set to what whaled's mallopt sets), + whaled's own ops (the default: the
# depthwise and 1x1 convolution ops, inferences run on tract's pool), and onnxruntime beside them. Prints a Markdown table; docs/BENCHMARKS.md has its output.
# Usage: bench/tract_steps.sh [RUNS]   (RUNS default 100; the B4 uses RUNS/5, at least 10)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-100}
cargo build --release --features onnxruntime --quiet
python3 tools/gen_test_models.py --out models/generated >/dev/null
ort=${ORT_DYLIB_PATH:-$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')}
bin=$PWD/target/release/whaled
p50() { python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["inference_ms"]["p50"])'; }
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%FT%RZ); runs=$runs"
echo
echo "| model | threads | tract stock p50 ms | + allocator | + whaled's ops (whaled default) | onnxruntime p50 ms | stock / ort | whaled / ort |"
echo "|---|---|---|---|---|---|---|---|"
for spec in efficientnet-lite0:fp32 marine-gate-lite0:fp32 models/generated/efficientnet-b0-random/model.toml:fp32 \
            models/generated/effb4-arcface-random/model.toml:fp32; do
    model=${spec%:*}; variant=${spec##*:}
    n=$runs; case $model in *effb4*) n=$(( runs / 5 > 10 ? runs / 5 : 10 )) ;; esac
    for threads in 1 2; do
        b() { "$bin" --log-level error bench --model "$model" --variant "$variant" --threads "$threads" --runs "$n" --warmup 10 --json "$@" | p50; }
        stock=$(WHALED_TRACT_STOCK=1 b --backend tract)
        alloc=$(WHALED_TRACT_STOCK=1 MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=536870912 b --backend tract)
        ours=$(b --backend tract)
        o=$(b --backend onnxruntime --ort-library "$ort")
        name=$(basename "$(dirname "$model")"); case $model in *.toml) ;; *) name=$model ;; esac
        python3 -c "s,a,w,o=$stock,$alloc,$ours,$o; print(f'| $name | $threads | {s} | {a} | {w} | {o} | {s/o:.2f}x | **{w/o:.2f}x** |')"
    done
done
