//! Retry jitter: a xorshift64 generator seeded from the clock and the process id, shared by everything
//! that reconnects (the broker, gpsd, cameras) so that a fleet's boxes, or one box's cameras, do not
//! retry in lockstep after an outage they shared. Not for anything security relevant.

use std::time::Duration;

pub struct Jitter(u64);

impl Jitter {
    /// A generator seeded from the time and the process id; `salt` tells apart generators made at the
    /// same instant in one process (one per camera).
    pub fn new(salt: u64) -> Jitter {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Jitter((t ^ (u64::from(std::process::id()) << 32) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `base` times a factor drawn uniformly from [lo, hi).
    pub fn scale(&mut self, base: Duration, lo: f64, hi: f64) -> Duration {
        base.mul_f64(lo + (hi - lo) * self.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_within_the_bounds() {
        let mut j = Jitter::new(3);
        let base = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..1000).map(|_| j.scale(base, 0.8, 1.2)).collect();
        assert!(waits.iter().all(|w| (Duration::from_secs(8)..Duration::from_secs(12)).contains(w)));
        let (lo, hi) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*lo < Duration::from_millis(8200) && *hi > Duration::from_millis(11800), "{lo:?}..{hi:?}");
    }
}
