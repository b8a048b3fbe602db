//! Life under systemd (`Type=notify`): READY=1 once models are loaded, cameras opened and the outbox
//! recovered; STATUS= lines with a one-line summary; STOPPING=1 / RELOADING=1; and WATCHDOG=1 sent only
//! while the pipeline makes progress ([`Control::progressing`]): a hung inference or a wedged capture
//! loop stops the pings and systemd kills and restarts the service (`WatchdogSec=`), where a
//! free-running timer would have kept a dead daemon alive. Outside systemd (no `NOTIFY_SOCKET`) every
//! call is a no-op.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::pipeline::{Control, Shutdown};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot notify systemd ({states:?}): {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: draining frames and the outbox")]);
}

pub fn reloading() {
    send(&[NotifyState::Reloading, NotifyState::Status("reloading: restarting with the new configuration")]);
}

/// How long [`extending_start_timeout`] keeps extending systemd's start timeout: past it, a load that
/// has not finished is taken as hung, and systemd's timeout expires a minute after the last extension.
pub const MAX_START_EXTENSION: Duration = Duration::from_secs(45 * 60);

/// Runs `load` (the models: on a Jetson the first start builds TensorRT engines, minutes for the B4)
/// while telling systemd every 20 s to extend the start timeout by 60 s, with a STATUS= line saying
/// how long it has taken, for at most [`MAX_START_EXTENSION`]. Without it a unit killed mid-build would
/// never cache its engines and would rebuild them on every restart. Outside systemd it just runs `load`.
pub fn extending_start_timeout<T>(what: &str, load: impl FnOnce() -> T) -> T {
    extend_every(what, Duration::from_secs(20), load)
}

fn extend_every<T>(what: &str, every: Duration, load: impl FnOnce() -> T) -> T {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return load();
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let started = Instant::now();
    let what = what.to_string();
    let ticker = std::thread::Builder::new().name("start-timeout".into()).spawn(move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(every) {
            if started.elapsed() > MAX_START_EXTENSION {
                log::error!(
                    "{what}: still not done after {MAX_START_EXTENSION:?}; no longer extending systemd's start timeout"
                );
                return;
            }
            let status = format!("starting: {what} ({} s)", started.elapsed().as_secs());
            send(&[NotifyState::ExtendTimeoutUsec(60_000_000), NotifyState::Status(&status)]);
        }
    });
    let out = load();
    drop(done_tx);
    if let Ok(t) = ticker {
        let _ = t.join();
    }
    out
}

/// A one-line summary for STATUS= and the logs.
pub fn summary(control: &Control, mqtt: Option<(bool, u64)>) -> String {
    let cams = control.snapshots();
    let frames: u64 = cams.iter().map(|c| c.frames_captured).sum();
    let passed: u64 = cams.iter().map(|c| c.passed_prefilter).sum();
    let mut s = format!("{} camera(s), {frames} frames, {passed} passed the pre-filter", cams.len());
    if let Some((connected, depth)) = mqtt {
        s.push_str(&format!(", mqtt {}, {depth} queued", if connected { "connected" } else { "disconnected" }));
    }
    s
}

/// Starts the thread that pings the systemd watchdog while `control` shows progress, and refreshes
/// STATUS= every 10 s. `mqtt` reports (connected, outbox depth). Does nothing without `WatchdogSec=`
/// unless NOTIFY_SOCKET is set (then only STATUS= updates). Stops when `shutdown` is triggered.
pub fn spawn_watchdog(
    control: Arc<Control>,
    stall_after: Duration,
    shutdown: Shutdown,
    mqtt: Arc<dyn Fn() -> Option<(bool, u64)> + Send + Sync>,
) {
    let watchdog = sd_notify::watchdog_enabled();
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let every = watchdog.map_or(Duration::from_secs(10), |w| (w / 3).max(Duration::from_millis(100)));
    let spawned = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        let mut last_status = Instant::now() - Duration::from_secs(60);
        let mut reported = false;
        while !shutdown.is_triggered() {
            if watchdog.is_some() {
                if control.progressing(stall_after) {
                    send(&[NotifyState::Watchdog]);
                    reported = false;
                } else if !reported {
                    // Data is being lost and only a restart will help: ERROR.
                    log::error!(
                        "pipeline stalled ({}); no longer pinging the systemd watchdog, expect a restart",
                        control.problems(stall_after).join("; ")
                    );
                    status(&format!("stalled: {}", control.problems(stall_after).join("; ")));
                    reported = true;
                }
            }
            if !reported && last_status.elapsed() >= Duration::from_secs(10) {
                status(&summary(&control, mqtt()));
                last_status = Instant::now();
            }
            std::thread::sleep(every.min(Duration::from_secs(1)));
        }
    });
    if let Err(e) = spawned {
        log::error!("cannot start the watchdog thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow model load under systemd: the start timeout is extended while it runs, and no longer
    /// once it has returned.
    #[test]
    fn a_slow_load_extends_the_start_timeout_until_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        let out = extend_every("loading models", Duration::from_millis(40), || {
            std::thread::sleep(Duration::from_millis(300));
            7
        });
        std::env::remove_var("NOTIFY_SOCKET");
        assert_eq!(out, 7);
        let mut msgs = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let extends = msgs.iter().filter(|m| m.contains("EXTEND_TIMEOUT_USEC=60000000")).count();
        assert!(extends >= 3, "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("STATUS=starting: loading models (")), "{msgs:?}");
        // Nothing more once the load is done.
        std::thread::sleep(Duration::from_millis(150));
        assert!(sock.recv(&mut buf).is_err(), "extended after the load returned");
    }
}
