//! `whaled::gps` against a real gpsd (gpsfake playing an NMEA log the test writes): positions follow
//! the track, a lost fix is no position, a killed gpsd ages out and is reconnected to, `position()`
//! never waits on the connection, and start-up with no gpsd at all neither blocks nor fails.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gpsd::{Gpsfake, Track, KNOTS_TO_MPS};
use common::logs;
use whaled::config::gps::GpsConfig;
use whaled::detection::{FixMode, Position};
use whaled::gps::Gps;

fn config(port: u16, max_age: Duration) -> GpsConfig {
    GpsConfig {
        address: format!("127.0.0.1:{port}"),
        max_age,
        silence: Duration::from_secs(3),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
    }
}

/// Polls `gps.position(now)` every 20 ms until `done` or `timeout`; returns (when, position) samples.
fn sample(
    gps: &Gps,
    timeout: Duration,
    mut done: impl FnMut(&[(Instant, Option<Position>)]) -> bool,
) -> Vec<(Instant, Option<Position>)> {
    let t = Instant::now();
    let mut out = Vec::new();
    while t.elapsed() < timeout && !done(&out) {
        let now = Instant::now();
        out.push((now, gps.position(now)));
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

/// A position must be one of the track's fixes, exactly as the sentences gave it; returns its epoch.
/// gpsd's first report of a session may come from a GGA alone, before any RMC gave it the date: no
/// `fix_time` then, and the epoch is found by position.
fn check_against_track(track: &Track, p: &Position) -> usize {
    let near = |f: &common::gpsd::Fix| (p.lat - f.lat).abs() < 1e-6 && (p.lon - f.lon).abs() < 1e-6;
    let i = match p.fix_time.as_deref() {
        Some(time) => track.index_of(time).unwrap_or_else(|| panic!("fix time {time} is not in the track")),
        None => track
            .epochs
            .iter()
            .position(|e| e.fix.as_ref().is_some_and(near))
            .unwrap_or_else(|| panic!("{p:?} is not on the track")),
    };
    let f = track.epochs[i].fix.unwrap_or_else(|| panic!("a position {p:?} for epoch {i}, which has no fix"));
    assert!((p.lat - f.lat).abs() < 1e-6 && (p.lon - f.lon).abs() < 1e-6, "{p:?} vs the track's {f:?}");
    if let Some(course) = p.course_deg {
        // From the RMC: gpsd passes it through, and its speed with it (knots -> m/s).
        assert!((course - f.course_deg).abs() < 0.01, "{p:?} vs {f:?}");
        let speed = p.speed_mps.expect("RMC gives speed with course");
        assert!((speed - f.speed_knots * KNOTS_TO_MPS).abs() < 0.01, "{p:?} vs {f:?}");
    }
    // A report from a GGA alone has no course, and a speed gpsd estimates from the positions: not the RMC's.
    if p.fix_mode == FixMode::ThreeD {
        assert_eq!(p.altitude_m, Some(f.altitude_m), "{p:?}");
    }
    // 1 Hz receiver: under a second, plus scheduling delay on a loaded test box (1.5 s was seen in a
    // full suite run while other tests compiled and ran).
    assert!(p.age_s >= 0.0 && p.age_s < 3.0, "age {} for a 1 Hz receiver: {p:?}", p.age_s);
    i
}

/// (a) + (b): positions follow the track sentence by sentence; during the no-fix stretch there is no
/// position (because gpsd says so, not because the fix aged: `max_age` is longer than the stretch), and
/// positions come back with the fix.
#[test]
fn positions_follow_the_track_and_a_lost_fix_is_no_position() {
    let dir = tempfile::tempdir().unwrap();
    // 12 s steaming north-east at 5 m/s, 6 s without a fix, 10 s on another leg.
    let track = Track::default().steam(43.5, -1.5, 5.0, 45.0, 12).no_fix(6).steam(43.5004, -1.4993, 4.0, 180.0, 10);
    let fake = Gpsfake::start(dir.path(), &track, true);
    let gps = Gps::start(&config(fake.port, Duration::from_secs(30)));
    // Epochs 0..12 first leg, 12..18 no fix, 18..28 second leg.
    let (lost_after, back_from) = (11, 18);

    // The epoch of each sample's position (checked against the track as it goes).
    let epoch = |p: &Option<Position>| p.as_ref().map(|p| check_against_track(&track, p));
    let samples = sample(&gps, Duration::from_secs(45), |s| {
        // Done once four epochs of the second leg have been seen.
        let mut back: Vec<_> = s.iter().filter_map(|(_, p)| epoch(p)).filter(|i| *i >= back_from).collect();
        back.dedup();
        back.len() >= 4
    });
    let stats = gps.stats();
    assert!(stats.connected && stats.fix && stats.bad_lines == 0, "{stats:?}\n{}", fake.log());

    let epochs: Vec<Option<usize>> = samples.iter().map(|(_, p)| epoch(p)).collect();
    let mut seen: Vec<usize> = epochs.iter().flatten().copied().collect();
    seen.dedup();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "epochs go back: {seen:?}");
    assert!(seen.iter().all(|i| *i <= lost_after || *i >= back_from), "{seen:?}");
    let first_leg = seen.iter().filter(|i| **i <= lost_after).count();
    let second_leg = seen.len() - first_leg;
    // gpsd may swallow the first epoch or two while the device is being opened.
    assert!(first_leg >= 8 && second_leg >= 4, "epochs seen: {seen:?}\n{}", fake.log());
    let with_time = samples.iter().filter_map(|(_, p)| p.as_ref()).filter(|p| p.fix_time.is_some()).count();
    let positions = samples.iter().filter(|(_, p)| p.is_some()).count();
    // Only the first report after gpsd opened the receiver (a GGA before any RMC) lacks the time.
    assert!(with_time + 60 >= positions, "{with_time} of {positions} positions with fix_time");
    assert!(
        samples.iter().filter_map(|(_, p)| p.as_ref()).any(|p| p.fix_mode == FixMode::ThreeD && p.course_deg.is_some()),
        "no 3D fix with course and speed"
    );

    // The no-fix stretch: from the last sample of the first leg to the first of the second, None only.
    let last_first = epochs.iter().rposition(|e| e.is_some_and(|i| i <= lost_after)).unwrap();
    let first_second = epochs.iter().position(|e| e.is_some_and(|i| i >= back_from)).unwrap();
    let gap = &samples[last_first + 1..first_second];
    assert!(gap.iter().all(|(_, p)| p.is_none()), "a position during the no-fix stretch");
    let span = samples[first_second].0 - samples[last_first].0;
    assert!(
        span > Duration::from_secs(4) && span < Duration::from_secs(10),
        "no position for {span:?}; the log has 6 s without a fix"
    );
    eprintln!(
        "epochs seen {seen:?} ({first_leg} + {second_leg}), {with_time} of {positions} positions with fix_time; no \
         position for {span:.1?} over the 6 s without a fix (max_age 30 s); {stats:?}"
    );
}

/// (c): gpsd killed -> no position within `max_age`; gpsd back -> reconnected, positions again; a thread
/// asking for the position in a tight loop all along never waits on any of it. One WARN for the outage,
/// one INFO when reports flow again.
#[test]
fn gpsd_killed_and_restarted() {
    logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let track = Track::default().steam(43.5, -1.5, 5.0, 45.0, 60);
    let mut fake = Gpsfake::start(dir.path(), &track, false);
    let max_age = Duration::from_secs(2);
    let gps = Arc::new(Gps::start(&config(fake.port, max_age)));
    let addr = format!("gpsd at 127.0.0.1:{}", fake.port);
    let first = sample(&gps, Duration::from_secs(20), |s| s.iter().filter(|(_, p)| p.is_some()).count() > 50);
    assert!(first.last().is_some_and(|(_, p)| p.is_some()), "no fix from gpsd: {}", fake.log());
    check_against_track(&track, first.last().unwrap().1.as_ref().unwrap());

    // The frame path: position() as fast as it goes, timed call by call.
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (gps, stop) = (gps.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut calls, mut slow, mut max) = (0u64, 0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let p = gps.position(t);
                let d = t.elapsed();
                std::hint::black_box(p);
                calls += 1;
                max = max.max(d);
                slow += u64::from(d > Duration::from_millis(2));
            }
            (calls, slow, max)
        })
    };

    let reconnects = gps.stats().reconnects;
    let killed = Instant::now();
    fake.kill();
    let gone = sample(&gps, Duration::from_secs(10), |s| s.last().is_some_and(|(_, p)| p.is_none()));
    let none_after = gone.last().unwrap().0 - killed;
    assert!(gone.last().unwrap().1.is_none(), "still a position 10 s after gpsd died");
    assert!(none_after <= max_age + Duration::from_millis(1200), "position gone {none_after:?} after the kill");
    assert!(!gps.stats().connected);
    // Several refused attempts (backoff 100 ms .. 1 s) while gpsd is down.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(gps.stats().reconnects, reconnects, "nothing to reconnect to");

    let restarted = Instant::now();
    fake.restart();
    let back = sample(&gps, Duration::from_secs(20), |s| s.last().is_some_and(|(_, p)| p.is_some()));
    let p = back
        .last()
        .unwrap()
        .1
        .clone()
        .unwrap_or_else(|| panic!("no position 20 s after gpsd came back: {}", fake.log()));
    check_against_track(&track, &p);
    let back_after = back.last().unwrap().0 - restarted;
    let stats = gps.stats();
    assert!(stats.reconnects > reconnects && stats.connected && stats.fix, "{stats:?}");

    stop.store(true, Ordering::Relaxed);
    let (calls, slow, max) = hammer.join().unwrap();
    eprintln!(
        "position() {calls} calls through the outage: max {max:?}, {slow} over 2 ms; no position {none_after:.2?} after \
         the kill (max_age {max_age:?}); positions again {back_after:.1?} after the restart; {stats:?}"
    );
    assert!(calls > 1000, "{calls} calls");
    // The connection thread's waits are 200 ms read timeouts and connects: a call that waited on any of
    // them would take that long. The bound leaves room for a loaded CI machine's scheduling.
    assert!(max < Duration::from_millis(50), "a position() call took {max:?}");
    assert!(slow * 1000 <= calls, "{slow} of {calls} calls over 2 ms");

    let warns = logs::matching(log::Level::Warn, &[&addr]);
    assert_eq!(warns.len(), 1, "one WARN per outage: {warns:?}");
    assert!(warns[0].contains("closed the connection") || warns[0].contains("read failed"), "{warns:?}");
    logs::wait_for(log::Level::Info, &[&addr, "reports again"], Duration::from_secs(1));
}

/// (d): nothing listens at start: `start` returns at once, no position, no panic; when gpsd appears
/// later, positions flow.
#[test]
fn nothing_listening_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::gpsd::free_port();
    let t = Instant::now();
    let gps = Gps::start(&config(port, Duration::from_secs(2)));
    let started = t.elapsed();
    assert!(started < Duration::from_millis(100), "start took {started:?}");
    assert!(gps.position(Instant::now()).is_none());
    std::thread::sleep(Duration::from_millis(1500));
    let s = gps.stats();
    assert!(!s.connected && !s.fix && s.reports == 0 && s.reconnects == 0, "{s:?}");
    assert!(gps.position(Instant::now()).is_none());

    let track = Track::default().steam(-33.85, 151.2, 3.0, 270.0, 30);
    let fake = Gpsfake::start_on(dir.path(), port, &track, true);
    let samples = sample(&gps, Duration::from_secs(20), |s| s.last().is_some_and(|(_, p)| p.is_some()));
    let p = samples.last().unwrap().1.clone().unwrap_or_else(|| panic!("no position from gpsd: {}", fake.log()));
    check_against_track(&track, &p);
    assert_eq!(gps.stats().reconnects, 1);
    let t = Instant::now();
    drop(gps);
    assert!(t.elapsed() < Duration::from_secs(1), "stop took {:?}", t.elapsed());
}
