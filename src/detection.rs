//! The Detection JSON: the upstream service's fields (names and meanings kept, so shore consumers need
//! no change) plus whaled's own (`event_id`, `device_id`, `source`, `captured_at`, pre-filter details,
//! timings). This is a wire type; it is built only from an [`Assessment`](crate::identify::Assessment).
//!
//! Upstream sentinels: a frame the pre-filter rejects has `class_animal: ""`, `id_animal: "unknown"`,
//! `rejection_reason: "not_a_marine_mammal"`; a frame that passes with no identification model configured
//! has `id_animal: "cetacean_unidentified"`; a top-1 probability below `min_confidence` gives
//! `rejected: true, rejection_reason: "low_confidence"` with the candidates still reported; an image that
//! cannot be decoded gives `rejection_reason: "corrupted_image"`. `bbox` is the whole frame.

use std::time::SystemTime;

use serde::Serialize;

use crate::identify::{Assessment, Identified};
use crate::scoring::round4;

/// Why a frame was rejected (upstream's `rejection_reason` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    NotAMarineMammal,
    LowConfidence,
    CorruptedImage,
}

/// A ranked alternative (upstream: ranks 2..k).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub class_animal: String,
    pub id_animal: String,
    pub probability: f64,
}

/// Pre-filter details (not in upstream): unrounded score, the threshold applied and the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefilterInfo {
    pub model: String,
    pub score: f64,
    pub threshold: f64,
}

/// Per-stage wall time in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    pub decode_ms: f64,
    pub preprocess_ms: f64,
    pub prefilter_ms: f64,
    pub identification_ms: f64,
    pub total_ms: f64,
}

/// Where a frame came from and when.
#[derive(Debug, Clone)]
pub struct FrameMeta {
    /// Upstream `image_ind`: the file name or frame identifier.
    pub image_ind: String,
    /// The path or camera the frame came from.
    pub source: String,
    pub captured_at: SystemTime,
}

/// One Detection record, as printed by `whaled identify` and published by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub image_ind: String,
    pub bbox: [u32; 4],
    pub class_animal: String,
    pub id_animal: String,
    pub probability: f64,
    pub mask: Option<String>,
    pub is_cetacean: bool,
    pub cetacean_score: f64,
    pub rejected: bool,
    pub rejection_reason: Option<RejectionReason>,
    pub model_version: String,
    pub candidates: Vec<Candidate>,
    pub event_id: String,
    pub device_id: String,
    pub source: String,
    /// The camera that took the frame (`whaled run`); absent for photos (`whaled identify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub camera: Option<String>,
    pub captured_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefilter: Option<PrefilterInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub timings: Timings,
}

impl Detection {
    /// The record for an assessed frame.
    pub fn from_assessment(a: &Assessment, meta: &FrameMeta, device_id: &str) -> Detection {
        let mut d = Detection::base(meta, device_id, a.model_version.clone());
        d.bbox = [0, 0, a.width, a.height];
        d.cetacean_score = round4(a.prefilter_score);
        d.is_cetacean = a.passed;
        d.prefilter =
            Some(PrefilterInfo { model: a.prefilter_model.clone(), score: a.prefilter_score, threshold: a.threshold });
        d.timings = a.timings.clone();
        if !a.passed {
            d.rejected = true;
            d.rejection_reason = Some(RejectionReason::NotAMarineMammal);
            return d;
        }
        match &a.identified {
            None => d.id_animal = "cetacean_unidentified".into(),
            Some(Identified { ranked, low_confidence }) => {
                if let Some((top, rest)) = ranked.split_first() {
                    d.class_animal = top.class_animal.clone();
                    d.id_animal = top.id_animal.clone();
                    d.probability = top.probability;
                    d.candidates = rest.to_vec();
                }
                if *low_confidence {
                    d.rejected = true;
                    d.rejection_reason = Some(RejectionReason::LowConfidence);
                }
            }
        }
        d
    }

    /// The record for a frame that could not be read or decoded.
    pub fn corrupted(meta: &FrameMeta, device_id: &str, model_version: String, error: String) -> Detection {
        let mut d = Detection::base(meta, device_id, model_version);
        d.rejected = true;
        d.rejection_reason = Some(RejectionReason::CorruptedImage);
        d.error = Some(error);
        d
    }

    fn base(meta: &FrameMeta, device_id: &str, model_version: String) -> Detection {
        Detection {
            image_ind: meta.image_ind.clone(),
            bbox: [0, 0, 0, 0],
            class_animal: String::new(),
            id_animal: "unknown".into(),
            probability: 0.0,
            mask: None,
            is_cetacean: false,
            cetacean_score: 0.0,
            rejected: false,
            rejection_reason: None,
            model_version,
            candidates: Vec::new(),
            event_id: uuid::Uuid::now_v7().to_string(),
            device_id: device_id.to_string(),
            source: meta.source.clone(),
            camera: None,
            captured_at: humantime::format_rfc3339_millis(meta.captured_at).to_string(),
            prefilter: None,
            error: None,
            timings: Timings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assessment(passed: bool, identified: Option<Identified>) -> Assessment {
        Assessment {
            width: 640,
            height: 480,
            prefilter_model: "pf".into(),
            prefilter_score: 0.123456,
            threshold: 0.1,
            passed,
            identified,
            model_version: "effb4-arcface-v1".into(),
            timings: Timings { decode_ms: 1.5, prefilter_ms: 2.0, total_ms: 4.5, ..Timings::default() },
        }
    }

    fn meta() -> FrameMeta {
        FrameMeta { image_ind: "f.jpg".into(), source: "/p/f.jpg".into(), captured_at: SystemTime::UNIX_EPOCH }
    }

    fn cand(id: &str, sp: &str, p: f64) -> Candidate {
        Candidate { class_animal: id.into(), id_animal: sp.into(), probability: p }
    }

    /// The upstream decision table: (passed, identification outcome) -> the fields consumers read.
    #[test]
    fn upstream_sentinels() {
        let ranked = vec![
            cand("aaaaaaaaaaaa", "beluga", 0.7024),
            cand("bbbbbbbbbbbb", "fin_whale", 0.2116),
            cand("cccccccccccc", "beluga", 0.086),
        ];
        let cases = [
            (assessment(false, None), "", "unknown", 0.0, true, Some(RejectionReason::NotAMarineMammal), 0),
            (assessment(true, None), "", "cetacean_unidentified", 0.0, false, None, 0),
            (
                assessment(true, Some(Identified { ranked: ranked.clone(), low_confidence: false })),
                "aaaaaaaaaaaa",
                "beluga",
                0.7024,
                false,
                None,
                2,
            ),
            (
                assessment(true, Some(Identified { ranked, low_confidence: true })),
                "aaaaaaaaaaaa",
                "beluga",
                0.7024,
                true,
                Some(RejectionReason::LowConfidence),
                2,
            ),
        ];
        for (a, class, species, p, rejected, reason, n_cands) in cases {
            let d = Detection::from_assessment(&a, &meta(), "dev");
            assert_eq!((d.class_animal.as_str(), d.id_animal.as_str(), d.probability), (class, species, p), "{d:?}");
            assert_eq!((d.rejected, d.rejection_reason, d.candidates.len()), (rejected, reason, n_cands), "{d:?}");
            assert_eq!(d.is_cetacean, a.passed);
            assert_eq!(d.cetacean_score, 0.1235);
            assert_eq!(d.bbox, [0, 0, 640, 480]);
            assert_eq!(d.timings.total_ms, 4.5);
            assert_eq!(d.captured_at, "1970-01-01T00:00:00.000Z");
        }
    }

    #[test]
    fn corrupted_record() {
        let d = Detection::corrupted(&meta(), "dev", "v".into(), "bad".into());
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["rejection_reason"], "corrupted_image");
        assert_eq!(json["id_animal"], "unknown");
        assert_eq!(json["mask"], serde_json::Value::Null);
        assert_eq!(json["bbox"], serde_json::json!([0, 0, 0, 0]));
        assert_eq!(json["error"], "bad");
    }
}
