//! `[gps]`: where gpsd listens and how fresh a fix must be, validated once at load.
//!
//! Optional and off by default: without a `[gps]` table whaled never opens a socket to gpsd and
//! detections carry no `position`. The address is checked here (host and port), not resolved: gpsd may
//! come up after whaled, and a name that does not resolve yet is retried like a refused connection.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::values::Interval;

/// gpsd's registered port.
pub const DEFAULT_PORT: u16 = 2947;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGps {
    address: Option<Spanned<String>>,
    max_age: Option<Interval>,
    silence: Option<Interval>,
    reconnect_min: Option<Interval>,
    reconnect_max: Option<Interval>,
}

/// Validated `[gps]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpsConfig {
    /// gpsd's JSON socket as `host:port` (a name, an IPv4 address or a bracketed IPv6 address).
    pub address: String,
    /// A fix that arrived longer than this before a frame's capture is no fix for that frame.
    pub max_age: Duration,
    /// No line at all from gpsd for this long: the connection is dropped and made again.
    pub silence: Duration,
    /// Exponential backoff with jitter between these after a failed or lost connection.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for GpsConfig {
    fn default() -> Self {
        GpsConfig {
            address: format!("127.0.0.1:{DEFAULT_PORT}"),
            max_age: Duration::from_secs(5),
            silence: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

/// Checks `host:port`; `Err` says what was expected.
fn check_address(v: &str) -> Result<(), String> {
    let expected = || format!("expected host:port such as \"127.0.0.1:{DEFAULT_PORT}\", got {v:?}");
    let Some((host, port)) = v.rsplit_once(':') else { return Err(expected()) };
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if bare.is_empty() || bare.contains(char::is_whitespace) || (bare.contains(':') && bare.len() == host.len()) {
        // Empty, spaced, or an IPv6 address without brackets ("::1:2947" is ambiguous).
        return Err(expected());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{}: the port must be a number from 1 to 65535", expected())),
    }
}

impl RawGps {
    /// Validates; `at(span, key, message)` builds an error that names file, line and key.
    pub(super) fn validate(
        self,
        at: &dyn Fn(std::ops::Range<usize>, &str, String) -> crate::error::Error,
    ) -> crate::Result<GpsConfig> {
        let d = GpsConfig::default();
        let address = match self.address {
            None => d.address,
            Some(a) => {
                let v = a.get_ref().trim().to_string();
                check_address(&v).map_err(|why| at(a.span(), "gps.address", why))?;
                v
            }
        };
        let reconnect_min = self.reconnect_min.map_or(d.reconnect_min, Interval::get);
        Ok(GpsConfig {
            address,
            max_age: self.max_age.map_or(d.max_age, Interval::get),
            silence: self.silence.map_or(d.silence, Interval::get),
            reconnect_min,
            reconnect_max: self.reconnect_max.map_or(d.reconnect_max, Interval::get).max(reconnect_min),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::GpsConfig;
    use crate::config::Config;

    fn parse(src: &str) -> crate::Result<Config> {
        Config::parse(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/test.toml"), src)
    }

    #[test]
    fn off_by_default_and_defaults_when_on() {
        assert_eq!(parse("").unwrap().gps, None);
        assert_eq!(parse("[gps]\n").unwrap().gps, Some(GpsConfig::default()));
        let g = parse(
            "[gps]\naddress = \"[::1]:12947\"\nmax_age = \"2s\"\nsilence = \"10s\"\nreconnect_min = \"1s\"\n\
             reconnect_max = \"500ms\"\n",
        )
        .unwrap()
        .gps
        .unwrap();
        assert_eq!(g.address, "[::1]:12947");
        assert_eq!((g.max_age, g.silence), (Duration::from_secs(2), Duration::from_secs(10)));
        // A maximum below the minimum is raised to it.
        assert_eq!((g.reconnect_min, g.reconnect_max), (Duration::from_secs(1), Duration::from_secs(1)));
        for ok in ["localhost:2947", "gpsd.boat.lan:1", "10.0.0.7:65535"] {
            let src = format!("[gps]\naddress = \"{ok}\"\n");
            assert_eq!(parse(&src).unwrap().gps.unwrap().address, ok);
        }
    }

    /// Each bad `[gps]` must fail naming the file, the line and the key.
    #[test]
    fn errors_name_file_line_and_key() {
        let cases: &[(&str, &[&str])] = &[
            ("[gps]\naddress = \"127.0.0.1:99999\"\n", &["config/test.toml:2:11: gps.address:", "1 to 65535"]),
            ("[gps]\naddress = \"127.0.0.1:0\"\n", &["config/test.toml:2:11: gps.address:", "1 to 65535"]),
            ("[gps]\naddress = \"127.0.0.1:gpsd\"\n", &["config/test.toml:2:11: gps.address:", "\"127.0.0.1:gpsd\""]),
            ("[gps]\n\naddress = \"127.0.0.1\"\n", &["config/test.toml:3:11: gps.address: expected host:port"]),
            ("[gps]\naddress = \":2947\"\n", &["config/test.toml:2:11: gps.address: expected host:port"]),
            ("[gps]\naddress = \"::1:2947\"\n", &["config/test.toml:2:11: gps.address: expected host:port"]),
            (
                "[gps]\naddress = \"127.0.0.1:2947\"\nmax_agee = \"5s\"\n",
                &["config/test.toml", "line 3", "unknown field `max_agee`", "expected one of `address`, `max_age`"],
            ),
            ("[gps]\nsilence = \"0s\"\n", &["config/test.toml", "line 2", "expected a duration greater than 0"]),
            ("[gps]\nmax_age = 5\n", &["config/test.toml", "line 2", "max_age"]),
        ];
        for (src, wants) in cases {
            let e = parse(src).expect_err(src).to_string();
            for w in *wants {
                assert!(e.contains(w), "config {src:?}\n error: {e}\n lacks: {w}");
            }
        }
    }
}
