//! A real mosquitto per test, on a free loopback port, and a subscriber that records everything it
//! receives. mosquitto comes from Debian (`apt-get install mosquitto`; .ci/run installs it).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn mosquitto_binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("the MQTT tests need a real broker: apt-get install mosquitto (.ci/run installs it)");
}

pub struct Broker {
    pub port: u16,
    pub dir: PathBuf,
    extra: String,
    child: Option<Child>,
}

impl Broker {
    /// Starts mosquitto on a free port with persistence (sessions survive a restart) plus `extra`
    /// config lines.
    pub fn start(dir: &Path, extra: &str) -> Broker {
        Self::start_on(dir, free_port(), extra)
    }

    pub fn start_on(dir: &Path, port: u16, extra: &str) -> Broker {
        let mut b = Broker { port, dir: dir.to_path_buf(), extra: extra.to_string(), child: None };
        b.restart();
        b
    }

    /// (Re)starts the broker with the same port, config and persistence file.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        std::fs::create_dir_all(&self.dir).unwrap();
        let conf = self.dir.join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).unwrap();
        write!(
            f,
            // `user root`: when the tests run as root, mosquitto would otherwise switch to its own user and
            // could not read the test's private temp directory (certificates, persistence).
            "user root\nper_listener_settings false\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
             autosave_interval 1\nlog_dest file {}/mosquitto.log\nlog_type all\nlistener {} 127.0.0.1\n{}\n",
            self.dir.display(),
            self.dir.display(),
            self.port,
            self.extra
        )
        .unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen on {}: see {}/mosquitto.log",
                self.port,
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker gracefully (SIGTERM: it saves its sessions) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id(), "TERM");
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal by name with kill(1) (no libc in the tests).
pub fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {}", self.topic, self.text()))
    }
}

/// A QoS 1 subscriber with a persistent session that reconnects on its own and records every message.
pub struct Subscriber {
    pub messages: Arc<Mutex<Vec<Msg>>>,
    stop: Arc<AtomicBool>,
    client: Arc<Mutex<Option<Client>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    pub fn start(port: u16, client_id: &str, filter: &str) -> Subscriber {
        Self::start_as(port, client_id, filter, None)
    }

    pub fn start_as(port: u16, client_id: &str, filter: &str, login: Option<(&str, &str)>) -> Subscriber {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let client_slot = Arc::new(Mutex::new(None));
        let (m, s, slot) = (messages.clone(), stop.clone(), client_slot.clone());
        let (id, filter) = (client_id.to_string(), filter.to_string());
        let login = login.map(|(u, p)| (u.to_string(), p.to_string()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut o = MqttOptions::new(id, "127.0.0.1", port);
            o.set_clean_session(false).set_keep_alive(Duration::from_secs(5)).set_max_packet_size(8 << 20, 8 << 20);
            if let Some((u, p)) = login {
                o.set_credentials(u, p);
            }
            let (client, mut conn) = Client::new(o, 64);
            *slot.lock().unwrap() = Some(client.clone());
            while !s.load(Ordering::SeqCst) {
                match conn.recv_timeout(Duration::from_millis(50)) {
                    Ok(Ok(Event::Incoming(Incoming::ConnAck(ack)))) => {
                        if !ack.session_present {
                            client.subscribe(filter.clone(), QoS::AtLeastOnce).unwrap();
                        } else {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => m.lock().unwrap().push(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("subscriber did not connect");
        Subscriber { messages, stop, client: client_slot, thread: Some(thread) }
    }

    /// Publishes from the subscriber's connection (commands in tests).
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        let c = self.client.lock().unwrap().clone().unwrap();
        c.publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()).unwrap();
    }

    pub fn snapshot(&self) -> Vec<Msg> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits until `done(messages)` holds; panics with `what` after `timeout`.
    pub fn wait_for(&self, timeout: Duration, what: &str, mut done: impl FnMut(&[Msg]) -> bool) -> Vec<Msg> {
        let t = Instant::now();
        loop {
            let m = self.snapshot();
            if done(&m) {
                return m;
            }
            if t.elapsed() >= timeout {
                let mut topics = std::collections::BTreeMap::new();
                for x in &m {
                    *topics.entry(x.topic.clone()).or_insert(0) += 1;
                }
                panic!("timed out after {timeout:?} waiting for {what}; got {} messages: {topics:?}", m.len());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
