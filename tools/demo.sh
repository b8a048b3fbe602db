#!/usr/bin/env bash
# The README's first command: whaled's main job on a replay camera, no camera or broker needed.
# Installs the system packages the build needs if they are missing (as root; otherwise names them and
# stops: tools/system-packages.sh), then runs
#   cargo run --release -- run --config config/replay.toml [EXTRA ARGS]
# which plays the frames in tests/photos/ once at 5 fps and prints one Detection JSON line per frame
# (logs and per-camera counters on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "tools/demo.sh: cargo not found: install Rust first (https://rustup.rs)" >&2; exit 1; }
bash tools/system-packages.sh build
exec cargo run --release -- run --config config/replay.toml "$@"
