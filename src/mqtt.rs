//! MQTT to shore: one publisher thread that owns the broker connection and drains the durable
//! [`Outbox`] into it.
//!
//! rumqttc gives us the protocol; this module adds what it lacks for a link that is down for hours:
//! events are taken from the on-disk outbox (never from memory) and leave it only when their PUBACK
//! arrives, matched to the event through the packet id rumqttc reports for each outgoing publish; after
//! any connection error the rumqttc client is dropped, we wait (exponential backoff with jitter) and
//! start a fresh one, which resends every unacknowledged event in order. The backlog is sent at most
//! `replay_rate` events per second, and at most [`WINDOW`] unacknowledged at a time, so a returning
//! link is not flooded; status, stats and command replies do not go through the outbox and never wait
//! behind it. Detections stay in order (live ones queue behind the backlog), so consumers see each
//! camera's events in capture order and de-duplicate on `event_id` (delivery is at-least-once).
//!
//! Topics (prefix default `whaled/<device_id>`): `status` (retained `online`; `offline` as the Last
//! Will; `stopped` on a clean shutdown), `<camera>/detection` and `<camera>/sighting` (QoS 1, via the outbox), `<camera>/snapshot`
//! (JPEG, on request), `stats` (periodic, QoS 0), `cmd/<command>` (subscribed) with replies on
//! `cmd/<command>/reply`. Retained commands are ignored.
//!
//! A session the broker keeps closing soon after CONNACK (typically another client connecting with our
//! client id: two boxes with the same `device_id`) is logged at ERROR, shown by [`Publisher::problems`],
//! and does not reset the backoff, so two such clients do not take the session from each other every
//! `reconnect_min`. TLS files that become unreadable after start-up (checked at start-up by the config)
//! fail the connection set-up, which backs off like any other connection failure.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rumqttc::{Client, ConnectReturnCode, ConnectionError, Event, Incoming, LastWill, MqttOptions, Outgoing, QoS};
use serde::Serialize;

use crate::config::mqtt::MqttConfig;
use crate::error::{Error, Result};
use crate::jitter::Jitter;
use crate::outbox::{Outbox, OutboxStats, SharedOutbox};
use crate::pipeline::{CameraSnapshot, Control, ModelLatencies};
use crate::signing::{Statement, Verifier};

/// Most outbox events published and not yet acknowledged.
pub const WINDOW: usize = 32;
/// How long a clean shutdown keeps delivering the backlog before it leaves the rest for the next start.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);
/// Longer than rumqttc's own connection timeout (5 s), so that it, not us, gives up on a connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(7);
/// A session closed sooner than this after CONNACK is "short": it does not reset the backoff, and
/// [`FLAP_COUNT`] of them closed by the broker within [`FLAP_WINDOW`] mean it keeps taking the session
/// away.
const SHORT_SESSION: Duration = Duration::from_secs(10);
const FLAP_COUNT: usize = 3;
const FLAP_WINDOW: Duration = Duration::from_secs(120);

/// `<prefix>/stats` payload (a wire type).
#[derive(Debug, Clone, Serialize)]
pub struct StatsMessage {
    pub device_id: String,
    pub uptime_s: f64,
    pub connected: bool,
    pub cameras: Vec<CameraSnapshot>,
    pub models: ModelLatencies,
    pub outbox: OutboxWire,
    pub threshold: f64,
    /// The gallery in use (absent: none configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gallery: Option<GalleryWire>,
}

/// The gallery part of the stats payload (a wire type).
#[derive(Debug, Clone, Serialize)]
pub struct GalleryWire {
    pub version: u64,
    pub photos: usize,
    pub individuals: usize,
}

/// The JSON line that starts a `cmd/gallery_update` message; the gallery or delta file follows the
/// newline.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GalleryUpdate {
    /// Read on its own (bounded) by `request_id_of`; declared so that `deny_unknown_fields` takes it.
    #[serde(rename = "request_id")]
    _request_id: Option<serde::de::IgnoredAny>,
    kind: UpdateKind,
    /// The version the gallery will have.
    version: u64,
    /// SHA-256 (hex) of the bytes after the newline.
    sha256: String,
    /// Replace the gallery even if the one sent is not newer (a full gallery only; needs `replaces`).
    force: Option<bool>,
    /// The version the box must have now (required with `force`).
    replaces: Option<u64>,
    /// Ed25519 signature (hex) of [`Statement`] by one of `[mqtt.gallery_keys]`.
    signature: Option<String>,
}

impl GalleryUpdate {
    fn statement(&self) -> Statement {
        Statement {
            kind: match self.kind {
                UpdateKind::Full => "full".into(),
                UpdateKind::Delta => "delta".into(),
            },
            version: self.version,
            sha256: self.sha256.to_ascii_lowercase(),
            force: self.force.unwrap_or(false),
            replaces: self.replaces,
        }
    }
}

/// Shore side of `cmd/gallery_update`: the whole message (signed header line, newline, the file) for a
/// gallery or delta file's bytes, as `whaled gallery sign` writes it. The kind and version are read
/// from the file itself, so the header cannot disagree with it.
pub fn signed_gallery_update(
    file: &[u8],
    what: &str,
    key: &crate::signing::SigningKey,
    replaces: Option<u64>,
    force: bool,
    request_id: Option<&str>,
) -> Result<Vec<u8>> {
    use crate::gallery::{Delta, Gallery};
    use sha2::{Digest, Sha256};
    let (kind, mut version) = if file.starts_with(b"WHGDELT1") {
        ("delta", Delta::from_bytes(file, what)?.version)
    } else {
        ("full", Gallery::from_bytes(file, what)?.version())
    };
    if force {
        // A rollback installs the file's rows as the version after the one it replaces.
        version = match (kind, replaces.and_then(|r| r.checked_add(1))) {
            ("full", Some(v)) => v,
            _ => {
                return Err(Error::Input(
                    "--force applies to a whole gallery and needs --replaces N (the version the boat has now, \
                     below u64::MAX)"
                        .into(),
                ))
            }
        };
    }
    let statement =
        Statement { kind: kind.into(), version, sha256: crate::signing::hex(&Sha256::digest(file)), force, replaces };
    let mut header = serde_json::json!({
        "kind": kind,
        "version": version,
        "sha256": statement.sha256,
        "signature": key.sign(&statement),
    });
    if force {
        header["force"] = serde_json::Value::Bool(true);
    }
    if let Some(r) = replaces {
        header["replaces"] = r.into();
    }
    if let Some(id) = request_id {
        if serde_json::to_vec(id).map_or(usize::MAX, |j| j.len()) > MAX_REQUEST_ID {
            return Err(Error::Input(format!("--request-id is longer than {MAX_REQUEST_ID} bytes as JSON")));
        }
        header["request_id"] = id.into();
    }
    let mut out = serde_json::to_vec(&header).map_err(|e| Error::Input(format!("header: {e}")))?;
    out.push(b'\n');
    out.extend_from_slice(file);
    Ok(out)
}

/// Most bytes of a `request_id` (as JSON) echoed in a reply; a longer one is refused, not echoed, so a
/// reply is never much larger than its request.
pub const MAX_REQUEST_ID: usize = 256;
/// MQTT's largest packet (remaining length 268,435,455). rumqttc fails the whole connection on an
/// incoming packet above its limit, before acknowledging it, and with a persistent session the broker
/// sends that message again on every reconnect: one oversized command would keep the boat offline for
/// good. So the incoming limit is the protocol's, and whaled refuses oversized commands itself
/// (`max_command_size`), with a reply. The broker's `message_size_limit` bounds what it will carry.
const MQTT_MAX_PACKET: usize = 268_435_455;

/// The request id of a command body, bounded: `Err` when it is too long to echo.
fn request_id_of(body: &serde_json::Value) -> Result<Option<serde_json::Value>, String> {
    match body.get("request_id") {
        None => Ok(None),
        Some(v) => {
            let len = serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
            if len > MAX_REQUEST_ID {
                Err(format!("request_id is {len} bytes as JSON, more than {MAX_REQUEST_ID}; refused, not echoed"))
            } else {
                Ok(Some(v.clone()))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum UpdateKind {
    Full,
    Delta,
}

/// Verifies and applies a gallery update; `Ok` names the new version and who signed it. Nothing changes
/// on any error.
fn apply_gallery_update(
    identifier: &crate::identify::Identifier,
    verifier: &Verifier,
    u: &GalleryUpdate,
    body: &[u8],
) -> crate::error::Result<String> {
    use crate::error::Error;
    use crate::gallery::{Delta, Gallery};
    use sha2::{Digest, Sha256};
    if u.sha256.len() != 64 || !u.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Input("header: sha256 must be 64 hex digits".into()));
    }
    if verifier.is_empty() {
        return Err(Error::Input(
            "shore updates are off on this box: no [mqtt.gallery_keys] pinned to verify them with; nothing changed"
                .into(),
        ));
    }
    let signature = u.signature.as_deref().ok_or_else(|| {
        Error::Input("unsigned: this box installs only gallery updates signed by a pinned key (`whaled gallery sign`); nothing changed".into())
    })?;
    let signer =
        verifier.verify(&u.statement(), signature).map_err(|why| Error::Input(format!("{why}; nothing changed")))?;
    let got: String = Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect();
    if !got.eq_ignore_ascii_case(&u.sha256) {
        return Err(Error::Input(format!(
            "the {} bytes received have SHA-256 {got}, the header says {}: a partial or corrupted transfer; nothing changed",
            body.len(),
            u.sha256
        )));
    }
    let current =
        identifier.gallery().ok_or_else(|| Error::Input("no gallery configured ([identification] gallery)".into()))?;
    let new = match u.kind {
        UpdateKind::Full => Gallery::from_bytes(body, "the gallery received")?,
        UpdateKind::Delta => current.apply(&Delta::from_bytes(body, "the delta received")?)?,
    };
    if let Some(m) = identifier.embedder() {
        new.check_embedder(m.sha256(), m.manifest().output.kind.values(), "the gallery received")?;
    }
    let force = u.force.unwrap_or(false);
    if let Some(r) = u.replaces {
        if r != current.version() {
            return Err(Error::Input(format!(
                "the update replaces version {r}, but version {} is in use (a replayed or stale update); nothing changed",
                current.version()
            )));
        }
    }
    // A rollback: the rows of an older gallery, installed under the new (higher, signed) version, so
    // that versions only ever rise on the boat and no update signed before can apply again.
    let new = if force {
        if matches!(u.kind, UpdateKind::Delta) || u.replaces.is_none() {
            return Err(Error::Input(
                "\"force\" applies to a whole gallery and needs \"replaces\": the version in use, signed with it \
                 (`whaled gallery sign --force --replaces N`)"
                    .into(),
            ));
        }
        Gallery::with_rows(new.dim(), new.embedder_sha256(), u.version, new.rows().to_vec())?
    } else {
        new
    };
    if new.version() != u.version {
        return Err(Error::Input(format!(
            "the header says version {} but the {} holds version {}",
            u.version,
            if matches!(u.kind, UpdateKind::Full) { "gallery" } else { "delta" },
            new.version()
        )));
    }
    // Always, forced or not: a version at or below the one in use is an update signed earlier (a replay)
    // or a stale one.
    if new.version() <= current.version() {
        return Err(Error::Input(format!(
            "the update is version {}, not above the one in use ({}); a rollback is a signed \"force\" that installs \
             the old rows under a new version",
            new.version(),
            current.version()
        )));
    }
    let summary = format!(
        "gallery version {}: {} photos of {} individuals (signed by {signer:?})",
        new.version(),
        new.len(),
        new.individuals()
    );
    identifier.replace_gallery(new)?;
    Ok(summary)
}

/// The outbox part of the stats payload (a wire type).
#[derive(Debug, Clone, Serialize)]
pub struct OutboxWire {
    pub depth: u64,
    pub bytes: u64,
    pub oldest_age_s: Option<f64>,
    /// Undelivered events dropped since start (size cap or full disk).
    pub dropped: u64,
    /// Of `dropped`, those dropped because the disk was full before the size cap.
    pub dropped_disk_full: u64,
    /// The disk holding the outbox was found full within the last minute.
    pub disk_full: bool,
}

impl From<OutboxStats> for OutboxWire {
    fn from(s: OutboxStats) -> Self {
        OutboxWire {
            depth: s.depth,
            bytes: s.bytes,
            oldest_age_s: s.oldest_age_ms.map(|m| m as f64 / 1e3),
            dropped: s.dropped,
            dropped_disk_full: s.dropped_disk_full,
            disk_full: s.disk_full,
        }
    }
}

/// `<prefix>/cmd/<command>/reply` payload (a wire type).
#[derive(Debug, Clone, Serialize)]
pub struct CommandReply {
    pub command: String,
    pub ok: bool,
    pub message: String,
    /// Echoed from the request's `request_id`, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<serde_json::Value>,
    /// `gallery_update`: the gallery's version after the command (the new one, or the unchanged one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gallery_version: Option<u64>,
}

pub use crate::pipeline::Snapshot;

/// The topics of one device.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Topics { prefix: prefix.to_string() }
    }
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }
    pub fn detection(&self, camera: &str) -> String {
        format!("{}/{camera}/detection", self.prefix)
    }
    pub fn sighting(&self, camera: &str) -> String {
        format!("{}/{camera}/sighting", self.prefix)
    }
    pub fn snapshot(&self, camera: &str) -> String {
        format!("{}/{camera}/snapshot", self.prefix)
    }
    pub fn stats(&self) -> String {
        format!("{}/stats", self.prefix)
    }
    pub fn commands(&self) -> String {
        format!("{}/cmd/+", self.prefix)
    }
    fn command_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(&self.prefix)?.strip_prefix("/cmd/").filter(|c| !c.contains('/'))
    }
}

/// The handle the rest of the daemon holds: append events, then close.
pub struct Publisher {
    outbox: Arc<SharedOutbox>,
    topics: Topics,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    snapshots: mpsc::SyncSender<Snapshot>,
    connected: Arc<AtomicBool>,
    flapping: Arc<Flapping>,
    client_id: String,
}

/// When the broker last kept taking the session away (ms since `since`; 0: never).
struct Flapping {
    since: Instant,
    at_ms: AtomicU64,
}

impl Flapping {
    fn recent(&self) -> bool {
        let at = self.at_ms.load(Ordering::SeqCst);
        at > 0 && (self.since.elapsed().as_millis() as u64).saturating_sub(at) < FLAP_WINDOW.as_millis() as u64
    }
}

impl Publisher {
    /// Opens the outbox (recovering it) and starts the connection thread. Fails only if the outbox
    /// cannot be opened; the broker may be unreachable for as long as it likes.
    pub fn start(cfg: &MqttConfig, device_id: &str, control: Arc<Control>) -> Result<Publisher> {
        // rustls needs a process-wide crypto provider; `ring` builds everywhere we cross-compile to.
        // (Err only means one is installed already.)
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (outbox, recovery) = Outbox::open(cfg.outbox.clone())?;
        if recovery.pending > 0 || recovery.damaged_segments > 0 {
            log::info!(
                "outbox {}: {} undelivered events to send; {} damaged segment(s): {} events lost, {} damaged bytes \
                 skipped, {} bytes cut off",
                cfg.outbox.dir.display(),
                recovery.pending,
                recovery.damaged_segments,
                recovery.lost_records,
                recovery.skipped_bytes,
                recovery.truncated_bytes
            );
        }
        let outbox = Arc::new(SharedOutbox::new(outbox));
        let flapping = Arc::new(Flapping { since: Instant::now(), at_ms: AtomicU64::new(0) });
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let (snap_tx, snap_rx) = mpsc::sync_channel(2);
        let mut link = Link {
            cfg: cfg.clone(),
            topics: Topics::new(&cfg.topic_prefix),
            device_id: device_id.to_string(),
            outbox: outbox.clone(),
            stop: stop.clone(),
            control,
            snapshots: snap_rx,
            started: Instant::now(),
            jitter: Jitter::new(0),
            connected: connected.clone(),
            flapping: flapping.clone(),
            short_sessions: VecDeque::new(),
            flap_logged: None,
        };
        let thread = std::thread::Builder::new()
            .name("mqtt".into())
            .spawn(move || link.run())
            .map_err(|e| Error::Input(format!("cannot start the MQTT thread: {e}")))?;
        Ok(Publisher {
            outbox,
            topics: Topics::new(&cfg.topic_prefix),
            stop,
            thread: Some(thread),
            snapshots: snap_tx,
            connected,
            flapping,
            client_id: cfg.client_id.clone(),
        })
    }

    /// Stores a detection for delivery; returns its outbox id. An error means the event could not be
    /// stored (disk full, medium failing): the caller logs it as lost.
    pub fn publish_detection(&self, camera: &str, json: &[u8]) -> Result<u64> {
        self.outbox.append(&self.topics.detection(camera), json)
    }

    /// Stores a sighting's best-frame JPEG for delivery (QoS 1, `<prefix>/<camera>/sighting/<id>/snapshot`;
    /// the crop around the located animal: `.../<id>/crop`).
    pub fn publish_sighting_snapshot(&self, camera: &str, sighting_id: &str, jpeg: &[u8], crop: bool) -> Result<u64> {
        let part = if crop { "crop" } else { "snapshot" };
        self.outbox.append(&format!("{}/{sighting_id}/{part}", self.topics.sighting(camera)), jpeg)
    }

    /// Stores a sighting event for delivery (QoS 1, `<prefix>/<camera>/sighting`), like a detection.
    pub fn publish_sighting(&self, camera: &str, json: &[u8]) -> Result<u64> {
        self.outbox.append(&self.topics.sighting(camera), json)
    }

    /// A sender for snapshot JPEGs (the pipeline's workers hold one).
    pub fn snapshot_sender(&self) -> mpsc::SyncSender<Snapshot> {
        self.snapshots.clone()
    }

    /// A cheap, shareable view for /healthz, /metrics and STATUS=: (connected, outbox depth, outbox
    /// bytes, events dropped by the size cap).
    pub fn probe(&self) -> Arc<dyn Fn() -> (bool, u64, u64, u64) + Send + Sync> {
        let (outbox, connected) = (self.outbox.clone(), self.connected.clone());
        Arc::new(move || {
            let s = outbox.stats();
            (connected.load(Ordering::SeqCst), s.depth, s.bytes, s.dropped)
        })
    }

    /// What `/healthz` should list besides a lost connection: a full outbox disk, a broker that keeps
    /// taking the session away. Empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        (self.problems_probe())()
    }

    /// [`problems`](Self::problems) as a cheap, shareable closure (for the health thread).
    pub fn problems_probe(&self) -> Arc<dyn Fn() -> Vec<String> + Send + Sync> {
        let (outbox, flapping, client_id) = (self.outbox.clone(), self.flapping.clone(), self.client_id.clone());
        Arc::new(move || {
            let mut out = Vec::new();
            let s = outbox.stats();
            if s.disk_full {
                out.push(format!(
                    "outbox {}: disk full before the size cap; {} undelivered events dropped to make room",
                    outbox.dir().display(),
                    s.dropped_disk_full
                ));
            }
            if flapping.recent() {
                out.push(format!(
                    "mqtt: the broker keeps closing the session; another client may be using client id {client_id}"
                ));
            }
            out
        })
    }

    /// The outbox's counters, as a cheap, shareable closure (for /metrics).
    pub fn outbox_probe(&self) -> Arc<dyn Fn() -> OutboxStats + Send + Sync> {
        let outbox = self.outbox.clone();
        Arc::new(move || outbox.stats())
    }

    /// Whether the broker connection is up now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub fn outbox_stats(&self) -> OutboxStats {
        self.outbox.stats()
    }

    /// Delivers what it can within a few seconds, publishes `stopped`, disconnects and syncs the outbox.
    pub fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the MQTT thread panicked");
            }
        }
        if let Err(e) = self.outbox.sync() {
            log::error!("outbox not synced at shutdown: {e}");
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The connection thread's state.
struct Link {
    cfg: MqttConfig,
    topics: Topics,
    device_id: String,
    outbox: Arc<SharedOutbox>,
    stop: Arc<AtomicBool>,
    control: Arc<Control>,
    snapshots: mpsc::Receiver<Snapshot>,
    started: Instant,
    jitter: Jitter,
    connected: Arc<AtomicBool>,
    flapping: Arc<Flapping>,
    /// When recent short sessions ended (see [`SHORT_SESSION`]).
    short_sessions: VecDeque<Instant>,
    flap_logged: Option<Instant>,
}

/// How a connection ended.
enum End {
    Stopped,
    /// Why, when CONNACK arrived if it did, whether the broker closed the connection, and whether the
    /// broker acknowledged at least one event in it.
    Failed(String, Option<Instant>, bool, bool),
}

/// Whether a failed session resets the reconnect backoff: one that lasted [`SHORT_SESSION`], or a
/// shorter one that delivered events and was not closed by the broker (a closed short session may be
/// another client taking our id, which must not make the two fight every `reconnect_min`).
fn resets_backoff(lasted: Option<Duration>, delivered: bool, closed_by_broker: bool) -> bool {
    match lasted {
        None => false,
        Some(d) if d >= SHORT_SESSION => true,
        Some(_) => delivered && !closed_by_broker,
    }
}

impl Link {
    fn options(&self) -> Result<MqttOptions> {
        let c = &self.cfg;
        let mut o = MqttOptions::new(c.client_id.clone(), c.host.clone(), c.port);
        o.set_keep_alive(c.keep_alive.max(Duration::from_secs(1)))
            .set_clean_session(false)
            // Incoming: the protocol's limit, so no message can fail the connection (see MQTT_MAX_PACKET).
            .set_max_packet_size(MQTT_MAX_PACKET, c.max_packet_size)
            .set_inflight((WINDOW + 16) as u16)
            .set_last_will(LastWill::new(self.topics.status(), "offline", QoS::AtLeastOnce, true));
        if let Some(user) = &c.username {
            o.set_credentials(user.clone(), c.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default());
        }
        if let Some(tls) = &c.tls {
            let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| Error::io(p, e));
            let client_auth = match &tls.client_auth {
                Some((cert, key)) => Some((read(cert)?, read(key)?)),
                None => None,
            };
            o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple {
                ca: read(&tls.ca)?,
                alpn: None,
                client_auth,
            }));
        }
        Ok(o)
    }

    fn run(&mut self) {
        let mut backoff = self.cfg.reconnect_min;
        let mut failures = 0u32;
        loop {
            let end = match self.options() {
                Ok(options) => self.session(options),
                // E.g. a TLS file replaced or removed since start-up: backs off like a failed connect.
                Err(e) => End::Failed(format!("cannot set up the connection: {e}"), None, false, false),
            };
            self.connected.store(false, Ordering::SeqCst);
            match end {
                End::Stopped => return,
                End::Failed(why, connected_at, closed_by_broker, delivered) => {
                    // A short session the broker closed may be a takeover (see `resets_backoff`).
                    let lasted = connected_at.map(|t| t.elapsed());
                    if lasted.is_some_and(|d| d < SHORT_SESSION) && closed_by_broker {
                        self.short_session(&why);
                    }
                    if resets_backoff(lasted, delivered, closed_by_broker) {
                        backoff = self.cfg.reconnect_min;
                        failures = 0;
                    }
                    failures += 1;
                    let wait = self.jitter.scale(backoff, 0.5, 1.0);
                    // The outbox keeps every event: WARN (recovered by retrying), not ERROR, except when
                    // only the operator can fix it (credentials), which `session` logs at ERROR.
                    if failures <= 3 || failures.is_power_of_two() {
                        log::warn!(
                            "MQTT broker {}:{}: {why}; retry {failures} in {wait:.1?} ({} events waiting)",
                            self.cfg.host,
                            self.cfg.port,
                            self.outbox.stats().depth
                        );
                    }
                    backoff = (backoff * 2).min(self.cfg.reconnect_max);
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        if self.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        self.housekeeping();
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }

    /// A session the broker closed soon after accepting it: after [`FLAP_COUNT`] within [`FLAP_WINDOW`],
    /// ERROR (an operator must act: two clients share our id), at most once per window.
    fn short_session(&mut self, why: &str) {
        let now = Instant::now();
        self.short_sessions.push_back(now);
        while self.short_sessions.front().is_some_and(|t| now.duration_since(*t) > FLAP_WINDOW) {
            self.short_sessions.pop_front();
        }
        let n = self.short_sessions.len();
        if n < FLAP_COUNT {
            return;
        }
        self.flapping.at_ms.store(self.flapping.since.elapsed().as_millis().max(1) as u64, Ordering::SeqCst);
        if self.flap_logged.is_some_and(|t| t.elapsed() < FLAP_WINDOW) {
            return;
        }
        self.flap_logged = Some(now);
        let span = self.short_sessions.front().map_or(Duration::ZERO, |t| now.duration_since(*t));
        log::error!(
            "MQTT broker {}:{} closed the session {n} times in {:.0}s, each within {}s of accepting it (last: {why}): \
             another client may be using client id {:?} (two devices with the same device_id?); events wait in \
             the outbox meanwhile",
            self.cfg.host,
            self.cfg.port,
            span.as_secs_f64(),
            SHORT_SESSION.as_secs(),
            self.cfg.client_id
        );
    }

    fn housekeeping(&mut self) {
        if let Err(e) = self.outbox.sync_if_due() {
            log::error!("outbox: {e}");
        }
        // Snapshots cannot be sent while disconnected: drop them (they are on demand, not events).
        while self.snapshots.try_recv().is_ok() {}
    }

    /// One connection, from connect to error or shutdown.
    fn session(&mut self, options: MqttOptions) -> End {
        let (client, mut conn) = Client::new(options, 256);
        if let Err(e) = client.subscribe(self.topics.commands(), QoS::AtLeastOnce) {
            return End::Failed(format!("subscribe: {e}"), None, false, false);
        }
        self.outbox.rewind();
        let mut connected: Option<Instant> = None;
        let mut delivered = false;
        // One entry per publish requested, in order: Some(outbox id) for events.
        let mut requested: VecDeque<Option<u64>> = VecDeque::new();
        let mut inflight: HashMap<u16, u64> = HashMap::new();
        let mut tokens = 0.0f64;
        let mut last_refill = Instant::now();
        let mut next_stats = Instant::now() + self.cfg.stats_interval;
        let mut stopping: Option<Instant> = None;
        let mut stopped_sent = false;
        loop {
            if stopping.is_none() && self.stop.load(Ordering::SeqCst) {
                if connected.is_none() {
                    return End::Stopped;
                }
                stopping = Some(Instant::now());
            }
            if let Some(since) = stopping {
                let drained = self.outbox.stats().depth == 0;
                if !stopped_sent && (drained || since.elapsed() > DRAIN_TIMEOUT) {
                    if client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, "stopped").is_ok() {
                        requested.push_back(None);
                    }
                    stopped_sent = true;
                    let _ = client.disconnect();
                }
                if since.elapsed() > DRAIN_TIMEOUT + Duration::from_secs(2) {
                    return End::Stopped;
                }
            }
            // rumqttc's poll may only be cut short once connected: a timeout during the TCP/TLS
            // handshake drops the half-open connection (seen with TLS: connect, CONNACK, close, again).
            let wait = if connected.is_some() { POLL } else { CONNECT_TIMEOUT };
            match conn.recv_timeout(wait) {
                Err(rumqttc::RecvTimeoutError::Timeout) if connected.is_none() => {
                    return End::Failed("no answer from the broker (connect timed out)".into(), None, false, false)
                }
                Err(rumqttc::RecvTimeoutError::Timeout) => {}
                Err(rumqttc::RecvTimeoutError::Disconnected) => {
                    return End::Failed("connection closed".into(), connected, false, delivered)
                }
                Ok(Ok(Event::Incoming(Incoming::ConnAck(ack)))) => {
                    connected = Some(Instant::now());
                    self.connected.store(true, Ordering::SeqCst);
                    log::info!(
                        "MQTT connected to {}:{} as {} (session resumed: {})",
                        self.cfg.host,
                        self.cfg.port,
                        self.cfg.client_id,
                        ack.session_present
                    );
                    if client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, "online").is_ok() {
                        requested.push_back(None);
                    }
                }
                Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    if let Some(Some(id)) = requested.pop_front() {
                        inflight.insert(pkid, id);
                    }
                }
                Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                    if let Some(id) = inflight.remove(&ack.pkid) {
                        self.outbox.ack(id);
                        delivered = true;
                    }
                }
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                    if let Some(reply) = self.command(&p) {
                        if client.try_publish(format!("{}/reply", p.topic), QoS::AtLeastOnce, false, reply).is_ok() {
                            requested.push_back(None);
                        }
                    }
                }
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) if stopping.is_some() => {
                    // Let the DISCONNECT reach the broker (so it discards the Will), then stop.
                    let _ = conn.recv_timeout(Duration::from_millis(100));
                    log::info!("MQTT disconnected cleanly (status: stopped)");
                    return End::Stopped;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let why = describe(&e);
                    if let ConnectionError::ConnectionRefused(
                        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
                    ) = e
                    {
                        log::error!(
                            "MQTT broker {}:{} refused whaled: {why}; check [mqtt] username and password",
                            self.cfg.host,
                            self.cfg.port
                        );
                    }
                    if stopping.is_some() {
                        return End::Stopped;
                    }
                    let closed_by_broker = match &e {
                        ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted) => true,
                        ConnectionError::MqttState(rumqttc::StateError::Io(io)) | ConnectionError::Io(io) => matches!(
                            io.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::ConnectionAborted
                                | std::io::ErrorKind::UnexpectedEof
                        ),
                        _ => false,
                    };
                    return End::Failed(why, connected, closed_by_broker, delivered);
                }
            }
            if connected.is_none() {
                continue;
            }
            // Refill the replay budget and send what the window allows.
            let rate = self.cfg.replay_rate;
            tokens = (tokens + last_refill.elapsed().as_secs_f64() * rate).min(rate.max(1.0));
            last_refill = Instant::now();
            while !stopped_sent && tokens >= 1.0 && inflight.len() + requested.len() < WINDOW {
                let next = self.outbox.next_to_send();
                match next {
                    Ok(Some(r)) => {
                        if client.try_publish(r.topic, QoS::AtLeastOnce, false, r.message).is_err() {
                            // Request queue full: resend from the watermark on the next pass.
                            self.outbox.rewind();
                            break;
                        }
                        requested.push_back(Some(r.id));
                        tokens -= 1.0;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("outbox: {e}");
                        break;
                    }
                }
            }
            if let Ok(s) = self.snapshots.try_recv() {
                if s.jpeg.len() + 256 > self.cfg.max_packet_size {
                    log::warn!(
                        "snapshot of {} ({} bytes) exceeds mqtt.max_packet_size {}; not sent",
                        s.camera,
                        s.jpeg.len(),
                        self.cfg.max_packet_size
                    );
                } else if client.try_publish(self.topics.snapshot(&s.camera), QoS::AtMostOnce, false, s.jpeg).is_ok() {
                    requested.push_back(None);
                }
            }
            if Instant::now() >= next_stats || self.control.take_stats_request() {
                next_stats = Instant::now() + self.cfg.stats_interval;
                if let Ok(json) = serde_json::to_vec(&self.stats(true)) {
                    if client.try_publish(self.topics.stats(), QoS::AtMostOnce, false, json).is_ok() {
                        requested.push_back(None);
                    }
                }
            }
            if let Err(e) = self.outbox.sync_if_due() {
                log::error!("outbox: {e}");
            }
        }
    }

    fn stats(&self, connected: bool) -> StatsMessage {
        StatsMessage {
            device_id: self.device_id.clone(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            connected,
            cameras: self.control.snapshots(),
            models: self.control.model_latencies(),
            outbox: self.outbox.stats().into(),
            threshold: self.control.threshold(),
            gallery: self.control.identifier().gallery().map(|g| GalleryWire {
                version: g.version(),
                photos: g.len(),
                individuals: g.individuals(),
            }),
        }
    }

    /// Runs a command; returns the reply payload (`None` for messages that get no reply), never larger
    /// than `max_packet_size` allows on the reply topic.
    fn command(&self, p: &rumqttc::Publish) -> Option<Vec<u8>> {
        let name = self.topics.command_name(&p.topic)?.to_string();
        if p.retain {
            // A retained "pause" would otherwise disable a camera after every restart.
            log::warn!("ignoring retained command on {} (commands must not be retained)", p.topic);
            return None;
        }
        let limit = self.cfg.max_command_size;
        let answer = if p.payload.len() > limit {
            let message = format!(
                "the command is {} bytes, more than this box's mqtt.max_command_size ({limit}); refused unread",
                p.payload.len()
            );
            log::warn!("{}: {message}", p.topic);
            reply(&name, false, message, None, None)
        } else if name == "gallery_update" {
            self.gallery_update(&p.payload)
        } else {
            self.simple_command(&name, &p.payload)
        };
        // The topic, the packet's own bytes and slack: a reply that would exceed the outgoing limit
        // fails the connection in rumqttc, so it is cut to a refusal instead.
        let room = self.cfg.max_packet_size.saturating_sub(p.topic.len() + 6 + 64);
        Some(bounded_reply(&name, answer, room))
    }

    /// pause / resume / snapshot / set_threshold / stats. Unsigned: the broker's ACLs decide who may
    /// send them (README, "Trust").
    fn simple_command(&self, name: &str, payload: &[u8]) -> CommandReply {
        let body: serde_json::Value = if payload.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            match serde_json::from_slice(payload) {
                Ok(v) => v,
                Err(e) => return reply(name, false, format!("payload is not JSON: {e}"), None, None),
            }
        };
        let request_id = match request_id_of(&body) {
            Ok(r) => r,
            Err(why) => {
                log::warn!("command {name} refused: {why}");
                return reply(name, false, why, None, None);
            }
        };
        let from = body.get("from").and_then(|f| f.as_str()).map(|f| truncate(f, 64));
        let camera = body.get("camera").and_then(|c| c.as_str());
        let (ok, message) = match (name, camera) {
            ("pause" | "resume" | "snapshot", None) => (false, format!("{name} needs {{\"camera\": NAME}}")),
            ("pause", Some(c)) => self.control.set_paused(c, true),
            ("resume", Some(c)) => self.control.set_paused(c, false),
            ("snapshot", Some(c)) => self.control.request_snapshot(c),
            ("set_threshold", _) => match body.get("threshold").and_then(|t| t.as_f64()) {
                Some(t) if (0.0..=1.0).contains(&t) => {
                    self.control.set_threshold(t);
                    // Unsigned: `from` is what the sender says it is (the broker's ACLs vouch for it).
                    log::info!(
                        "pre-filter threshold set to {t} by command (from: {})",
                        from.as_deref().unwrap_or("not given")
                    );
                    (true, format!("threshold {t}"))
                }
                _ => (false, "set_threshold needs {\"threshold\": a number in [0, 1]}".into()),
            },
            ("stats", _) => {
                self.control.request_stats();
                (true, "stats published".into())
            }
            _ => (
                false,
                format!(
                    "unknown command {:?}; known: pause, resume, set_threshold, stats, snapshot, gallery_update",
                    truncate(name, 64)
                ),
            ),
        };
        if ok && matches!(name, "pause" | "resume") {
            log::info!("{message} by command (from: {})", from.as_deref().unwrap_or("not given"));
        }
        reply(name, ok, message, request_id, None)
    }

    /// `cmd/gallery_update`: a JSON header line, a newline, then a gallery or delta file. Every reply
    /// carries the gallery's version after the command.
    fn gallery_update(&self, payload: &[u8]) -> CommandReply {
        let identifier = self.control.identifier();
        let verifier = Verifier::new(self.cfg.gallery_keys.clone());
        let (ok, message, request_id) = match payload.iter().position(|&b| b == b'\n') {
            None => (false, "expected a JSON header line, a newline, then the gallery or delta bytes".into(), None),
            Some(nl) => {
                // The request id first (bounded), so that even a refused header can be paired with its reply.
                let request_id = serde_json::from_slice::<serde_json::Value>(&payload[..nl])
                    .ok()
                    .map_or(Ok(None), |v| request_id_of(&v));
                match (request_id, serde_json::from_slice::<GalleryUpdate>(&payload[..nl])) {
                    (Err(why), _) => (false, why, None),
                    (Ok(rid), Err(e)) => (
                        false,
                        format!(
                            "header: {e} (expected {{\"kind\": \"full\"|\"delta\", \"version\": N, \"sha256\": HEX, \
                             \"signature\": HEX}}, as `whaled gallery sign` writes it)"
                        ),
                        rid,
                    ),
                    (Ok(rid), Ok(header)) => {
                        match apply_gallery_update(identifier, &verifier, &header, &payload[nl + 1..]) {
                            Ok(summary) => {
                                log::info!("gallery updated from shore: {summary}");
                                (true, summary, rid)
                            }
                            Err(e) => (false, e.to_string(), rid),
                        }
                    }
                }
            }
        };
        if !ok {
            log::warn!("gallery update refused: {message}");
        }
        let gallery_version = identifier.gallery().map(|g| g.version());
        reply("gallery_update", ok, message, request_id, gallery_version)
    }
}

fn reply(
    command: &str,
    ok: bool,
    message: String,
    request_id: Option<serde_json::Value>,
    gallery_version: Option<u64>,
) -> CommandReply {
    CommandReply { command: truncate(command, 64), ok, message, request_id, gallery_version }
}

/// `s`, cut to at most `max` bytes on a character boundary (marked with "...").
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The reply as JSON in at most `room` bytes: as it is if it fits, else the same outcome with the
/// message cut short and no echoed request id.
fn bounded_reply(name: &str, r: CommandReply, room: usize) -> Vec<u8> {
    if let Ok(json) = serde_json::to_vec(&r) {
        if json.len() <= room {
            return json;
        }
    }
    let short = CommandReply {
        command: truncate(name, 64),
        ok: r.ok,
        message: truncate(&format!("(reply cut to fit mqtt.max_packet_size) {}", r.message), 200),
        request_id: None,
        gallery_version: r.gallery_version,
    };
    log::warn!("command {}: reply cut to fit mqtt.max_packet_size", truncate(name, 64));
    serde_json::to_vec(&short).unwrap_or_default()
}

/// A connection error in words an operator can act on.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!(
            "connection refused: {}",
            match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorised",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
                ConnectReturnCode::Success => "success?",
            }
        ),
        // rumqttc words a dropped connection as a "serialization/deserialization error"; it is the network.
        ConnectionError::Io(io) | ConnectionError::MqttState(rumqttc::StateError::Io(io)) => format!("network: {io}"),
        ConnectionError::Tls(t) => format!("TLS: {t}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_resets_after_a_session_that_delivered() {
        let short = Some(Duration::from_secs(2));
        let long = Some(SHORT_SESSION);
        // (lasted, delivered, closed by the broker) -> resets
        let cases = [
            (None, false, false, false),
            (None, true, false, false),
            (short, false, false, false),
            (short, true, false, true),
            // A short session the broker closed: a takeover must not reset, delivered or not.
            (short, true, true, false),
            (long, false, false, true),
            (long, false, true, true),
        ];
        for (lasted, delivered, closed, want) in cases {
            assert_eq!(resets_backoff(lasted, delivered, closed), want, "{lasted:?} {delivered} {closed}");
        }
    }

    #[test]
    fn request_ids_are_bounded() {
        let ok = serde_json::json!({"request_id": "a".repeat(MAX_REQUEST_ID - 2)});
        assert_eq!(request_id_of(&ok).unwrap().unwrap().as_str().unwrap().len(), MAX_REQUEST_ID - 2);
        let long = serde_json::json!({"request_id": "a".repeat(MAX_REQUEST_ID - 1)});
        assert!(request_id_of(&long).unwrap_err().contains("more than 256"));
        let nested = serde_json::json!({"request_id": {"a": vec![1; 200]}});
        assert!(request_id_of(&nested).is_err());
        assert_eq!(request_id_of(&serde_json::json!({})).unwrap(), None);
    }

    #[test]
    fn replies_fit_their_room() {
        let big = reply("pause", true, "x".repeat(10_000), Some(serde_json::json!(7)), None);
        let out = bounded_reply("pause", big, 1_000);
        assert!(out.len() <= 1_000, "{}", out.len());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!((v["ok"].as_bool(), v["request_id"].is_null()), (Some(true), true), "{v}");
        let small = reply("stats", true, "stats published".into(), Some(serde_json::json!("r1")), None);
        let v: serde_json::Value = serde_json::from_slice(&bounded_reply("stats", small, 1_000)).unwrap();
        assert_eq!(v["request_id"], "r1");
        assert_eq!(truncate("héllo wörld", 5), "h...");
        assert_eq!(truncate("short", 64), "short");
    }
}
