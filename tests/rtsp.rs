//! Network cameras against a real RTSP server (GStreamer's gst-rtsp-server, started by each test on
//! its own loopback port, serving H.264 encoded live from whales-dev photos): frames reach the
//! pipeline and match the photos; a server killed and restarted mid-run comes back by itself while the
//! other camera never stops; a server that accepts and then sends nothing is reported stalled and
//! recovers; wrong credentials give one ERROR and never show the password; under a slow model the
//! camera delivers fresh frames and drops the rest; a camera that also sends audio; `kind = "gstreamer"`
//! pipelines (JPEG, NV12, I420, YUY2 against GStreamer's own conversion); `cameras --probe` and
//! `check-config` on the command line.
//!
//! Needs the `gstreamer` feature and Debian's GStreamer packages (tools/system-packages.sh test).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::broker::{free_port, unsafe_kill};
use common::*;
use whaled::config::Config;
use whaled::detection::Detection;
use whaled::identify::{GalleryAccess, Identifier};
use whaled::pipeline::{run, run_controlled, Camera, Control, Options, Shutdown};
use whaled::source::SourceEvent;

/// gst-rtsp-server through Debian's python3-gi, serving the photos in `dir` at `fps`.
struct RtspServer {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    _photos: tempfile::TempDir,
}

impl RtspServer {
    fn start(fps: u32, size: &str, login: Option<(&str, &str)>) -> RtspServer {
        Self::start_with(fps, size, login, None, false)
    }

    fn start_with(
        fps: u32,
        size: &str,
        login: Option<(&str, &str)>,
        colorimetry: Option<&str>,
        audio: bool,
    ) -> RtspServer {
        // A folder of 000.jpg, 001.jpg, ...: multifilesrc plays numbered files. Scaled to the stream's
        // size here, so the server's own scaler does nothing and frames can be compared with these files.
        let photos = tempfile::tempdir().unwrap();
        let (w, h) = size.split_once('x').map(|(w, h)| (w.parse().unwrap(), h.parse().unwrap())).unwrap();
        for (i, p) in whales_dev("cetacean", 6).iter().enumerate() {
            let img = image::open(p).unwrap().to_rgb8();
            let img = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
            write(photos.path(), &format!("{i:03}.jpg"), &jpeg(&img, 95));
        }
        let port = free_port();
        let mut args = vec![
            repo().join("tests/rtsp/server.py").display().to_string(),
            "--port".into(),
            port.to_string(),
            "--dir".into(),
            photos.path().display().to_string(),
            "--fps".into(),
            fps.to_string(),
            "--size".into(),
            size.into(),
        ];
        if let Some(c) = colorimetry {
            args.extend(["--colorimetry".into(), c.into()]);
        }
        if audio {
            args.push("--audio".into());
        }
        if let Some((u, p)) = login {
            args.extend(["--user".into(), u.into(), "--password".into(), p.into()]);
        }
        let mut s = RtspServer { port, args, child: None, _photos: photos };
        s.restart();
        s
    }

    fn photos(&self) -> &std::path::Path {
        self._photos.path()
    }

    fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/cam", self.port)
    }

    /// (Re)starts the server on the same port; returns once it listens.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let t = Instant::now();
        loop {
            let mut child = Command::new("/usr/bin/python3")
                .args(&self.args)
                .stdout(Stdio::piped())
                .spawn()
                .expect("the RTSP tests need /usr/bin/python3 with python3-gi (tools/system-packages.sh test)");
            let mut line = String::new();
            let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
            if line.trim() == "READY" {
                self.child = Some(child);
                return;
            }
            // The port of a killed server can take a moment to be free again.
            let _ = child.wait();
            assert!(t.elapsed() < Duration::from_secs(20), "the RTSP server did not start (port {})", self.port);
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT: the sockets stay open and nothing is sent (a camera that hangs).
    fn signal(&self, sig: &str) {
        unsafe_kill(self.child.as_ref().expect("running").id(), sig);
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("CONT");
        }
        self.kill();
    }
}

fn identifier(config: &str) -> Arc<Identifier> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(&dir.path().join("whaled.toml"), config).unwrap();
    Arc::new(Identifier::from_config(&cfg, GalleryAccess::ReadWrite).unwrap())
}

/// A camera from a `[[camera]]` block, through the same parsing and `source::open` as the daemon.
fn camera(block: &str) -> Camera {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(&dir.path().join("whaled.toml"), &format!("[[camera]]\n{block}")).unwrap();
    let c = &cfg.cameras[0];
    Camera {
        name: c.name.as_str().into(),
        source: whaled::source::open(c).unwrap(),
        sample_interval: c.sample_interval,
    }
}

fn replay_camera(name: &str) -> Camera {
    let frames: Vec<Arc<[u8]>> = (0..4).map(|i| Arc::from(jpeg(&frame(i, 320, 240), 85))).collect();
    Camera {
        name: name.into(),
        source: Box::new(whaled::source::replay::ReplaySource::from_frames(name.into(), frames, 4.0, true)),
        sample_interval: None,
    }
}

fn options() -> Options {
    Options { workers: 1, emit_rejected: true, stats_interval: None, device_id: "test".into(), ..Options::default() }
}

/// Detections with the moment they reached the sink, shared with the thread that drives the server.
type Seen = Arc<Mutex<Vec<(Detection, Instant)>>>;

fn count(seen: &Seen, camera: &str, after: Instant) -> usize {
    seen.lock().unwrap().iter().filter(|(d, at)| d.source == camera && *at > after).count()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let sum: u64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| u64::from(x.abs_diff(y))).sum();
    sum as f64 / a.as_raw().len() as f64
}

/// The decoded frames are the photos: each frame, converted from the decoder's I420 by whaled, is
/// within a few levels of one of the source photos scaled by the `image` crate (an independent path);
/// capture times are on the monotonic clock, recent, and ~1/fps apart.
#[test]
fn rtsp_frames_are_the_served_photos_with_stream_times() {
    use whaled::source::pixels::{Colour, Matrix};
    // x264 fed by jpegdec signals full-range BT.601; forced to bt709 it signals limited-range BT.709,
    // as HD cameras do. Read with the wrong one, frames are ~10 levels off.
    frames_match_photos(None, Colour { full_range: true, matrix: Matrix::Bt601 });
    frames_match_photos(Some("bt709"), Colour { full_range: false, matrix: Matrix::Bt709 });
}

fn frames_match_photos(colorimetry: Option<&str>, declared: whaled::source::pixels::Colour) {
    let server = RtspServer::start_with(10, "640x360", None, colorimetry, false);
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(
        &dir.path().join("whaled.toml"),
        &format!("[[camera]]\nname = \"direct\"\nkind = \"rtsp\"\nurl = \"{}\"\n", server.url()),
    )
    .unwrap();
    let mut source = whaled::source::open(&cfg.cameras[0]).unwrap();
    // What the server streams, decoded by the `image` crate: an independent path to the same pixels.
    let photos: Vec<image::RgbImage> =
        (0..6).map(|i| image::open(server.photos().join(format!("{i:03}.jpg"))).unwrap().to_rgb8()).collect();
    let t = Instant::now();
    let mut frames = Vec::new();
    while frames.len() < 12 {
        assert!(t.elapsed() < Duration::from_secs(30), "only {} frames in 30 s", frames.len());
        match source.next().unwrap() {
            SourceEvent::Frame(f) => frames.push((f, Instant::now())),
            SourceEvent::Idle => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut matched = Vec::new();
    for (f, pulled) in &frames {
        let whaled::source::FrameData::Raw { format, colour, width, height, stride, bytes } = &f.data else {
            panic!("an H.264 stream gives raw frames")
        };
        assert_eq!((*format, *width, *height), (whaled::source::pixels::RawFormat::I420, 640, 360));
        assert_eq!(*colour, declared);
        let rgb = whaled::source::pixels::to_rgb(*format, *colour, *width, *height, *stride, bytes, "direct").unwrap();
        let (best, diff) = photos
            .iter()
            .enumerate()
            .map(|(i, p)| (i, mean_abs_diff(&rgb, p)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        eprintln!("{colorimetry:?} frame {}: {diff:.2} levels from photo #{best}", f.seq);
        assert!(diff < 4.0, "frame {} is {diff:.1} levels from the nearest photo (#{best})", f.seq);
        matched.push(best);
        assert!(f.captured_mono <= *pulled, "captured after it was pulled");
        assert!(pulled.duration_since(f.captured_mono) < Duration::from_secs(2), "a stale capture time");
        let age = SystemTime::now().duration_since(f.captured_at).unwrap();
        assert!(age < Duration::from_secs(5), "captured_at {age:?} ago");
    }
    // The clip plays the photos in order, one per frame.
    let distinct: std::collections::BTreeSet<_> = matched.iter().collect();
    assert!(distinct.len() >= 5, "frames matched photos {matched:?}");
    // Stream times: 10 fps -> 100 ms apart on average over the last frames.
    let (first, last) = (&frames[2].0, &frames[11].0);
    let per = last.captured_mono.duration_since(first.captured_mono) / (last.seq - first.seq) as u32;
    assert!((60..=160).contains(&per.as_millis()), "frames {per:?} apart at 10 fps");
}

/// Frames from the network camera reach the models and give detections beside a second camera. The
/// camera also sends an audio stream, as many IP cameras do: whaled takes the video and ignores it.
#[test]
fn rtsp_camera_gets_detections_beside_another_camera() {
    let server = RtspServer::start_with(10, "640x360", None, None, true);
    let id = identifier("");
    let cams = vec![
        camera(&format!("name = \"mast\"\nkind = \"rtsp\"\nurl = \"{}\"\nsample_fps = 4\n", server.url())),
        replay_camera("bow"),
    ];
    let shutdown = Shutdown::new();
    let mut got: Vec<Detection> = Vec::new();
    let stop = shutdown.clone();
    let stats = run(id, cams, &Options { emit_rejected: false, ..options() }, &shutdown, |d| {
        got.push(d);
        if got.iter().filter(|d| d.source == "mast").count() >= 4 {
            stop.trigger();
        }
        Ok(())
    })
    .unwrap();
    let mast: Vec<&Detection> = got.iter().filter(|d| d.source == "mast").collect();
    assert!(mast.len() >= 4, "{stats:?}");
    // emit_rejected is off: these passed the shipped gate, on whale photos streamed over RTSP.
    assert!(mast.iter().all(|d| d.is_cetacean && d.bbox == [0, 0, 640, 360]), "{mast:?}");
    let s = stats.iter().find(|s| s.camera == "mast").unwrap();
    assert!(s.frames_captured > s.frames_sampled, "sampling at 4 of 10 fps: {s:?}");
    assert_eq!(s.errors, 0, "{s:?}");
}

/// The camera is unreachable at start, comes up, then dies mid-run and comes back on the same port:
/// the camera connects and reconnects by itself, each failure is logged once (not every retry), and
/// the other camera never stops.
#[test]
fn killed_server_comes_back_and_the_other_camera_never_stops() {
    logs::capture();
    let mut server = RtspServer::start(10, "640x360", None);
    server.kill(); // unreachable when the pipeline starts
    let id = identifier("");
    let cams = vec![
        camera(&format!(
            "name = \"cut\"\nkind = \"rtsp\"\nurl = \"{}\"\nsample_fps = 4\ntimeout = \"3s\"\n",
            server.url()
        )),
        replay_camera("steady"),
    ];
    let seen: Seen = Arc::default();
    let shutdown = Shutdown::new();
    let (stop, watch) = (shutdown.clone(), seen.clone());
    let driver = std::thread::spawn(move || {
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(count(&watch, "cut", t0), 0, "frames from a camera that is not up");
        server.restart();
        wait_until("first frames", Duration::from_secs(30), || count(&watch, "cut", t0) >= 2);
        server.kill();
        let killed = Instant::now();
        // Long enough for several retries (backoff 0.5, 1, 2, 4 s).
        std::thread::sleep(Duration::from_secs(6));
        let steady_during_outage = count(&watch, "steady", killed);
        let cut_during_outage = count(&watch, "cut", killed + Duration::from_millis(500));
        server.restart();
        let restarted = Instant::now();
        wait_until("frames after the restart", Duration::from_secs(60), || count(&watch, "cut", restarted) >= 2);
        stop.trigger();
        (steady_during_outage, cut_during_outage, restarted.elapsed(), server)
    });
    let stats = run(id, cams, &options(), &shutdown, |d| {
        seen.lock().unwrap().push((d, Instant::now()));
        Ok(())
    })
    .unwrap();
    let (steady, cut, back_after, _server) = driver.join().unwrap();
    assert!(steady >= 10, "the other camera gave {steady} detections in the 6 s outage");
    assert_eq!(cut, 0, "detections from a dead server");
    eprintln!("back {back_after:?} after the restart");
    let s = stats.iter().find(|s| s.camera == "cut").unwrap();
    assert!(s.errors >= 4 && s.reconnects >= 2, "{s:?}");
    let warned = logs::matching(log::Level::Warn, &["camera cut:"]);
    assert!(
        !warned.is_empty() && (warned.len() as u64) < s.errors,
        "{} WARN lines for {} failures: {warned:#?}",
        warned.len(),
        s.errors
    );
    assert!(logs::matching(log::Level::Error, &["camera cut:"]).is_empty(), "a cut stream is not an operator's error");
    logs::wait_for(log::Level::Warn, &["camera cut: delivering frames again"], Duration::from_secs(1));
}

/// A server that keeps the connection and sends nothing (SIGSTOP): after `timeout` the camera is
/// reported stalled (once) and shows as failing on /healthz, while the capture loop keeps coming round
/// (the watchdog sees progress); after SIGCONT it recovers by itself.
#[test]
fn a_stream_that_stalls_without_closing_is_reopened() {
    logs::capture();
    let server = RtspServer::start(10, "640x360", None);
    let id = identifier("");
    let cams = vec![camera(&format!(
        "name = \"hang\"\nkind = \"rtsp\"\nurl = \"{}\"\nsample_fps = 4\ntimeout = \"2s\"\n",
        server.url()
    ))];
    let control = Arc::new(Control::new(&["hang".into()], id.clone()));
    let seen: Seen = Arc::default();
    let shutdown = Shutdown::new();
    let (stop, watch, ctl) = (shutdown.clone(), seen.clone(), control.clone());
    let driver = std::thread::spawn(move || {
        let t0 = Instant::now();
        wait_until("first frames", Duration::from_secs(30), || count(&watch, "hang", t0) >= 2);
        server.signal("STOP");
        logs::wait_for(log::Level::Warn, &["camera hang:", "no frame within 2s: stalled"], Duration::from_secs(15));
        let problems = ctl.problems(Duration::from_secs(60));
        let progressing = ctl.progressing(Duration::from_secs(5));
        // Several more attempts against the stopped server: each times out (rtspsrc's own timeout or
        // whaled's, whichever fires first), and none is logged again.
        std::thread::sleep(Duration::from_secs(5));
        let stalled_lines = logs::matching(log::Level::Warn, &["camera hang:", "stalled"]).len();
        server.signal("CONT");
        let resumed = Instant::now();
        wait_until("frames after SIGCONT", Duration::from_secs(60), || count(&watch, "hang", resumed) >= 2);
        stop.trigger();
        (problems, progressing, stalled_lines, server)
    });
    let stats = run_controlled(id, cams, &options(), &shutdown, &control, |e| {
        if let whaled::pipeline::Event::Detection(d) = e {
            seen.lock().unwrap().push((d, Instant::now()));
        }
        Ok(())
    })
    .unwrap();
    let (problems, progressing, stalled_lines, _server) = driver.join().unwrap();
    assert!(problems.iter().any(|p| p.contains("camera hang: failing")), "{problems:?}");
    assert!(progressing, "a stalled camera must not stall the watchdog's progress rule");
    assert_eq!(stalled_lines, 1, "the stall is reported once while it lasts");
    assert!(stats[0].reconnects >= 1, "{:?}", stats[0]);
}

/// Wrong credentials: one ERROR naming the cause, however many retries, and the password in no log
/// line; the right ones (given in the URL) get frames, and that password is never logged either.
#[test]
fn wrong_credentials_give_one_error_and_no_password_in_the_log() {
    logs::capture();
    let server = RtspServer::start(10, "320x180", Some(("crew", "right-horse")));
    let id = identifier("");
    let url = server.url();
    let cams = vec![
        camera(&format!(
            "name = \"locked\"\nkind = \"rtsp\"\nurl = \"{url}\"\nuser = \"crew\"\npassword = \"wrong-staple\"\n"
        )),
        camera(&format!(
            "name = \"unlocked\"\nkind = \"rtsp\"\nurl = \"{}\"\nsample_fps = 4\n",
            url.replace("rtsp://", "rtsp://crew:right-horse@")
        )),
    ];
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let t0 = Instant::now();
    let mut unlocked = 0;
    let stats = run(id, cams, &options(), &shutdown, |d| {
        unlocked += usize::from(d.source == "unlocked");
        // Several retries of the locked camera (0.5 + 1 + 2 s of backoff) and frames from the other.
        if t0.elapsed() > Duration::from_secs(6) && unlocked >= 3 {
            stop.trigger();
        }
        Ok(())
    })
    .unwrap();
    let locked = stats.iter().find(|s| s.camera == "locked").unwrap();
    assert!(locked.errors >= 3 && locked.frames_captured == 0, "{locked:?}");
    let errors = logs::matching(log::Level::Error, &["camera locked:"]);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("refused the credentials"), "{}", errors[0]);
    let every_line = logs::matching(log::Level::Info, &[])
        .into_iter()
        .chain(logs::matching(log::Level::Warn, &[]))
        .chain(logs::matching(log::Level::Error, &[]))
        .collect::<Vec<_>>();
    for secret in ["wrong-staple", "right-horse"] {
        assert!(every_line.iter().all(|l| !l.contains(secret)), "{secret} in the log");
    }
    assert!(
        every_line.iter().any(|l| l.contains("camera unlocked: rtsp://127.0.0.1")),
        "the URL is logged without credentials"
    );
}

/// A 25 fps stream under the B4 identifier (hundreds of ms per frame): the camera keeps pulling at
/// the stream's rate, the pipeline drops what inference cannot take, and every assessed frame is fresh.
#[test]
fn a_slow_model_gets_fresh_frames_and_drops_the_rest() {
    let server = RtspServer::start(25, "640x360", None);
    let id = identifier(&format!(
        "[prefilter]\nmodel = \"{}\"\nthreshold = 0.0\n[identification]\nmodel = \"{}\"\n",
        b0_manifest().display(),
        b4_manifest().display()
    ));
    let cams = vec![camera(&format!("name = \"fast\"\nkind = \"rtsp\"\nurl = \"{}\"\n", server.url()))];
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let mut emitted: Vec<(Detection, Duration)> = Vec::new();
    let started = Instant::now();
    let stats = run(id, cams, &options(), &shutdown, |d| {
        let age =
            SystemTime::now().duration_since(humantime::parse_rfc3339(&d.captured_at).unwrap()).unwrap_or_default();
        emitted.push((d, age));
        if emitted.len() == 6 {
            stop.trigger();
        }
        Ok(())
    })
    .unwrap();
    let s = &stats[0];
    eprintln!("{s:?} in {:?}", started.elapsed());
    let per_frame = Duration::from_secs_f64(s.latency_p95_ms.unwrap() / 1e3);
    assert!(s.frames_dropped > 0, "a slow model must cause drops: {s:?}");
    assert!(s.frames_sampled - s.frames_decoded - s.frames_dropped <= 1, "every frame accounted for: {s:?}");
    for (d, age) in &emitted {
        assert!(
            *age < per_frame * 3 + Duration::from_millis(500),
            "{} is {age:?} old (per frame {per_frame:?})",
            d.image_ind
        );
        assert_eq!(d.candidates.len(), 4, "identification ran");
    }
}

/// Pulls `n` frames from a `kind = "gstreamer"` camera built from `pipeline`.
fn pipeline_frames(pipeline: &str, n: usize) -> Vec<whaled::source::Frame> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(
        &dir.path().join("whaled.toml"),
        &format!("[[camera]]\nname = \"pipe\"\nkind = \"gstreamer\"\npipeline = \"{pipeline}\"\n"),
    )
    .unwrap();
    let mut source = whaled::source::open(&cfg.cameras[0]).unwrap();
    let t = Instant::now();
    let mut frames = Vec::new();
    while frames.len() < n {
        assert!(t.elapsed() < Duration::from_secs(20), "{pipeline}: only {} frames", frames.len());
        if let SourceEvent::Frame(f) = source.next().unwrap() {
            frames.push(f);
        }
    }
    frames
}

/// `kind = "gstreamer"`: the operator's pipeline. JPEG frames (an HTTP MJPEG camera's) arrive encoded
/// and decode; NV12, I420 and YUY2 frames, converted by whaled, match the same frames converted to RGB
/// by GStreamer's own videoconvert (a second code path, with its own chroma upsampling) within 4 levels
/// on average, and read with the wrong range they would not.
#[test]
fn gstreamer_pipelines_deliver_jpeg_and_raw_frames() {
    let src = "videotestsrc pattern=smpte is-live=true";
    let caps = "width=320,height=240,framerate=20/1";
    let jpeg = pipeline_frames(&format!("{src} ! video/x-raw,{caps} ! jpegenc ! appsink name=whaled"), 2);
    let whaled::source::FrameData::Encoded(bytes) = &jpeg[1].data else { panic!("JPEG frames stay encoded") };
    let img = image::load_from_memory(bytes).unwrap();
    assert_eq!((img.width(), img.height()), (320, 240));

    let to_rgb = |f: &whaled::source::Frame| match &f.data {
        whaled::source::FrameData::Raw { format, colour, width, height, stride, bytes } => {
            whaled::source::pixels::to_rgb(*format, *colour, *width, *height, *stride, bytes, "pipe").unwrap()
        }
        other => panic!("raw frames expected, got {other:?}"),
    };
    for format in ["NV12", "I420", "YUY2"] {
        let raw = format!("{src} ! video/x-raw,format={format},{caps}");
        let reference = to_rgb(
            &pipeline_frames(&format!("{raw} ! videoconvert ! video/x-raw,format=RGB ! appsink name=whaled"), 1)[0],
        );
        let frames = pipeline_frames(&format!("{raw} ! appsink name=whaled"), 1);
        let diff = mean_abs_diff(&to_rgb(&frames[0]), &reference);
        eprintln!("{format}: {diff:.2} levels from GStreamer's RGB");
        // Measured 1.5-2.8: the two upsample chroma differently at the bars' edges.
        assert!(diff < 4.0, "{format}: {diff:.2} levels from GStreamer's own conversion");
        // The test can tell: the same frame read with the other range is far off.
        let mut wrong = frames[0].clone();
        if let whaled::source::FrameData::Raw { colour, .. } = &mut wrong.data {
            colour.full_range = !colour.full_range;
        }
        let off = mean_abs_diff(&to_rgb(&wrong), &reference);
        assert!(off > 8.0, "{format}: the wrong range is only {off:.2} levels off");
    }
}

/// The command line: `whaled cameras --probe URL` describes the stream (and never prints the password
/// the URL carries); `whaled check-config` names the elements this machine lacks (a Jetson's decoder on
/// a PC) and exits non-zero.
#[test]
fn probe_and_check_config_on_the_command_line() {
    let server = RtspServer::start(10, "320x180", Some(("crew", "right-horse")));
    let whaled = env!("CARGO_BIN_EXE_whaled");
    let url = server.url().replace("rtsp://", "rtsp://crew:right-horse@");
    let out = Command::new(whaled).args(["cameras", "--probe", &url]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("{}:", server.url())) && text.contains("video: H.264"), "{text}");
    assert!(text.contains("320x180 @ 10.00 fps"), "{text}");
    assert!(!text.contains("right-horse"), "the password printed: {text}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "whaled.toml",
        format!(
            "[[camera]]\nname = \"jetson\"\nkind = \"rtsp\"\nurl = \"{}\"\ndecoder = \"nvv4l2decoder ! nvvidconv\"\n",
            server.url()
        )
        .as_bytes(),
    );
    let out = Command::new(whaled).args(["check-config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check-config accepted a missing element");
    assert!(err.contains("camera jetson: this machine has no GStreamer element nvv4l2decoder, nvvidconv"), "{err}");
}
