//! A real gpsd per test, run by gpsfake (Debian `gpsd` + `gpsd-clients`; tools/system-packages.sh test
//! installs them) from an NMEA log the test writes, on a free loopback port.
//!
//! The log is GGA + RMC per epoch (1 Hz: gpsfake sends one sentence every 0.5 s), with correct
//! checksums, from a [`Track`] the test keeps: it knows the exact latitude, longitude, time, speed and
//! course of every epoch, as written (so as gpsd will read them), and which epochs have no fix
//! (RMC status `V`, GGA quality 0, no position). gpsfake runs its own gpsd in the foreground; both are
//! put in a process group of their own, so [`Gpsfake::kill`] takes gpsd down at once, as a crash would.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

pub use super::broker::free_port;

/// Knots to m/s, as gpsd converts them.
pub const KNOTS_TO_MPS: f64 = 0.514_444_444;
/// Seconds between two sentences; with two sentences an epoch this is 1 Hz.
pub const CYCLE: f64 = 0.5;

/// One second of the receiver's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Epoch {
    /// UTC, whole seconds.
    pub time: SystemTime,
    /// `None`: no fix this second.
    pub fix: Option<Fix>,
}

/// A fix as written into the sentences (degrees after the ddmm.mmmmmm rounding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fix {
    pub lat: f64,
    pub lon: f64,
    /// RMC speed over ground, knots as written.
    pub speed_knots: f64,
    /// RMC course over ground, degrees.
    pub course_deg: f64,
    /// GGA altitude above mean sea level, metres.
    pub altitude_m: f64,
}

/// What the receiver saw, one epoch a second.
#[derive(Debug, Clone, Default)]
pub struct Track {
    pub epochs: Vec<Epoch>,
}

/// 2025-06-01T12:00:00Z: any fixed date gpsd accepts.
pub fn start_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_748_779_200)
}

/// `v` degrees as NMEA `(d)ddmm.mmmmmm` and the hemisphere letter, and the degrees that text means.
fn nmea_angle(v: f64, lat: bool) -> (String, char, f64) {
    let hemi = match (lat, v >= 0.0) {
        (true, true) => 'N',
        (true, false) => 'S',
        (false, true) => 'E',
        (false, false) => 'W',
    };
    let a = v.abs();
    let mut deg = a.trunc();
    let mut min = ((a - deg) * 60.0 * 1e6).round() / 1e6;
    if min >= 60.0 {
        deg += 1.0;
        min -= 60.0;
    }
    let text = if lat { format!("{:02}{min:09.6}", deg as u32) } else { format!("{:03}{min:09.6}", deg as u32) };
    let back = deg + min / 60.0;
    (text, hemi, if v >= 0.0 { back } else { -back })
}

impl Track {
    /// A vessel steaming from (`lat`, `lon`) at `speed_mps` on `course_deg` for `seconds` epochs after
    /// the end of the track so far (or [`start_time`]).
    pub fn steam(mut self, lat: f64, lon: f64, speed_mps: f64, course_deg: f64, seconds: u32) -> Track {
        let t0 = self.next_time();
        let speed_knots = (speed_mps / KNOTS_TO_MPS * 1e3).round() / 1e3;
        let c = course_deg.to_radians();
        for i in 0..seconds {
            let d = speed_mps * f64::from(i);
            let la = lat + d * c.cos() / 111_320.0;
            let lo = lon + d * c.sin() / (111_320.0 * lat.to_radians().cos());
            let (_, _, la) = nmea_angle(la, true);
            let (_, _, lo) = nmea_angle(lo, false);
            self.epochs.push(Epoch {
                time: t0 + Duration::from_secs(u64::from(i)),
                fix: Some(Fix { lat: la, lon: lo, speed_knots, course_deg, altitude_m: 12.3 }),
            });
        }
        self
    }

    /// `seconds` epochs without a fix.
    pub fn no_fix(mut self, seconds: u32) -> Track {
        let t0 = self.next_time();
        for i in 0..seconds {
            self.epochs.push(Epoch { time: t0 + Duration::from_secs(u64::from(i)), fix: None });
        }
        self
    }

    fn next_time(&self) -> SystemTime {
        self.epochs.last().map_or(start_time(), |e| e.time + Duration::from_secs(1))
    }

    /// The index of the epoch whose time, as RFC 3339 with milliseconds (`Position::fix_time`), is `t`.
    pub fn index_of(&self, fix_time: &str) -> Option<usize> {
        self.epochs.iter().position(|e| humantime::format_rfc3339_millis(e.time).to_string() == fix_time)
    }

    /// The NMEA log: `$GPGGA` then `$GPRMC` per epoch.
    pub fn nmea(&self) -> String {
        let mut out = String::new();
        for e in &self.epochs {
            let iso = humantime::format_rfc3339_seconds(e.time).to_string(); // 2025-06-01T12:00:00Z
            let hms = format!("{}{}{}.00", &iso[11..13], &iso[14..16], &iso[17..19]);
            let dmy = format!("{}{}{}", &iso[8..10], &iso[5..7], &iso[2..4]);
            let (gga, rmc) = match e.fix {
                Some(f) => {
                    let (la, lah, _) = nmea_angle(f.lat, true);
                    let (lo, loh, _) = nmea_angle(f.lon, false);
                    (
                        format!("GPGGA,{hms},{la},{lah},{lo},{loh},1,08,0.9,{:.1},M,47.0,M,,", f.altitude_m),
                        format!(
                            "GPRMC,{hms},A,{la},{lah},{lo},{loh},{:.3},{:.1},{dmy},,,A",
                            f.speed_knots, f.course_deg
                        ),
                    )
                }
                None => (format!("GPGGA,{hms},,,,,0,00,,,M,,M,,"), format!("GPRMC,{hms},V,,,,,,,{dmy},,,N")),
            };
            for s in [gga, rmc] {
                let sum = s.bytes().fold(0u8, |a, b| a ^ b);
                out.push_str(&format!("${s}*{sum:02X}\r\n"));
            }
        }
        out
    }
}

fn gpsfake_binary() -> PathBuf {
    for p in ["/usr/bin/gpsfake", "/usr/local/bin/gpsfake"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "the GPS tests need a real gpsd: apt-get install gpsd gpsd-clients python3-gps \
         (tools/system-packages.sh test installs them)"
    );
}

/// gpsfake (and its gpsd) feeding a track on a loopback port.
pub struct Gpsfake {
    pub port: u16,
    pub dir: PathBuf,
    /// Play the log once (`-1`) or loop it.
    pub once: bool,
    child: Option<Child>,
    starts: u32,
}

impl Gpsfake {
    /// Writes `track` into `dir` and starts gpsfake on a free port.
    pub fn start(dir: &Path, track: &Track, once: bool) -> Gpsfake {
        Self::start_on(dir, free_port(), track, once)
    }

    pub fn start_on(dir: &Path, port: u16, track: &Track, once: bool) -> Gpsfake {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("track.nmea"), track.nmea()).unwrap();
        let mut g = Gpsfake { port, dir: dir.to_path_buf(), once, child: None, starts: 0 };
        g.restart();
        g
    }

    /// (Re)starts gpsfake with the same port and log; returns when gpsd accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "gpsfake already running");
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("gpsfake-{}.log", self.starts))).unwrap();
        let mut cmd = Command::new(gpsfake_binary());
        cmd.arg("-q").arg("-P").arg(self.port.to_string()).arg("-c").arg(CYCLE.to_string());
        if self.once {
            cmd.arg("-1");
        }
        cmd.arg(self.dir.join("track.nmea"))
            // Its gpsd's control socket goes into TMPDIR.
            .env("TMPDIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        self.child = Some(cmd.spawn().expect("start gpsfake"));
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gpsfake exited ({status}) before listening: {}", self.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "gpsd did not listen on {} within 15 s: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to gpsfake and its gpsd at once (their process group), as a crash would; waits for them.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-KILL").arg("--").arg(format!("-{}", c.id())).status();
            let _ = c.wait();
            // gpsd is gpsfake's child: gone when nothing listens any more.
            let t = Instant::now();
            while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                assert!(t.elapsed() < Duration::from_secs(5), "gpsd still listens on {} after SIGKILL", self.port);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// gpsfake's output (all starts).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            out += &std::fs::read_to_string(self.dir.join(format!("gpsfake-{i}.log"))).unwrap_or_default();
        }
        out
    }
}

impl Drop for Gpsfake {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-KILL").arg("--").arg(format!("-{}", c.id())).status();
            let _ = c.wait();
        }
    }
}
