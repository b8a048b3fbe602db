#!/usr/bin/env bash
# A fleet on one broker (issue 20, item 7; docs/BENCHMARKS.md): FLEET whaled processes (boat-01..), each
# with its own config, outbox and replay camera (whales-dev positives and negatives looping, every frame an
# event: `emit_rejected`, `[sightings] publish = "both"`), publishing to one mosquitto on loopback with
# persistence. During the run the broker is restarted twice (SIGTERM: it saves its sessions) and two
# daemons are SIGKILLed and restarted with the same config and outbox (the second while the broker is
# down, so it dies holding a backlog). A QoS 1 subscriber with a persistent session records everything.
# At the end every camera is paused (cmd/pause), the backlog drains, each daemon gets one SIGTERM (a
# second one makes whaled exit at once, without its clean shutdown); then: every event a daemon stored (printed on stdout, which whaled does only after the outbox append) must
# have arrived, and per device and camera the detections must arrive in capture order (first
# occurrences; duplicates are allowed, at-least-once, and counted), and every daemon's last status must
# be `stopped` (not its Last Will). CPU and memory of the broker and
# every daemon are sampled from /proc every SAMPLE seconds.
#
# Needs: mosquitto and mosquitto-clients (mosquitto_sub, mosquitto_pub) from Debian, python3 with Pillow,
# ../shared/data/whales-dev (falls back to tests/photos), a built whaled: target/release/whaled if it is
# newer than the sources, else target/debug/whaled (this script builds nothing; it waits up to
# WAIT_BINARY s for one to appear; WHALED=path overrides). Traffic stays on 127.0.0.1.
# Usage: [FLEET=20] [DURATION=240] [FPS=2] [SAMPLE=5] [BROKER_DOWN=5] [DRAIN_TIMEOUT=180] [KEEP=1] bench/fleet.sh
# (KEEP=1 keeps the work dir in /tmp: logs, stdout, what the subscriber got; it is always kept on FAIL.)
# Exit status: 0 = PASS, 1 = FAIL, 2 = could not run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
FLEET=${FLEET:-20}
DURATION=${DURATION:-240}
FPS=${FPS:-2}
SAMPLE=${SAMPLE:-5}
BROKER_DOWN=${BROKER_DOWN:-5}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-180}
WAIT_BINARY=${WAIT_BINARY:-3600}
for tool in /usr/sbin/mosquitto mosquitto_sub mosquitto_pub python3; do
    command -v "$tool" >/dev/null || { echo "fleet.sh needs $tool (apt-get install mosquitto mosquitto-clients)"; exit 2; }
done
(( FLEET >= 2 && DURATION >= 30 )) || { echo "FLEET >= 2 and DURATION >= 30, please"; exit 2; }

# --- the binary: release if newer than every source file, else debug; wait (bounded) for one to exist.
newest_src=$(find src crates Cargo.toml Cargo.lock -type f -printf '%T@\n' 2>/dev/null | sort -n | tail -1)
waited=0
while :; do
    if [[ -n ${WHALED:-} ]]; then
        bin=$(realpath "$WHALED"); build="given by WHALED"; break
    elif [[ -x target/release/whaled ]] && [[ $(stat -c %Y target/release/whaled) -ge ${newest_src%.*} ]]; then
        bin=$repo/target/release/whaled; build=release; break
    elif [[ -x target/debug/whaled ]]; then
        bin=$repo/target/debug/whaled; build=debug; break
    fi
    (( waited < WAIT_BINARY )) || { echo "no whaled binary after ${WAIT_BINARY}s (target/release or target/debug)"; exit 2; }
    echo "waiting for target/debug/whaled or target/release/whaled (${waited}s) ..."
    sleep 60; waited=$((waited + 60))
done
stale=""
[[ $(stat -c %Y "$bin") -ge ${newest_src%.*} ]] || stale=" (older than the newest source file)"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB"
echo "binary:  $bin ($build, built $(date -u -r "$bin" +%FT%TZ))$stale; $("$bin" --version 2>/dev/null || true)"
echo "source:  HEAD $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src crates 2>/dev/null || echo ' + uncommitted changes in src/ or crates/')"
echo "fleet:   $FLEET daemons, $DURATION s, replay at $FPS fps, samples every $SAMPLE s"

work=$(mktemp -d /tmp/whaled-fleet.XXXXXX)
mkdir -p "$work/pids" "$work/broker" "$work/boats"
declare -A pid=()
broker_pid=""; sub_pid=""; sampler_pid=""
cleanup() {
    local p
    for p in "${pid[@]}" $broker_pid $sub_pid $sampler_pid; do
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ ${KEEP:-0} == 1 || ${failed:-1} == 1 ]]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 2' INT TERM

# --- the camera's pictures: 8 whales then 8 scenes, 640x360, looping (an encounter every 8 s at 2 fps).
python3 - "$work/photos" "$repo" <<'PY'
import csv, os, sys
from PIL import Image
out, repo = sys.argv[1:3]
os.makedirs(out)
data = os.path.join(repo, "..", "shared", "data", "whales-dev")
try:
    rows = list(csv.DictReader(open(os.path.join(data, "manifest.csv"))))
    whales = [os.path.join(data, r["relpath"]) for r in rows if r["label"] == "cetacean"][:8]
    scenes = [os.path.join(data, r["relpath"]) for r in rows if r["label"] == "non_cetacean"][:8]
except OSError:
    whales, scenes = [], []
if not whales or not scenes:
    photos = sorted(os.path.join(repo, "tests", "photos", f) for f in os.listdir(os.path.join(repo, "tests", "photos")))
    whales, scenes = photos, []
    print("whales-dev not found: replaying tests/photos only")
for i, src in enumerate(whales + scenes):
    Image.open(src).convert("RGB").resize((640, 360), Image.BILINEAR).save(os.path.join(out, f"{i:03d}.jpg"), quality=85)
print(f"camera: {len(whales)} whale photos then {len(scenes)} scenes, looping")
PY

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/broker/mosquitto.conf" <<CONF
# user root: as root, mosquitto would otherwise switch to its own user and could not read this private dir.
user root
listener $port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $work/broker/
autosave_interval 10
# The subscriber's queue while it reconnects after a broker restart: 20 boats' backlogs (default 1000).
max_queued_messages 100000
log_dest file $work/broker/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
log_timestamp_format %Y-%m-%dT%H:%M:%S
CONF

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
broker_start() {
    /usr/sbin/mosquitto -c "$work/broker/mosquitto.conf" >>"$work/broker/stderr" 2>&1 &
    broker_pid=$!
    echo "$broker_pid" > "$work/pids/broker.pid"
    local i
    for i in $(seq 100); do listening && return 0; sleep 0.1; done
    echo "mosquitto did not listen on $port"; tail "$work/broker/mosquitto.log"; exit 2
}
# Waits (at most 20 s) for a process told to stop, else SIGKILLs it; returns its exit status. One
# SIGTERM only: a second one makes whaled exit at once, without its clean shutdown.
wait_exit() {
    local p=$1 i rc=0
    for i in $(seq 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null && echo "  (pid $p ignored SIGTERM for 20 s: killed)"
    wait "$p" 2>/dev/null || rc=$?
    return "$rc"
}
# SIGTERM (mosquitto saves its sessions and queues), then wait for it.
stop_pid() { kill -TERM "$1" 2>/dev/null || return 0; wait_exit "$1" || true; }
broker_stop() { stop_pid "$broker_pid"; rm -f "$work/pids/broker.pid"; broker_pid=""; }

boat() { printf 'boat-%02d' "$1"; }
daemon_start() {
    local b; b=$(boat "$1")
    "$bin" --log-level info run --config "$work/boats/$b/whaled.toml" >>"$work/boats/$b/stdout" 2>>"$work/boats/$b/log" &
    pid[$1]=$!
    echo "${pid[$1]}" > "$work/pids/$b.pid"
}
for i in $(seq "$FLEET"); do
    b=$(boat "$i")
    mkdir -p "$work/boats/$b"
    cat > "$work/boats/$b/whaled.toml" <<TOML
device_id = "$b"
[[camera]]
name = "cam"
kind = "replay"
path = "$work/photos"
fps = $FPS
loop = true
[pipeline]
emit_rejected = true
stats_interval = "30s"
[sightings]
publish = "both"
gap = "2s"
update_interval = "2s"
[mqtt]
host = "127.0.0.1"
port = $port
keep_alive = "5s"
reconnect_min = "200ms"
reconnect_max = "2s"
stats_interval = "30s"
[mqtt.outbox]
dir = "$work/boats/$b/outbox"
TOML
done
"$bin" --log-level warn check-config "$work/boats/$(boat 1)/whaled.toml" >"$work/check-config.txt" 2>&1 \
    || { echo "config rejected:"; cat "$work/check-config.txt"; exit 2; }

cat > "$work/fleet.py" <<'PY'
import glob, json, os, sys, time
from datetime import datetime

work = sys.argv[2]

def stored():
    """Per device: the events it printed (= appended to its outbox first), in order."""
    out, torn = {}, 0
    for path in sorted(glob.glob(f"{work}/boats/*/stdout")):
        dev = path.split("/")[-2]
        evs = out.setdefault(dev, [])
        for line in open(path, encoding="utf-8", errors="replace"):
            try:
                e = json.loads(line)
            except ValueError:
                torn += 1
                continue
            kind = "sighting" if "started_at" in e and "event" in e else "detection"
            evs.append((e["event_id"], e.get("camera"), kind, e.get("captured_at")))
    return out, torn

def arrived():
    """What the subscriber got: (time, device, camera, kind, event_id), in arrival order."""
    got = []
    try:
        f = open(f"{work}/sub.txt", encoding="utf-8", errors="replace")
    except OSError:
        return got
    for line in f:
        parts = line.rstrip("\n").split(" ", 2)
        if len(parts) < 3:
            continue
        t, topic, payload = parts
        levels = topic.split("/")
        if len(levels) != 4 or levels[3] not in ("detection", "sighting"):
            continue
        try:
            e = json.loads(payload)
        except ValueError:
            continue
        got.append((float(t), levels[1], levels[2], levels[3], e.get("event_id"), e.get("captured_at")))
    return got

def missing():
    st, _ = stored()
    ids = {g[4] for g in arrived()}
    n = sum(len(v) for v in st.values())
    m = sum(1 for v in st.values() for e in v if e[0] not in ids)
    print(n, m)

def sample(interval, max_s):
    """CSV: time, label, pid, utime+stime ticks, process start (s since boot), VmRSS kB, VmHWM kB; and
    the whole box's busy/total ticks (label 'box')."""
    stop = f"{work}/sampler.stop"
    end = time.time() + max_s
    with open(f"{work}/samples.csv", "w") as out:
        while time.time() < end and not os.path.exists(stop):
            now = time.time()
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            out.write(f"{now},box,0,{sum(cpu) - cpu[3] - cpu[4]},{sum(cpu)},0,0\n")
            for pf in glob.glob(f"{work}/pids/*.pid"):
                label = os.path.basename(pf)[:-4]
                try:
                    p = int(open(pf).read())
                    with open(f"/proc/{p}/stat") as f:
                        st = f.read().rsplit(")", 1)[1].split()
                    status = dict(l.split(":", 1) for l in open(f"/proc/{p}/status") if ":" in l)
                    rss = int(status["VmRSS"].split()[0]); hwm = int(status["VmHWM"].split()[0])
                except (OSError, ValueError, KeyError):
                    continue
                if st[0] == "Z":
                    continue
                ticks = int(st[11]) + int(st[12])
                out.write(f"{now},{label},{p},{ticks},{int(st[19]) / os.sysconf('SC_CLK_TCK')},{rss},{hwm}\n")
            out.flush()
            time.sleep(max(0.0, interval - (time.time() - now)))

def usage():
    """Per label: mean CPU % over each process's life (sum of ticks / sum of lifetimes, restarts
    included), peak VmHWM MB, mean RSS MB."""
    tck = os.sysconf("SC_CLK_TCK")
    boot = float([l for l in open("/proc/stat") if l.startswith("btime")][0].split()[1])
    procs, box = {}, []
    for line in open(f"{work}/samples.csv"):
        t, label, p, ticks, start, rss, hwm = line.strip().split(",")
        if label == "box":
            box.append((float(t), int(ticks), int(start)))
            continue
        procs.setdefault(label, {}).setdefault(p, []).append((float(t), int(ticks), float(start), int(rss), int(hwm)))
    res = {}
    for label, by_pid in procs.items():
        ticks = life = 0.0
        hwm, rss = 0, []
        for s in by_pid.values():
            last = s[-1]
            ticks += last[1] / tck
            life += max(1e-3, last[0] - (boot + last[2]))
            hwm = max(hwm, max(x[4] for x in s))
            rss += [x[3] for x in s]
        res[label] = (100 * ticks / life, hwm / 1024, sum(rss) / len(rss) / 1024, len(by_pid))
    busy = None
    if len(box) > 1:
        busy = 100 * (box[-1][1] - box[0][1]) / max(1, box[-1][2] - box[0][2])
    return res, busy

def frames():
    """Camera counters from the daemons' stats log lines: the last line of each process, summed (a
    restart starts its counters at zero)."""
    tot = dict(frames_captured=0, frames_sampled=0, frames_dropped=0, frames_decoded=0)
    p50 = []
    for path in glob.glob(f"{work}/boats/*/log"):
        last = None
        for line in open(path, encoding="utf-8", errors="replace"):
            if "whaled] config " in line and last:
                for k in tot:
                    tot[k] += last.get(k, 0)
                last = None
            if "whaled::pipeline] stats {" in line or "whaled] final stats {" in line:
                try:
                    last = json.loads(line.split("stats ", 1)[1])
                    p50.append(last.get("latency_p50_ms", 0))
                except ValueError:
                    pass
        if last:
            for k in tot:
                tot[k] += last.get(k, 0)
    return tot, p50

def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None

def report(run_s):
    st, torn = stored()
    got = arrived()
    first = {}  # event_id -> index of first arrival
    count = {}
    for k, g in enumerate(got):
        count[g[4]] = count.get(g[4], 0) + 1
        first.setdefault(g[4], k)
    # Outbox files, to tell "still in the outbox" from "gone" for anything missing.
    def in_outbox(dev, eid):
        for f in glob.glob(f"{work}/boats/{dev}/outbox/*"):
            try:
                if eid.encode() in open(f, "rb").read():
                    return True
            except OSError:
                pass
        return False
    rows, fail = [], []
    tot = dict(stored=0, arrived=0, missing=0, dups=0, extra=0, ooo=0, ooo_time=0, ooo_all=0)
    stored_ids = {e[0] for v in st.values() for e in v}
    for dev in sorted(set(st) | {g[1] for g in got}):
        evs = st.get(dev, [])
        idx = {e[0]: i for i, e in enumerate(evs)}
        det = sum(1 for e in evs if e[2] == "detection")
        miss = [e for e in evs if e[0] not in first]
        dev_got = [g for g in got if g[1] == dev]
        dups = sum(count[e[0]] - 1 for e in evs if e[0] in count)
        extra = len({g[4] for g in dev_got if g[4] not in stored_ids})
        # Order: first occurrences, per camera, detections by stored (outbox) order and by captured_at;
        # and every event of the device in outbox order.
        ooo = ooo_time = ooo_all = 0
        seen, hi_all, hi, hi_t, examples = set(), -1, {}, {}, []
        for g in dev_got:
            if g[4] in seen or g[4] not in idx:
                continue
            seen.add(g[4])
            i = idx[g[4]]
            if i < hi_all:
                ooo_all += 1
            hi_all = max(hi_all, i)
            if g[3] != "detection":
                continue
            cam = g[2]
            if i < hi.get(cam, -1):
                ooo += 1
                if len(examples) < 3:
                    examples.append(f"{dev}/{cam}: stored #{i} arrived after stored #{hi[cam]}")
            hi[cam] = max(hi.get(cam, -1), i)
            t = ts(g[5])
            if t is not None:
                if cam in hi_t and t < hi_t[cam]:
                    ooo_time += 1
                hi_t[cam] = max(hi_t.get(cam, t), t)
        still = sum(1 for e in miss if in_outbox(dev, e[0]))
        rows.append((dev, len(evs), det, len(evs) - det, len(evs) - len(miss), len(miss), still, dups, extra, ooo, ooo_time, ooo_all))
        for k, v in zip(("stored", "arrived", "missing", "dups", "extra", "ooo", "ooo_time", "ooo_all"),
                        (len(evs), len(evs) - len(miss), len(miss), dups, extra, ooo, ooo_time, ooo_all)):
            tot[k] += v
        if miss:
            fail.append(f"{dev}: {len(miss)} stored events never arrived ({still} still in its outbox), e.g. {miss[0][0]} ({miss[0][2]})")
        if ooo or ooo_time:
            fail.append(f"{dev}: {ooo} detections out of stored order, {ooo_time} out of capture time; " + "; ".join(examples))
    print("\nper device: stored (detections + sightings) / arrived / missing (still in outbox) / duplicates / arrived-not-stored / out of order (stored order, captured_at, all events)")
    for r in rows:
        print(f"  {r[0]}  {r[1]:6d} ({r[2]} + {r[3]})  {r[4]:6d}  {r[5]} ({r[6]})  {r[7]:4d}  {r[8]}  {r[9]} {r[10]} {r[11]}")
    span = (got[-1][0] - got[0][0]) if len(got) > 1 else 0
    print(f"\ntotal: {tot['stored']} events stored, {tot['arrived']} arrived, {tot['missing']} missing, "
          f"{tot['dups']} duplicate deliveries ({100 * tot['dups'] / max(1, len(got)):.2f} % of {len(got)} messages), "
          f"{tot['extra']} arrived that no stdout shows, {tot['ooo']} detections out of order "
          f"({tot['ooo_time']} by captured_at, {tot['ooo_all']} of all events by outbox order); unparsable stdout lines: {torn}")
    if span:
        print(f"through the broker: {len(got) / span:.1f} events/s on average over {span:.0f} s "
              f"({tot['stored'] / run_s:.1f} stored/s over the {run_s:.0f} s the fleet ran)")
    # Capture to arrival, first arrivals of detections (the subscriber's clock is the daemons' clock).
    delay, done = [], set()
    for g in got:
        if g[3] == "detection" and g[4] not in done and g[5]:
            done.add(g[4])
            delay.append(g[0] - ts(g[5]).timestamp())
    if delay:
        delay.sort()
        q = lambda f: delay[min(len(delay) - 1, int(f * len(delay)))]
        print(f"capture to arrival (detections, first arrival): p50 {q(0.5):.2f} s, p99 {q(0.99):.2f} s, max {delay[-1]:.2f} s")
    fr, p50 = frames()
    if fr["frames_captured"]:
        p50.sort()
        print(f"frames (each daemon process's last stats line: the final one on a clean stop): {fr['frames_captured']} captured, {fr['frames_sampled']} sampled, "
              f"{fr['frames_dropped']} dropped (pipeline busy), {fr['frames_decoded']} assessed; "
              f"frame latency p50 median {p50[len(p50) // 2]:.0f} ms (max {p50[-1]:.0f})")
    res, busy = usage()
    daemons = sorted(k for k in res if k.startswith("boat-"))
    print("\nresources (mean CPU % of one core over each process's life, restarts included; peak = max VmHWM):")
    if "broker" in res:
        c, h, r, n = res["broker"]
        print(f"  mosquitto: CPU {c:.2f} %, peak RSS {h:.1f} MB, mean RSS {r:.1f} MB ({n} processes: 2 restarts)")
    for d in daemons:
        c, h, r, n = res[d]
        print(f"  {d}: CPU {c:5.1f} %, peak RSS {h:6.1f} MB, mean RSS {r:6.1f} MB" + (f" ({n} processes)" if n > 1 else ""))
    if daemons:
        cs = [res[d][0] for d in daemons]; hs = [res[d][1] for d in daemons]
        print(f"  daemons: CPU mean {sum(cs) / len(cs):.1f} % (min {min(cs):.1f}, max {max(cs):.1f}; fleet total {sum(cs):.0f} %), "
              f"peak RSS mean {sum(hs) / len(hs):.1f} MB (max {max(hs):.1f}; fleet total {sum(hs):.0f} MB)")
    if busy is not None:
        print(f"  whole box: {busy:.0f} % busy over the run (all CPUs; other work on the box included)")
    # The retained status after the clean stop: "stopped" (an "offline" there is the Last Will: the
    # daemon's DISCONNECT never reached the broker).
    status = {}
    for line in open(f"{work}/sub.txt", encoding="utf-8", errors="replace"):
        parts = line.rstrip("\n").split(" ", 2)
        if len(parts) == 3 and parts[1].endswith("/status"):
            status[parts[1].split("/")[1]] = parts[2]
    devices = sorted(st)
    not_stopped = [f"{d}={status.get(d, 'none')}" for d in devices if status.get(d) != "stopped"]
    print(f"status after the SIGTERM: {len(devices) - len(not_stopped)} of {len(devices)} 'stopped'"
          + (f"; not: {', '.join(not_stopped)}" if not_stopped else ""))
    if not_stopped:
        fail.append(f"{len(not_stopped)} daemons' last status is not 'stopped' (clean shutdown): {', '.join(not_stopped)}")
    if tot["stored"] == 0:
        fail.append("no events stored at all")
    print()
    for f in fail:
        print("FAIL: " + f)
    print("RESULT: " + ("FAIL" if fail else "PASS"))
    sys.exit(1 if fail else 0)

cmd = sys.argv[1]
if cmd == "missing":
    missing()
elif cmd == "sample":
    sample(float(sys.argv[3]), float(sys.argv[4]))
elif cmd == "report":
    report(float(sys.argv[3]))
PY

# Waits (at most $1 s) until the subscriber has every event the daemons printed; says how it ended.
drain() {
    local limit=$1 t0=$SECONDS n m
    while :; do
        read -r n m < <(python3 "$work/fleet.py" missing "$work")
        if (( m == 0 )); then echo "  all $n stored events arrived ($((SECONDS - t0)) s)"; return 0; fi
        if (( SECONDS - t0 >= limit )); then echo "  $m of $n stored events still missing after ${limit} s"; return 1; fi
        sleep 2
    done
}

# --- the run
broker_start
python3 "$work/fleet.py" sample "$work" "$SAMPLE" $((DURATION + DRAIN_TIMEOUT + 300)) &
sampler_pid=$!
# mosquitto_sub reconnects by itself; -c -i: a persistent session, so a broker restart loses nothing queued for it.
mosquitto_sub -h 127.0.0.1 -p "$port" -c -i fleet-shore -q 1 -k 5 -t 'whaled/#' -F '%U %t %p' >"$work/sub.txt" 2>"$work/sub.log" &
sub_pid=$!
sleep 1
kill -0 "$sub_pid" || { echo "mosquitto_sub died:"; cat "$work/sub.log"; exit 2; }
t0=$SECONDS
for i in $(seq "$FLEET"); do daemon_start "$i"; sleep 0.2; done
echo "started: mosquitto on 127.0.0.1:$port, $FLEET daemons, work dir $work"

at() { local d=$(( t0 + $1 - SECONDS )); (( d <= 0 )) || sleep "$d"; }
ka=$(( (FLEET + 3) / 4 )); kb=$(( FLEET * 3 / 4 )); (( kb != ka )) || kb=$FLEET
at $(( DURATION / 4 ))
echo "$((SECONDS - t0)) s: broker restart 1 (SIGTERM, ${BROKER_DOWN} s down)"
broker_stop; sleep "$BROKER_DOWN"; broker_start
at $(( DURATION * 2 / 5 ))
echo "$((SECONDS - t0)) s: SIGKILL $(boat "$ka"), restarted 2 s later"
kill -KILL "${pid[$ka]}"; wait "${pid[$ka]}" 2>/dev/null || true; sleep 2; daemon_start "$ka"
at $(( DURATION * 3 / 5 ))
echo "$((SECONDS - t0)) s: broker restart 2 (SIGTERM, ${BROKER_DOWN} s down); SIGKILL $(boat "$kb") 2 s into the outage, restarted after it"
broker_stop; sleep 2
kill -KILL "${pid[$kb]}"; wait "${pid[$kb]}" 2>/dev/null || true
sleep $(( BROKER_DOWN > 2 ? BROKER_DOWN - 2 : 0 )); broker_start; sleep 2; daemon_start "$kb"
at "$DURATION"
run_s=$((SECONDS - t0))
echo "$run_s s: pausing every camera (cmd/pause), then waiting for the backlog"
for i in $(seq "$FLEET"); do
    timeout 10 mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -i "fleet-ctl-$i" -t "whaled/$(boat "$i")/cmd/pause" -m '{"camera": "cam"}' || echo "  pause $(boat "$i") failed"
done
sleep 3
drain "$DRAIN_TIMEOUT" || true
echo "$((SECONDS - t0)) s: SIGTERM to every daemon"
for i in $(seq "$FLEET"); do kill -TERM "${pid[$i]}" 2>/dev/null || true; done
bad_exit=0
for i in $(seq "$FLEET"); do
    rc=0; wait_exit "${pid[$i]}" || rc=$?
    (( rc == 0 )) || { echo "  $(boat "$i") exited with status $rc"; bad_exit=$((bad_exit + 1)); }
    rm -f "$work/pids/$(boat "$i").pid"; unset "pid[$i]"
done
(( bad_exit )) || echo "  every daemon exited with status 0"
drain 60 || true
sleep 2
kill -TERM "$sub_pid" 2>/dev/null || true; wait "$sub_pid" 2>/dev/null || true; sub_pid=""
broker_stop
touch "$work/sampler.stop"; wait "$sampler_pid" 2>/dev/null || true; sampler_pid=""

# --- what the logs say (the odd things: warnings, errors, broker disconnections)
echo
echo "daemon log lines at WARN/ERROR (all boats, by message, numbers and ids blanked):"
cat "$work"/boats/*/log | grep -E ' (WARN|ERROR) ' | sed -E 's/^\[[^ ]+ //; s/[0-9a-f]{8}-[0-9a-f-]{27}/<id>/g; s/[0-9]+(\.[0-9]+)?/N/g' \
    | sort | uniq -c | sort -rn | head -20 || true
echo "broker: $(grep -c 'New client connected' "$work/broker/mosquitto.log" || true) connections, " \
     "$(grep -c -E 'disconnected|closed its connection' "$work/broker/mosquitto.log" || true) disconnections, " \
     "$(grep -c -i -E 'warning|error' "$work/broker/mosquitto.log" || true) warning/error lines"
grep -i -E 'warning|error' "$work/broker/mosquitto.log" | head -5 || true
echo "subscriber: $(wc -l < "$work/sub.txt") messages; its log: $(tr '\n' ' ' < "$work/sub.log" | cut -c1-300)"

failed=1
if python3 "$work/fleet.py" report "$work" "$run_s"; then failed=0; fi
exit "$failed"
