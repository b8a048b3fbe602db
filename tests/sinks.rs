//! Where detections go, each sink failing on its own: a closed or full stdout is a convenience lost
//! (one ERROR), never a reason to stop the daemon or to drop what MQTT and the outbox still carry.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::{Broker, Subscriber};
use common::repo;

/// The daemon, killed if the test fails before it exits.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 10 §3: whaled's stdout is a pipe whose reader has gone (a `| head` that exited, a log shipper
/// that died). Every detection of the replay must still reach the broker, the daemon must run to the end
/// of its source and exit 0, and the broken stdout must be reported once at ERROR.
#[test]
fn a_closed_stdout_does_not_stop_mqtt() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"), "");
    let sub = Subscriber::start(broker.port, "shore", "whaled/boat/#");
    let config = tmp.path().join("whaled.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"boat\"\n\
             [[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"{}\"\nfps = 4\nloop = false\n\
             [pipeline]\nemit_rejected = true\n\
             [sightings]\npublish = \"detections\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\
             [mqtt.outbox]\ndir = \"{}\"\n",
            repo().join("tests/photos").display(),
            broker.port,
            tmp.path().join("outbox").display()
        ),
    )
    .unwrap();
    let frames = std::fs::read_dir(repo().join("tests/photos")).unwrap().count();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_whaled"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    drop(child.0.stdout.take()); // the reader is gone: every write to stdout fails with EPIPE
    let mut stderr = child.0.stderr.take().unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "whaled did not finish its replay");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert!(status.success(), "{status}:\n{log}");
    let msgs = sub.wait_for(Duration::from_secs(20), "every detection", |m| {
        m.iter().filter(|m| m.topic.ends_with("/detection")).count() >= frames
    });
    assert_eq!(msgs.iter().filter(|m| m.topic.ends_with("/detection")).count(), frames);
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains("stdout"), "{log}");
}
