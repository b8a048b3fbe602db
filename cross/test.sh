#!/usr/bin/env bash
# Cross-builds whaled for one ARM target with cargo-zigbuild (glibc 2.31 floor, JetPack 5), runs the
# test suite on the result under qemu-user, prints the binary's glibc floor (and fails above 2.31), and
# packages the tested binary as a .deb. Called by .ci/run for both targets; see cross/README.md.
#
#   cross/test.sh aarch64-unknown-linux-gnu        # Jetson, Raspberry Pi 4/5 (64-bit OS)
#   cross/test.sh armv7-unknown-linux-gnueabihf    # Raspberry Pi 2/3/4 (32-bit OS), other ARMv7 boards
#
# What runs under emulation in CI: the library's unit tests (config, scoring, outbox, decoding,
# preprocessing, inference on the shipped pre-filter), tests/model_errors.rs, tests/mqtt.rs (the outbox
# and publisher against the host's mosquitto: outage, SIGKILL and restart, TLS), tests/service.rs
# (sd_notify, the progress-fed watchdog, SIGHUP re-exec, /healthz), tests/parity.rs (tract's NEON
# kernels against onnxruntime on every model), tests/depthwise.rs and tests/pointwise.rs (whaled's own
# NEON conv ops against tract's and onnxruntime; compiled out on armv7, where the ops are not used),
# tests/cli.rs (the cross-built binary end to end, the B4 identification network included) and, on
# aarch64, the ops crate's own unit tests (its NEON kernels against the definition on odd shapes, the
# work split): built in the same cargo invocation as whaled's, so tract is not re-resolved and rebuilt
# for that one package (which cost ~3.5 min per target as a separate `cargo test -p`), tests/gps.rs
# (the gpsd client against a real gpsd) and tests/pillow_resize.rs (the Pillow-exact resize as compiled
# for the board, against Pillow on the host: 12 s). Measured under emulation and left out for their cost or their
# speed assumptions (2026-12-06, aarch64): allocations 123 s; sinks fails (20 s allowed for every
# detection through the broker); gps_daemon 85 s (after its 30 s wait for 12 frames became 120 s).
# gallery, sightings, export and zero_shot run the B4 embedder many times (not measured). parity.rs needs the
# onnxruntime feature, so on armv7 (tract only) it compiles to nothing; there tract is checked instead against this machine's
# onnxruntime through `whaled identify` on the same photos (below). Measured on a 2-vCPU machine
# (cross/README.md): aarch64 ~11.5 min of tests (parity 306 s; 332-407 s on 2026-12-06 with the gate's int8 case, 238 s once
# split into four tests that run in parallel with the B4 on one frame; cli 269 s before its B4 test went to x86_64 only, mqtt 67 s, service 42 s),
# armv7 ~7 min of tests (cli 172 s, 125 s since its B4 test is left to the parity check; mqtt 78 s) and 118 s for the parity check (two cases at a time; 162 s one by one); plus ~10-15 min per
# target for a cold build. With --full, the whole `cargo test`
# suite (adds the pipeline and allocation tests: ~15 min on aarch64). Not here: the V4L2 capture test
# (tests/vivid/run.sh aarch64 boots an emulated aarch64 machine for that) and the booted-systemd test
# (amd64 only).
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
mkdir -p target
fake_cpuinfo=target/cpuinfo-$target
: > "$fake_cpuinfo"
for n in 0 1; do printf "$cpuinfo" "$n" >> "$fake_cpuinfo"; done

# Runs a command with the board's cpuinfo in place of /proc/cpuinfo.
on_board() { unshare --mount --propagation private sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$fake_cpuinfo" "$@"; }

echo "== build and test $target (release, under qemu-$qemu -cpu $cpu)"
# Release: tract unoptimised under emulation would take minutes per inference. The same build yields
# the binary that is packaged below, so the shipped binary is the tested one.
if [ "$full" = --full ]; then
    selection=()
else
    selection=(--lib --test model_errors --test mqtt --test service --test parity --test depthwise --test pointwise --test stem --test reduce --test maxpool --test expand --test cli)
fi
# CROSS_SELECTION replaces the selection (e.g. "--test gps --test sinks", to time tests before adding them).
if [ -n "${CROSS_SELECTION:-}" ]; then
    read -ra selection <<<"$CROSS_SELECTION"
fi
# aarch64 ships whaled's own ops (armv7 leaves them to tract): their unit tests run too, in this invocation
# (`--lib` then means both crates' unit tests; features unify, so tract is built once).
if [ "$target" = aarch64-unknown-linux-gnu ]; then
    selection=(-p whaled -p whaled-tract-ops "${selection[@]}")
    # The gpsd client against a real gpsd (gpsfake): 27 s under emulation, ~30 s to build. Pillow's exact
    # resize, as the compiler vectorised it for NEON, against Pillow itself on the host: 12 s.
    if [ "$full" != --full ] && [ -z "${CROSS_SELECTION:-}" ]; then selection+=(--test gps --test pillow_resize); fi
fi
build_start=$SECONDS
cargo-zigbuild test --release "${features[@]}" --target "$target.$glibc_floor" "${selection[@]}" --no-run
test_start=$SECONDS
# The full-size zoo (1.2 GB of ViTs, ResNets, Swin) would take hours under emulation: its reduced twins,
# with the same op kinds, run here; the full size runs on x86_64 (.ci/test). `whaled eval` against the
# 48 drawn boxes checks eval's IoU arithmetic and decoded sizes, nothing ARM-specific, and its 48 gate
# inferences cost ~110 s under emulation per target (cli: 188 -> 296 s on aarch64): x86_64 only. The
# onnxruntime session-per-worker test checks whaled's session plumbing (four threads, outputs kept apart),
# nothing the board's kernels change, and took 54 s under qemu-aarch64 (2026-12-06): x86_64 only.
skips=(--skip full_size_zoo --skip eval_reports_localisation_against_drawn_boxes
    --skip onnxruntime_sessions_per_worker_keep_outputs_apart)
# cli's three `whaled identify` runs of the B4 check the Detection's fields and the min_confidence rule,
# nothing the board's kernels change, and were cli's longest test under emulation (~200 s): x86_64 only.
# The B4's numerics on the board are checked against onnxruntime: on aarch64 by tests/parity.rs (through
# the same Model::load and run), on armv7 by the parity check's b4-fp32 case below (`whaled identify`).
skips+=(--skip identify_with_the_upstream_identification_network)
on_board cargo-zigbuild test --release "${features[@]}" --target "$target.$glibc_floor" "${selection[@]}" -- "${skips[@]}"
echo "$target: build $((test_start - build_start)) s, tests under emulation $((SECONDS - test_start)) s"

bin=target/$target/release/whaled
if [ -z "$ort_platform" ]; then
    # tests/parity.rs compiles to nothing without the onnxruntime feature, so on this target tract's
    # kernels (NEON on armv7) are checked here instead: the cross-built `whaled identify` (tract, under
    # qemu with the board's cpuinfo) against this machine's `whaled identify` with the onnxruntime
    # backend, on the same photos, for the shipped pre-filters (the marine gate; the zero-shot Lite0, fp32
    # and int8) and every generated model
    # (B0, ResNet-18, the B4 identification network through its head): pre-filter scores within
    # ABS + REL x |score| (fp32: 1e-3 relative; int8: 0.02), and for the B4 the same top-5 identities
    # with probabilities within 2e-4 (they are rounded to 4 dp).
    echo "== parity: tract on $target against onnxruntime on this machine (whaled identify)"
    parity_start=$SECONDS
    # The reference: this machine's whaled with the onnxruntime backend ($HOST_WHALED, else the dev build
    # .ci/test made with the same features, so this build is a no-op in CI).
    host_whaled=${HOST_WHALED:-}
    if [ -z "$host_whaled" ]; then
        cargo build --quiet --features onnxruntime,gstreamer --bin whaled
        host_whaled=target/debug/whaled
    fi
    host_ort=$(python3 -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')
    parity=target/parity-$target
    rm -rf "$parity"
    mkdir -p "$parity/one"
    cp tests/photos/synthetic_0.jpg "$parity/one/"
    gen=$PWD/models/generated
    # name | pre-filter model | variant | identification model | photos | ABS | REL
    # The B4 case first: it is the longest (two run at a time, below).
    cases=(
        "b4-fp32|$gen/efficientnet-b0-random/model.toml|fp32|$gen/effb4-arcface-random/model.toml|$PWD/$parity/one|1e-7|1e-3"
        "gate-fp32|marine-gate-lite0|fp32||$PWD/tests/photos|1e-7|1e-3"
        "gate-v2-fp32|marine-gate-v2|fp32||$PWD/tests/photos|1e-7|1e-3"
        "lite0-fp32|efficientnet-lite0|fp32||$PWD/tests/photos|1e-7|1e-3"
        "lite0-int8|efficientnet-lite0|int8||$PWD/tests/photos|0.02|0"
        "b0-fp32|$gen/efficientnet-b0-random/model.toml|fp32||$PWD/tests/photos|1e-7|1e-3"
        "resnet18-fp32|$gen/resnet18-random/model.toml|fp32||$PWD/tests/photos|1e-7|1e-3"
    )
    # One case: both configs, the reference on this machine, the board's run, the comparison.
    parity_case() {
        local name prefilter variant embedder photos abs rel backend t0
        IFS='|' read -r name prefilter variant embedder photos abs rel <<<"$1"
        for backend in tract onnxruntime; do
            {
                printf '[inference]\nbackend = "%s"\n' "$backend"
                printf '[inference.onnxruntime]\nlibrary = "%s"\nexecution_providers = ["cpu"]\n' "$host_ort"
                printf '[prefilter]\nmodel = "%s"\nvariant = "%s"\nthreshold = 0.0\n' "$prefilter" "$variant"
                if [ -n "$embedder" ]; then printf '[identification]\nmodel = "%s"\nmin_confidence = 0.0\n' "$embedder"; fi
            } > "$parity/$name-$backend.toml"
        done
        "$host_whaled" identify --config "$parity/$name-onnxruntime.toml" "$photos" > "$parity/$name-onnxruntime.jsonl" 2> "$parity/$name-onnxruntime.log" \
            || { cat "$parity/$name-onnxruntime.log" >&2; echo "cross/test.sh: parity $name: onnxruntime on this machine failed" >&2; return 1; }
        t0=$SECONDS
        on_board "$bin" identify --config "$parity/$name-tract.toml" "$photos" > "$parity/$name-tract.jsonl" 2> "$parity/$name-tract.log" \
            || { cat "$parity/$name-tract.log" >&2; echo "cross/test.sh: parity $name: whaled on $target failed" >&2; return 1; }
        python3 - "$parity/$name-onnxruntime.jsonl" "$parity/$name-tract.jsonl" "$name" "$abs" "$rel" "$((SECONDS - t0))" <<'PY'
import json, sys
ref_path, got_path, name, secs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[6]
abs_tol, rel_tol = float(sys.argv[4]), float(sys.argv[5])
load = lambda p: {r["image_ind"]: r for r in map(json.loads, open(p))}
ref, got = load(ref_path), load(got_path)
problems = []
if not ref or sorted(ref) != sorted(got):
    problems.append(f"images differ: onnxruntime {sorted(ref)}, tract {sorted(got)}")
score_diff = score_rel = prob_diff = 0.0
for image in sorted(set(ref) & set(got)):
    r, g = ref[image], got[image]
    want = r["prefilter"]["score"]
    d = abs(want - g["prefilter"]["score"])
    score_diff, score_rel = max(score_diff, d), max(score_rel, d / abs(want) if want else 0.0)
    if d > abs_tol + rel_tol * abs(want):
        problems.append(f"{image}: pre-filter score {g['prefilter']['score']} (tract) vs {want} (onnxruntime), more than {abs_tol:g} + {rel_tol:g} x score apart")
    top = lambda x: [x["class_animal"]] + [c["class_animal"] for c in x["candidates"]]
    probs = lambda x: [x["probability"]] + [c["probability"] for c in x["candidates"]]
    if top(r) != top(g):
        problems.append(f"{image}: top-5 {top(g)} (tract) vs {top(r)} (onnxruntime)")
    elif r["candidates"]:
        prob_diff = max([prob_diff] + [abs(a - b) for a, b in zip(probs(r), probs(g))])
        if prob_diff > 2e-4:
            problems.append(f"{image}: probabilities {probs(g)} (tract) vs {probs(r)} (onnxruntime)")
print(f"parity {name}: {len(got)} image(s), max |score difference| {score_diff:.1e} ({score_rel:.1e} relative)"
      + (f", top-5 {'differs' if any('top-5' in p for p in problems) else 'identical'}, max |probability difference| {prob_diff:.1e}"
         if any(r["candidates"] for r in ref.values()) else "")
      + f"; {secs} s under emulation")
for p in problems:
    print(f"FAILED parity {name}: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
    }
    # Two cases at a time (each is one single-threaded process under qemu beside one on this machine):
    # 118 s instead of 162 on armv7 (cross/README.md). Each case's output is printed in order once all
    # are done; any failure fails the run.
    for case in "${cases[@]}"; do
        name=${case%%|*}
        ( parity_case "$case" && touch "$parity/$name.ok" ) > "$parity/$name.out" 2>&1 &
        while [ "$(jobs -pr | wc -l)" -ge 2 ]; do wait -n || true; done
    done
    wait
    parity_failed=0
    for case in "${cases[@]}"; do
        name=${case%%|*}
        cat "$parity/$name.out"
        [ -f "$parity/$name.ok" ] || { echo "cross/test.sh: parity $name failed" >&2; parity_failed=1; }
    done
    [ "$parity_failed" = 0 ] || exit 1
    echo "parity on $target: $((SECONDS - parity_start)) s"
fi

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
