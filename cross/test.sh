#!/usr/bin/env bash
# Cross-builds whaled for one ARM target with cargo-zigbuild (glibc 2.31 floor, JetPack 5), runs the
# test suite on the result under qemu-user, prints the binary's glibc floor (and fails above 2.31), and
# packages the tested binary as a .deb. Called by .ci/run for both targets; see cross/README.md.
#
#   cross/test.sh aarch64-unknown-linux-gnu        # Jetson, Raspberry Pi 4/5 (64-bit OS)
#   cross/test.sh armv7-unknown-linux-gnueabihf    # Raspberry Pi 2/3/4 (32-bit OS), other ARMv7 boards
#
# What runs under emulation (CI, about 2 minutes): the library's unit tests (config, scoring, outbox,
# decoding, preprocessing, inference on the shipped pre-filter), tests/model_errors.rs, tests/mqtt.rs
# (the outbox and publisher against the host's mosquitto: outage, SIGKILL and restart, TLS) and
# tests/service.rs (sd_notify, the progress-fed watchdog, SIGHUP re-exec, /healthz). With --full, the
# whole `cargo test` suite, including tract-vs-onnxruntime parity on every model on aarch64, the CLI and
# the pipeline: about 15 minutes on aarch64 under emulation, too long for every CI run (measured figures
# in cross/README.md). Not here: the V4L2 capture test (tests/vivid/run.sh aarch64 boots an emulated
# aarch64 machine for that) and the booted-systemd test (amd64 only).
#
# Needs (installed by .ci/run): rustup target, Debian's libc6-dev-<arch>-cross (sysroot for qemu and
# bindgen headers), qemu-user-static, cmake, libclang, cargo-zigbuild and ziglang (pip), root for the
# binfmt_misc registration.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:?usage: cross/test.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [--full]}
full=${2:-}
glibc_floor=2.31
case "$target" in
    aarch64-unknown-linux-gnu)
        qemu=aarch64 sysroot=/usr/aarch64-linux-gnu deb_arch=arm64
        # A Raspberry Pi 4's cores (Cortex-A72; Jetson Orin's A78AE has the same features that matter).
        cpu=cortex-a72 cpuinfo="processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
        # onnxruntime publishes aarch64 wheels; the backend is built in and tested.
        features=(--features onnxruntime) ort_platform=manylinux_2_28_aarch64 ;;
    armv7-unknown-linux-gnueabihf)
        qemu=arm sysroot=/usr/arm-linux-gnueabihf deb_arch=armhf
        cpu=cortex-a15 cpuinfo="processor\t: %d\nmodel name\t: ARMv7 Processor rev 3 (v7l)\nBogoMIPS\t: 108.00\nFeatures\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm\nCPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x2\nCPU part\t: 0xc0f\nCPU revision\t: 3\n\n"
        # No onnxruntime build exists for armv7 on PyPI (nor from Microsoft): tract only, and the tests
        # that need onnxruntime are compiled out with the feature.
        features=() ort_platform=
        # libjpeg-turbo's NEON code: the wrapper cargo-zigbuild puts around zig cc passes the Rust
        # target's CPU (v7 without NEON), which fails libjpeg-turbo's NEON check, and a generic v7 CPU
        # with +neon crashes clang's ARM backend on jcgray-neon.c. C code is built for the Cortex-A7
        # (NEON, VFPv4: Raspberry Pi 2, and the A53/A72 of a Pi 3/4 on a 32-bit OS); a later -mcpu wins.
        export CFLAGS_armv7_unknown_linux_gnueabihf="-mcpu=cortex_a7" ;;
    *) echo "cross/test.sh: unsupported target '$target'" >&2; exit 2 ;;
esac

for tool in cargo-zigbuild "qemu-$qemu-static" cmake; do
    command -v "$tool" >/dev/null || { echo "cross/test.sh: $tool not found (see .ci/run for the installs)" >&2; exit 1; }
done
[ -d "$sysroot/lib" ] || { echo "cross/test.sh: no sysroot at $sysroot (apt-get install libc6-dev-$deb_arch-cross)" >&2; exit 1; }
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

# Test binaries spawn the cross-built `whaled` (CLI, service and MQTT tests) and `whaled` re-executes
# itself on SIGHUP: the kernel must know how to run an ARM executable, so register qemu-user with
# binfmt_misc for the duration of the run (the runner below only covers the test binaries themselves).
binfmt=/proc/sys/fs/binfmt_misc
[ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt"
registered=
if [ ! -e "$binfmt/qemu-$qemu" ]; then
    cat "/usr/lib/binfmt.d/qemu-$qemu.conf" > "$binfmt/register"
    registered=yes
fi
cleanup() { if [ -n "$registered" ]; then echo -1 > "$binfmt/qemu-$qemu"; fi; }
trap cleanup EXIT
export QEMU_LD_PREFIX=$sysroot QEMU_CPU=$cpu
triple_env=$(echo "$target" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${triple_env}_RUNNER=qemu-$qemu-static -L $sysroot"

if [ -n "$ort_platform" ]; then
    # The same onnxruntime version as the host's wheel, for this architecture.
    ort_dir=target/onnxruntime-$target
    if ! ls "$ort_dir"/libonnxruntime.so* >/dev/null 2>&1; then
        version=$(python3 -c 'import onnxruntime; print(onnxruntime.__version__)')
        pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
        mkdir -p "$ort_dir"
        python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --platform "$ort_platform" --python-version "$pyver" -d "$ort_dir" "onnxruntime==$version"
        python3 - "$ort_dir" <<'PY'
import glob, os, sys, zipfile
d = sys.argv[1]
(wheel,) = glob.glob(os.path.join(d, "onnxruntime-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if "/capi/libonnxruntime.so" in name:
            with open(os.path.join(d, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
os.remove(wheel)
PY
    fi
    ORT_DYLIB_PATH=$(ls "$ort_dir"/libonnxruntime.so* | sort | tail -1)
    export ORT_DYLIB_PATH
    echo "onnxruntime for $target: $ORT_DYLIB_PATH"
fi

python3 tools/gen_test_models.py --out models/generated

# qemu-user 7.2 shows programs the host's /proc/cpuinfo (x86). onnxruntime's cpuinfo library then
# dereferences NULL while loading (a segfault), and tract cannot see NEON on armv7. A board's cpuinfo,
# bind-mounted in a private mount namespace for the test run only, gives them what a real one reads.
fake_cpuinfo=target/cpuinfo-$target
: > "$fake_cpuinfo"
for n in 0 1; do printf "$cpuinfo" "$n" >> "$fake_cpuinfo"; done

echo "== build and test $target (release, under qemu-$qemu -cpu $cpu)"
# Release: tract unoptimised under emulation would take minutes per inference. The same build yields
# the binary that is packaged below, so the shipped binary is the tested one.
if [ "$full" = --full ]; then
    selection=()
else
    selection=(--lib --test model_errors --test mqtt --test service)
fi
cargo-zigbuild test --release "${features[@]}" --target "$target.$glibc_floor" "${selection[@]}" --no-run
unshare --mount --propagation private sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$fake_cpuinfo" \
    cargo-zigbuild test --release "${features[@]}" --target "$target.$glibc_floor" "${selection[@]}"

bin=target/$target/release/whaled
echo "== glibc floor of $bin"
floor=$(readelf --version-info --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
echo "$target: highest glibc symbol version required: $floor (JetPack 5 / Ubuntu 20.04 has 2.31)"
if [ "$(printf '%s\n%s\n' "$floor" "$glibc_floor" | sort -V | tail -1)" != "$glibc_floor" ]; then
    echo "cross/test.sh: $bin needs glibc $floor, above the $glibc_floor floor" >&2
    exit 1
fi

echo "== .deb ($deb_arch)"
# --no-build: package exactly the binary tested above. The glibc231 variant states the libc floor by
# hand: dpkg-shlibdeps would read this machine's cross libc (2.36) and demand that.
cargo deb --no-build --no-strip --target "$target" --variant glibc231 -o target/debian/ | tail -1
deb=$(ls -t target/debian/whaled_*_"$deb_arch".deb | head -1)
dpkg-deb -f "$deb" Package Version Architecture Depends
dpkg-deb -c "$deb" | grep -q "./usr/bin/whaled$" || { echo "cross/test.sh: $deb has no /usr/bin/whaled" >&2; exit 1; }
