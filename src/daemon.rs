//! `whaled run`: the daemon's wiring, as a library function so that tests and the binary drive the same
//! code. [`run`] opens the cameras, starts the MQTT publisher (outbox first: an event is on disk before
//! anyone sees it), the health endpoint and the systemd watchdog, runs the pipeline until every source
//! ends or `shutdown` is triggered, hands each detection to the sinks (outbox, stdout; each fails on its
//! own, see `sink.rs`), and drains. Signals are the caller's: `main.rs` turns SIGINT/SIGTERM into
//! `shutdown` and asks [`watch_reload`] to handle SIGHUP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::{CameraConfig, Config, Origin, PublishMode};
use crate::error::{Error, Result};
use crate::health::{MqttHealth, MqttProbe};
use crate::identify::Identifier;
use crate::mqtt::Publisher;
use crate::pipeline::{self, Camera, CameraSnapshot, Control, Shutdown};
use crate::sink::{OutboxSink, Sink, Sinks, StdoutSink};

/// How a run ended.
#[derive(Debug)]
pub struct Stopped {
    /// Every camera's final counters.
    pub stats: Vec<CameraSnapshot>,
    /// `shutdown` was triggered (a signal, a reload), rather than every source ending.
    pub on_request: bool,
}

/// Runs the daemon on `cfg` until every source ends or `shutdown` is triggered.
pub fn run(mut cfg: Config, identifier: Identifier, shutdown: &Shutdown) -> Result<Stopped> {
    if cfg.cameras.is_empty() {
        let Some(node) = crate::source::v4l2::device_nodes()
            .into_iter()
            .find(|p| crate::source::v4l2::describe(p).is_ok_and(|d| !d.contains("no video capture")))
        else {
            return Err(Error::Input(
                "no cameras configured and no V4L2 camera found (/dev/video*): add a [[camera]] block \
                 (see config/whaled.toml), or try one without a camera: whaled run --config config/replay.toml"
                    .into(),
            ));
        };
        log::info!("no cameras configured: using the first camera found, {}", node.display());
        cfg.cameras.push(CameraConfig::default_v4l2("camera0", node));
    }
    let cameras = cfg
        .cameras
        .iter()
        .map(|c| {
            Ok(Camera {
                name: c.name.as_str().into(),
                source: crate::source::open(c)?,
                sample_interval: c.sample_interval,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let options = pipeline::Options {
        workers: cfg.pipeline.workers,
        emit_rejected: cfg.pipeline.emit_rejected,
        stats_interval: Some(cfg.pipeline.stats_interval),
        device_id: cfg.device_id.clone(),
        sightings: (cfg.sightings.publish != PublishMode::Detections).then(|| cfg.sightings.clone()),
        // Beside the outbox: open sightings survive a crash as an `end` the next run sends.
        state_file: cfg.mqtt.as_ref().map(|m| m.outbox.dir.join("open-sightings.json")),
        gps: cfg.gps.as_ref().map(|g| {
            log::info!("GPS from gpsd at {}", g.address);
            Arc::new(crate::gps::Gps::start(g))
        }),
    };
    if let Some(s) = &options.sightings {
        log::info!(
            "sightings on (publish {:?}): gap {:?}, at most {} identified frames per sighting, one per {:?}",
            s.publish,
            s.gap,
            s.max_identified,
            s.identify_interval
        );
    }
    log::info!("running {} camera(s) with {} inference worker(s)", cfg.cameras.len(), options.workers);
    let identifier = Arc::new(identifier);
    let names: Vec<Arc<str>> = cameras.iter().map(|c| c.name.clone()).collect();
    let control = Arc::new(Control::new(&names, identifier.clone()));
    let publisher = match &cfg.mqtt {
        Some(m) => {
            log::info!(
                "publishing to mqtt://{}:{} under {}/ as device {} (outbox {})",
                m.host,
                m.port,
                m.topic_prefix,
                cfg.device_id,
                m.outbox.dir.display()
            );
            let p = Publisher::start(m, &cfg.device_id, control.clone())?;
            control.set_snapshot_sender(p.snapshot_sender());
            Some(p)
        }
        None => None,
    };
    let mqtt = mqtt_probe(publisher.as_ref());
    if let Some(addr) = cfg.health_listen {
        let bound =
            crate::health::spawn(addr, control.clone(), mqtt.clone(), cfg.pipeline.stall_timeout, shutdown.clone())?;
        log::info!("health endpoint on http://{bound}/healthz and /metrics");
    }
    let m = mqtt.clone();
    let mqtt_status = Arc::new(move || m().map(|h| (h.connected, h.depth)));
    crate::service::spawn_watchdog(control.clone(), cfg.pipeline.stall_timeout, shutdown.clone(), mqtt_status.clone());
    crate::service::ready(&format!("running: {}", crate::service::summary(&control, mqtt_status())));

    let mut outputs: Vec<Box<dyn Sink + '_>> = Vec::new();
    if let Some(p) = &publisher {
        outputs.push(Box::new(OutboxSink::new(p)));
    }
    outputs.push(Box::new(StdoutSink::new()));
    let mut sinks = Sinks::new(outputs);
    let result = pipeline::run_controlled(identifier, cameras, &options, shutdown, &control, |e| sinks.deliver(&e));
    drop(sinks);
    // Also sent by the signal thread as soon as a stop is requested; this covers sources that ended.
    crate::service::stopping();
    if let Some(p) = publisher {
        p.close();
    }
    Ok(Stopped { stats: result?, on_request: shutdown.is_triggered() })
}

/// The MQTT side of /healthz, /metrics and STATUS=, from the publisher's cheap probes.
fn mqtt_probe(publisher: Option<&Publisher>) -> MqttProbe {
    let Some(p) = publisher else { return Arc::new(|| None) };
    let (numbers, problems, outbox) = (p.probe(), p.problems_probe(), p.outbox_probe());
    Arc::new(move || {
        let (connected, depth, bytes, dropped) = numbers();
        Some(MqttHealth {
            connected,
            depth,
            bytes,
            dropped,
            dropped_disk_full: outbox().dropped_disk_full,
            problems: problems(),
        })
    })
}

/// SIGHUP: the configuration is checked again as start-up would check it ([`crate::identify::check`]:
/// the file, the models' digests and shapes) and, if good, `shutdown` is triggered and the returned flag
/// set, so the caller drains and re-executes itself with it; a bad config is logged at ERROR and the
/// daemon keeps running as it is. Also sends STOPPING=1 as soon as `shutdown` is triggered.
pub fn watch_reload(shutdown: &Shutdown, origin: Origin) -> Result<Arc<AtomicBool>> {
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .map_err(|e| Error::Input(format!("cannot install signal handler: {e}")))?;
    let reexec = Arc::new(AtomicBool::new(false));
    let (shutdown, flag) = (shutdown.clone(), reexec.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if shutdown.is_triggered() {
                crate::service::stopping();
                return;
            }
            if hup.swap(false, Ordering::SeqCst) {
                let checked = match &origin {
                    Origin::File(p) => Config::load(p),
                    Origin::Defaults => Config::discover(None),
                }
                .and_then(|c| crate::identify::check(&c).map(|_| c));
                match checked {
                    Ok(_) => {
                        log::info!("SIGHUP: configuration valid; draining and restarting with it");
                        crate::service::reloading();
                        flag.store(true, Ordering::SeqCst);
                        shutdown.trigger();
                    }
                    Err(e) => log::error!("SIGHUP: new configuration rejected, keeping the running one: {e}"),
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        })
        .map_err(|e| Error::Input(format!("cannot start the signal thread: {e}")))?;
    Ok(reexec)
}
