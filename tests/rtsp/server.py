#!/usr/bin/python3
"""A real RTSP server for whaled's network-camera tests (GStreamer's gst-rtsp-server through PyGObject).

Serves an H.264 stream at rtsp://127.0.0.1:PORT/cam, encoded live by x264 from a folder of JPEG photos
(000.jpg, 001.jpg, ...) played in a loop at --fps, scaled to --size. With --user/--password the mount
asks for HTTP Basic credentials. Prints "READY" on stdout once it listens.

Run by the tests with Debian's /usr/bin/python3 (python3-gi, gir1.2-gst-rtsp-server-1.0); killed,
stopped (SIGSTOP: a server that accepts and then sends nothing) and restarted on the same port by them.
"""
import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", help="folder of 000.jpg, 001.jpg, ...")
    ap.add_argument("--clip", help="serve this H.264 .mp4 as it is (no re-encoding; bench/rtsp.sh)")
    ap.add_argument("--fps", type=int, default=10)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--colorimetry", help="e.g. bt709 (limited range); default: what jpegdec gives (full-range BT.601)")
    ap.add_argument("--audio", action="store_true", help="a second stream, PCMA audio, as many IP cameras send")
    ap.add_argument("--user")
    ap.add_argument("--password")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    colorimetry = f",colorimetry={args.colorimetry}" if args.colorimetry else ""

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    if args.clip:
        launch = f'( filesrc location="{args.clip}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )'
    elif args.dir:
        launch = (
            f'( multifilesrc location="{args.dir}/%03d.jpg" loop=true caps=image/jpeg,framerate={args.fps}/1 '
            f"! jpegdec ! videoconvert ! videoscale ! video/x-raw,width={w},height={h},format=I420{colorimetry} "
            f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} pass=quant quantizer=20 "
            f"! rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
    else:
        ap.error("give --dir or --clip")
    if args.audio:
        launch = launch[:-1] + "audiotestsrc is-live=true ! alawenc ! rtppcmapay name=pay1 pt=8 )"
    factory.set_launch(launch)
    factory.set_shared(True)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "crew")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password or ""), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_role_from_structure(
            Gst.Structure.new_from_string(
                "crew, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
            )
        )
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        sys.exit(1)
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    print("READY", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
