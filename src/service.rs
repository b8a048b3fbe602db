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
