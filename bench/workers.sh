#!/usr/bin/env bash
# Pipeline throughput with 1 and 2 inference workers, two replay cameras, on each backend: what a second
# worker buys (docs/BENCHMARKS.md). Every frame passes the pre-filter (threshold 0) and goes through the
# generated B4 ArcFace embedder at 512x512, so the models dominate; intra-op threads = 1, so two workers
# can use two cores. The cameras replay tests/photos as fast as they are taken (the mailbox keeps the
# freshest frame of each), for SECONDS_PER_RUN seconds (default 60); the figure is identified frames per
# second between the second and the last per-camera stats line (every 5 s), so loading is excluded.
# Usage: bench/workers.sh   (builds release with the onnxruntime feature first)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features onnxruntime --quiet
python3 tools/gen_test_models.py --out models/generated >/dev/null
ort=${ORT_DYLIB_PATH:-$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')}
bin=$PWD/target/release/whaled
duration=${SECONDS_PER_RUN:-60}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() { # backend workers -> identified frames per second
    local backend=$1 workers=$2 cfg=$work/whaled-$1-$2.toml
    cat > "$cfg" <<TOML
[inference]
backend = "$backend"
threads = 1
[inference.onnxruntime]
library = "$ort"
[prefilter]
threshold = 0.0
[identification]
model = "$PWD/models/generated/effb4-arcface-random/model.toml"
[pipeline]
workers = $workers
stats_interval = "5s"
[[camera]]
name = "port"
kind = "replay"
path = "$PWD/tests/photos"
fps = 1000
loop = true
[[camera]]
name = "starboard"
kind = "replay"
path = "$PWD/tests/photos"
fps = 1000
loop = true
TOML
    "$bin" --log-level info run --config "$cfg" > /dev/null 2> "$work/log" &
    local pid=$!
    sleep "$duration"
    kill -TERM $pid
    wait $pid || true
    # Identified frames per second between the second stats tick (models loaded, warm) and the last.
    python3 - "$work/log" <<'PY'
import json, sys
from datetime import datetime
ticks = {}
for line in open(sys.argv[1]):
    if "whaled::pipeline] stats " in line:
        t = datetime.fromisoformat(line[1:25].replace("Z", "+00:00")).timestamp()
        s = json.loads(line.split("] stats ", 1)[1])
        ticks.setdefault(s["camera"], []).append((t, s["identified"]))
rate = 0.0
for cam, v in ticks.items():
    (t0, n0), (t1, n1) = v[1], v[-1]
    rate += (n1 - n0) / (t1 - t0)
print(f"{rate:.2f}")
PY
}

echo "| backend | workers | identified frames / s (two cameras) | 2 workers / 1 worker |"
echo "|---|---|---|---|"
for backend in onnxruntime tract; do
    one=
    for workers in 1 2; do
        rate=$(run "$backend" "$workers")
        if [ -z "$one" ]; then one=$rate; ratio=-; else ratio=$(python3 -c "print(f'{$rate/$one:.2f}x')"); fi
        echo "| $backend | $workers | $rate | $ratio |"
    done
done
