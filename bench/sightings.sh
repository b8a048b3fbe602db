#!/usr/bin/env bash
# Messages and bytes over the link for a replayed 30-minute survey, per-frame detections vs sightings
# (docs/BENCHMARKS.md). The survey: 2 frames/s for 30 min (3,600 frames, 640x360 JPEG) of sea scenes
# (whales-dev negatives) with 4 encounters of 40, 60, 30 and 90 s (whales-dev/whales-extra positives,
# each with a 2 s dip of scenes inside it), replayed 8x faster with the recording's own timestamps
# (`speed = 8`), through the default gate and a gallery-only Lite0 embedder with 20 individuals
# (12-hex ids, as Happywhale's), 2 workers, to a local mosquitto; a subscriber counts what arrives.
# Needs mosquitto and mosquitto-clients (mosquitto_sub). Usage: bench/sightings.sh   (builds release first)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features onnxruntime --quiet
bin=$PWD/target/release/whaled
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import csv, os, random, sys
from PIL import Image
work = sys.argv[1]
data = "../shared/data"
rows = list(csv.DictReader(open(f"{data}/whales-dev/manifest.csv")))
whales = [f"{data}/whales-dev/{r['relpath']}" for r in rows if r["label"] == "cetacean"]
whales += sorted(os.path.join(f"{data}/whales-extra", f) for f in os.listdir(f"{data}/whales-extra") if f.endswith(".jpg"))[:40]
scenes = [f"{data}/whales-dev/{r['relpath']}" for r in rows if r["label"] == "non_cetacean"]
pool = os.path.join(work, "pool"); os.makedirs(pool)
def small(src, name):
    out = os.path.join(pool, name)
    Image.open(src).convert("RGB").resize((640, 360), Image.BILINEAR).save(out, quality=85)
    return out
W = [small(p, f"w{i}.jpg") for i, p in enumerate(whales)]
S = [small(p, f"s{i}.jpg") for i, p in enumerate(scenes)]
rng = random.Random(7)
# The gallery: 20 individuals, one photo each, from the whale pool.
cat = os.path.join(work, "catalogue")
for i, p in enumerate(W[:20]):
    d = os.path.join(cat, "%012x" % rng.getrandbits(48)); os.makedirs(d); os.link(p, os.path.join(d, "a.jpg"))
seq = ["s"] * 3600
for start, secs in ((150, 40), (600, 60), (1000, 30), (1500, 90)):
    for k in range(start * 2, (start + secs) * 2):
        seq[k] = "w"
    mid = (start + secs // 2) * 2
    for k in range(mid, mid + 4):
        seq[k] = "s"
cam = os.path.join(work, "survey"); os.makedirs(cam)
for i, kind in enumerate(seq):
    src = rng.choice(W if kind == "w" else S)
    os.link(src, os.path.join(cam, f"{i:05d}.jpg"))
print(f"survey: {len(seq)} frames, {seq.count('w')} whale frames in 4 encounters")
PY
cat > "$work/embedder.toml" <<TOML
name = "lite0-embedder"
role = "embedder"
license = "Apache-2.0"
[[variants]]
name = "fp32"
file = "$PWD/models/efficientnet-lite0/efficientnet_lite0_fp32.onnx"
[input]
name = "input"
width = 224
height = 224
layout = "nchw"
resize = "stretch"
interpolation = "bilinear"
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
[output]
name = "logits"
kind = "embedding"
dim = 1000
[embedder]
scale = 30.0
top_k = 5
min_confidence = 0.0
model_version = "lite0-embedder"
TOML
printf '[identification]\nmodel = "%s"\n' "$work/embedder.toml" > "$work/build.toml"
"$bin" --log-level warn gallery build --config "$work/build.toml" --out "$work/g.wgal" "$work/catalogue" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
sleep 1
for mode in detections sightings; do
    rm -rf "$work/outbox-$mode"
    cat > "$work/run-$mode.toml" <<TOML
device_id = "vessel-01"
[identification]
model = "$work/embedder.toml"
gallery = "$work/g.wgal"
[[camera]]
name = "bow"
kind = "replay"
path = "$work/survey"
fps = 2
speed = ${SPEED:-8}
loop = false
[pipeline]
workers = 2
[sightings]
publish = "$mode"
[mqtt]
host = "127.0.0.1"
port = $port
[mqtt.outbox]
dir = "$work/outbox-$mode"
TOML
    mosquitto_sub -h 127.0.0.1 -p "$port" -q 1 -t 'whaled/vessel-01/#' -v > "$work/link-$mode.txt" &
    sub=$!
    sleep 0.5
    "$bin" --log-level info run --config "$work/run-$mode.toml" > /dev/null 2> "$work/log-$mode.txt"
    sleep 3
    kill "$sub"
    python3 - "$work/link-$mode.txt" "$mode" "$work/log-$mode.txt" <<'PY'
import json, re, sys
path, mode, log = sys.argv[1:4]
kinds = {}
phases = {}
sightings = set()
for line in open(path, encoding="utf-8", errors="replace"):
    topic, _, payload = line.rstrip("\n").partition(" ")
    kind = topic.rsplit("/", 1)[-1]
    if kind not in ("detection", "sighting"):
        continue
    # On the wire: PUBLISH fixed header (2) + topic length (2) + topic + packet id (2) + payload.
    if kind == "sighting":
        e = json.loads(payload)
        sightings.add(e["sighting_id"])
        phases[e["event"]] = phases.get(e["event"], 0) + 1
    n, b = kinds.get(kind, (0, 0))
    kinds[kind] = (n + 1, b + 6 + len(topic.encode()) + len(payload.encode()))
msgs = sum(v[0] for v in kinds.values()); total = sum(v[1] for v in kinds.values())
text = open(log).read()
drops = re.findall(r'"frames_dropped":(\d+)', text)
discarded = re.findall(r'"sightings_discarded":(\d+)', text)
print(f"publish={mode}: {kinds} -> {msgs} messages, {total} bytes in 30 min = {msgs*2} messages/h, {total*2/1e6:.3f} MB/h; "
      f"per encounter (4) {msgs/4:.1f} messages, {total/4/1e3:.1f} kB; frames_dropped={drops[-1] if drops else '?'}; "
      f"sightings {len(sightings)} {phases}, one-frame sightings discarded {discarded[-1] if discarded else '?'}")
PY
done
