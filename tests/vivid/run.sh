#!/usr/bin/env bash
# Real V4L2 capture test: boots Debian's stock kernel under QEMU (software emulation, no KVM needed)
# with the `vivid` test driver, and inside it runs (1) examples/vivid_check, which drives the capture
# code through formats, a driver unbind/rebind and shutdown, then (2) the `whaled` binary itself:
# `whaled run` on the first camera it finds until its first detection, stopped by SIGTERM. Passes
# only if the guest prints VIVID_CHECK_EXIT=0 and WHALED_RUN_EXIT=0.
#
#   tests/vivid/run.sh            # x86_64 guest, release binaries (--features onnxruntime,gstreamer);
#                                 # VIVID_PROFILE=debug: the debug ones `cargo test` built
#   tests/vivid/run.sh aarch64    # aarch64 guest (qemu-system-aarch64), the binaries cross/test.sh
#                                 # built and tested for aarch64-unknown-linux-gnu (release, glibc 2.31)
#
# The guest is emulated (TCG), so its speed depends on the host far more than native code does: one
# pre-filter inference took 2-5 s on an AMD EPYC host and ~40 s on an Intel Sapphire Rapids one with
# the debug binary. Hence one inference per point the check proves, waits for events rather than fixed
# sleeps, a limit with room for the slow host, each step's seconds in the log (host side and guest
# side), and release binaries by default.
#
# The binaries are dynamically linked; their loader and libraries go into the initramfs. Needs:
# qemu-system-x86 / qemu-system-arm, busybox-static (and busybox-static:arm64), kmod, cpio, and the
# Debian archive for the kernel package (arm64 packages need `dpkg --add-architecture arm64`).
# Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${1:-x86_64}
case "$arch" in
    x86_64)
        deb_arch=amd64
        # VIVID_PROFILE=debug: the binaries `cargo test --features onnxruntime,gstreamer` built (no extra build;
        # whaled's own code unoptimised, tract optimised either way).
        profile=${VIVID_PROFILE:-release}
        case "$profile" in
            release) bindir=target/release build=(cargo build --release --features onnxruntime,gstreamer --example vivid_check --bin whaled) ;;
            debug) bindir=target/debug build=(cargo build --features onnxruntime,gstreamer --example vivid_check --bin whaled) ;;
            *) echo "tests/vivid/run.sh: VIVID_PROFILE is release or debug, not '$profile'" >&2; exit 2 ;;
        esac
        libdirs=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu)
        console=ttyS0
        strip=strip
        # `-cpu max` gives the guest RDRAND, so the kernel's random pool is ready at once (event ids
        # need getrandom(), which would otherwise block for minutes in a guest with no entropy source).
        qemu=(qemu-system-x86_64 -accel tcg -cpu max) ;;
    aarch64)
        deb_arch=arm64
        bindir=target/aarch64-unknown-linux-gnu/release
        build=(cargo-zigbuild build --release --features onnxruntime --target aarch64-unknown-linux-gnu.2.31 --example vivid_check --bin whaled)
        libdirs=(/usr/aarch64-linux-gnu/lib)
        console=ttyAMA0
        strip=aarch64-linux-gnu-strip
        # `-cpu max` has RNDR (the random pool is seeded at boot, as RDRAND does on x86);
        # pauth-impdef makes pointer authentication cheap to emulate.
        qemu=(qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on) ;;
    *) echo "tests/vivid/run.sh: unknown architecture '$arch' (x86_64 or aarch64)" >&2; exit 2 ;;
esac
work=target/vivid/$arch
mkdir -p "$work"
# Each host step prints the seconds it took.
t=$SECONDS
took() { echo "-- $1: $((SECONDS - t)) s"; t=$SECONDS; }

echo "== $arch binaries"
# aarch64: a no-op after cross/test.sh built them (same profile and features).
"${build[@]}" --quiet
took "build"
for b in "$bindir/examples/vivid_check" "$bindir/whaled"; do
    file "$b" | grep -q "$( [ "$arch" = x86_64 ] && echo x86-64 || echo aarch64)" || { echo "$b is not an $arch binary" >&2; exit 1; }
done

echo "== kernel and busybox ($deb_arch)"
if [ "$deb_arch" != "$(dpkg --print-architecture)" ] && ! dpkg --print-foreign-architectures | grep -qx "$deb_arch"; then
    dpkg --add-architecture "$deb_arch"
    apt-get update -qq
fi
pkg=$(apt-cache depends "linux-image-$deb_arch:$deb_arch" | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ ! -d "$work/kroot/lib/modules" ] || [ "$(cat "$work/kernel-package" 2>/dev/null)" != "$pkg" ]; then
    rm -rf "$work/kroot" "$work/broot" "$work"/*.deb
    (cd "$work" && apt-get download "$pkg" "busybox-static:$deb_arch" 2>/dev/null)
    dpkg-deb -x "$work"/linux-image-*.deb "$work/kroot"
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/broot"
    echo "$pkg" > "$work/kernel-package"
fi
kv=$(ls "$work/kroot/lib/modules")
depmod -b "$work/kroot" "$kv"
echo "$pkg ($kv)"
took "kernel and busybox"

echo "== initramfs"
root="$work/initrd"
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,models/efficientnet-lite0,models/marine-gate-lite0,models/marine-gate-v2,usr/bin,usr/share/whaled,etc/whaled}
cp "$work/broot/bin/busybox" "$root/bin/busybox"
: > "$root/lib/modules/order"
modprobe -d "$work/kroot" -S "$kv" --show-depends vivid | awk '/^insmod/{print $2}' | while read -r ko; do
    name=$(basename "$ko")
    case "$ko" in
        *.xz) xz -dc "$ko" > "$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
        *.zst) zstd -qdc "$ko" > "$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
        *) cp "$ko" "$root/lib/modules/$name" ;;
    esac
    echo "$name" >> "$root/lib/modules/order"
done
# The binaries, their ELF interpreter at the path they name, and their libraries (recursively) in /lib.
"$strip" -o "$root/vivid_check" "$bindir/examples/vivid_check"
"$strip" -o "$root/usr/bin/whaled" "$bindir/whaled"
find_lib() {
    local d
    for d in "${libdirs[@]}"; do [ -e "$d/$1" ] && { echo "$d/$1"; return; }; done
    echo "tests/vivid/run.sh: library $1 not found in ${libdirs[*]}" >&2
    exit 1
}
copy_deps() {
    local lib path
    for lib in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [ -e "$root/lib/$lib" ] && continue
        path=$(find_lib "$lib")
        cp -L "$path" "$root/lib/$lib"
        copy_deps "$root/lib/$lib"
    done
}
for b in "$root/vivid_check" "$root/usr/bin/whaled"; do
    interp=$(readelf -l "$b" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    mkdir -p "$root$(dirname "$interp")"
    [ -e "$root$interp" ] || cp -L "$(find_lib "$(basename "$interp")")" "$root$interp"
    copy_deps "$b"
done
cp models/efficientnet-lite0/model.toml models/efficientnet-lite0/efficientnet_lite0_fp32.onnx "$root/models/efficientnet-lite0/"
# `whaled run` with no config file uses the default pre-filter.
cp models/marine-gate-v2/model.toml models/marine-gate-v2/marine_gate_v2_fp32.onnx "$root/models/marine-gate-v2/"
ln -s /models "$root/usr/share/whaled/models"
# `whaled run` with no [[camera]] takes the first V4L2 camera; rejected frames are printed too, so
# stdout shows that frames went through capture, decoding and the pre-filter.
cat > "$root/etc/whaled/whaled.toml" <<'TOML'
[pipeline]
emit_rejected = true
stats_interval = "5s"
TOML
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do
    case "$m" in
        vivid.ko) insmod /lib/modules/$m n_devs=1 node_types=0x1 ;;
        *) insmod /lib/modules/$m ;;
    esac
done
export LD_LIBRARY_PATH=/lib
up() { cut -d' ' -f1 /proc/uptime; }
echo "== guest booted at $(up) s"
/vivid_check /models
echo "== vivid_check done at $(up) s"
echo "== whaled run on the vivid camera, until its first detection"
start=$(up)
/usr/bin/whaled run --config /etc/whaled/whaled.toml > /tmp/run.jsonl 2> /tmp/run.log &
pid=$!
# Up to 300 s for the first detection (model load and one inference; ~10 s on a fast host).
i=0
while [ $i -lt 300 ] && ! grep -q '"camera":"camera0"' /tmp/run.jsonl; do sleep 1; i=$((i + 1)); done
kill -TERM $pid
wait $pid
rc=$?
n=$(grep -c '"camera":"camera0"' /tmp/run.jsonl)
grep -v "^\s*$" /tmp/run.log | tail -8
head -c 600 /tmp/run.jsonl; echo
echo "whaled run: exit status $rc, $n detection(s) from camera0"
echo "== step whaled run: $(awk -v a="$start" -v b="$(up)" 'BEGIN{printf "%.1f", b - a}') s"
if [ "$rc" = 0 ] && [ "$n" -ge 1 ] && ! grep -q "panicked" /tmp/run.log; then
    echo "WHALED_RUN_EXIT=0"
else
    echo "WHALED_RUN_EXIT=1"
fi
echo "== guest done at $(up) s"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.img"
took "initramfs"

echo "== boot"
# QEMU's own exit status is always 0: the verdict is the console lines. The limit, from a measurement:
# on the 2-vCPU AMD EPYC (shared with other builds) the x86_64 guest took 88 s with the debug binaries
# (boot 9 s, vivid_check 56 s: 6 pre-filter runs, the slowest 9.2 s; whaled run 15 s), the aarch64
# guest 98 s with its release binaries (boot 6 s, vivid_check 69 s, the slowest run 7.6 s; whaled
# run 21 s). The check runs about 8 inferences; an Intel Sapphire Rapids host took ~40 s per inference
# (20x), ~10 min here, so 1200 s leaves room for that host, and a hang still fails within 20 minutes.
# VIVID_TIMEOUT overrides.
limit=${VIVID_TIMEOUT:-1200}
timeout "$limit" "${qemu[@]}" -m 1536 -smp 2 -nographic -no-reboot \
    -kernel "$work/kroot/boot/vmlinuz-$kv" -initrd "$work/initrd.img" \
    -append "console=$console panic=-1 loglevel=4" | tee "$work/console.log" | grep -v "^\s*$" || true
took "boot and guest run (limit $limit s)"
echo "== guest steps ($arch)"
grep -a "^== \(step\|guest\|vivid_check\)" "$work/console.log" || true
grep -q "VIVID_CHECK_EXIT=0" "$work/console.log"
grep -q "WHALED_RUN_EXIT=0" "$work/console.log"
echo "vivid capture test passed ($arch)"
