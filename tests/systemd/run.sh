#!/usr/bin/env bash
# Boots a real systemd (Debian bookworm in systemd-nspawn), installs the whaled .deb the way the README
# says (dpkg -i, systemctl enable --now), runs it on a replay camera and checks: Type=notify readiness,
# the STATUS= line, the hardened unit actually running as the `whaled` user, then a hang (the test hook
# WHALED_TEST_HANG_AFTER_FRAMES) that must make systemd's watchdog kill and restart the service.
# The checks run inside the container (tests/systemd/check.sh); this script passes only if the console
# shows SYSTEMD_CHECK_EXIT=0. Needs root, debootstrap, systemd-container, cargo-deb.
# Usage: tests/systemd/run.sh [DEB]   (default: builds one from the dev profile with cargo deb)
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${WHALED_SYSTEMD_WORK:-/tmp/whaled-systemd}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$work"

deb=${1:-}
if [ -z "$deb" ]; then
    echo "== .deb (dev profile: the boot test needs no optimised build)"
    # The binary `cargo test` built (same features, so a no-op after the test run), packaged as is.
    cargo build --quiet --features onnxruntime --example vivid_check --bin whaled
    cargo deb --no-build --profile dev -o "$work/whaled.deb" 2>&1 | grep -v "dev profile is not supported\|To enable debug symbols" || true
    deb="$work/whaled.deb"
fi

root="$work/root"
if [ ! -x "$root/lib/systemd/systemd" ]; then
    echo "== debootstrap bookworm into $root"
    rm -rf "$root"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,adduser,dbus bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; exit 1; }
fi

echo "== prepare the container"
rm -rf "$root/opt/whaled-test"
mkdir -p "$root/opt/whaled-test/photos"
cp "$deb" "$root/opt/whaled-test/whaled.deb"
cp tests/photos/*.jpg "$root/opt/whaled-test/photos/"
cp tests/systemd/check.sh "$root/opt/whaled-test/check.sh"
chmod 755 "$root/opt/whaled-test/check.sh"
cat > "$root/etc/systemd/system/whaled-check.service" <<'UNIT'
[Unit]
Description=whaled boot test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/opt/whaled-test/check.sh
StandardOutput=journal+console
StandardError=journal+console
UNIT
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/whaled-check.service "$root/etc/systemd/system/multi-user.target.wants/whaled-check.service"
# A previous run's package and state go away.
rm -rf "$root/var/lib/whaled" "$root/etc/whaled" "$root/etc/systemd/system/whaled.service.d"
chroot "$root" sh -c 'dpkg --purge whaled >/dev/null 2>&1 || true'

echo "== boot"
timeout 300 systemd-nspawn --quiet --register=no --keep-unit -D "$root" -b > "$work/console.log" 2>&1 || true
grep -E "check.sh\[[0-9]+\]: (ok|FAILED|info):" "$work/console.log" | sed 's/^.*check.sh\[[0-9]*\]: //' || true
if ! grep -q "SYSTEMD_CHECK_EXIT=0" "$work/console.log"; then
    echo "booted systemd test failed; console:" >&2
    tail -60 "$work/console.log" >&2
    exit 1
fi
echo "systemd boot test passed"
