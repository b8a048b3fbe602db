#!/usr/bin/env bash
# What a network camera costs (docs/BENCHMARKS.md): whaled's CPU on one 1080p30 H.264 RTSP stream with
# software decoding (avdec_h264), at sample_fps 1 and 5, against the same footage as an MJPEG replay
# (what a V4L2 MJPEG camera or an ffmpeg-to-MJPEG bridge would hand whaled), and the decoder alone at
# real time (gst-launch-1.0 ... ! avdec_h264 ! fakesink sync=true: what a hardware decoder removes).
#
# The footage: whales-dev photos at 1920x1080, a different photo every frame, H.264 CBR 6 Mbit/s, no
# B-frames, a key frame every 2 s: every frame a scene change at a typical IP camera's bitrate, a
# pessimistic proxy for sea footage. Served by tests/rtsp/server.py --clip (gst-rtsp-server, no
# re-encoding). The shipped marine gate runs on every sampled frame on tract with 1 thread; no
# identification model. CPU = (utime + stime) of the whaled process over SECONDS_PER_RUN (default 30)
# after a 6 s warm-up, in % of one core.
# Usage: bench/rtsp.sh   (needs tools/system-packages.sh test and gstreamer1.0-tools; builds release)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features gstreamer --quiet
command -v gst-launch-1.0 >/dev/null || { echo "bench/rtsp.sh: needs gst-launch-1.0 (apt-get install gstreamer1.0-tools)" >&2; exit 1; }
bin=$PWD/target/release/whaled
duration=${SECONDS_PER_RUN:-30}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
tick=$(getconf CLK_TCK)

echo "== footage: $((duration + 15)) s of 1080p30 H.264 from whales-dev photos"
python3 - "$work/photos" <<'PY'
import csv, os, sys
from PIL import Image
out = sys.argv[1]
os.makedirs(out)
root = "../shared/data/whales-dev"
rows = list(csv.DictReader(open(f"{root}/manifest.csv")))
for i, r in enumerate(rows[:100]):
    Image.open(f"{root}/{r['relpath']}").convert("RGB").resize((1920, 1080), Image.BILINEAR).save(f"{out}/{i:03d}.jpg", quality=92)
PY
frames=$(( (duration + 15) * 30 ))
gst-launch-1.0 -q multifilesrc location="$work/photos/%03d.jpg" loop=true num-buffers=$frames caps=image/jpeg,framerate=30/1 \
    ! jpegdec ! videoconvert ! video/x-raw,format=I420 \
    ! x264enc bitrate=6000 pass=cbr speed-preset=veryfast bframes=0 key-int-max=60 \
    ! video/x-h264,profile=main ! h264parse ! mp4mux ! filesink location="$work/clip.mp4"
gst-launch-1.0 -q filesrc location="$work/clip.mp4" ! qtdemux ! h264parse ! avdec_h264 ! jpegenc quality=85 \
    ! filesink location="$work/clip.mjpeg"
ls -l "$work/clip.mp4" "$work/clip.mjpeg" | awk '{print "  " $5 " bytes  " $9}'

cpu_of() { # PID -> "utime+stime" in ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}
measure() { # PID -> % of one core over $duration s after a 6 s warm-up
    local pid=$1 a b
    sleep 6
    a=$(cpu_of "$pid")
    sleep "$duration"
    b=$(cpu_of "$pid")
    python3 -c "print(f'{($b - $a) / $tick / $duration * 100:.1f}')"
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rtsp_run() { # sample_fps -> CPU %
    /usr/bin/python3 tests/rtsp/server.py --port "$port" --clip "$work/clip.mp4" > "$work/server.out" 2>&1 &
    local server=$!
    pids+=("$server")
    until grep -q READY "$work/server.out"; do sleep 0.1; done
    cat > "$work/rtsp.toml" <<TOML
[inference]
threads = 1
[[camera]]
name = "ipcam"
kind = "rtsp"
url = "rtsp://127.0.0.1:$port/cam"
sample_fps = $1
TOML
    "$bin" run --config "$work/rtsp.toml" > /dev/null 2> "$work/rtsp-$1.log" &
    local pid=$!
    pids+=("$pid")
    measure "$pid"
    kill "$pid" "$server"; wait "$pid" "$server" 2>/dev/null || true
}
replay_run() { # sample_fps -> CPU %
    cat > "$work/replay.toml" <<TOML
[inference]
threads = 1
[[camera]]
name = "mjpeg"
kind = "replay"
path = "$work/clip.mjpeg"
fps = 30
sample_fps = $1
TOML
    "$bin" run --config "$work/replay.toml" > /dev/null 2> "$work/replay-$1.log" &
    local pid=$!
    pids+=("$pid")
    measure "$pid"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}
decoder_only() {
    gst-launch-1.0 -q filesrc location="$work/clip.mp4" ! qtdemux ! h264parse ! avdec_h264 ! fakesink sync=true &
    local pid=$!
    pids+=("$pid")
    measure "$pid"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

echo "== $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(date -u +%FT%TZ); ${duration} s per run"
printf '%-44s %s\n' "source" "whaled CPU, % of one core"
for fps in 1 5; do
    printf '%-44s %s\n' "rtsp 1080p30 H.264, avdec_h264, sample_fps $fps" "$(rtsp_run "$fps")"
    printf '%-44s %s\n' "replay 1080p30 MJPEG, sample_fps $fps" "$(replay_run "$fps")"
done
printf '%-44s %s\n' "avdec_h264 alone at 30 fps (gst-launch)" "$(decoder_only)"
