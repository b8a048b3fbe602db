//! The zero-shot gate stage (upstream's CLIP rule) through `whaled identify`, against an independent
//! reference (`tools/zeroshot_ref.py`: onnxruntime's Python API for the image encoder, numpy for the
//! rule), on the generated encoder (no CLIP weights are reachable here): scores, verdicts at a threshold
//! that splits the photos, the stage before and after the pre-filter, and bad manifests.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{generated, repo, whales_dev};

fn zs_manifest() -> PathBuf {
    generated().join("zeroshot-random/model.toml")
}

fn check(out: &Output, what: &str) -> String {
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed: {}\nstdout: {o}\nstderr: {e}", out.status);
    o.into_owned()
}

/// 224x224 PNGs of real photos: the exact model input (a stretch resize of a 224x224 image is the identity).
fn photos(dir: &Path) -> Vec<PathBuf> {
    let mut srcs = whales_dev("cetacean", 3);
    srcs.extend(whales_dev("non_cetacean", 3));
    srcs.iter()
        .enumerate()
        .map(|(i, p)| {
            let img = image::open(p).unwrap().to_rgb8();
            let small = image::imageops::resize(&img, 224, 224, image::imageops::FilterType::Triangle);
            let out = dir.join(format!("photo{i}.png"));
            small.save(&out).unwrap();
            out
        })
        .collect()
}

fn reference(pngs: &[PathBuf]) -> Vec<(String, f64)> {
    let mut cmd = Command::new("python3");
    cmd.current_dir(repo()).arg("tools/zeroshot_ref.py").arg("--model").arg(zs_manifest()).args(pngs);
    let out = check(&cmd.output().unwrap(), "tools/zeroshot_ref.py");
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["image"].as_str().unwrap().to_string(), v["score"].as_f64().unwrap())
        })
        .collect()
}

fn identify(dir: &Path, extra: &str, pngs: &[PathBuf]) -> Output {
    let cfg = dir.join("whaled.toml");
    std::fs::write(&cfg, format!("[prefilter]\nthreshold = 0.0\n{extra}")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_whaled")).arg("identify").arg("--config").arg(&cfg).args(pngs).output().unwrap()
}

#[test]
fn the_stage_applies_the_upstream_rule_before_or_after_the_prefilter() {
    let tmp = tempfile::tempdir().unwrap();
    let pngs = photos(tmp.path());
    let refs = reference(&pngs);
    assert_eq!(refs.len(), pngs.len());
    let mut scores: Vec<f64> = refs.iter().map(|r| r.1).collect();
    scores.sort_by(f64::total_cmp);
    assert!(
        scores[0] > 1e-6 && scores[scores.len() - 1] < 1.0 - 1e-6,
        "the generated encoder spreads scores: {scores:?}"
    );
    // A threshold halfway between the 3rd and 4th scores: three photos pass, three do not.
    let threshold = (scores[2] + scores[3]) / 2.0;
    assert!(scores[3] - scores[2] > 2e-3, "scores too close to split robustly: {scores:?}");

    for position in ["after_prefilter", "before_prefilter"] {
        let extra = format!(
            "[zero_shot]\nmodel = \"{}\"\nthreshold = {threshold}\nposition = \"{position}\"\n",
            zs_manifest().display()
        );
        let out = identify(tmp.path(), &extra, &pngs);
        let stdout = check(&out, "whaled identify");
        let mut passed = 0;
        let mut worst = 0f64;
        assert_eq!(stdout.lines().count(), refs.len(), "{position}: one detection per photo: {stdout}");
        for (line, (name, want)) in stdout.lines().zip(&refs) {
            let d: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(d["image_ind"].as_str(), Some(name.as_str()));
            let z = &d["zero_shot"];
            let got = z["score"].as_f64().unwrap();
            worst = worst.max((got - want).abs());
            assert!((got - want).abs() < 1e-3, "{position} {name}: {got} vs reference {want}");
            let pass = *want >= threshold;
            assert_eq!(z["passed"].as_bool(), Some(pass), "{position} {name}: {d}");
            assert_eq!((d["is_cetacean"].as_bool(), d["rejected"].as_bool()), (Some(pass), Some(!pass)), "{d}");
            assert_eq!(z["threshold"].as_f64(), Some(threshold));
            if !pass {
                assert_eq!(d["rejection_reason"], "not_a_marine_mammal");
                if position == "before_prefilter" {
                    // Rejected before the pre-filter ran: no pre-filter result, the gate score is the zero-shot one.
                    assert!(d.get("prefilter").is_none(), "{d}");
                    assert!((d["cetacean_score"].as_f64().unwrap() - (want * 1e4).round() / 1e4).abs() <= 1e-4, "{d}");
                }
            }
            if position == "after_prefilter" {
                assert!(d["prefilter"].is_object(), "the pre-filter ran first: {d}");
            }
            passed += usize::from(pass);
        }
        assert_eq!(passed, 3, "{position}");
        eprintln!("{position}: 6 photos, verdicts as the reference, max |score - reference| = {worst:.2e}");
    }

    // Now a pre-filter threshold that rejects some photos too: each stage runs only on what the stage
    // before it passed, and a frame goes on only if both pass.
    let base = check(&identify(tmp.path(), "", &pngs), "whaled identify (pre-filter only)");
    let pf: Vec<f64> = base
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["prefilter"]["score"].as_f64().unwrap())
        .collect();
    let mut sorted = pf.clone();
    sorted.sort_by(f64::total_cmp);
    let pf_threshold = (sorted[2] + sorted[3]) / 2.0;
    for position in ["after_prefilter", "before_prefilter"] {
        let cfg = tmp.path().join("whaled.toml");
        std::fs::write(
            &cfg,
            format!(
                "[prefilter]\nthreshold = {pf_threshold}\n[zero_shot]\nmodel = \"{}\"\nthreshold = {threshold}\nposition = \"{position}\"\n",
                zs_manifest().display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_whaled"))
            .arg("identify")
            .arg("--config")
            .arg(&cfg)
            .args(&pngs)
            .output()
            .unwrap();
        let stdout = check(&out, "whaled identify");
        assert_eq!(refs.len(), pf.len(), "references for every photo");
        assert_eq!(stdout.lines().count(), refs.len(), "{position}: one detection per photo: {stdout}");
        for ((line, (name, zs)), p) in stdout.lines().zip(&refs).zip(&pf) {
            let d: serde_json::Value = serde_json::from_str(line).unwrap();
            let (pf_pass, zs_pass) = (*p >= pf_threshold, *zs >= threshold);
            assert_eq!(d["is_cetacean"].as_bool(), Some(pf_pass && zs_pass), "{position} {name}: {d}");
            let (pf_ran, zs_ran) = match position {
                "after_prefilter" => (true, pf_pass),
                _ => (zs_pass, true),
            };
            assert_eq!(d.get("prefilter").is_some(), pf_ran, "{position} {name}: {d}");
            assert_eq!(d.get("zero_shot").is_some(), zs_ran, "{position} {name}: {d}");
        }
    }
}

#[test]
fn bad_zero_shot_manifests_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let pngs = &photos(tmp.path())[..1];
    // A pre-filter manifest where a zero-shot one is expected.
    let shipped = repo().join("models/marine-gate-lite0/model.toml");
    let out = identify(tmp.path(), &format!("[zero_shot]\nmodel = \"{}\"\n", shipped.display()), pngs);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("is configured as [zero_shot] but its role is not \"zero_shot\""), "{e}");

    // As many positives as prompts; a typo in the position.
    let src = std::fs::read_to_string(zs_manifest()).unwrap();
    let dir = zs_manifest().parent().unwrap().to_path_buf();
    let bad = src
        .lines()
        .map(|l| if l.starts_with("positives") { "positives = 24".to_string() } else { l.to_string() })
        .map(|l| {
            if l.starts_with("file = \"") || l.starts_with("text_embeddings = \"") {
                let (k, v) = l.split_once(" = ").unwrap();
                format!("{k} = \"{}\"", dir.join(v.trim_matches('"')).display())
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let bad_path = tmp.path().join("bad-zs.toml");
    std::fs::write(&bad_path, bad).unwrap();
    let out = identify(tmp.path(), &format!("[zero_shot]\nmodel = \"{}\"\n", bad_path.display()), pngs);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("positives = 24") && e.contains("needs negative prompts"), "{e}");
    let out = identify(
        tmp.path(),
        &format!("[zero_shot]\nmodel = \"{}\"\nposition = \"first\"\n", zs_manifest().display()),
        pngs,
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && e.contains("before_prefilter"), "{e}");
}
