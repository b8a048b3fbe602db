#!/usr/bin/env bash
# Checks the Debian/Ubuntu packages that building (and testing) whaled needs beyond Rust itself, and
# installs the missing ones when run as root; otherwise prints the exact apt-get line and exits 1.
# Used by tools/demo.sh (the README's first command) and .ci/test (the second).
#
#   tools/system-packages.sh build   # C compiler, libclang (v4l bindgen), cmake + make + nasm (libjpeg-turbo)
#   tools/system-packages.sh gstreamer  # build + GStreamer's development files and the plugins that
#                                       # network cameras use (the `gstreamer` cargo feature)
#   tools/system-packages.sh test    # all of the above + mosquitto (MQTT tests' broker) + openssl (TLS test)
#                                    # + gpsd, gpsd-clients, python3-gps (GPS tests: gpsfake)
#                                    # + the RTSP tests' server (python3-gi, gst-rtsp-server) and x264
set -euo pipefail

what=${1:-build}
case "$what" in
    build | gstreamer | test) ;;
    *) echo "usage: tools/system-packages.sh build|gstreamer|test" >&2; exit 2 ;;
esac

missing=()
need() { # need PACKAGE WHY: records a missing package and says why it is needed
    missing+=("$1")
    echo "missing: $1 ($2)" >&2
}
have() { command -v "$1" >/dev/null; }
# An installed Debian package (for libraries and plugins, which have no command to look for).
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
# libclang as bindgen (clang-sys) finds it: $LIBCLANG_PATH, else the unversioned libclang.so that
# libclang-dev installs (its dependencies bring clang's own headers, which bindgen needs too).
have_libclang() {
    if [ -n "${LIBCLANG_PATH:-}" ]; then
        compgen -G "$LIBCLANG_PATH/libclang*.so*" >/dev/null
    else
        compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null || compgen -G "/usr/lib/*/libclang.so" >/dev/null
    fi
}

have cc || need gcc "a C compiler: Rust links with cc, and libjpeg-turbo and ring are C"
[ -e /usr/include/stdio.h ] || need libc6-dev "the C library's headers, for the C code above"
have make || need make "cmake's build files for libjpeg-turbo are Makefiles"
have_libclang || need libclang-dev "the v4l crate generates its bindings with bindgen, which loads libclang"
have cmake || need cmake "libjpeg-turbo is built from source with cmake"
have nasm || need nasm "libjpeg-turbo's x86 SIMD code is assembled with nasm"
if [ "$what" = gstreamer ] || [ "$what" = test ]; then
    have pkg-config || need pkg-config "the GStreamer bindings find the system libraries with pkg-config"
    have_pkg libgstreamer1.0-dev || need libgstreamer1.0-dev "the gstreamer feature links GStreamer"
    have_pkg libgstreamer-plugins-base1.0-dev || need libgstreamer-plugins-base1.0-dev "appsink, video frames, the Discoverer (--probe)"
    have_pkg gstreamer1.0-plugins-good || need gstreamer1.0-plugins-good "rtspsrc and the RTP depayloaders"
    have_pkg gstreamer1.0-plugins-bad || need gstreamer1.0-plugins-bad "h264parse and h265parse"
    have_pkg gstreamer1.0-libav || need gstreamer1.0-libav "avdec_h264 / avdec_h265, the software decoders"
fi
if [ "$what" = test ]; then
    have_pkg gstreamer1.0-plugins-ugly || need gstreamer1.0-plugins-ugly "x264enc: the RTSP tests' server encodes H.264 live"
    have_pkg gir1.2-gst-rtsp-server-1.0 || need gir1.2-gst-rtsp-server-1.0 "the RTSP tests' server (gst-rtsp-server)"
    /usr/bin/python3 -c 'import gi' 2>/dev/null || need python3-gi "the RTSP tests' server runs on /usr/bin/python3 with PyGObject"
    [ -x /usr/sbin/mosquitto ] || need mosquitto "the MQTT tests start their own broker"
    have openssl || need openssl "the MQTT TLS test makes its certificates with openssl"
    [ -x /usr/sbin/gpsd ] || need gpsd "the GPS tests run a real gpsd (through gpsfake)"
    have gpsfake || need gpsd-clients "the GPS tests feed gpsd NMEA logs with gpsfake"
    /usr/bin/python3 -c 'import gps' 2>/dev/null || need python3-gps "gpsfake (run by /usr/bin/python3) imports the gps module"
fi

[ ${#missing[@]} = 0 ] && exit 0
line="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" != 0 ]; then
    echo "install them first, then run this again:  sudo $line" >&2
    exit 1
fi
if ! have apt-get; then
    echo "no apt-get on this machine: install the packages above (Debian/Ubuntu names) with its package manager" >&2
    exit 1
fi
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh machine (or container image) may have no package lists yet.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
