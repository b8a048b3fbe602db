//! Durable MQTT throughput on loopback, for docs/BENCHMARKS.md (run by bench/mqtt.sh, which starts a
//! mosquitto): N detection-sized events (about 900 bytes of JSON) are
//!  1. published with bare rumqttc at QoS 1, timed until every PUBACK is in (no durability: baseline);
//!  2. stored through whaled's `Publisher` (outbox with the default fsync policy) and timed until the
//!     outbox has been emptied by PUBACKs;
//!  3. the same with `fsync_every = 1` (every event on the medium before the next).
//!
//! Usage: mqtt_throughput PORT N OUTBOX_DIR

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
use whaled::config::Config;
use whaled::identify::{GalleryAccess, Identifier};
use whaled::mqtt::Publisher;
use whaled::pipeline::Control;

fn payload(i: usize) -> Vec<u8> {
    let mut s = format!(
        "{{\"image_ind\":\"bow#{i}\",\"bbox\":[0,0,1920,1080],\"class_animal\":\"\",\"id_animal\":\"cetacean_unidentified\",\
         \"probability\":0.0,\"mask\":null,\"is_cetacean\":true,\"cetacean_score\":0.4123,\"rejected\":false,\
         \"rejection_reason\":null,\"model_version\":\"efficientnet-lite0-imagenet\",\"candidates\":[],\
         \"event_id\":\"019ad0c4-0000-7000-8000-{i:012}\",\"device_id\":\"bench\",\"source\":\"bow\",\"camera\":\"bow\",\
         \"captured_at\":\"2026-11-28T20:00:00.000Z\",\"prefilter\":{{\"model\":\"efficientnet-lite0-imagenet\",\
         \"score\":0.41234,\"threshold\":0.048}},\"timings\":{{\"decode_ms\":2.5,\"preprocess_ms\":0.2,\
         \"prefilter_ms\":28.1,\"identification_ms\":0.0,\"total_ms\":30.9}}}}"
    );
    s.push_str(&" ".repeat(900usize.saturating_sub(s.len())));
    s.into_bytes()
}

fn bare(port: u16, n: usize) -> f64 {
    let mut o = MqttOptions::new("bench-bare", "127.0.0.1", port);
    o.set_inflight(48);
    let (client, mut conn) = Client::new(o, 256);
    let t = Instant::now();
    let (mut sent, mut acked) = (0, 0);
    while acked < n {
        while sent < n
            && sent - acked < 32
            && client.try_publish("bench/bare", QoS::AtLeastOnce, false, payload(sent)).is_ok()
        {
            sent += 1;
        }
        if let Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) = conn.recv_timeout(Duration::from_millis(20)) {
            acked += 1;
        }
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn durable(
    port: u16,
    n: usize,
    dir: &std::path::Path,
    fsync_every: Option<usize>,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let toml = format!(
        "device_id = \"bench\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nreplay_rate = 1000000\n[mqtt.outbox]\ndir = \"{}\"\n{}",
        dir.display(),
        fsync_every.map_or(String::new(), |k| format!("fsync_every = {k}\n"))
    );
    let cfg = Config::parse(&dir.with_extension("toml"), &toml)?;
    let id = Arc::new(Identifier::from_config(&cfg, GalleryAccess::ReadWrite)?);
    let control = Arc::new(Control::new(&[Arc::from("bow")], id));
    let p = Publisher::start(cfg.mqtt.as_ref().ok_or("no [mqtt]")?, "bench", control)?;
    let t = Instant::now();
    for i in 0..n {
        p.publish_detection("bow", &payload(i))?;
    }
    let append = n as f64 / t.elapsed().as_secs_f64();
    while p.outbox_stats().depth > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let delivered = n as f64 / t.elapsed().as_secs_f64();
    p.close();
    Ok((append, delivered))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (port, n, dir): (u16, usize, std::path::PathBuf) = (args[1].parse()?, args[2].parse()?, args[3].clone().into());
    println!("events={n} payload_bytes={}", payload(0).len());
    println!("bare_rumqttc_qos1_acked_per_s={:.0}", bare(port, n));
    let (a, d) = durable(port, n, &dir.join("default"), None)?;
    println!("whaled_default_fsync append_per_s={a:.0} delivered_acked_per_s={d:.0}");
    let (a, d) = durable(port, n, &dir.join("every"), Some(1))?;
    println!("whaled_fsync_every_event append_per_s={a:.0} delivered_acked_per_s={d:.0}");
    Ok(())
}
