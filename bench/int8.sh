#!/usr/bin/env bash
# int8 on tract (issue 23): the shipped marine gate's int8 variant and an int8 identification model,
# each against its fp32 file, on both backends, one session. The identification model is the exporter's
# stand-in for the upstream checkpoint (tools/make_synthetic_ckpt.py: the upstream's key set and
# shapes, calibrated random weights, rows planted for 12 whales-dev photos), exported by
# tools/export_upstream.py and quantized by tools/quantize_model.py --set whales; quality is the
# int8 embedding's cosine to the fp32 one and the identification top-1 on the 54 whales-dev cetaceans
# (examples/int8_embedding.rs). Figures: docs/BENCHMARKS.md, "int8 on tract".
#
#     bench/int8.sh [RUNS]      (default 50 for the gate; the identification model runs RUNS / 10)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-50}
cargo build --release --features onnxruntime --quiet --example int8_embedding
cargo build --release --features onnxruntime --quiet
ort=${ORT_DYLIB_PATH:-$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')}
export ORT_DYLIB_PATH=$ort
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
photos=$(python3 -c "
import csv
rows = [r for r in csv.DictReader(open('../shared/data/whales-dev/manifest.csv')) if r['label'] == 'cetacean']
print(' '.join('../shared/data/whales-dev/' + r['relpath'] for r in rows))")
echo "== the stand-in checkpoint, its export and its int8 variant"
python3 tools/make_synthetic_ckpt.py --out "$work/synth" --photos $(echo "$photos" | tr ' ' '\n' | head -12) >/dev/null
python3 tools/export_upstream.py --ckpt "$work/synth/efficientnet_b4_512_fold0.ckpt" --classes "$work/synth/encoder_classes.npy" \
    --species "$work/synth/species_map.csv" --out "$work/model" >/dev/null
python3 tools/quantize_model.py --model "$work/model/model.toml" --set whales 2>&1 | grep -v -i warning
echo "== quality: int8 against fp32 on the 54 whales-dev cetaceans"
target/release/examples/int8_embedding "$work/model/model.toml" $photos
echo
echo "== speed: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(date -u +%FT%TZ); 1 thread"
echo
echo "| model | variant | tract p50 ms | onnxruntime p50 ms | tract / onnxruntime |"
echo "|---|---|---|---|---|"
for spec in models/marine-gate-v2/model.toml:fp32:$runs models/marine-gate-v2/model.toml:int8:$runs \
            "$work/model/model.toml:fp32:$((runs / 10 + 2))" "$work/model/model.toml:int8:$((runs / 10 + 2))"; do
    IFS=: read -r model variant n <<<"$spec"
    t=$(target/release/whaled --log-level error bench --model "$model" --variant "$variant" --backend tract --threads 1 --runs "$n" --warmup 3 --json)
    o=$(target/release/whaled --log-level error bench --model "$model" --variant "$variant" --backend onnxruntime --ort-library "$ort" --threads 1 --runs "$n" --warmup 3 --json)
    python3 - "$t" "$o" <<'PY'
import json, sys
t, o = json.loads(sys.argv[1]), json.loads(sys.argv[2])
a, b = t["inference_ms"]["p50"], o["inference_ms"]["p50"]
print(f'| {t["model"]} | {t["variant"]} | {a:.2f} | {b:.2f} | {a / b:.2f}x |')
PY
done
