//! MQTT delivery against a real mosquitto started by each test on a free loopback port: a broker outage
//! mid-stream, a daemon SIGKILLed while the broker is down, a torn outbox tail, a damaged closed segment,
//! a second daemon on the same outbox, the outbox on a full (tmpfs) disk, the status topic's Last Will,
//! TLS with a client certificate, TLS files checked at start-up and backed off at run time, a wrong
//! password, two clients with one client id, commands, and every payload validated against the JSON
//! Schemas in `schemas/`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::{free_port, unsafe_kill, Broker, Msg, Subscriber};
use common::{logs, repo};
use whaled::config::mqtt::MqttConfig;
use whaled::config::Config;
use whaled::identify::{GalleryAccess, Identifier};
use whaled::mqtt::Publisher;
use whaled::outbox::{Outbox, OutboxConfig};
use whaled::pipeline::Control;

fn control(cameras: &[&str]) -> Arc<Control> {
    let id = Arc::new(Identifier::from_config(&Config::defaults().unwrap(), GalleryAccess::ReadWrite).unwrap());
    let names: Vec<Arc<str>> = cameras.iter().map(|c| Arc::from(*c)).collect();
    Arc::new(Control::new(&names, id))
}

fn mqtt_config(port: u16, outbox: &Path) -> MqttConfig {
    let toml = format!(
        "device_id = \"t1\"\n[sightings]\npublish = \"detections\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"400ms\"\n\
         replay_rate = 2000\n[mqtt.outbox]\ndir = \"{}\"\n",
        outbox.display()
    );
    Config::parse(&outbox.with_extension("toml"), &toml).unwrap().mqtt.unwrap()
}

fn event(camera: &str, seq: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"event_id": format!("{camera}-{seq}"), "camera": camera, "seq": seq}))
        .unwrap()
}

/// Distinct events in arrival order (first occurrence of each event_id), per camera.
fn first_seen(msgs: &[Msg]) -> BTreeMap<String, Vec<u64>> {
    let mut seen = HashSet::new();
    let mut per: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.topic.ends_with("/detection")) {
        let j = m.json();
        if seen.insert(j["event_id"].as_str().unwrap().to_string()) {
            per.entry(j["camera"].as_str().unwrap().to_string()).or_default().push(j["seq"].as_u64().unwrap());
        }
    }
    per
}

#[test]
fn broker_outage_mid_stream_loses_nothing_and_keeps_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&tmp.path().join("broker"), "");
    let sub = Subscriber::start(broker.port, "shore", "whaled/t1/#");
    let publisher =
        Publisher::start(&mqtt_config(broker.port, &tmp.path().join("outbox")), "t1", control(&["a", "b"])).unwrap();
    let n = 300u64;
    for seq in 0..n {
        for cam in ["a", "b"] {
            publisher.publish_detection(cam, &event(cam, seq)).unwrap();
        }
        if seq == 100 {
            // Let some be delivered, then take the broker away while events keep coming.
            std::thread::sleep(Duration::from_millis(300));
            broker.stop();
        }
        if seq == 200 {
            broker.restart();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let msgs = sub.wait_for(Duration::from_secs(60), "every event after the outage", |m| {
        first_seen(m).values().map(Vec::len).sum::<usize>() == 2 * n as usize
    });
    for (cam, seqs) in first_seen(&msgs) {
        assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "camera {cam}: every event once, in order");
    }
    let dups = msgs.iter().filter(|m| m.topic.ends_with("/detection")).count() - 2 * n as usize;
    eprintln!("{} detection messages, {dups} duplicates (at-least-once)", 2 * n as usize + dups);
    let t = Instant::now();
    while publisher.outbox_stats().depth > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "outbox never emptied: {:?}", publisher.outbox_stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    publisher.close();
}

#[test]
fn a_torn_outbox_tail_is_cut_and_intact_records_are_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let (mut o, _) = Outbox::open(OutboxConfig::new(dir.clone())).unwrap();
    for seq in 0..5 {
        o.append("whaled/t1/a/detection", &event("a", seq)).unwrap();
    }
    drop(o);
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 7).unwrap(); // power cut mid-write

    let broker = Broker::start(&tmp.path().join("broker"), "");
    let sub = Subscriber::start(broker.port, "shore", "whaled/t1/#");
    let publisher = Publisher::start(&mqtt_config(broker.port, &dir), "t1", control(&["a"])).unwrap();
    publisher.publish_detection("a", &event("a", 5)).unwrap();
    let msgs = sub.wait_for(Duration::from_secs(20), "the intact records", |m| {
        first_seen(m).get("a").is_some_and(|v| v.contains(&5))
    });
    assert_eq!(first_seen(&msgs)["a"], vec![0, 1, 2, 3, 5], "the torn record 4 is never delivered");
    for m in msgs.iter().filter(|m| m.topic.ends_with("/detection")) {
        m.json(); // nothing corrupt reached the wire
    }
    publisher.close();
}

// ---- the daemon binary ------------------------------------------------------------------------

struct Daemon {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_whaled"));
        cmd.args(["--log-level", "info", "run", "--config"]).arg(config);
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Daemon {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (o, e) = (stdout.clone(), stderr.clone());
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            BufReader::new(out).lines().map_while(Result::ok).for_each(|l| o.lock().unwrap().push(l))
        });
        std::thread::spawn(move || {
            BufReader::new(err).lines().map_while(Result::ok).for_each(|l| e.lock().unwrap().push(l))
        });
        Daemon { child, stdout, stderr }
    }

    fn event_ids(&self) -> Vec<String> {
        let lines = self.stdout.lock().unwrap().clone();
        lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event_id"].as_str().unwrap().to_string())
            .collect()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for the process to exit on its own; panics after `timeout`.
    fn exit_within(&mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (s, self.stderr());
            }
            assert!(t.elapsed() < timeout, "still running after {timeout:?}:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_stdout_lines(&self, n: usize, timeout: Duration) {
        let t = Instant::now();
        while self.stdout.lock().unwrap().len() < n {
            assert!(t.elapsed() < timeout, "daemon printed fewer than {n} detections; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(mut self) -> Vec<String> {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        self.event_ids()
    }

    /// SIGTERM; returns the exit status.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        unsafe_kill(self.child.id(), "TERM");
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (s, self.stderr());
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no clean exit after SIGTERM:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon config: a looping replay camera over tests/photos emitting every frame, MQTT on `port`.
fn daemon_config(dir: &Path, port: u16, mqtt_extra: &str) -> PathBuf {
    let path = dir.join("whaled.toml");
    std::fs::write(
        &path,
        format!(
            "device_id = \"boat\"\n\
             [[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"{}\"\nfps = 8\n\
             [pipeline]\nemit_rejected = true\n\
             [sightings]\npublish = \"detections\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\
             stats_interval = \"1s\"\n{mqtt_extra}\n[mqtt.outbox]\ndir = \"{}\"\n",
            repo().join("tests/photos").display(),
            dir.join("outbox").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn sigkill_while_the_broker_is_down_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = daemon_config(tmp.path(), port, "");
    let first = Daemon::start(&config);
    first.wait_stdout_lines(10, Duration::from_secs(180)); // generous: qemu-user on a loaded CI box
    let pending = first.kill9();
    assert!(pending.len() >= 10);

    let broker = Broker::start_on(&tmp.path().join("broker"), port, "");
    let sub = Subscriber::start(port, "shore", "whaled/boat/#");
    let second = Daemon::start(&config);
    let want: HashSet<String> = pending.iter().cloned().collect();
    let msgs = sub.wait_for(Duration::from_secs(60), "every event of the killed run", |m| {
        let got: HashSet<String> = m
            .iter()
            .filter(|m| m.topic == "whaled/boat/bow/detection")
            .map(|m| m.json()["event_id"].as_str().unwrap().to_string())
            .collect();
        want.is_subset(&got)
    });
    let (status, stderr) = second.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("undelivered events to send"), "{stderr}");
    // In order: the killed run's events arrive in the order they were captured.
    let order: Vec<String> = msgs
        .iter()
        .filter(|m| m.topic.ends_with("/detection"))
        .map(|m| m.json()["event_id"].as_str().unwrap().to_string())
        .filter(|e| want.contains(e))
        .collect();
    let mut firsts = Vec::new();
    for e in order {
        if !firsts.contains(&e) {
            firsts.push(e);
        }
    }
    assert_eq!(firsts, pending, "delivered in capture order");
    validate_all(&sub.snapshot());
    drop(broker);
}

#[test]
fn status_is_offline_after_a_kill_online_on_restart_and_stopped_after_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"), "");
    let sub = Subscriber::start(broker.port, "shore", "whaled/boat/#");
    let config = daemon_config(tmp.path(), broker.port, "");
    let statuses = |m: &[Msg]| m.iter().filter(|m| m.topic == "whaled/boat/status").map(Msg::text).collect::<Vec<_>>();

    let d = Daemon::start(&config);
    sub.wait_for(Duration::from_secs(60), "online", |m| statuses(m).last().is_some_and(|s| s == "online"));
    d.kill9();
    sub.wait_for(Duration::from_secs(20), "offline (the Last Will)", |m| {
        statuses(m).last().is_some_and(|s| s == "offline")
    });
    let d = Daemon::start(&config);
    sub.wait_for(Duration::from_secs(60), "online again", |m| statuses(m).last().is_some_and(|s| s == "online"));
    let (status, stderr) = d.terminate();
    assert!(status.success(), "{stderr}");
    let m = sub.wait_for(Duration::from_secs(10), "stopped", |m| statuses(m).last().is_some_and(|s| s == "stopped"));
    assert_eq!(statuses(&m), ["online", "offline", "online", "stopped"]);
    // The retained status a dashboard sees when it connects later:
    let late = Subscriber::start(broker.port, "late-dashboard", "whaled/boat/status");
    let r = late.wait_for(Duration::from_secs(10), "retained status", |m| !m.is_empty());
    assert!(r[0].retain && r[0].text() == "stopped");
    validate_all(&sub.snapshot());
}

#[test]
fn commands_pause_resume_threshold_stats_snapshot_and_retained_ones_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"), "");
    let sub = Subscriber::start(broker.port, "shore", "whaled/boat/#");
    // A retained "pause" left on the broker must not pause the camera of a daemon that starts later.
    sub.publish("whaled/boat/cmd/pause", br#"{"camera": "bow"}"#, true);
    let d = Daemon::start(&daemon_config(tmp.path(), broker.port, ""));
    sub.wait_for(Duration::from_secs(60), "online", |m| {
        m.iter().any(|m| m.topic == "whaled/boat/status" && m.text() == "online")
    });
    d.wait_stdout_lines(3, Duration::from_secs(60));
    let replies = |m: &[Msg], cmd: &str| {
        m.iter().filter(|x| x.topic == format!("whaled/boat/cmd/{cmd}/reply")).map(Msg::json).collect::<Vec<_>>()
    };
    assert!(replies(&sub.snapshot(), "pause").is_empty(), "the retained command got no reply");

    sub.publish("whaled/boat/cmd/pause", br#"{"camera": "bow", "request_id": 7}"#, false);
    let m = sub.wait_for(Duration::from_secs(10), "pause reply", |m| !replies(m, "pause").is_empty());
    let r = &replies(&m, "pause")[0];
    assert_eq!((r["ok"].as_bool(), r["request_id"].as_i64()), (Some(true), Some(7)), "{r}");
    std::thread::sleep(Duration::from_millis(500));
    let paused_at = d.stdout.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(d.stdout.lock().unwrap().len() <= paused_at + 1, "no detections while paused");
    sub.publish("whaled/boat/cmd/resume", br#"{"camera": "bow"}"#, false);
    sub.wait_for(Duration::from_secs(10), "resume reply", |m| !replies(m, "resume").is_empty());
    d.wait_stdout_lines(paused_at + 3, Duration::from_secs(30));

    sub.publish("whaled/boat/cmd/set_threshold", br#"{"threshold": 0.5}"#, false);
    sub.publish("whaled/boat/cmd/set_threshold", br#"{"threshold": 7}"#, false);
    sub.publish("whaled/boat/cmd/pause", br#"{"camera": "stern"}"#, false);
    sub.publish("whaled/boat/cmd/reboot", b"{}", false);
    sub.publish("whaled/boat/cmd/snapshot", br#"{"camera": "bow"}"#, false);
    let m = sub.wait_for(Duration::from_secs(20), "replies and a snapshot", |m| {
        replies(m, "set_threshold").len() == 2
            && replies(m, "pause").len() == 2
            && !replies(m, "reboot").is_empty()
            && m.iter().any(|x| x.topic == "whaled/boat/bow/snapshot")
    });
    let th = replies(&m, "set_threshold");
    assert_eq!((th[0]["ok"].as_bool(), th[1]["ok"].as_bool()), (Some(true), Some(false)));
    assert_eq!(replies(&m, "pause")[1]["ok"].as_bool(), Some(false), "unknown camera");
    assert!(replies(&m, "reboot")[0]["message"].as_str().unwrap().contains("unknown command"));
    let snap = m.iter().find(|x| x.topic == "whaled/boat/bow/snapshot").unwrap();
    assert!(snap.payload.starts_with(&[0xFF, 0xD8]) && image::load_from_memory(&snap.payload).is_ok(), "a JPEG");

    sub.publish("whaled/boat/cmd/stats", b"", false);
    let m = sub.wait_for(Duration::from_secs(10), "stats with the new threshold", |m| {
        m.iter().any(|x| x.topic == "whaled/boat/stats" && x.json()["threshold"].as_f64() == Some(0.5))
    });
    let (status, stderr) = d.terminate();
    assert!(status.success(), "{stderr}");
    validate_all(&m);
}

// ---- TLS and credentials ----------------------------------------------------------------------

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl (Debian package openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all made for this test.
fn make_certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    // X.509 v3 with the usual extensions: rustls (webpki) refuses v1 certificates.
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=whaled test CA",
        ],
    );
    for name in ["server", "client"] {
        let ext = format!("{name}.ext");
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        openssl(
            dir,
            &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")],
        );
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
        ];
        args.extend(["-extfile", &ext]);
        openssl(dir, &args);
    }
}

#[test]
fn tls_with_a_client_certificate_delivers() {
    logs::capture();
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    make_certs(&certs);
    let tls_port = free_port();
    let c = |f: &str| certs.join(f).display().to_string();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        c("ca.crt"),
        c("server.crt"),
        c("server.key")
    );
    let broker = Broker::start(&tmp.path().join("broker"), &extra);
    let sub = Subscriber::start(broker.port, "shore", "whaled/t1/#"); // plain listener, same broker
    let mut cfg = mqtt_config(tls_port, &tmp.path().join("outbox"));
    let toml = format!(
        "device_id = \"t1\"\n[sightings]\npublish = \"detections\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {tls_port}\nreconnect_min = \"100ms\"\n\
         [mqtt.tls]\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        c("ca.crt"),
        c("client.crt"),
        c("client.key")
    );
    cfg.tls = Config::parse(&tmp.path().join("tls.toml"), &toml).unwrap().mqtt.unwrap().tls;
    let p = Publisher::start(&cfg, "t1", control(&["a"])).unwrap();
    for seq in 0..3 {
        p.publish_detection("a", &event("a", seq)).unwrap();
    }
    let m = sub
        .wait_for(Duration::from_secs(20), "events over TLS", |m| first_seen(m).get("a").is_some_and(|v| v.len() == 3));
    assert_eq!(first_seen(&m)["a"], vec![0, 1, 2]);
    p.close();
    drop(broker);
}

#[test]
fn a_wrong_password_is_a_clear_error_that_never_shows_the_password() {
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("passwords");
    let out = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["whaled", "right-horse-battery"])
        .output()
        .expect("mosquitto_passwd (Debian package mosquitto)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let broker =
        Broker::start(&tmp.path().join("broker"), &format!("password_file {}\nallow_anonymous false\n", pw.display()));
    let secret = tmp.path().join("mqtt.pass");
    std::fs::write(&secret, "wrong-staple-secret\n").unwrap();
    let config = daemon_config(
        tmp.path(),
        broker.port,
        &format!("username = \"whaled\"\npassword_file = \"{}\"", secret.display()),
    );
    let d = Daemon::start(&config);
    let t = Instant::now();
    while !d.stderr().contains("check [mqtt] username and password") {
        assert!(t.elapsed() < Duration::from_secs(60), "no credentials error:\n{}", d.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, stderr) = d.terminate();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("ERROR") && (stderr.contains("bad user name or password") || stderr.contains("not authorised")),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-staple-secret"), "the password leaked into the log");
    // The right one works.
    std::fs::write(&secret, "right-horse-battery\n").unwrap();
    let sub = Subscriber::start_as(broker.port, "shore", "whaled/boat/#", Some(("whaled", "right-horse-battery")));
    let d = Daemon::start(&config);
    sub.wait_for(Duration::from_secs(60), "online with the right password", |m| m.iter().any(|m| m.text() == "online"));
    let (status, _) = d.terminate();
    assert!(status.success());
}

// ---- schemas --------------------------------------------------------------------------------------

fn schema(name: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(repo().join("schemas").join(name)).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Validates every message by topic against its schema; panics on the first invalid one.
fn validate_all(msgs: &[Msg]) {
    let detection = schema("detection.schema.json");
    let stats = schema("stats.schema.json");
    let reply = schema("command-reply.schema.json");
    let status = schema("status.schema.json");
    let mut counts = BTreeMap::new();
    for m in msgs {
        let (v, value) = if m.topic.contains("/cmd/") && !m.topic.ends_with("/reply") {
            continue; // commands the test sent
        } else if m.topic.ends_with("/detection") {
            (&detection, m.json())
        } else if m.topic.ends_with("/stats") {
            (&stats, m.json())
        } else if m.topic.ends_with("/reply") {
            (&reply, m.json())
        } else if m.topic.ends_with("/status") {
            (&status, serde_json::Value::String(m.text()))
        } else {
            continue;
        };
        if let Err(e) = v.validate(&value) {
            panic!("{} does not match its schema: {e}\n{value}", m.topic);
        }
        *counts.entry(m.topic.rsplit('/').next().unwrap().to_string()).or_insert(0) += 1;
    }
    eprintln!("validated {counts:?}");
}

// ---- the outbox under stress ---------------------------------------------------------------------

/// A bad block in the middle of a closed segment: every intact record around it is still delivered.
#[test]
fn damage_in_a_closed_segment_loses_only_the_damaged_events() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let (mut o, _) = Outbox::open(OutboxConfig { segment_bytes: 1000, ..OutboxConfig::new(dir.clone()) }).unwrap();
    for seq in 0..30 {
        o.append("whaled/t1/a/detection", &event("a", seq)).unwrap();
    }
    drop(o);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "{segs:?}");
    // The third record of the first segment (seq 2): its payload bytes zeroed.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let at = bytes.windows(5).position(|w| w == b"a-2\",").expect("event a-2 in the first segment");
    for b in &mut bytes[at..at + 10] {
        *b = 0;
    }
    std::fs::write(&segs[0], &bytes).unwrap();

    let broker = Broker::start(&tmp.path().join("broker"), "");
    let sub = Subscriber::start(broker.port, "shore", "whaled/t1/#");
    let publisher = Publisher::start(&mqtt_config(broker.port, &dir), "t1", control(&["a"])).unwrap();
    let msgs = sub.wait_for(Duration::from_secs(20), "every intact event", |m| {
        first_seen(m).get("a").is_some_and(|v| v.contains(&29))
    });
    let want: Vec<u64> = (0..30).filter(|s| *s != 2).collect();
    assert_eq!(first_seen(&msgs)["a"], want, "only the damaged event is missing");
    let t = Instant::now();
    while publisher.outbox_stats().depth > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the watermark is stuck: {:?}", publisher.outbox_stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    publisher.close();
}

/// Two daemons on one outbox directory would interleave ids: the second refuses to start, naming it.
#[test]
fn a_second_daemon_on_the_same_outbox_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let config = daemon_config(tmp.path(), free_port(), ""); // no broker needed
    let first = Daemon::start(&config);
    first.wait_stdout_lines(1, Duration::from_secs(60));
    let mut second = Daemon::start(&config);
    let (status, stderr) = second.exit_within(Duration::from_secs(60));
    assert!(!status.success(), "{stderr}");
    let dir = tmp.path().join("outbox").display().to_string();
    assert!(stderr.contains(&dir) && stderr.contains("in use by another process"), "{stderr}");
    let (status, stderr) = first.terminate();
    assert!(status.success(), "the first daemon carries on: {stderr}");
}

/// The issue's reproduction: the outbox on a tiny tmpfs (a private mount namespace, so nothing leaks),
/// the broker down, a fast camera. The oldest undelivered events make room for the newest, the loss is
/// counted in `stats` and reported once per 10 s, not once per event.
#[test]
fn a_full_outbox_disk_drops_the_oldest_keeps_the_newest_and_says_so_once() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    // The shore subscriber's session exists before the daemon publishes (mosquitto persists it).
    let mut broker = Broker::start_on(&tmp.path().join("broker"), port, "");
    let sub = Subscriber::start(port, "shore", "whaled/boat/#");
    broker.stop();

    let outbox = tmp.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let config = tmp.path().join("whaled.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"boat\"\n\
             [[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"{}\"\nfps = 50\n\
             [pipeline]\nemit_rejected = true\n\
             [sightings]\npublish = \"detections\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"300ms\"\n\
             stats_interval = \"1s\"\n[mqtt.outbox]\ndir = \"{}\"\n",
            repo().join("tests/photos").display(),
            outbox.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs -o size=32k whaled-test \"$1\" && exec \"$2\" --log-level info run --config \"$3\"")
        .arg("sh")
        .arg(&outbox)
        .arg(env!("CARGO_BIN_EXE_whaled"))
        .arg(&config);
    let d = Daemon::spawn(cmd);
    let started = Instant::now();
    // However fast this machine (or qemu-user) runs the pre-filter: wait for the disk to fill and the
    // first drop to be reported, then for a few events more, which must still be stored.
    while !d.stderr().contains("disk is full") {
        assert!(started.elapsed() < Duration::from_secs(600), "the 32 KiB outbox never filled:\n{}", d.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }
    let at_first_drop = d.event_ids().len();
    d.wait_stdout_lines(at_first_drop + 3, Duration::from_secs(300));
    let printed = d.event_ids();
    let filled_in = started.elapsed();
    assert!(
        d.stderr().contains("dropped undelivered events") && d.stderr().contains("disk is full"),
        "no report of the full disk:\n{}",
        d.stderr()
    );

    broker.restart();
    let newest = printed.last().unwrap().clone();
    let detections = |m: &[Msg]| -> Vec<String> {
        m.iter()
            .filter(|m| m.topic == "whaled/boat/bow/detection")
            .map(|m| m.json()["event_id"].as_str().unwrap().to_string())
            .collect()
    };
    let msgs = sub.wait_for(Duration::from_secs(60), "the newest events and stats counting the drops", |m| {
        detections(m).contains(&newest)
            && m.iter()
                .any(|x| x.topic == "whaled/boat/stats" && x.json()["outbox"]["dropped_disk_full"].as_u64() > Some(0))
    });
    let delivered: HashSet<String> = detections(&msgs).into_iter().collect();
    assert!(!delivered.contains(&printed[0]), "the oldest undelivered event was dropped");
    let stats = msgs.iter().rev().find(|x| x.topic == "whaled/boat/stats").unwrap().json();
    assert_eq!(stats["outbox"]["disk_full"], true, "{stats}");
    let dropped = stats["outbox"]["dropped_disk_full"].as_u64().unwrap();
    assert_eq!(stats["outbox"]["dropped"].as_u64(), Some(dropped), "{stats}");
    validate_all(&msgs);

    let (status, stderr) = d.terminate();
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("lost: cannot store it in the outbox"), "no event was refused:\n{stderr}");
    let reports = stderr.lines().filter(|l| l.contains("ERROR") && l.contains("dropped undelivered events")).count();
    let allowed = 2 + (started.elapsed().as_secs() / 10) as usize;
    assert!(
        (1..=allowed).contains(&reports),
        "{reports} ERROR reports in {:.0?} (disk filled within {filled_in:.0?}; {dropped} dropped):\n{stderr}",
        started.elapsed()
    );
}

// ---- TLS files and client ids -------------------------------------------------------------------

/// A config whose CA file is not a certificate fails `whaled check-config` (naming the file and the
/// key); with the real CA it passes.
#[test]
fn check_config_checks_the_tls_files() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    make_certs(&certs);
    let ca = tmp.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let config = tmp.path().join("whaled.toml");
    std::fs::write(
        &config,
        format!(
            "[sightings]\npublish = \"detections\"\n[mqtt]\nhost = \"127.0.0.1\"\n[mqtt.tls]\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            ca.display(),
            certs.join("client.crt").display(),
            certs.join("client.key").display()
        ),
    )
    .unwrap();
    let check = || Command::new(env!("CARGO_BIN_EXE_whaled")).arg("check-config").arg(&config).output().unwrap();
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("mqtt.tls.ca") && stderr.contains(&ca.display().to_string()), "{stderr}");
    std::fs::copy(certs.join("ca.crt"), &ca).unwrap();
    let out = check();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A TLS file that disappears after start-up fails each connection set-up; the retries back off
/// (they used to count as a dropped connection and run every `reconnect_min` forever).
#[test]
fn a_tls_file_removed_after_start_up_backs_off() {
    logs::capture();
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    make_certs(&certs);
    let port = free_port(); // never reached: the set-up fails first
    let toml = format!(
        "device_id = \"t1\"\n[sightings]\npublish = \"detections\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min = \"100ms\"\n\
         reconnect_max = \"1s\"\n[mqtt.tls]\nca = \"{}\"\n[mqtt.outbox]\ndir = \"{}\"\n",
        certs.join("ca.crt").display(),
        tmp.path().join("outbox").display()
    );
    let cfg = Config::parse(&tmp.path().join("w.toml"), &toml).unwrap().mqtt.unwrap();
    std::fs::remove_file(certs.join("ca.crt")).unwrap();
    let p = Publisher::start(&cfg, "t1", control(&["a"])).unwrap();
    let at = format!("127.0.0.1:{port}");
    logs::wait_for(
        log::Level::Warn,
        &[&at, "cannot set up the connection", "ca.crt", "retry 3 in"],
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(2));
    let attempts = logs::matching(log::Level::Warn, &[&at, "cannot set up the connection"]).len();
    assert!(attempts <= 5, "{attempts} retries logged: not backing off");
    p.close();
}

/// Two publishers with one client id (two boxes with the same device_id): the broker keeps closing one
/// session for the other. Said at ERROR, named, and listed for /healthz.
#[test]
fn two_clients_with_one_client_id_are_an_error() {
    logs::capture();
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"), "");
    let client_id = format!("twin-{}", broker.port);
    let publisher = |name: &str| {
        let mut cfg = mqtt_config(broker.port, &tmp.path().join(name));
        cfg.client_id = client_id.clone();
        Publisher::start(&cfg, "t1", control(&["a"])).unwrap()
    };
    let (a, b) = (publisher("outbox-a"), publisher("outbox-b"));
    let line = logs::wait_for(
        log::Level::Error,
        &["closed the session", "another client may be using client id", &format!("{client_id:?}")],
        Duration::from_secs(30),
    );
    eprintln!("{line}");
    let problems = [a.problems(), b.problems()].concat();
    assert!(problems.iter().any(|p| p.contains(&client_id)), "{problems:?}");
    a.close();
    b.close();
    assert!(broker.log().contains("already connected"), "mosquitto saw the same client id twice");
}

// ---- hostile and oversized commands ---------------------------------------------------------------

/// Distinct detection event ids the broker delivered.
fn detection_ids(msgs: &[Msg]) -> HashSet<String> {
    msgs.iter()
        .filter(|m| m.topic.ends_with("/detection"))
        .map(|m| m.json()["event_id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `more` new detections (not in `before`) have reached the broker.
fn detections_flow(sub: &Subscriber, before: &HashSet<String>, more: usize, within: Duration, what: &str) {
    sub.wait_for(within, what, |m| detection_ids(m).difference(before).count() >= more);
}

#[test]
fn no_command_can_knock_the_boat_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"), "");
    let sub = Subscriber::start(broker.port, "shore", "whaled/boat/#");
    // The defaults: max_packet_size 1 MiB (outgoing); a command limit of 2 MiB for this test.
    let d = Daemon::start(&daemon_config(tmp.path(), broker.port, "max_command_size = 2097152"));
    sub.wait_for(Duration::from_secs(60), "online", |m| {
        m.iter().any(|m| m.topic == "whaled/boat/status" && m.text() == "online")
    });
    detections_flow(&sub, &HashSet::new(), 2, Duration::from_secs(120), "first detections");
    let replies = |m: &[Msg], cmd: &str| {
        m.iter().filter(|x| x.topic == format!("whaled/boat/cmd/{cmd}/reply")).map(Msg::json).collect::<Vec<_>>()
    };

    // 1. A 1.5 MiB gallery_update (QoS 1), larger than the outgoing limit: once it failed the
    //    connection before its PUBACK, and the broker sent it again on every reconnect.
    let mut poison = br#"{"kind": "full", "version": 9, "sha256": "00", "request_id": "big"}"#.to_vec();
    poison.push(b'\n');
    poison.resize(1_500_000, 0x5a);
    let before = detection_ids(&sub.snapshot());
    sub.publish("whaled/boat/cmd/gallery_update", &poison, false);
    let m = sub.wait_for(Duration::from_secs(20), "a refusal of the 1.5 MiB update", |m| {
        !replies(m, "gallery_update").is_empty()
    });
    let r = &replies(&m, "gallery_update")[0];
    assert_eq!((r["ok"].as_bool(), r["request_id"].as_str()), (Some(false), Some("big")), "{r}");
    detections_flow(&sub, &before, 2, Duration::from_secs(60), "detections after the 1.5 MiB command");

    // 2. A 3 MiB command, above max_command_size: refused unread, with a reply.
    let before = detection_ids(&sub.snapshot());
    sub.publish("whaled/boat/cmd/gallery_update", &vec![b'x'; 3 << 20], false);
    let m = sub.wait_for(Duration::from_secs(20), "a refusal of the 3 MiB command", |m| {
        replies(m, "gallery_update").len() >= 2
    });
    let r = &replies(&m, "gallery_update")[1];
    assert!(r["ok"] == false && r["message"].as_str().unwrap().contains("max_command_size"), "{r}");
    detections_flow(&sub, &before, 2, Duration::from_secs(60), "detections after the 3 MiB command");

    // 3. A command just under the outgoing limit whose request_id would make the reply larger than it:
    //    refused, not echoed, and the connection stays up (no Last Will).
    let before = detection_ids(&sub.snapshot());
    let huge_id =
        serde_json::to_vec(&serde_json::json!({"camera": "bow", "request_id": "r".repeat(1_040_000)})).unwrap();
    sub.publish("whaled/boat/cmd/pause", &huge_id, false);
    let m =
        sub.wait_for(Duration::from_secs(20), "a refusal of the huge request_id", |m| !replies(m, "pause").is_empty());
    let r = &replies(&m, "pause")[0];
    assert!(r["ok"] == false && r["message"].as_str().unwrap().contains("request_id"), "{r}");
    assert!(r.get("request_id").is_none(), "a long request_id is never echoed");
    // A camera name as long as the packet allows, echoed in the message: the reply is cut to fit.
    let long_camera = serde_json::to_vec(&serde_json::json!({"camera": "c".repeat(1_040_000)})).unwrap();
    sub.publish("whaled/boat/cmd/resume", &long_camera, false);
    let m =
        sub.wait_for(Duration::from_secs(20), "a reply to the long camera name", |m| !replies(m, "resume").is_empty());
    assert!(m.iter().all(|x| !x.topic.ends_with("/reply") || x.payload.len() < 1 << 20));
    assert_eq!(replies(&m, "resume")[0]["ok"].as_bool(), Some(false));
    detections_flow(&sub, &before, 2, Duration::from_secs(60), "detections after the oversized replies");

    // Each command was answered once (acknowledged, never sent again), the status never went
    // offline, and the daemon connected once.
    std::thread::sleep(Duration::from_secs(2));
    let m = sub.snapshot();
    assert_eq!(replies(&m, "gallery_update").len(), 2, "a command was delivered again");
    assert_eq!(replies(&m, "pause").len(), 1, "a command was delivered again");
    assert!(!m.iter().any(|x| x.topic == "whaled/boat/status" && x.text() == "offline"), "the Last Will fired");
    let (status, stderr) = d.terminate();
    assert!(status.success(), "{stderr}");
    assert_eq!(stderr.matches("MQTT connected").count(), 1, "reconnected:\n{stderr}");
    validate_all(&m);
}

/// The broker's ACLs are the boundary for the unsigned commands: the example ACL file shipped in
/// config/ lets the boat use its own topics, shore's operators command, and everyone else only read.
#[test]
fn without_the_right_a_client_cannot_pause_a_camera() {
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("passwords");
    for (i, (user, pass)) in
        [("boat", "boat-pass"), ("shore", "shore-pass"), ("guest", "guest-pass")].iter().enumerate()
    {
        let mut cmd = Command::new("mosquitto_passwd");
        cmd.arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd.arg(&pw).args([user, pass]).output().expect("mosquitto_passwd (Debian package mosquitto)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let acl = repo().join("config/mosquitto-acl.example");
    let broker = Broker::start(
        &tmp.path().join("broker"),
        &format!("password_file {}\nacl_file {}\nallow_anonymous false\n", pw.display(), acl.display()),
    );
    let secret = tmp.path().join("mqtt.pass");
    std::fs::write(&secret, "boat-pass\n").unwrap();
    let config = daemon_config(
        tmp.path(),
        broker.port,
        &format!("username = \"boat\"\npassword_file = \"{}\"", secret.display()),
    );
    let shore = Subscriber::start_as(broker.port, "shore", "whaled/boat/#", Some(("shore", "shore-pass")));
    let guest = Subscriber::start_as(broker.port, "guest", "whaled/boat/#", Some(("guest", "guest-pass")));
    let d = Daemon::start(&config);
    shore.wait_for(Duration::from_secs(60), "online", |m| m.iter().any(|m| m.text() == "online"));
    // The guest may read what the boat publishes...
    guest.wait_for(Duration::from_secs(120), "detections seen by the guest", |m| detection_ids(m).len() >= 2);
    let replies = |m: &[Msg]| m.iter().filter(|x| x.topic == "whaled/boat/cmd/pause/reply").count();
    // ...but its pause never reaches the boat: no reply, detections keep coming.
    guest.publish("whaled/boat/cmd/pause", br#"{"camera": "bow", "request_id": "guest"}"#, false);
    std::thread::sleep(Duration::from_secs(2));
    let before = detection_ids(&shore.snapshot());
    detections_flow(&shore, &before, 2, Duration::from_secs(60), "detections after the guest's pause");
    assert_eq!(replies(&shore.snapshot()), 0, "the guest's pause reached the boat");
    assert!(broker.log().contains("Denied PUBLISH from guest"), "mosquitto denied it:\n{}", broker.log());
    // Shore's operator may.
    shore.publish("whaled/boat/cmd/pause", br#"{"camera": "bow", "request_id": "shore"}"#, false);
    let m = shore.wait_for(Duration::from_secs(10), "shore's pause reply", |m| replies(m) == 1);
    let r = m.iter().find(|x| x.topic == "whaled/boat/cmd/pause/reply").unwrap().json();
    assert_eq!((r["ok"].as_bool(), r["request_id"].as_str()), (Some(true), Some("shore")), "{r}");
    let (status, stderr) = d.terminate();
    assert!(status.success(), "{stderr}");
}
