//! Whether the system clock can be trusted: the kernel's own view, read with adjtimex(2).
//!
//! A board with no real-time clock (a Raspberry Pi) boots at sea with a clock from its last shutdown
//! and keeps it until NTP, chrony or a GPS PPS discipline it; only then does the kernel clear
//! `STA_UNSYNC`. Detections carry the answer as `clock_synced`, so shore knows when `captured_at` may be
//! wrong (and `position.fix_time`, the satellites' time, is the one to use). The call only reads
//! (`modes = 0`), needs no privilege, and costs one system call, so it may be asked per frame.

/// `Some(true)`: the kernel considers the clock synchronised; `Some(false)`: it does not (never
/// synchronised since boot, or the discipline was lost); `None`: the call failed (e.g. forbidden by a
/// seccomp filter).
pub fn synchronised() -> Option<bool> {
    // SAFETY: `timex` is a plain C struct for which all-zero bytes are a valid value; with `modes = 0`
    // adjtimex only writes the kernel's state into the struct we own and pass by valid pointer.
    let (rc, status) = unsafe {
        let mut t: libc::timex = std::mem::zeroed();
        let rc = libc::adjtimex(&mut t);
        (rc, t.status)
    };
    if rc < 0 {
        return None;
    }
    // TIME_ERROR (5): not synchronised; STA_UNSYNC (0x0040): the same, as a status bit.
    Some(rc != libc::TIME_ERROR && status & libc::STA_UNSYNC == 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_kernel_state() {
        // Synchronised or not depends on the machine; that it can be read does not.
        let v = super::synchronised();
        assert!(v.is_some(), "adjtimex(2) failed: {}", std::io::Error::last_os_error());
        // Cheap enough for every frame.
        let t = std::time::Instant::now();
        for _ in 0..1000 {
            assert!(super::synchronised().is_some());
        }
        assert!(t.elapsed() < std::time::Duration::from_millis(500), "{:?} for 1000 calls", t.elapsed());
    }
}
