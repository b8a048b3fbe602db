//! Where the live pipeline's detections go: a [`Sink`] per destination (the durable outbox that MQTT
//! delivers from, stdout), fanned out by [`Sinks`] so that each fails on its own. A closed or full
//! stdout is a convenience lost, said once at ERROR; the outbox goes on. Only when no sink is left
//! does the daemon stop (nothing would receive what it finds).
//!
//! Order matters: the outbox comes first, so an event is on disk before anyone sees it (see
//! ARCHITECTURE.md, invariants).

use std::io::Write;

use crate::error::{Error, Result};
use crate::pipeline::{Delivery, Event};

/// One destination of events (detections, sightings). `deliver` gets the event and its JSON line
/// (serialised once for every sink).
pub trait Sink {
    /// For logs: "stdout", "outbox".
    fn name(&self) -> &'static str;
    /// Delivers one detection. An error is this sink's alone; what it means is the sink's to say
    /// ([`Failure`]).
    fn deliver(&mut self, event: &Event, line: &str) -> std::result::Result<(), Failure>;
    /// Whether what this sink stores survives a crash (the outbox): [`Sinks::deliver`] reports an event
    /// as held only once such a sink has it.
    fn durable(&self) -> bool {
        false
    }
}

/// How a sink failed.
#[derive(Debug)]
pub enum Failure {
    /// This event is lost to this sink; later ones may still get through (a full disk, say).
    Event(Error),
    /// The sink is gone for good (a closed pipe): no further deliveries are attempted.
    Closed(Error),
}

/// Detection lines on stdout, flushed per line so that `whaled run | jq` sees them at once.
pub struct StdoutSink {
    out: std::io::Stdout,
}

impl StdoutSink {
    pub fn new() -> Self {
        StdoutSink { out: std::io::stdout() }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn deliver(&mut self, e: &Event, line: &str) -> std::result::Result<(), Failure> {
        if matches!(e, Event::Snapshot { .. }) {
            return Ok(()); // binary: not for a terminal
        }
        let mut out = self.out.lock();
        writeln!(out, "{line}").and_then(|_| out.flush()).map_err(|e| Failure::Closed(Error::Input(e.to_string())))
    }
}

/// The durable outbox that the MQTT connection delivers from: an event stored here is on disk and will
/// reach the broker (see `outbox.rs`). A failure loses this event (full disk past what the outbox can
/// make room for); the next may be stored again.
pub struct OutboxSink<'a> {
    publisher: &'a crate::mqtt::Publisher,
}

impl<'a> OutboxSink<'a> {
    pub fn new(publisher: &'a crate::mqtt::Publisher) -> Self {
        OutboxSink { publisher }
    }
}

impl Sink for OutboxSink<'_> {
    fn name(&self) -> &'static str {
        "outbox"
    }

    fn durable(&self) -> bool {
        true
    }

    fn deliver(&mut self, e: &Event, line: &str) -> std::result::Result<(), Failure> {
        let stored = match e {
            Event::Detection(d) => {
                self.publisher.publish_detection(d.camera.as_deref().unwrap_or("unknown"), line.as_bytes())
            }
            Event::Sighting(s) => self.publisher.publish_sighting(&s.camera, line.as_bytes()),
            Event::Restored { camera, .. } => self.publisher.publish_sighting(camera, line.as_bytes()),
            Event::Snapshot { camera, sighting_id, jpeg, crop } => {
                self.publisher.publish_sighting_snapshot(camera, sighting_id, jpeg, *crop)
            }
            Event::Wake => return Ok(()),
        };
        stored.map(|_| ()).map_err(Failure::Event)
    }
}

/// Events lost to one sink are said at most this often (with the count since), not once per frame.
const LOSS_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// One sink and its state in the fan-out.
struct Slot<'a> {
    sink: Box<dyn Sink + 'a>,
    open: bool,
    /// When a lost event was last logged, and how many were lost since without a line.
    last_logged: Option<std::time::Instant>,
    unlogged: u64,
}

/// The sinks of one daemon, in delivery order.
pub struct Sinks<'a> {
    sinks: Vec<Slot<'a>>,
}

impl<'a> Sinks<'a> {
    /// `sinks` in delivery order (the outbox first).
    pub fn new(sinks: Vec<Box<dyn Sink + 'a>>) -> Sinks<'a> {
        Sinks {
            sinks: sinks.into_iter().map(|sink| Slot { sink, open: true, last_logged: None, unlogged: 0 }).collect(),
        }
    }

    /// Delivers `e` to every sink still open. Errors only when no sink is left open. [`Delivery::Held`]
    /// when every durable sink (the outbox) took it, or there is none; `NotHeld` when one failed or has
    /// closed (the event reached stdout at most).
    pub fn deliver(&mut self, e: &Event) -> Result<Delivery> {
        let (line, event_id) = match e {
            Event::Wake => return Ok(Delivery::Held),
            Event::Snapshot { sighting_id, .. } => (Ok(String::new()), sighting_id.as_str()),
            Event::Detection(d) => (serde_json::to_string(d), d.event_id.as_str()),
            Event::Sighting(s) => (serde_json::to_string(s), s.event_id.as_str()),
            Event::Restored { json, event_id, .. } => (serde_json::to_string(json), event_id.as_str()),
        };
        let line = line.map_err(|err| Error::Input(format!("event {event_id} to JSON: {err}")))?;
        let d = e;
        let mut held = true;
        for slot in self.sinks.iter_mut() {
            if !slot.open {
                held &= !slot.sink.durable();
                continue;
            }
            let result = slot.sink.deliver(d, &line);
            held &= result.is_ok() || !slot.sink.durable();
            match result {
                Ok(()) => {}
                Err(Failure::Event(e)) => {
                    // Data lost: ERROR, but one line per LOSS_LOG_EVERY, not one per frame.
                    slot.unlogged += 1;
                    if slot.last_logged.is_none_or(|t| t.elapsed() >= LOSS_LOG_EVERY) {
                        log::error!(
                            "{} event(s) lost to {} (the last, {}): {e}",
                            slot.unlogged,
                            slot.sink.name(),
                            event_id
                        );
                        slot.last_logged = Some(std::time::Instant::now());
                        slot.unlogged = 0;
                    }
                }
                Err(Failure::Closed(e)) => {
                    slot.open = false;
                    log::error!("{}: {e}; no more detections go there (the other outputs go on)", slot.sink.name());
                }
            }
        }
        if self.sinks.iter().any(|s| s.open) {
            Ok(if held { Delivery::Held } else { Delivery::NotHeld })
        } else {
            Err(Error::Input("every output failed (see above): detections would go nowhere".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink that records what it got and fails as told: `fail_at` deliveries in, once (`Event`) or for
    /// good (`Closed`).
    struct Scripted {
        name: &'static str,
        durable: bool,
        got: Arc<Mutex<Vec<String>>>,
        fail_at: usize,
        closed: bool,
        n: usize,
    }

    impl Sink for Scripted {
        fn name(&self) -> &'static str {
            self.name
        }

        fn durable(&self) -> bool {
            self.durable
        }

        fn deliver(&mut self, e: &Event, _: &str) -> std::result::Result<(), Failure> {
            self.n += 1;
            if self.n == self.fail_at {
                let e = Error::Input("broken".into());
                return Err(if self.closed { Failure::Closed(e) } else { Failure::Event(e) });
            }
            let Event::Detection(d) = e else { panic!("only detections here") };
            self.got.lock().unwrap().push(d.image_ind.clone());
            Ok(())
        }
    }

    fn detection(n: usize) -> Event {
        let meta = crate::detection::FrameMeta {
            image_ind: format!("f{n}"),
            source: "cam".into(),
            captured_at: std::time::SystemTime::UNIX_EPOCH,
        };
        Event::Detection(crate::detection::Detection::corrupted(&meta, "dev", "v".into(), "x".into()))
    }

    fn scripted(name: &'static str, fail_at: usize, closed: bool) -> (Box<dyn Sink>, Arc<Mutex<Vec<String>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        (Box::new(Scripted { name, durable: name == "outbox", got: got.clone(), fail_at, closed, n: 0 }), got)
    }

    /// Each row: how the outbox and stdout fail; what each received; whether delivery stops.
    #[test]
    fn sinks_fail_independently() {
        use Delivery::{Held as H, NotHeld as N};
        type Row = (
            (usize, bool),
            (usize, bool),
            &'static [&'static str],
            &'static [&'static str],
            &'static [Option<Delivery>],
        );
        let rows: &[Row] = &[
            // stdout closes at the 2nd event: the outbox still gets (holds) all three.
            ((0, false), (2, true), &["f0", "f1", "f2"], &["f0"], &[Some(H), Some(H), Some(H)]),
            // the outbox loses the 2nd event (disk full): stdout and later events unaffected; the 2nd is
            // not held (it reached stdout only).
            ((2, false), (0, false), &["f0", "f2"], &["f0", "f1", "f2"], &[Some(H), Some(N), Some(H)]),
            // the outbox is gone for good: nothing after is held.
            ((2, true), (0, false), &["f0"], &["f0", "f1", "f2"], &[Some(H), Some(N), Some(N)]),
            // both gone: delivery fails (the daemon stops rather than drop everything silently).
            ((1, true), (2, true), &[], &["f0"], &[Some(N), None, None]),
        ];
        for &((of, oc), (sf, sc), want_outbox, want_stdout, want) in rows {
            let (outbox, o_got) = scripted("outbox", of, oc);
            let (stdout, s_got) = scripted("stdout", sf, sc);
            let mut sinks = Sinks::new(vec![outbox, stdout]);
            let results: Vec<Option<Delivery>> = (0..3).map(|n| sinks.deliver(&detection(n)).ok()).collect();
            assert_eq!(*o_got.lock().unwrap(), want_outbox);
            assert_eq!(*s_got.lock().unwrap(), want_stdout);
            assert_eq!(results, want);
        }
        // No durable output configured (stdout only): nothing to wait for, every delivery is held.
        let (stdout, _) = scripted("stdout", 0, false);
        assert_eq!(Sinks::new(vec![stdout]).deliver(&detection(0)).unwrap(), H);
    }
}
