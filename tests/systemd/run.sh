#!/usr/bin/env bash
# Boots a real systemd (Debian bookworm in systemd-nspawn), installs the whaled .deb the way the README
# says (dpkg -i, systemctl enable --now), runs it on a replay camera and checks: the installed binary is
# the one just built, Type=notify readiness, the STATUS= line, the hardened unit running as the `whaled`
# user, the daemon's device_id being the container's host name (gethostname(2); the unit's
# ProcSubset=pid hides /proc/sys/kernel/hostname), a reload that really applies a changed config in the
# same process, then a hang (the test hook WHALED_TEST_HANG_AFTER_FRAMES) that must make systemd's
# watchdog kill and restart the service. The checks run inside the container (tests/systemd/check.sh);
# this script passes only if the console shows SYSTEMD_CHECK_EXIT=0.
# Needs root, debootstrap, systemd-container, cargo-deb.
# Usage: tests/systemd/run.sh [DEB]   (default: builds one from the dev profile with cargo deb)
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${WHALED_SYSTEMD_WORK:-/tmp/whaled-systemd}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The container's host name: distinctive, so that a device_id from anywhere else (the CI machine's name,
# or the old fallback `whaled`) cannot match it by accident.
container_host=whaled-ci-box-7
mkdir -p "$work"

[ "$(id -u)" = 0 ] || { echo "tests/systemd/run.sh: needs root (debootstrap, systemd-nspawn)" >&2; exit 1; }
for tool in debootstrap:debootstrap systemd-nspawn:systemd-container dpkg-deb:dpkg; do
    command -v "${tool%%:*}" >/dev/null || { echo "tests/systemd/run.sh: ${tool%%:*} not found (apt-get install ${tool##*:})" >&2; exit 1; }
done

# sha256 of /usr/bin/whaled inside a .deb
deb_binary_sha() { dpkg-deb --fsys-tarfile "$1" | tar -xO ./usr/bin/whaled | sha256sum | cut -d' ' -f1; }
# GNU build id of an ELF file (survives stripping), empty if none
build_id() { readelf -n "$1" 2>/dev/null | sed -n 's/^ *Build ID: *//p'; }

deb=${1:-}
if [ -z "$deb" ]; then
    command -v cargo-deb >/dev/null || { echo "tests/systemd/run.sh: cargo-deb not found (cargo install cargo-deb --locked)" >&2; exit 1; }
    echo "== .deb (dev profile: the boot test needs no optimised build)"
    # The binary `cargo test` built (same features, so a no-op after the test run), packaged as is.
    cargo build --quiet --features onnxruntime,gstreamer --example vivid_check --bin whaled
    deb="$work/whaled.deb"
    # An old package must never be what gets installed: remove it first, and fail if cargo deb fails
    # (only its harmless notes about the dev profile are filtered out of the log).
    rm -f "$deb"
    if ! cargo deb --no-build --profile dev -o "$deb" >"$work/cargo-deb.log" 2>&1; then
        cat "$work/cargo-deb.log" >&2
        echo "tests/systemd/run.sh: cargo deb failed" >&2
        exit 1
    fi
    grep -v "dev profile is not supported\|To enable debug symbols" "$work/cargo-deb.log" || true
    [ -s "$deb" ] || { echo "tests/systemd/run.sh: cargo deb did not write $deb" >&2; exit 1; }
    # The package must hold the binary just built: same build id (cargo deb may strip it).
    built=$(build_id target/debug/whaled)
    packaged=$(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/whaled > "$work/whaled.packaged" && build_id "$work/whaled.packaged")
    rm -f "$work/whaled.packaged"
    if [ -z "$built" ] || [ "$built" != "$packaged" ]; then
        echo "tests/systemd/run.sh: $deb does not hold target/debug/whaled (build id '$packaged', built '$built')" >&2
        exit 1
    fi
    echo "packaged target/debug/whaled (build id $built)"
fi
[ -f "$deb" ] || { echo "tests/systemd/run.sh: no such package: $deb" >&2; exit 1; }
deb_version=$(dpkg-deb -f "$deb" Version)
deb_sha=$(deb_binary_sha "$deb")
echo "$deb: whaled $deb_version, /usr/bin/whaled sha256 $deb_sha"

root="$work/root"
# The amd64 package is built with network cameras: its binary links GStreamer's core libraries.
if [ ! -x "$root/lib/systemd/systemd" ] || [ ! -e "$root/usr/lib/x86_64-linux-gnu/libgstreamer-1.0.so.0" ]; then
    echo "== debootstrap bookworm into $root"
    rm -rf "$root"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,adduser,dbus,libgstreamer1.0-0,libgstreamer-plugins-base1.0-0 bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; echo "tests/systemd/run.sh: debootstrap failed (log: $work/debootstrap.log)" >&2; exit 1; }
fi

echo "== prepare the container"
rm -rf "$root/opt/whaled-test"
mkdir -p "$root/opt/whaled-test/photos"
cp "$deb" "$root/opt/whaled-test/whaled.deb"
cp tests/photos/*.jpg "$root/opt/whaled-test/photos/"
cp tests/systemd/check.sh "$root/opt/whaled-test/check.sh"
chmod 755 "$root/opt/whaled-test/check.sh"
# What check.sh compares against: the package just built, and the host name given to the container.
cat > "$root/opt/whaled-test/expected.env" <<ENV
deb_version=$deb_version
deb_sha=$deb_sha
container_host=$container_host
ENV
# debootstrap copied this machine's /etc/hostname, which the container's systemd would set over
# nspawn's --hostname: give the container its own name both ways.
echo "$container_host" > "$root/etc/hostname"
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

echo "== boot (host name $container_host)"
rm -f "$work/console.log"
timeout 300 systemd-nspawn --quiet --register=no --keep-unit --hostname="$container_host" -D "$root" -b > "$work/console.log" 2>&1 || true
grep -E "check.sh\[[0-9]+\]: (ok|FAILED|info):" "$work/console.log" | sed 's/^.*check.sh\[[0-9]*\]: //' || true
if ! grep -q "SYSTEMD_CHECK_EXIT=0" "$work/console.log"; then
    echo "booted systemd test failed; console ($work/console.log):" >&2
    tail -60 "$work/console.log" >&2
    exit 1
fi
echo "systemd boot test passed"
