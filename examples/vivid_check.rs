//! The V4L2 check that runs inside a QEMU guest against the kernel's `vivid` test driver
//! (tests/vivid/run.sh boots it). Exits 0 only if every step holds; prints what it saw.
//!
//! 1. `whaled cameras`-style description of /dev/video0.
//! 2. Format negotiation: preference [MJPEG, YUYV] on vivid (no MJPEG) must pick YUYV 640x480.
//! 3. 30 frames captured with kernel timestamps, all decoded to RGB, three through the pre-filter; then
//!    20 more one at a time through the pipeline's decoder: each matches its own bytes, none its predecessor.
//! 4. NV12, GREY and RGB24 negotiated in turn, 5 frames each decoded and through the pre-filter.
//! 5. The live pipeline on that camera while the driver is unbound mid-stream and bound again:
//!    capture errors are counted, the camera is reopened (reconnects >= 1) and frames flow again,
//!    and shutdown is clean — no hang, no panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use whaled::config::{CameraConfig, Config, PixelFormat, SourceConfig};
use whaled::identify::Identifier;
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

fn run() -> Result<(), String> {
    let models = std::env::args().nth(1).ok_or("usage: vivid_check MODEL_DIR")?;
    print!("{}", describe(Path::new(DEVICE)).map_err(|e| e.to_string())?);

    // 2 + 3: negotiation and 30 frames.
    let cfg = Config::parse(
        Path::new("/whaled.toml"),
        &format!("[prefilter]\nmodel = \"{models}/efficientnet-lite0/model.toml\"\n"),
    )
    .map_err(|e| e.to_string())?;
    let identifier = Arc::new(Identifier::from_config(&cfg).map_err(|e| e.to_string())?);
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
    let mut ws = identifier.workspace();
    for (i, f) in frames.iter().enumerate() {
        let img = whaled::decode::decode_frame(&f.data, &format!("vivid#{i}")).map_err(|e| e.to_string())?;
        if img.dimensions() != (640, 480) {
            return Err(format!("frame {i} decoded to {:?}", img.dimensions()));
        }
        if i % 10 == 0 {
            let a = identifier.assess(&mut ws, &f.data, &format!("vivid#{i}")).map_err(|e| e.to_string())?;
            println!("frame {i}: pre-filter score {:.5}", a.prefilter_score);
            check((0.0..=1.0).contains(&a.prefilter_score), "pre-filter score is a probability")?;
        }
    }
    check(true, "30 YUYV frames decoded to RGB")?;
    drop(frames);

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
        let whaled::source::FrameData::Raw { format, width, height, stride, bytes } = &f.data else {
            return Err("YUYV frames are raw".into());
        };
        addresses.insert(bytes.as_ptr() as usize);
        let direct = whaled::source::pixels::to_rgb(*format, *width, *height, *stride, bytes, "direct")
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

    // 4: the other raw formats whaled converts.
    for format in [PixelFormat::Nv12, PixelFormat::Grey, PixelFormat::Rgb24] {
        let mut source = V4l2Source::new("vivid".into(), settings_for(vec![format]));
        let mut scores = Vec::new();
        while scores.len() < 5 {
            match source.next().map_err(|e| format!("{format:?}: {e}"))? {
                SourceEvent::Frame(f) => {
                    let a = identifier
                        .assess(&mut ws, &f.data, &format!("vivid-{format:?}#{}", f.seq))
                        .map_err(|e| e.to_string())?;
                    check((a.width, a.height) == (640, 480), &format!("{format:?} frame {} is 640x480", f.seq))?;
                    scores.push(a.prefilter_score);
                }
                other => return Err(format!("v4l2 source: {other:?}")),
            }
        }
        let n = source.negotiated().ok_or("no negotiated format")?;
        println!("negotiated {n:?}; pre-filter scores {scores:.4?}");
        check(n.format == format, &format!("{format:?} negotiated"))?;
        check(scores.iter().all(|s| (0.0..=1.0).contains(s)), &format!("5 {format:?} frames through the pre-filter"))?;
    }

    // 5: the pipeline while the device vanishes and comes back.
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
    let chaos = std::thread::spawn(move || -> Result<(), String> {
        std::thread::sleep(Duration::from_secs(4));
        std::fs::write(format!("{DRIVER}/unbind"), "vivid.0").map_err(|e| format!("unbind: {e}"))?;
        println!("driver unbound; {DEVICE} exists: {}", Path::new(DEVICE).exists());
        std::thread::sleep(Duration::from_secs(3));
        std::fs::write(format!("{DRIVER}/bind"), "vivid.0").map_err(|e| format!("bind: {e}"))?;
        println!("driver bound again");
        std::thread::sleep(Duration::from_secs(8));
        println!("triggering shutdown");
        stopper.trigger();
        // Watchdog: a shutdown that does not complete is a failure; show where each thread waits.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(20));
            println!("HANG: the pipeline did not stop within 20 s of shutdown");
            for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
                let p = t.path();
                let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default().trim().to_string();
                println!("  thread {} wchan={} stack:\n{}", read("comm"), read("wchan"), read("stack"));
            }
            println!("VIVID_CHECK_EXIT=2");
            std::process::exit(2);
        });
        Ok(())
    });
    let started = Instant::now();
    let mut emitted = Vec::new();
    let stats = pipeline::run(identifier, cams, &options, &shutdown, |d| {
        println!("detection {} at {:?}", d.image_ind, started.elapsed());
        emitted.push((started.elapsed(), d.image_ind));
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    chaos.join().map_err(|_| "chaos thread panicked")??;
    let s = &stats[0];
    println!("pipeline stats: {s:?}");
    println!("emitted: {emitted:?}");
    check(s.errors >= 1, "the vanished device was reported as an error")?;
    check(s.reconnects >= 1, "the camera was reopened after the driver came back")?;
    check(emitted.iter().any(|(t, _)| *t > Duration::from_secs(8)), "detections after the reconnect")?;
    check(started.elapsed() < Duration::from_secs(60), "clean shutdown")?;
    Ok(())
}
