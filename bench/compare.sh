#!/usr/bin/env bash
# tract vs onnxruntime, side by side in one run, on every model the product ships or tests, at 1 and 2
# intra-op threads, with the seed's protocol (batch 1, 10 warm-up runs, 100 timed runs, mean ± std,
# p50/p95; load and optimise time apart): `whaled bench --json` for both backends, and onnxruntime's own
# Python API on the same input shape as the outside reference. Prints a Markdown table.
# Usage: bench/compare.sh [RUNS]   (builds release with the onnxruntime feature first; RUNS default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-100}
cargo build --release --features onnxruntime --quiet
python3 tools/gen_test_models.py --out models/generated >/dev/null
ort=${ORT_DYLIB_PATH:-$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')}
bin=$PWD/target/release/whaled
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%FT%RZ); runs=$runs"
echo
echo "| model | variant | threads | tract p50 ms (mean ± std, p95) | onnxruntime p50 ms (mean ± std, p95) | tract / onnxruntime | onnxruntime Python API p50 ms | tract load: parse + optimise ms | onnxruntime session ms |"
echo "|---|---|---|---|---|---|---|---|---|"
for spec in efficientnet-lite0:fp32 efficientnet-lite0:int8 marine-gate-lite0:fp32 marine-gate-v2:fp32 marine-gate-v2:int8 \
            models/generated/efficientnet-b0-random/model.toml:fp32 models/generated/resnet18-random/model.toml:fp32 \
            models/generated/effb4-arcface-random/model.toml:fp32; do
    model=${spec%:*}; variant=${spec##*:}
    for threads in 1 2; do
        t=$("$bin" --log-level error bench --model "$model" --variant "$variant" --backend tract --threads "$threads" --runs "$runs" --warmup 10 --json)
        o=$("$bin" --log-level error bench --model "$model" --variant "$variant" --backend onnxruntime --ort-library "$ort" --threads "$threads" --runs "$runs" --warmup 10 --json)
        case $model in *.toml) man=$model ;; *) man=models/$model/model.toml ;; esac
        python3 - "$t" "$o" "$threads" "$runs" "$man" <<'PY'
import json, sys, time, tomllib, os
import numpy as np, onnxruntime as rt
t, o = json.loads(sys.argv[1]), json.loads(sys.argv[2])
threads, runs, man = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
# The same ONNX file through onnxruntime's Python API, from the manifest whaled loaded.
name = t["model"]
m = tomllib.load(open(man, "rb"))
f = next(v["file"] for v in m["variants"] if v["name"] == t["variant"])
so = rt.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
s = rt.InferenceSession(os.path.join(os.path.dirname(man), f), so, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
x = np.random.default_rng(0).standard_normal([1, 3, m["input"]["height"], m["input"]["width"]]).astype(np.float32)
for _ in range(10):
    s.run(None, {i.name: x})
ts = []
for _ in range(runs):
    a = time.perf_counter(); s.run(None, {i.name: x}); ts.append((time.perf_counter() - a) * 1e3)
py = float(np.median(ts))
ti, oi = t["inference_ms"], o["inference_ms"]
fmt = lambda d: f'{d["p50"]:.2f} ({d["mean"]:.2f} ± {d["std"]:.2f}, {d["p95"]:.2f})'
print(f'| {name} | {t["variant"]} | {threads} | {fmt(ti)} | {fmt(oi)} | **{ti["p50"] / oi["p50"]:.2f}x** | {py:.2f} | '
      f'{t["load_ms"]["parse"]:.0f} + {t["load_ms"]["optimise"]:.0f} | {o["load_ms"]["optimise"]:.0f} |')
PY
    done
done
