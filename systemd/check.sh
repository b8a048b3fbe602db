#!/usr/bin/env bash
# Lints the unit as CI does: `systemd-analyze verify` must exit 0 with nothing on stderr, and
# `systemd-analyze security --offline=yes` must rate the exposure at 3.0 or less (the figure is printed; the threshold option counts tenths).
# verify checks that ExecStart= is executable, so a copy of the unit points at the binary built here.
# Usage: systemd/check.sh [WHALED_BINARY]   (default target/debug/whaled)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/whaled}")
[ -x "$bin" ] || { echo "no whaled binary at $bin: cargo build first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/usr/bin/whaled|$bin|" systemd/whaled.service > "$work/whaled.service"
if ! systemd-analyze verify "$work/whaled.service" 2> "$work/verify.err" || [ -s "$work/verify.err" ]; then
    echo "systemd-analyze verify failed:" >&2
    cat "$work/verify.err" >&2
    exit 1
fi
echo "systemd-analyze verify: ok (exit 0, empty stderr)"
systemd-analyze security --offline=yes --threshold=30 systemd/whaled.service > "$work/security.out" 2>&1 || {
    cat "$work/security.out" >&2
    echo "exposure above 3.0" >&2
    exit 1
}
grep "Overall exposure level" "$work/security.out"
