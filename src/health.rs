//! The optional health endpoint (`[health] listen = "127.0.0.1:9820"`, off by default): `GET /healthz`
//! answers 200 only while every camera delivers and the broker connection (if configured) is up, with a
//! JSON body listing what is not; `GET /metrics` gives the same counters as the MQTT stats topic in
//! Prometheus text format. tiny_http: a small synchronous server, one thread, no async runtime.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::pipeline::{Control, Shutdown};

/// What the daemon reports about MQTT and its outbox (`None` when no broker is configured).
pub type MqttProbe = Arc<dyn Fn() -> Option<MqttHealth> + Send + Sync>;

/// The MQTT link and the outbox at one instant.
#[derive(Debug, Clone, Default)]
pub struct MqttHealth {
    pub connected: bool,
    /// Events waiting for the broker's acknowledgement.
    pub depth: u64,
    pub bytes: u64,
    /// Undelivered events dropped by the size cap or a full disk since start.
    pub dropped: u64,
    /// Of those, dropped because the disk was full before the cap.
    pub dropped_disk_full: u64,
    /// What is wrong besides a lost connection (a full outbox disk, a broker that keeps taking the
    /// session away), in words.
    pub problems: Vec<String>,
}

/// `/healthz` body (a wire type).
#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub healthy: bool,
    pub problems: Vec<String>,
}

/// Binds `listen` and serves until `shutdown`. Binding errors are returned (a port in use is an operator
/// error worth failing start-up for).
pub fn spawn(
    listen: std::net::SocketAddr,
    control: Arc<Control>,
    mqtt: MqttProbe,
    stall_after: Duration,
    shutdown: Shutdown,
) -> Result<std::net::SocketAddr> {
    let server = tiny_http::Server::http(listen).map_err(|e| Error::Input(format!("health endpoint {listen}: {e}")))?;
    let bound = server.server_addr().to_ip().unwrap_or(listen);
    let started = Instant::now();
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            while !shutdown.is_triggered() {
                let req = match server.recv_timeout(Duration::from_millis(200)) {
                    Ok(Some(r)) => r,
                    Ok(None) => continue,
                    Err(e) => {
                        log::warn!("health endpoint: {e}");
                        continue;
                    }
                };
                let (code, body, kind) = match req.url() {
                    "/healthz" => {
                        let mut problems = control.problems(stall_after);
                        if let Some(m) = mqtt() {
                            if !m.connected {
                                problems.push(format!("mqtt: not connected ({} events queued)", m.depth));
                            }
                            problems.extend(m.problems);
                        }
                        let report = HealthReport { healthy: problems.is_empty(), problems };
                        let code = if report.healthy { 200 } else { 503 };
                        (code, serde_json::to_string(&report).unwrap_or_default(), "application/json")
                    }
                    "/metrics" => (200, metrics(&control, mqtt(), started.elapsed()), "text/plain; version=0.0.4"),
                    _ => (404, "not found: try /healthz or /metrics\n".to_string(), "text/plain"),
                };
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], kind.as_bytes());
                let mut response = tiny_http::Response::from_string(body).with_status_code(code);
                if let Ok(h) = header {
                    response = response.with_header(h);
                }
                if let Err(e) = req.respond(response) {
                    log::debug!("health endpoint: {e}");
                }
            }
        })
        .map_err(|e| Error::Input(format!("cannot start the health thread: {e}")))?;
    Ok(bound)
}

/// A label value in the exposition format: backslash, double quote and newline escaped (a camera name
/// may contain any of them).
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The stats topic's counters in Prometheus text exposition format.
pub fn metrics(control: &Control, mqtt: Option<MqttHealth>, uptime: Duration) -> String {
    let mut out = String::new();
    let cams = control.snapshots();
    /// (metric name, help text, counter)
    type Counter = (&'static str, &'static str, fn(&crate::pipeline::CameraSnapshot) -> u64);
    let counters: [Counter; 10] = [
        ("frames_captured", "Frames delivered by the camera", |c| c.frames_captured),
        ("frames_sampled", "Frames offered to inference", |c| c.frames_sampled),
        ("frames_dropped", "Sampled frames replaced by a newer one before inference", |c| c.frames_dropped),
        ("frames_decoded", "Frames decoded and assessed", |c| c.frames_decoded),
        ("frames_corrupt", "Frames that could not be decoded", |c| c.frames_corrupt),
        ("passed_prefilter", "Frames that passed the pre-filter", |c| c.passed_prefilter),
        ("identified", "Frames run through identification", |c| c.identified),
        ("errors", "Capture and inference errors", |c| c.errors),
        ("reconnects", "Times the camera came back after failing", |c| c.reconnects),
        ("bytes_copied", "Bytes of sampled frames copied out of the camera's buffers", |c| c.bytes_copied),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP whaled_{name}_total {help}.\n# TYPE whaled_{name}_total counter");
        for c in &cams {
            let _ = writeln!(out, "whaled_{name}_total{{camera=\"{}\"}} {}", label(&c.camera), get(c));
        }
    }
    let _ = writeln!(out, "# HELP whaled_camera_fps Current capture rate.\n# TYPE whaled_camera_fps gauge");
    for c in &cams {
        let _ = writeln!(out, "whaled_camera_fps{{camera=\"{}\"}} {:.3}", label(&c.camera), c.fps);
    }
    let _ = writeln!(out, "# HELP whaled_latency_ms Frame latency (decode to decision) quantiles over the last 256 frames.\n# TYPE whaled_latency_ms gauge");
    for c in &cams {
        for (q, v) in [("0.5", c.latency_p50_ms), ("0.95", c.latency_p95_ms)] {
            if let Some(v) = v {
                let _ = writeln!(out, "whaled_latency_ms{{camera=\"{}\",quantile=\"{q}\"}} {v:.3}", label(&c.camera));
            }
        }
    }
    let m = control.model_latencies();
    let _ = writeln!(out, "# HELP whaled_model_inference_ms Model inference time quantiles over the last 256 runs.\n# TYPE whaled_model_inference_ms gauge");
    for (model, q, v) in [
        ("prefilter", "0.5", m.prefilter_p50_ms),
        ("prefilter", "0.95", m.prefilter_p95_ms),
        ("identification", "0.5", m.identification_p50_ms),
        ("identification", "0.95", m.identification_p95_ms),
    ] {
        if let Some(v) = v {
            let _ = writeln!(out, "whaled_model_inference_ms{{model=\"{model}\",quantile=\"{q}\"}} {v:.3}");
        }
    }
    let _ = writeln!(out, "# HELP whaled_prefilter_threshold Current pre-filter threshold.\n# TYPE whaled_prefilter_threshold gauge\nwhaled_prefilter_threshold {}", control.threshold());
    if let Some(MqttHealth { connected, depth, bytes, dropped, dropped_disk_full, .. }) = mqtt {
        let _ = writeln!(out, "# HELP whaled_mqtt_connected 1 while the broker connection is up.\n# TYPE whaled_mqtt_connected gauge\nwhaled_mqtt_connected {}", u8::from(connected));
        let _ = writeln!(out, "# HELP whaled_outbox_depth Events waiting for the broker's acknowledgement.\n# TYPE whaled_outbox_depth gauge\nwhaled_outbox_depth {depth}");
        let _ = writeln!(out, "# HELP whaled_outbox_bytes Size of the outbox on disk.\n# TYPE whaled_outbox_bytes gauge\nwhaled_outbox_bytes {bytes}");
        let _ = writeln!(out, "# HELP whaled_outbox_dropped_total Undelivered events dropped by the size cap or a full disk.\n# TYPE whaled_outbox_dropped_total counter\nwhaled_outbox_dropped_total {dropped}");
        let _ = writeln!(out, "# HELP whaled_outbox_dropped_disk_full_total Undelivered events dropped because the disk was full before the size cap.\n# TYPE whaled_outbox_dropped_disk_full_total counter\nwhaled_outbox_dropped_disk_full_total {dropped_disk_full}");
    }
    let _ = writeln!(out, "# HELP whaled_uptime_seconds Seconds since start.\n# TYPE whaled_uptime_seconds gauge\nwhaled_uptime_seconds {:.1}", uptime.as_secs_f64());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Camera names may hold any character but `/`, `+`, `#`, whitespace and controls: a `"` or `\` must
    /// not end the label value early (Prometheus would reject the whole scrape).
    #[test]
    fn label_values_are_escaped() {
        let cfg = crate::config::Config::defaults().unwrap();
        let identifier =
            Arc::new(crate::identify::Identifier::from_config(&cfg, crate::identify::GalleryAccess::ReadOnly).unwrap());
        let names: Vec<Arc<str>> = vec![Arc::from(r#"bow"cam\1"#), Arc::from("mast")];
        let control = Control::new(&names, identifier);
        let text = metrics(&control, None, Duration::from_secs(1));
        assert!(text.contains(r#"whaled_frames_captured_total{camera="bow\"cam\\1"} 0"#), "{text}");
        assert!(text.contains(r#"whaled_camera_fps{camera="bow\"cam\\1"} 0.000"#), "{text}");
        // Every sample line parses: name{label="value",...} number, with only escaped quotes inside values.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            if let Some(labels) = series.split_once('{').map(|(_, l)| l) {
                let mut chars = labels.chars();
                let mut quotes = 0;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => assert!(matches!(chars.next(), Some('\\' | '"' | 'n')), "{line}"),
                        '"' => quotes += 1,
                        _ => {}
                    }
                }
                assert_eq!(quotes % 2, 0, "{line}");
                assert!(labels.ends_with('}'), "{line}");
            }
        }
    }

    #[test]
    fn label_escapes_newlines_too() {
        assert_eq!(label("a\nb\\\"c"), "a\\nb\\\\\\\"c");
    }
}
