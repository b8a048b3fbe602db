//! A shore-side consumer of whaled's sighting events: subscribe, de-duplicate, fold into a table.
//!
//! whaled delivers at-least-once (an event whose PUBACK was lost is sent again after a reconnect), so a
//! consumer keeps the `event_id`s it has applied and skips repeats. Every event of an encounter carries
//! the same `sighting_id` and the sighting's state so far (frame counts, best frame, the aggregated
//! answer), so folding is "replace the row with the newest event"; `end` closes the row. Events of one
//! camera arrive in order; a consumer that may see them out of order keeps the one with the most
//! `frames.sampled`.
//!
//!   cargo run --example shore_consumer -- --host broker.example.org --port 1883 --prefix 'whaled/+'
//!
//! prints the table each time it changes (a dashboard would write it to its database instead).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};

/// One row of the table: the latest state of a sighting.
#[derive(Debug, Default, Clone)]
struct Row {
    device: String,
    camera: String,
    started_at: String,
    last_seen_at: String,
    state: String,
    individual: String,
    species: String,
    probability: f64,
    votes: u64,
    identified: u64,
    passed: u64,
    sampled: u64,
    position: String,
}

/// The fold: de-duplicates on `event_id`, keeps each sighting's newest state. (A long-running consumer
/// would forget the ids of sightings ended long ago; a day of a box's events is a few thousand ids.)
#[derive(Default)]
struct Table {
    seen: HashSet<String>,
    rows: BTreeMap<String, Row>,
}

impl Table {
    /// Applies one event; returns whether the table changed.
    fn apply(&mut self, e: &serde_json::Value) -> bool {
        let (Some(event_id), Some(sighting)) = (e["event_id"].as_str(), e["sighting_id"].as_str()) else {
            return false;
        };
        if !self.seen.insert(event_id.to_string()) {
            return false; // a repeat: at-least-once delivery
        }
        let sampled = e["frames"]["sampled"].as_u64().unwrap_or(0);
        let top = &e["identification"]["top"][0];
        let row = self.rows.entry(sighting.to_string()).or_default();
        if row.state.starts_with("end") {
            // The first `end` is final: a later event (or a second `end`, reason `restart`, after a
            // crash between delivering the first and recording it) changes nothing.
            return false;
        }
        if row.sampled > sampled && e["event"] != "end" {
            return false; // older than what the row holds
        }
        *row = Row {
            device: e["device_id"].as_str().unwrap_or("").into(),
            camera: e["camera"].as_str().unwrap_or("").into(),
            started_at: e["started_at"].as_str().unwrap_or("").into(),
            last_seen_at: e["last_seen_at"].as_str().unwrap_or("").into(),
            state: match e["end_reason"].as_str() {
                Some(reason) => format!("end ({reason})"),
                None => e["event"].as_str().unwrap_or("").into(),
            },
            individual: top["class_animal"].as_str().unwrap_or("-").into(),
            species: top["id_animal"].as_str().unwrap_or("-").into(),
            probability: top["probability"].as_f64().unwrap_or(0.0),
            votes: top["votes"].as_u64().unwrap_or(0),
            identified: e["frames"]["identified"].as_u64().unwrap_or(0),
            passed: e["frames"]["passed"].as_u64().unwrap_or(0),
            sampled,
            position: match (e["start_position"]["lat"].as_f64(), e["start_position"]["lon"].as_f64()) {
                (Some(la), Some(lo)) => format!("{la:.5},{lo:.5}"),
                _ => "-".into(),
            },
        };
        true
    }

    fn print(&self) {
        println!(
            "{:<36} {:<10} {:<6} {:<24} {:<24} {:<14} {:<12} {:<18} {:>6} {:>5} {:>9} {:<20}",
            "sighting",
            "device",
            "camera",
            "started",
            "last seen",
            "state",
            "individual",
            "species",
            "p",
            "votes",
            "id/pass",
            "start position"
        );
        for (id, r) in &self.rows {
            println!(
                "{id:<36} {:<10} {:<6} {:<24} {:<24} {:<14} {:<12} {:<18} {:>6.4} {:>5} {:>4}/{:<4} {:<20}",
                r.device,
                r.camera,
                r.started_at,
                r.last_seen_at,
                r.state,
                r.individual,
                r.species,
                r.probability,
                r.votes,
                r.identified,
                r.passed,
                r.position
            );
        }
        println!();
    }
}

fn main() {
    let mut host = "127.0.0.1".to_string();
    let mut port = 1883u16;
    let mut prefix = "whaled/+".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--host", Some(v)) => host = v,
            ("--port", Some(v)) => port = v.parse().unwrap_or_else(|_| usage()),
            ("--prefix", Some(v)) => prefix = v,
            _ => usage(),
        }
    }
    // A persistent session (clean_session = false, fixed client id): the broker queues QoS 1 events
    // while this consumer is away, so nothing published is missed.
    let mut options = MqttOptions::new("whaled-shore-consumer", host, port);
    options.set_clean_session(false).set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, 64);
    let mut table = Table::default();
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                if let Err(e) = client.subscribe(format!("{prefix}/+/sighting"), QoS::AtLeastOnce) {
                    eprintln!("subscribe: {e}");
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                match serde_json::from_slice::<serde_json::Value>(&p.payload) {
                    Ok(e) => {
                        if table.apply(&e) {
                            table.print();
                        }
                    }
                    Err(e) => eprintln!("{}: not JSON: {e}", p.topic),
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("connection: {e}; retrying");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: shore_consumer [--host HOST] [--port PORT] [--prefix 'whaled/+']");
    std::process::exit(2);
}
