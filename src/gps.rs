//! The box's position, from gpsd: one thread holds a JSON connection to gpsd and keeps the latest fix,
//! and every frame asks [`Gps::position`] where the box was when it was captured.
//!
//! gpsd owns the receiver (serial, USB, NMEA over the network, PPS) and speaks one protocol for all of
//! them: after `?WATCH={"enable":true,"json":true};` it sends one JSON report per line; the `TPV`
//! reports (time, position, velocity) are the ones used here. Fields, per gpsd's JSON docs: `mode`
//! (0 unknown, 1 no fix, 2 2D, 3 3D), `time` (ISO 8601 UTC, the satellites' time), `lat`/`lon`,
//! `altMSL` (else `alt`, else `altHAE`), `speed` (m/s), `track` (degrees true), `eph` (metres). With
//! several receivers the latest report of any of them is the fix.
//!
//! Invariants:
//! - **Never blocks the frame path.** The connection, its reads (200 ms timeouts), parsing, backoff and
//!   logging all happen on the `gps` thread; [`Gps::position`] only locks a mutex that the thread holds
//!   for nothing longer than swapping in a pointer, and clones the fix out.
//! - **A stale fix is no fix.** A fix is given to a frame only if it arrived within `max_age` of the
//!   capture; a `TPV` with `mode` < 2 (the receiver lost the satellites) clears it at once, and when
//!   gpsd goes away the last fix simply ages out. A frame without a current fix has no `position` (the
//!   pipeline counts it); it never gets an old one.
//! - **gpsd may come and go.** A refused or lost connection, or gpsd silent for `silence` (no line at
//!   all), closes the socket and retries after an exponential backoff with jitter (`reconnect_min` to
//!   `reconnect_max`); WARN once per outage, INFO when reports flow again, DEBUG per attempt.
//! - **Input never panics.** A line that is not JSON, has the wrong types, an impossible position, or
//!   is longer than [`MAX_LINE`] is counted (`bad_lines`) and skipped at DEBUG.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::gps::GpsConfig;
use crate::detection::{FixMode, Position};
use crate::jitter::Jitter;

/// Socket read timeout: how often the thread looks at the shutdown flag and the silence timer.
const POLL: Duration = Duration::from_millis(200);
/// Per address tried; bounds how long a shutdown waits for a connect to a host that does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// gpsd's longest reports (`SKY` with every satellite) are a few KiB; a longer line is not gpsd.
pub const MAX_LINE: usize = 64 << 10;
const WATCH: &[u8] = b"?WATCH={\"enable\":true,\"json\":true};\n";

/// Counters of the gpsd connection (tests and logs; frames without a fix are counted per camera in
/// `stats` as `frames_without_fix`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpsStats {
    /// A connection to gpsd is open now.
    pub connected: bool,
    /// A fix is current now (what [`Gps::position`] would give a frame captured now).
    pub fix: bool,
    /// `TPV` reports received since start.
    pub reports: u64,
    /// Lines skipped because they were not a well-formed gpsd report.
    pub bad_lines: u64,
    /// Times the connection came back after it failed or was lost.
    pub reconnects: u64,
}

/// The latest fix and when it arrived.
#[derive(Debug)]
struct Fix {
    /// `age_s` is filled in per frame.
    position: Position,
    received: Instant,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    fix: Mutex<Option<Arc<Fix>>>,
    connected: AtomicBool,
    reports: AtomicU64,
    bad_lines: AtomicU64,
    reconnects: AtomicU64,
}

impl Shared {
    fn set_fix(&self, fix: Option<Arc<Fix>>) {
        // Swapped under the lock, dropped outside it.
        let old = std::mem::replace(&mut *self.fix.lock().unwrap_or_else(PoisonError::into_inner), fix);
        drop(old);
    }
}

/// Handle to the `gps` thread; dropping it stops the thread.
pub struct Gps {
    shared: Arc<Shared>,
    max_age: Duration,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Gps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gps").field("max_age", &self.max_age).finish_non_exhaustive()
    }
}

impl Gps {
    /// Starts the `gps` thread and returns at once: nothing here touches the network, so a gpsd that is
    /// absent, slow or unresolvable costs start-up nothing (positions are absent until it answers).
    pub fn start(cfg: &GpsConfig) -> Gps {
        let shared = Arc::new(Shared::default());
        let mut link = Link { cfg: cfg.clone(), shared: shared.clone(), jitter: Jitter::new(0) };
        let thread = std::thread::Builder::new().name("gps".into()).spawn(move || link.run());
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log::error!("gps: cannot start the gpsd thread: {e}; detections will carry no position");
                None
            }
        };
        Gps { shared, max_age: cfg.max_age, thread }
    }

    /// The fix current at `at` (a frame's capture time): the latest report had a 2D or 3D fix and
    /// arrived within `max_age` of `at` (before it, or after it when the frame is older than the fix).
    /// `age_s` is `at` minus the fix's arrival (negative when the fix arrived after the capture).
    pub fn position(&self, at: Instant) -> Option<Position> {
        let fix = self.shared.fix.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
        let (age, sign) = match at.checked_duration_since(fix.received) {
            Some(d) => (d, 1.0),
            None => (fix.received.duration_since(at), -1.0),
        };
        if age > self.max_age {
            return None;
        }
        let age_s = sign * (age.as_secs_f64() * 1e3).round() / 1e3;
        Some(Position { age_s, ..fix.position.clone() })
    }

    pub fn stats(&self) -> GpsStats {
        let s = &self.shared;
        GpsStats {
            connected: s.connected.load(Ordering::SeqCst),
            fix: self.position(Instant::now()).is_some(),
            reports: s.reports.load(Ordering::Relaxed),
            bad_lines: s.bad_lines.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Stops the thread and waits for it (at most one read timeout, or one connect attempt).
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("gps: the gpsd thread panicked");
            }
        }
        self.shared.connected.store(false, Ordering::SeqCst);
    }
}

impl Drop for Gps {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One gpsd report, as much of it as whaled uses (unknown fields are ignored: other classes and newer
/// gpsd fields pass through). Not a wire type.
#[derive(Debug, Deserialize)]
struct Report {
    class: String,
    mode: Option<u8>,
    time: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    #[serde(rename = "altMSL")]
    alt_msl: Option<f64>,
    alt: Option<f64>,
    #[serde(rename = "altHAE")]
    alt_hae: Option<f64>,
    speed: Option<f64>,
    track: Option<f64>,
    eph: Option<f64>,
}

/// What one line means.
#[derive(Debug, PartialEq)]
enum Line {
    /// A report of another class (VERSION, DEVICES, WATCH, SKY, ...).
    Other,
    /// A TPV without a usable fix: clears the fix.
    NoFix,
    Fix(Position),
}

/// Parses one line from gpsd; `Err` says why it is not a report.
fn parse_line(line: &[u8]) -> Result<Line, String> {
    let r: Report = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if r.class != "TPV" {
        return Ok(Line::Other);
    }
    let fix_mode = match r.mode.unwrap_or(0) {
        0 | 1 => return Ok(Line::NoFix),
        2 => FixMode::TwoD,
        _ => FixMode::ThreeD,
    };
    let (Some(lat), Some(lon)) = (r.lat, r.lon) else { return Ok(Line::NoFix) };
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Err(format!("a TPV with lat {lat}, lon {lon}"));
    }
    // Normalised to the form `captured_at` has; a time gpsd could not give (no date yet) is left out.
    let fix_time = r
        .time
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        .map(crate::detection::rfc3339_millis);
    Ok(Line::Fix(Position {
        lat,
        lon,
        fix_mode,
        fix_time,
        age_s: 0.0,
        altitude_m: if fix_mode == FixMode::ThreeD { r.alt_msl.or(r.alt).or(r.alt_hae) } else { None },
        speed_mps: r.speed,
        course_deg: r.track,
        horizontal_error_m: r.eph,
    }))
}

/// How a session ended.
enum End {
    Stopped,
    /// Why, and whether any TPV arrived in it.
    Lost(String, bool),
}

/// The `gps` thread's state.
struct Link {
    cfg: GpsConfig,
    shared: Arc<Shared>,
    jitter: Jitter,
}

impl Link {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    fn run(&mut self) {
        let addr = self.cfg.address.clone();
        let mut backoff = self.cfg.reconnect_min;
        // Since when gpsd has been unreachable or silent (the WARN was logged then).
        let mut outage: Option<Instant> = None;
        let mut failed = false;
        let mut attempt = 0u64;
        while !self.stopping() {
            attempt += 1;
            log::debug!("gps: connecting to gpsd at {addr} (attempt {attempt})");
            let why = match connect(&addr) {
                Ok(stream) => {
                    self.shared.connected.store(true, Ordering::SeqCst);
                    if failed {
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    if outage.is_none() && attempt == 1 {
                        log::info!("gps: connected to gpsd at {addr}");
                    }
                    let end = self.session(stream, &mut outage);
                    self.shared.connected.store(false, Ordering::SeqCst);
                    match end {
                        End::Stopped => return,
                        End::Lost(why, reported) => {
                            if reported {
                                backoff = self.cfg.reconnect_min;
                            }
                            why
                        }
                    }
                }
                Err(why) => why,
            };
            failed = true;
            let wait = self.jitter.scale(backoff, 0.5, 1.0).max(self.cfg.reconnect_min);
            if outage.is_none() {
                outage = Some(Instant::now());
                log::warn!(
                    "gps: gpsd at {addr}: {why}; retrying with backoff up to {:?} (detections carry no position \
                     meanwhile)",
                    self.cfg.reconnect_max
                );
            } else {
                log::debug!("gps: gpsd at {addr}: {why}; retry in {wait:.1?}");
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
            let until = Instant::now() + wait;
            while Instant::now() < until {
                if self.stopping() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())));
            }
        }
    }

    /// Reads reports until the connection fails, gpsd falls silent, or the handle stops us.
    fn session(&mut self, mut stream: TcpStream, outage: &mut Option<Instant>) -> End {
        if let Err(e) = stream.set_read_timeout(Some(POLL)).and_then(|_| stream.set_write_timeout(Some(POLL * 5))) {
            return End::Lost(format!("cannot set socket timeouts: {e}"), false);
        }
        if let Err(e) = stream.write_all(WATCH) {
            return End::Lost(format!("cannot send WATCH: {e}"), false);
        }
        let mut pending: Vec<u8> = Vec::with_capacity(4096);
        let mut skipping = false; // inside an over-long line, until its newline
        let mut buf = [0u8; 8192];
        let mut last_line = Instant::now();
        let mut reported = false;
        loop {
            if self.stopping() {
                return End::Stopped;
            }
            match stream.read(&mut buf) {
                Ok(0) => return End::Lost("closed the connection".into(), reported),
                Ok(n) => {
                    let mut chunk = &buf[..n];
                    while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
                        last_line = Instant::now();
                        if skipping {
                            skipping = false;
                        } else {
                            pending.extend_from_slice(&chunk[..nl]);
                            if self.line(&pending) && !reported {
                                reported = true;
                                if let Some(since) = outage.take() {
                                    log::info!(
                                        "gps: gpsd at {} reports again, after {:.0?}",
                                        self.cfg.address,
                                        since.elapsed()
                                    );
                                }
                            }
                        }
                        pending.clear();
                        chunk = &chunk[nl + 1..];
                    }
                    if !skipping {
                        pending.extend_from_slice(chunk);
                        if pending.len() > MAX_LINE {
                            self.bad(&format!("a line longer than {MAX_LINE} bytes"));
                            pending.clear();
                            skipping = true;
                        }
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return End::Lost(format!("read failed: {e}"), reported),
            }
            if last_line.elapsed() > self.cfg.silence {
                return End::Lost(format!("sent nothing for {:?}", self.cfg.silence), reported);
            }
        }
    }

    /// Handles one line; true when it was a TPV report.
    fn line(&self, raw: &[u8]) -> bool {
        let line = raw.trim_ascii();
        if line.is_empty() {
            return false;
        }
        match parse_line(line) {
            Ok(Line::Other) => false,
            Ok(Line::NoFix) => {
                self.shared.reports.fetch_add(1, Ordering::Relaxed);
                self.shared.set_fix(None);
                true
            }
            Ok(Line::Fix(position)) => {
                self.shared.reports.fetch_add(1, Ordering::Relaxed);
                self.shared.set_fix(Some(Arc::new(Fix { position, received: Instant::now() })));
                true
            }
            Err(why) => {
                self.bad(&format!("{why}: {:.120}", String::from_utf8_lossy(line)));
                false
            }
        }
    }

    fn bad(&self, why: &str) {
        self.shared.bad_lines.fetch_add(1, Ordering::Relaxed);
        log::debug!("gps: skipped a line from gpsd at {}: {why}", self.cfg.address);
    }
}

/// Resolves `host:port` and connects to the first address that answers.
fn connect(address: &str) -> Result<TcpStream, String> {
    let addrs = address.to_socket_addrs().map_err(|e| format!("cannot resolve: {e}"))?;
    let mut last = "resolves to no address".to_string();
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("cannot connect: {e}"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpv_reports() {
        let l = br#"{"class":"TPV","device":"/dev/pts/3","mode":3,"time":"2025-06-01T12:00:03.000Z","ept":0.005,"lat":43.500300000,"lon":-1.499400000,"altHAE":59.3000,"altMSL":12.3000,"alt":12.3000,"track":45.0000,"magtrack":44.9888,"speed":2.675,"geoidSep":47.000,"eph":17.100}"#;
        let Line::Fix(p) = parse_line(l).unwrap() else { panic!("a fix") };
        assert_eq!((p.lat, p.lon, p.fix_mode), (43.5003, -1.4994, FixMode::ThreeD));
        assert_eq!(p.fix_time.as_deref(), Some("2025-06-01T12:00:03.000Z"));
        assert_eq!(
            (p.altitude_m, p.speed_mps, p.course_deg, p.horizontal_error_m),
            (Some(12.3), Some(2.675), Some(45.0), Some(17.1))
        );
        // 2D: no altitude even if a stale one is sent; no time: absent.
        let Line::Fix(p) = parse_line(br#"{"class":"TPV","mode":2,"lat":1.5,"lon":2.5,"altHAE":3}"#).unwrap() else {
            panic!("a fix")
        };
        assert_eq!((p.fix_mode, p.altitude_m, p.fix_time), (FixMode::TwoD, None, None));
        for no_fix in [
            &br#"{"class":"TPV","mode":1,"time":"2025-06-01T12:00:09.000Z"}"#[..],
            br#"{"class":"TPV","mode":0,"lat":1,"lon":2}"#,
            br#"{"class":"TPV"}"#,
            br#"{"class":"TPV","mode":3,"lat":1}"#,
        ] {
            assert_eq!(parse_line(no_fix), Ok(Line::NoFix), "{}", String::from_utf8_lossy(no_fix));
        }
        assert_eq!(parse_line(br#"{"class":"SKY","satellites":[{"PRN":1}]}"#), Ok(Line::Other));
        for bad in [
            &b"not json"[..],
            b"{\"class\":\"TPV\",\"mode\":\"3\"}",
            b"{\"mode\":3}",
            b"{\"class\":\"TPV\",\"mode\":3,\"lat\":91,\"lon\":0}",
            b"[1,2]",
            b"{\"class\":\"TPV\",\"mode\":300}",
        ] {
            assert!(parse_line(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// A fake gpsd that sends `script` and then keeps the connection open and silent.
    fn fake_gpsd(script: &'static [u8]) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = vec![0u8; WATCH.len()];
            s.read_exact(&mut got).unwrap();
            s.write_all(script).unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            got
        });
        (port, t)
    }

    fn cfg(port: u16) -> GpsConfig {
        GpsConfig {
            address: format!("127.0.0.1:{port}"),
            max_age: Duration::from_secs(1),
            silence: Duration::from_secs(10),
            ..GpsConfig::default()
        }
    }

    fn wait(what: &str, mut done: impl FnMut() -> bool) {
        let t = Instant::now();
        while !done() {
            assert!(t.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Bad input of every kind is counted and skipped; the fix after it is used; split lines join up.
    #[test]
    fn garbage_is_counted_and_skipped() {
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let long: &'static [u8] = Box::leak(long.into_boxed_slice());
        let script: &'static [u8] = Box::leak(
            [
                &b"{\"class\":\"VERSION\",\"release\":\"3.22\"}\r\n\n\xff\xfe garbage\n{\"class\":\"TPV\",\"mode\":3,"
                    [..],
                long,
                b"{\"class\":\"TPV\",\"mode\":3,\"lat\":1,\"lon\":2}\n{\"cla",
                b"ss\":\"TPV\",\"mode\":2,\"lat\":-33.5,\"lon\":151.25,\"track\":10}\n",
            ]
            .concat()
            .into_boxed_slice(),
        );
        let (port, server) = fake_gpsd(script);
        let gps = Gps::start(&cfg(port));
        wait("two reports", || gps.stats().reports == 2);
        let s = gps.stats();
        // The bytes before the long line and the long line itself; the half TPV in front of it is part of it.
        assert_eq!((s.bad_lines, s.connected, s.fix, s.reconnects), (2, true, true, 0), "{s:?}");
        let p = gps.position(Instant::now()).unwrap();
        assert_eq!((p.lat, p.lon, p.fix_mode, p.course_deg), (-33.5, 151.25, FixMode::TwoD, Some(10.0)));
        assert!(p.age_s >= 0.0 && p.age_s < 1.0, "{}", p.age_s);
        assert_eq!(server.join().unwrap(), WATCH);
        // The fake closed the connection: the fix ages out after max_age.
        wait("the fix to age out", || gps.position(Instant::now()).is_none());
        assert!(gps.position(Instant::now() - Duration::from_millis(1500)).is_some(), "a frame captured earlier");
    }

    /// A fix is given to frames within `max_age` either side of its arrival, with a signed age.
    #[test]
    fn age_either_side() {
        let (port, _server) = fake_gpsd(b"{\"class\":\"TPV\",\"mode\":3,\"lat\":1,\"lon\":2}\n");
        let gps = Gps::start(&cfg(port));
        wait("a fix", || gps.stats().fix);
        let now = Instant::now();
        assert!(gps.position(now + Duration::from_millis(500)).unwrap().age_s > 0.4);
        let before = gps.position(now - Duration::from_millis(500)).unwrap().age_s;
        assert!(before < -0.4 && before > -1.0, "{before}");
        assert!(gps.position(now + Duration::from_secs(2)).is_none());
        assert!(gps.position(now - Duration::from_secs(2)).is_none());
    }

    #[test]
    fn stop_is_prompt_while_connected_and_while_backing_off() {
        let (port, _server) = fake_gpsd(b"");
        let mut gps = Gps::start(&cfg(port));
        wait("a connection", || gps.stats().connected);
        let t = Instant::now();
        gps.stop();
        assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
        assert!(!gps.stats().connected);

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let gps = Gps::start(&GpsConfig { reconnect_min: Duration::from_secs(30), ..cfg(closed) });
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        drop(gps);
        assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
    }
}
