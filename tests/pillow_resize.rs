//! `resampler = "pillow"` against Pillow itself: real-content frames of real sizes (4000x3000 and its
//! portrait, odd sizes, 1920x1080, 300x200 enlarged, one axis unchanged; bilinear, bicubic and
//! Lanczos; both orders of Pillow's two passes; stretched like the upstream's `Resize((512, 512))` and resized + centre-cropped like timm's
//! eval transform) resized by `tools/pillow_resize_ref.py` with Pillow, and by whaled twice: the
//! resampler on its own with the geometry whaled derives, and the whole [`Preprocessor`] from a
//! manifest-shaped input spec. Every byte must be equal. The fast resampler's difference on the same
//! frames is printed, to show what the test tells apart.

mod common;

use std::process::Command;

use common::{repo, whales_dev};
use image::RgbImage;
use whaled::manifest::{InputSpec, Interpolation, Layout, Resampler, Resize};
use whaled::preprocess::Preprocessor;
use whaled::resample::{Filter, Geometry, PillowResizer};

struct Case {
    name: String,
    input: RgbImage,
    expected: Vec<u8>,
    interpolation: Interpolation,
    resize: Resize,
    out: (usize, usize),
    geometry: Geometry,
}

fn cases() -> Vec<Case> {
    let dir = std::env::temp_dir().join(format!("whaled-pillow-resize-{}", std::process::id()));
    let mut args = vec![repo().join("tools/pillow_resize_ref.py").display().to_string(), "--out".into()];
    args.push(dir.display().to_string());
    args.extend(whales_dev("cetacean", 3).iter().map(|p| p.display().to_string()));
    let out = Command::new("python3").args(&args).output().expect("python3");
    assert!(out.status.success(), "pillow_resize_ref.py: {}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let read = |name: &serde_json::Value| -> Vec<u8> { std::fs::read(dir.join(name.as_str().unwrap())).unwrap() };
    let n = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let cases = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let (w, h) = (n(&c["width"]), n(&c["height"]));
            let interpolation = match c["filter"].as_str().unwrap() {
                "bilinear" => Interpolation::Bilinear,
                "bicubic" => Interpolation::Bicubic,
                "lanczos3" => Interpolation::Lanczos3,
                f => panic!("filter {f}"),
            };
            let resized = (n(&c["resized"][0]), n(&c["resized"][1]));
            let crop = (n(&c["crop"][0]), n(&c["crop"][1]), n(&c["crop"][2]), n(&c["crop"][3]));
            let resize = match c["mode"].as_str().unwrap() {
                "stretch" => Resize::Stretch,
                _ => Resize::CenterCrop { fraction: c["crop_pct"].as_f64().unwrap() },
            };
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                input: RgbImage::from_raw(w as u32, h as u32, read(&c["input"])).unwrap(),
                expected: read(&c["expected"]),
                interpolation,
                resize,
                out: (n(&c["out_width"]), n(&c["out_height"])),
                geometry: Geometry { resized, crop },
            }
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    cases
}

fn spec(case: &Case, resampler: Resampler) -> InputSpec {
    InputSpec {
        name: "input".into(),
        width: case.out.0 as u32,
        height: case.out.1 as u32,
        layout: Layout::Nhwc,
        resize: case.resize,
        interpolation: case.interpolation,
        resampler,
        // The tensor is then v / 255 exactly enough to read the bytes back.
        mean: [0.0; 3],
        std: [1.0; 3],
    }
}

fn bytes_of(tensor: &[f32]) -> Vec<u8> {
    tensor.iter().map(|&v| (v * 255.0).round() as u8).collect()
}

fn first_difference(got: &[u8], want: &[u8], width: usize) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => format!("lengths {} vs {}", got.len(), want.len()),
        Some(i) => format!(
            "{} of {} bytes differ; first at x={} y={} channel {}: {} vs Pillow's {}",
            got.iter().zip(want).filter(|(a, b)| a != b).count(),
            want.len(),
            i / 3 % width,
            i / 3 / width,
            i % 3,
            got[i],
            want[i]
        ),
    }
}

/// Asserts `got` is Pillow's output for `case`, naming the first differing byte.
fn same_bytes(got: &[u8], case: &Case, path: &str) {
    assert!(got == case.expected, "{} ({path}): {}", case.name, first_difference(got, &case.expected, case.out.0));
}

#[test]
fn pillow_resampler_gives_pillows_bytes() {
    let cases = cases();
    assert_eq!(cases.len(), 20);
    let mut tensor = Vec::new();
    for case in &cases {
        let (w, h) = case.input.dimensions();
        // whaled's own geometry, against the torchvision formula the reference used.
        let geometry = match case.resize {
            Resize::Stretch => Geometry::stretch(case.out.0, case.out.1),
            Resize::CenterCrop { .. } => Geometry::center_crop(
                w as usize,
                h as usize,
                case.geometry.resized.0.min(case.geometry.resized.1),
                case.out.0,
            )
            .unwrap(),
        };
        assert_eq!(geometry, case.geometry, "{}: geometry", case.name);

        let filter = Filter::of(case.interpolation).unwrap();
        let mut resizer = PillowResizer::new(filter);
        let mut out = vec![0; case.expected.len()];
        resizer.resize(case.input.as_raw(), w as usize, h as usize, geometry, &mut out);
        same_bytes(&out, case, "resampler");
        // Again with the cached coefficients, on a different frame of the same size first (the frames
        // under 2 megapixels: the check is the cache, not the size, and debug builds are slow).
        if w * h < 2_000_000 {
            let other = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 7]));
            resizer.resize(other.as_raw(), w as usize, h as usize, geometry, &mut out);
            resizer.resize(case.input.as_raw(), w as usize, h as usize, geometry, &mut out);
            same_bytes(&out, case, "second frame");
        }

        // The whole preprocessor, deriving the geometry from the manifest's crop fraction.
        let mut pre = Preprocessor::new(&spec(case, Resampler::Pillow));
        assert!(!pre.fits(w, h), "{}: the Pillow path must ask for the full-size decode", case.name);
        pre.run(&case.input, &mut tensor).unwrap();
        same_bytes(&bytes_of(&tensor), case, "Preprocessor");

        let mut fast = Preprocessor::new(&spec(case, Resampler::Fast));
        fast.run(&case.input, &mut tensor).unwrap();
        let got = bytes_of(&tensor);
        let differ = got.iter().zip(&case.expected).filter(|(a, b)| a != b).count();
        let worst = got.iter().zip(&case.expected).map(|(&a, &b)| (i16::from(a) - i16::from(b)).abs()).max().unwrap();
        eprintln!(
            "{:<45} pillow: identical ({} bytes); fast: {:5.1} % of bytes differ, max {worst} levels",
            case.name,
            case.expected.len(),
            100.0 * differ as f64 / case.expected.len() as f64
        );
    }
}

/// Degenerate frames (one pixel, one row, one column) enlarge to the input without a panic; an empty
/// one is an error naming its size.
#[test]
fn pillow_resampler_handles_degenerate_frames() {
    let spec = InputSpec {
        name: "input".into(),
        width: 8,
        height: 8,
        layout: Layout::Nchw,
        resize: Resize::CenterCrop { fraction: 0.875 },
        interpolation: Interpolation::Bicubic,
        resampler: Resampler::Pillow,
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    let mut pre = Preprocessor::new(&spec);
    let mut t = Vec::new();
    for (w, h) in [(1, 1), (1, 400), (3, 2), (400, 1)] {
        pre.run(&RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3])), &mut t).unwrap();
        assert_eq!(t.len(), 8 * 8 * 3, "{w}x{h}");
    }
    let e = pre.run(&RgbImage::new(0, 5), &mut t).unwrap_err().to_string();
    assert!(e.contains("empty 0x5 frame"), "{e}");
}
