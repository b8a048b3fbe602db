#!/usr/bin/env bash
# Real V4L2 capture test: boots Debian's stock kernel under QEMU (software emulation, no KVM needed)
# with the `vivid` test driver, runs examples/vivid_check as a static binary inside, and passes only
# if the guest prints VIVID_CHECK_EXIT=0. Needs: qemu-system-x86, busybox-static, kmod, cpio,
# libclang-dev (apt), and the Debian archive for the kernel package. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=target/vivid
mkdir -p "$work"

echo "== static vivid_check binary"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --example vivid_check \
    --target x86_64-unknown-linux-gnu --target-dir target/static
bin=target/static/x86_64-unknown-linux-gnu/debug/examples/vivid_check
if readelf -d "$bin" | grep -q NEEDED; then
    echo "vivid_check is not statically linked" >&2
    exit 1
fi

echo "== kernel"
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ ! -d "$work/kroot/lib/modules" ] || [ "$(cat "$work/kernel-package" 2>/dev/null)" != "$pkg" ]; then
    rm -rf "$work/kroot" "$work"/*.deb
    (cd "$work" && apt-get download "$pkg" 2>/dev/null)
    dpkg-deb -x "$work"/linux-image-*.deb "$work/kroot"
    echo "$pkg" > "$work/kernel-package"
fi
kv=$(ls "$work/kroot/lib/modules")
depmod -b "$work/kroot" "$kv"
echo "$pkg ($kv)"

echo "== initramfs"
root="$work/initrd"
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,models/efficientnet-lite0}
cp "$(command -v busybox)" "$root/bin/busybox"
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
strip -o "$root/vivid_check" "$bin"
cp models/efficientnet-lite0/model.toml models/efficientnet-lite0/efficientnet_lite0_fp32.onnx "$root/models/efficientnet-lite0/"
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
/vivid_check /models
echo "VIVID_GUEST_RC=$?"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.img"

echo "== boot"
# QEMU's own exit status is always 0: the verdict is the console line. `-cpu max` gives the guest
# RDRAND, so the kernel's random pool is ready at once (event ids need getrandom(), which would
# otherwise block for minutes in an emulated guest with no entropy source).
timeout 300 qemu-system-x86_64 -accel tcg -cpu max -m 1536 -smp 2 -nographic -no-reboot \
    -kernel "$work/kroot/boot/vmlinuz-$kv" -initrd "$work/initrd.img" \
    -append "console=ttyS0 panic=-1 loglevel=4" | tee "$work/console.log" | grep -v "^\s*$" || true
grep -q "VIVID_CHECK_EXIT=0" "$work/console.log"
echo "vivid capture test passed"
