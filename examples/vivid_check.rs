//! The V4L2 check that runs inside a QEMU guest against the kernel's `vivid` test driver
//! (tests/vivid/run.sh boots it). Exits 0 only if every step holds; prints what it saw, and each
//! step's seconds (`== step ...: N s`), so a slow host shows where its time went.
//!
//! Inference under QEMU's software emulation is the slow part (seconds per frame, and far more on some
//! hosts), so the check runs the fewest inferences that prove each point and waits for events, not
//! for fixed times sized on one machine:
//!
//! 1. `whaled cameras`-style description of /dev/video0.
//! 2. Format negotiation: preference [MJPEG, YUYV] on vivid (no MJPEG) must pick YUYV 640x480.
//! 3. 30 frames captured with kernel timestamps, all decoded to RGB, the first through the pre-filter;
//!    then 20 more one at a time through the pipeline's decoder: each matches its own bytes, none its
//!    predecessor.
//! 4. NV12, GREY and RGB24 negotiated in turn, 5 frames each decoded to 640x480 RGB, the first through
//!    the pre-filter.
//! 5. The live pipeline on that camera: once it has emitted a detection the driver is unbound, and bound
//!    again: capture errors are counted, the camera is reopened (reconnects >= 1), a frame captured
//!    after the rebind is detected, and shutdown is clean (no hang, no panic). Every wait is bounded
//!    by a multiple of the slowest inference measured in steps 3 and 4.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use whaled::config::{CameraConfig, Config, PixelFormat, SourceConfig};
use whaled::identify::{GalleryAccess, Identifier};
use whaled::pipeline::{self, Camera, Options, Shutdown};
use whaled::source::v4l2::{describe, V4l2Settings, V4l2Source};
use whaled::source::{Source, SourceEvent};

const DEVICE: &str = "/dev/video0";
const DRIVER: &str = "/sys/bus/platform/drivers/vivid";

fn settings() -> V4l2Settings {
    settings_for(vec![PixelFormat::Mjpeg, PixelFormat::Yuyv])
}

fn settings_for(formats: Vec<PixelFormat>) -> V4l2Settings {
    V4l2Settings {
        path: PathBuf::from(DEVICE),
        formats,
        width: 640,
        height: 480,
        fps: 30,
        timeout: Duration::from_secs(2),
    }
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        println!("ok: {what}");
        Ok(())
    } else {
        Err(format!("FAILED: {what}"))
    }
}

fn main() {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .filter_module("whaled::pipeline", log::LevelFilter::Debug)
        .init();
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            println!("{e}");
            1
        }
    };
    println!("VIVID_CHECK_EXIT={code}");
    std::process::exit(code);
}

/// Each step's seconds, printed as it ends.
struct Clock {
    start: Instant,
    step: Instant,
}

impl Clock {
    fn step(&mut self, what: &str) {
        let now = Instant::now();
        println!(
            "== step {what}: {:.1} s (check total {:.1} s)",
            (now - self.step).as_secs_f64(),
            (now - self.start).as_secs_f64()
        );
        self.step = now;
    }
}

/// Waits until `done` holds, polling every 100 ms, for at most `limit`.
fn wait_for(what: &str, limit: Duration, done: impl Fn() -> bool) -> Result<(), String> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > limit {
            return Err(format!("FAILED: {what} within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{what} after {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

fn run() -> Result<(), String> {
    let models = std::env::args().nth(1).ok_or("usage: vivid_check MODEL_DIR")?;
    let mut clock = Clock { start: Instant::now(), step: Instant::now() };
    print!("{}", describe(Path::new(DEVICE)).map_err(|e| e.to_string())?);

    // 2 + 3: negotiation and 30 frames.
    let cfg = Config::parse(
        Path::new("/whaled.toml"),
        &format!("[prefilter]\nmodel = \"{models}/efficientnet-lite0/model.toml\"\n"),
    )
    .map_err(|e| e.to_string())?;
    let identifier = Arc::new(Identifier::from_config(&cfg, GalleryAccess::ReadWrite).map_err(|e| e.to_string())?);
    clock.step("1: describe the device, load the pre-filter");
    let mut source = V4l2Source::new("vivid".into(), settings());
    let mut frames = Vec::new();
    let t = Instant::now();
    while frames.len() < 30 {
        match source.next().map_err(|e| e.to_string())? {
            SourceEvent::Frame(f) => frames.push(f),
            other => return Err(format!("v4l2 source: {other:?}")),
        }
    }
    let n = source.negotiated().ok_or("no negotiated format")?;
    println!("negotiated {:?}; 30 frames in {:?}", n, t.elapsed());
    check(
        n.format == PixelFormat::Yuyv && (n.width, n.height) == (640, 480),
        "YUYV 640x480 chosen over unavailable MJPEG",
    )?;
    let seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
    check(seqs == (0..30).collect::<Vec<_>>(), "30 frames in sequence")?;
    let age = frames[29].captured_at.elapsed().unwrap_or_default();
    check(age < Duration::from_secs(10), &format!("kernel timestamp maps to wall clock (last frame {age:?} old)"))?;
    clock.step("2: negotiate YUYV, capture 30 frames");
    let mut ws = identifier.workspace();
    // The slowest pre-filter run seen: the pipeline's waits in step 5 are sized from it.
    let mut slowest = Duration::ZERO;
    for (i, f) in frames.iter().enumerate() {
        let img = whaled::decode::decode_frame(&f.data, &format!("vivid#{i}")).map_err(|e| e.to_string())?;
        if img.dimensions() != (640, 480) {
            return Err(format!("frame {i} decoded to {:?}", img.dimensions()));
        }
    }
    check(true, "30 YUYV frames decoded to RGB")?;
    let t = Instant::now();
    let a = identifier.assess(&mut ws, &frames[0].data, "vivid#0").map_err(|e| e.to_string())?;
    slowest = slowest.max(t.elapsed());
    println!("frame 0: pre-filter score {:.5} in {:.1} s", a.prefilter_score, t.elapsed().as_secs_f64());
    check((0.0..=1.0).contains(&a.prefilter_score), "pre-filter score is a probability")?;
    drop(frames);
    clock.step("3: decode 30 YUYV frames, one through the pre-filter");

    // 3b: the live path's decoder on consecutive frames, each dropped before the next is captured (the
    // allocator then hands the next frame the same address, and raw frames all have one length). Each
    // decode must equal a direct conversion of that frame's bytes, and consecutive frames of vivid's
    // pattern (its text overlay counts frames and time) must differ.
    let mut decoder = whaled::decode::Decoder::new(true);
    let (mut previous, mut same_as_previous, mut stale) = (None::<Vec<u8>>, 0, 0);
    let mut addresses = std::collections::HashSet::new();
    for _ in 0..20 {
        let f = match source.next().map_err(|e| e.to_string())? {
            SourceEvent::Frame(f) => f,
            other => return Err(format!("v4l2 source: {other:?}")),
        };
        let whaled::source::FrameData::Raw { format, colour, width, height, stride, bytes } = &f.data else {
            return Err("YUYV frames are raw".into());
        };
        addresses.insert(bytes.as_ptr() as usize);
        let direct = whaled::source::pixels::to_rgb(*format, *colour, *width, *height, *stride, bytes, "direct")
            .map_err(|e| e.to_string())?;
        let decoded = decoder.decode(&f.data, |_, _| true, "vivid").map_err(|e| e.to_string())?.image.as_raw().clone();
        stale += usize::from(decoded != *direct.as_raw());
        same_as_previous += usize::from(previous.as_ref() == Some(&decoded));
        previous = Some(decoded);
    }
    println!("20 consecutive frames: {} distinct payload addresses", addresses.len());
    check(stale == 0, &format!("every decode matches its own frame ({stale} of 20 stale)"))?;
    check(
        same_as_previous == 0,
        &format!("consecutive frames differ ({same_as_previous} of 19 equal to the previous)"),
    )?;
    drop(source);
    clock.step("3b: 20 consecutive frames through the pipeline's decoder");

    // 4: the other raw formats whaled converts: 5 frames each decoded, the first through the pre-filter
    // (the conversion is what differs between formats; one inference shows the frame reaches the model).
    for format in [PixelFormat::Nv12, PixelFormat::Grey, PixelFormat::Rgb24] {
        let mut source = V4l2Source::new("vivid".into(), settings_for(vec![format]));
        let mut decoded = 0;
        let mut score = None;
        while decoded < 5 {
            match source.next().map_err(|e| format!("{format:?}: {e}"))? {
                SourceEvent::Frame(f) => {
                    let name = format!("vivid-{format:?}#{}", f.seq);
                    let img = whaled::decode::decode_frame(&f.data, &name).map_err(|e| e.to_string())?;
                    check(img.dimensions() == (640, 480), &format!("{format:?} frame {} decodes to 640x480", f.seq))?;
                    if score.is_none() {
                        let t = Instant::now();
                        let a = identifier.assess(&mut ws, &f.data, &name).map_err(|e| e.to_string())?;
                        slowest = slowest.max(t.elapsed());
                        check((a.width, a.height) == (640, 480), &format!("{format:?} frame {} is 640x480", f.seq))?;
                        score = Some(a.prefilter_score);
                    }
                    decoded += 1;
                }
                other => return Err(format!("v4l2 source: {other:?}")),
            }
        }
        let n = source.negotiated().ok_or("no negotiated format")?;
        println!("negotiated {n:?}; pre-filter score {score:.4?}");
        check(n.format == format, &format!("{format:?} negotiated"))?;
        check(
            score.is_some_and(|s| (0.0..=1.0).contains(&s)),
            &format!("5 {format:?} frames decoded, one through the pre-filter"),
        )?;
        clock.step(&format!("4: {format:?}"));
    }

    // 5: the pipeline while the device vanishes and comes back. Each wait allows 30 s plus ten of the
    // slowest inferences seen above (a frame in hand, one pending, the reconnect's backoff).
    let patience = Duration::from_secs(30) + slowest * 10;
    println!("slowest pre-filter run {:.1} s: waits of up to {:.0} s", slowest.as_secs_f64(), patience.as_secs_f64());
    let shutdown = Shutdown::new();
    let camera = CameraConfig {
        name: "vivid".into(),
        source: SourceConfig::V4l2(settings()),
        sample_interval: Some(Duration::from_millis(500)),
    };
    let cams = vec![Camera {
        name: "vivid".into(),
        source: whaled::source::open(&camera).map_err(|e| e.to_string())?,
        sample_interval: camera.sample_interval,
    }];
    let options =
        Options { workers: 1, emit_rejected: true, stats_interval: None, device_id: "vm".into(), ..Options::default() };
    let stopper = shutdown.clone();
    // Capture times of the emitted detections, and when the driver was bound again.
    let emitted = Arc::new(std::sync::Mutex::new(Vec::<std::time::SystemTime>::new()));
    let rebound = Arc::new(std::sync::Mutex::new(None::<std::time::SystemTime>));
    let (seen, rebound_at) = (emitted.clone(), rebound.clone());
    let chaos = std::thread::spawn(move || -> Result<(), String> {
        let result = (|| -> Result<(), String> {
            wait_for("a detection from the live pipeline", patience, || seen.lock().is_ok_and(|e| !e.is_empty()))?;
            std::fs::write(format!("{DRIVER}/unbind"), "vivid.0").map_err(|e| format!("unbind: {e}"))?;
            println!("driver unbound; {DEVICE} exists: {}", Path::new(DEVICE).exists());
            std::thread::sleep(Duration::from_secs(3));
            std::fs::write(format!("{DRIVER}/bind"), "vivid.0").map_err(|e| format!("bind: {e}"))?;
            *rebound_at.lock().map_err(|_| "poisoned")? = Some(std::time::SystemTime::now());
            println!("driver bound again");
            wait_for("a detection of a frame captured after the rebind", patience, || {
                after_rebind_seen(&seen, &rebound_at)
            })
        })();
        println!("triggering shutdown");
        stopper.trigger();
        // Watchdog: a shutdown that does not complete is a failure; show where each thread waits.
        std::thread::spawn(move || {
            std::thread::sleep(patience);
            println!("HANG: the pipeline did not stop within {patience:?} of shutdown");
            for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
                let p = t.path();
                let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default().trim().to_string();
                println!("  thread {} wchan={} stack:\n{}", read("comm"), read("wchan"), read("stack"));
            }
            println!("VIVID_CHECK_EXIT=2");
            std::process::exit(2);
        });
        result
    });
    let started = Instant::now();
    let sink = emitted.clone();
    let stats = pipeline::run(identifier, cams, &options, &shutdown, |d| {
        println!("detection {} at {:.1} s", d.image_ind, started.elapsed().as_secs_f64());
        let at =
            humantime::parse_rfc3339(&d.captured_at).map_err(|e| whaled::Error::Input(format!("captured_at: {e}")))?;
        if let Ok(mut e) = sink.lock() {
            e.push(at);
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    let stopped = started.elapsed();
    chaos.join().map_err(|_| "chaos thread panicked")??;
    let s = &stats[0];
    println!("pipeline stats: {s:?}");
    check(s.errors >= 1, "the vanished device was reported as an error")?;
    check(s.reconnects >= 1, "the camera was reopened after the driver came back")?;
    check(after_rebind_seen(&emitted, &rebound), "a frame captured after the rebind was detected")?;
    println!("pipeline ran {:.1} s", stopped.as_secs_f64());
    clock.step("5: live pipeline through unbind, rebind and shutdown");
    Ok(())
}

/// Whether a detection's frame was captured after the driver was bound again.
fn after_rebind_seen(
    emitted: &std::sync::Mutex<Vec<std::time::SystemTime>>,
    rebound: &std::sync::Mutex<Option<std::time::SystemTime>>,
) -> bool {
    let since = rebound.lock().ok().and_then(|r| *r);
    since.is_some_and(|since| emitted.lock().is_ok_and(|e| e.iter().any(|t| *t > since)))
}
