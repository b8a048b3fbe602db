//! Network cameras in the configuration: `kind = "rtsp"` (an IP camera's stream, decoded by the
//! decoder the board has) and `kind = "gstreamer"` (any GStreamer pipeline that ends in whaled's
//! appsink), validated once at load.
//!
//! Credentials never stay in a URL: `rtsp://user:pass@host/...` is split into the URL shown in logs
//! (`rtsp://host/...`), the user, and a [`Secret`] handed to the RTSP source as a property. A password
//! may also come from `password_file` or `password_env`, as for the broker.

use std::time::Duration;

use serde::Deserialize;

use super::secret::Secret;

/// How RTP travels from the camera. TCP (interleaved in the RTSP connection) is the default: it passes
/// NAT and firewalls and loses nothing on a lossy link, where UDP loses slices of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

/// The stream's video codec: picks the RTP depayloader, the parser and the default decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VideoCodec {
    H264,
    H265,
}

impl VideoCodec {
    /// The software decoder (GStreamer's libav plugin) that every board has.
    pub fn default_decoder(self) -> &'static str {
        match self {
            VideoCodec::H264 => "avdec_h264",
            VideoCodec::H265 => "avdec_h265",
        }
    }
}

/// An `rtsp://` or `rtsps://` URL without credentials: safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamUrl(String);

impl StreamUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A URL split into what may be logged and the credentials it carried (percent-decoded).
#[derive(Debug, Clone, PartialEq)]
pub struct SplitUrl {
    pub url: StreamUrl,
    pub user: Option<String>,
    pub password: Option<Secret>,
}

/// Splits `scheme://[user[:password]@]host[:port]/path` for one of `schemes`. The error never repeats
/// the URL (it may hold a password), only what is wrong with it.
pub fn split_url(url: &str, schemes: &[&str]) -> Result<SplitUrl, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("expected a URL like {}://camera.local/stream, without a scheme here", schemes[0]));
    };
    if !schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
        return Err(format!("expected a {} URL, got a {scheme}:// one", schemes.join(" or ")));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (userinfo, host) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    if host.is_empty() || host.contains(char::is_whitespace) || path.contains(char::is_whitespace) {
        return Err("has no host, or has spaces (write them as %20)".into());
    }
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((user, pass)) => (user, Some(pass)),
                None => (u, None),
            };
            let user = percent_decode(user).ok_or("has a malformed %-escape in its user name")?;
            let pass = pass.map(|p| percent_decode(p).ok_or("has a malformed %-escape in its password")).transpose()?;
            ((!user.is_empty()).then_some(user), pass.map(Secret::new))
        }
    };
    Ok(SplitUrl { url: StreamUrl(format!("{scheme}://{host}{path}")), user, password })
}

/// `%41` -> `A`; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A validated `kind = "rtsp"` camera.
#[derive(Debug, Clone, PartialEq)]
pub struct RtspSettings {
    pub url: StreamUrl,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub transport: Transport,
    /// The jitter buffer's latency (rtspsrc `latency`).
    pub latency: Duration,
    pub codec: VideoCodec,
    /// GStreamer elements between the parser and whaled's appsink: one decoder (`avdec_h264`) or a
    /// chain (`nvv4l2decoder ! nvvidconv`).
    pub decoder: String,
    /// No frame for this long: the stream counts as stalled and is reopened.
    pub timeout: Duration,
    /// Take capture times from the camera's RTCP sender reports (NTP), for cameras whose clock is
    /// synchronised with the box's; otherwise the RTP timestamps, anchored at arrival.
    pub ntp_sync: bool,
}

/// A validated `kind = "gstreamer"` camera.
#[derive(Debug, Clone, PartialEq)]
pub struct GstSettings {
    /// A `gst-launch-1.0` description ending in `appsink name=whaled`.
    pub pipeline: String,
    pub timeout: Duration,
}

/// The default `timeout` of network cameras: an RTSP session takes a few seconds to start.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The appsink whaled reads frames from, by name, in a `kind = "gstreamer"` pipeline.
pub const APPSINK_NAME: &str = "whaled";

/// Checks a decoder chain: GStreamer elements joined by `!`, none of them empty, no sink at the end.
pub fn check_decoder(decoder: &str) -> Result<String, String> {
    let d = decoder.trim();
    if d.is_empty() || d.split('!').any(|e| e.trim().is_empty()) {
        return Err(format!(
            "expected a GStreamer element or a chain like \"nvv4l2decoder ! nvvidconv\", got {decoder:?}"
        ));
    }
    if d.contains("appsink") {
        return Err("ends before whaled's appsink: name only the decoding elements".into());
    }
    Ok(d.to_string())
}

/// Checks a whole pipeline description for the appsink whaled reads from.
pub fn check_pipeline(pipeline: &str) -> Result<String, String> {
    let p = pipeline.trim();
    let named = p.split(|c: char| c.is_whitespace() || c == '!').any(|w| w == format!("name={APPSINK_NAME}"));
    if !p.contains("appsink") || !named {
        return Err(format!(
            "must end in `appsink name={APPSINK_NAME}` (whaled sets its caps, max-buffers=1 and drop=true)"
        ));
    }
    Ok(p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        let cases: &[(&str, &str, Option<&str>, Option<&str>)] = &[
            ("rtsp://cam.local/axis-media/media.amp", "rtsp://cam.local/axis-media/media.amp", None, None),
            (
                "rtsp://root:p%40ss%3Aw0rd@10.0.0.9:554/s?x=1",
                "rtsp://10.0.0.9:554/s?x=1",
                Some("root"),
                Some("p@ss:w0rd"),
            ),
            ("RTSP://admin@[fe80::1]:8554", "RTSP://[fe80::1]:8554", Some("admin"), None),
            ("rtsps://u:@h/p", "rtsps://h/p", Some("u"), Some("")),
        ];
        for (url, shown, user, pass) in cases {
            let s = split_url(url, &["rtsp", "rtsps"]).unwrap();
            assert_eq!(s.url.as_str(), *shown, "{url}");
            assert_eq!(s.user.as_deref(), *user, "{url}");
            assert_eq!(s.password.as_ref().map(Secret::expose), *pass, "{url}");
            assert!(!format!("{s:?}").contains("w0rd"), "a password in Debug: {s:?}");
        }
        for (url, want) in [
            ("http://cam/x", "expected a rtsp or rtsps URL, got a http:// one"),
            ("cam.local/stream", "without a scheme"),
            ("rtsp:///path", "has no host"),
            ("rtsp://u:se%zzcret@h/", "malformed %-escape in its password"),
        ] {
            let e = split_url(url, &["rtsp", "rtsps"]).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("cret"), "the error repeats the password: {e}");
        }
    }

    #[test]
    fn decoders_and_pipelines() {
        assert_eq!(check_decoder(" nvv4l2decoder ! nvvidconv ").unwrap(), "nvv4l2decoder ! nvvidconv");
        assert!(check_decoder("avdec_h264 ! ").is_err());
        assert!(check_decoder("avdec_h264 ! appsink").is_err());
        assert!(check_pipeline("videotestsrc ! appsink name=whaled").is_ok());
        assert!(check_pipeline("videotestsrc ! appsink name=whaled2").is_err());
        assert!(check_pipeline("videotestsrc ! fakesink name=whaled").is_err());
    }
}
