//! Log records of this test process, for tests that check what whaled says (and at which level). The
//! first call installs a logger for the whole process (a process has one): it keeps every record at
//! INFO and above and also prints it, so `cargo test -- --nocapture` still shows the log.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static LINES: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = format!("{}", r.args());
            eprintln!("[{} {}] {line}", r.level(), r.target());
            LINES.lock().unwrap_or_else(|p| p.into_inner()).push((r.level(), line));
        }
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (once per process).
pub fn capture() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        log::set_boxed_logger(Box::new(Capture)).expect("another logger was installed first");
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// The captured lines at `level` containing every one of `needles`.
pub fn matching(level: log::Level, needles: &[&str]) -> Vec<String> {
    LINES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(l, s)| *l == level && needles.iter().all(|n| s.contains(n)))
        .map(|(_, s)| s.clone())
        .collect()
}

/// Waits until a line at `level` contains every one of `needles`; panics after `timeout`.
pub fn wait_for(level: log::Level, needles: &[&str], timeout: Duration) -> String {
    let t = Instant::now();
    loop {
        if let Some(l) = matching(level, needles).pop() {
            return l;
        }
        assert!(t.elapsed() < timeout, "no {level} log line with {needles:?} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
