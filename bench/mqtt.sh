#!/usr/bin/env bash
# Durable MQTT throughput on loopback for docs/BENCHMARKS.md: starts a mosquitto on a free port and runs
# examples/mqtt_throughput (bare rumqttc QoS 1 vs whaled's outbox + publisher, same broker, same run).
# Usage: bench/mqtt.sh [EVENTS]   (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
cargo build --release --quiet --example mqtt_throughput
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/m.conf"
/usr/sbin/mosquitto -c "$work/m.conf" >/dev/null 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null; rm -rf "$work"' EXIT
sleep 0.5
echo "outbox on: $(df -P "$work" | awk 'NR==2 {print $1}') ($(stat -f -c %T "$work"))"
target/release/examples/mqtt_throughput "$port" "$n" "$work"
