//! The Jetson path's configuration, with the real (CPU-only) onnxruntime library of the PyPI wheel:
//! `[inference.onnxruntime.tensorrt]` and `.cuda` are validated by check-config, and when TensorRT and
//! CUDA are configured but absent from the library, each is skipped with a WARN naming it, nothing is
//! written to the cache directory, and the model runs on the CPU provider with the same output as a
//! CPU-only config (docs/JETSON.md, "What happens without a GPU"). What the providers would be given is
//! checked without a GPU by the unit tests of `backend::onnxruntime` (the `ort` builders against the
//! option lists in onnxruntime's key names).
#![cfg(feature = "onnxruntime")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{logs, ort_library, repo, shipped_manifest, write};
use log::Level;
use whaled::config::{Config, ExecutionProvider, Switch};
use whaled::manifest::ModelManifest;
use whaled::model::Model;

fn whaled(args: &[&str], state_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whaled"))
        .args(args)
        .env_remove("WHALED_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("STATE_DIRECTORY", state_dir)
        .output()
        .expect("run whaled")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A config on the onnxruntime backend with these providers and extra TOML after `[inference.onnxruntime]`.
fn ort_config(providers: &str, extra: &str) -> String {
    format!(
        "[inference]\nbackend = \"onnxruntime\"\n[inference.onnxruntime]\nlibrary = \"{}\"\nexecution_providers = {providers}\n{extra}",
        ort_library().display()
    )
}

/// The shipped Lite0 (its onnxruntime variant is the static-QDQ int8, the case `int8 = "auto"` turns on)
/// loaded with `config`, and its output for a fixed input.
fn run_lite0(dir: &Path, config: &str) -> Vec<f32> {
    let cfg = Config::parse(&dir.join("whaled.toml"), config).unwrap();
    let model = Model::load(ModelManifest::load(&shipped_manifest()).unwrap(), None, &cfg.inference).unwrap();
    assert_eq!(model.variant().name, "int8");
    let input: Vec<f32> = (0..3 * 224 * 224).map(|i| ((i % 255) as f32 / 127.5) - 1.0).collect();
    model.run(&input).unwrap()
}

#[test]
fn tensorrt_and_cuda_configured_but_absent_fall_back_to_cpu_with_a_warn_each() {
    logs::capture();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("trt-cache");
    let gpu = ort_config(
        "[\"tensorrt\", \"cuda\", \"cpu\"]",
        &format!(
            "[inference.onnxruntime.tensorrt]\nfp16 = \"auto\"\nint8 = \"auto\"\ncache_dir = \"{}\"\nmax_workspace_mb = 1024\n\
             [inference.onnxruntime.cuda]\nmemory_limit_mb = 2048\narena_extend_strategy = \"same_as_requested\"\n",
            cache.display()
        ),
    );
    // The options reach the validated config...
    let cfg = Config::parse(&tmp.path().join("whaled.toml"), &gpu).unwrap();
    let providers = &cfg.inference.onnxruntime.execution_providers;
    let ExecutionProvider::Tensorrt(t) = &providers[0] else { panic!("{providers:?}") };
    assert_eq!((t.fp16, t.int8, &t.cache_dir), (Switch::Auto, Switch::Auto, &cache));
    assert_eq!(t.max_workspace_bytes, Some(1 << 30));
    let ExecutionProvider::Cuda(c) = &providers[1] else { panic!("{providers:?}") };
    assert_eq!(c.memory_limit_bytes, Some(2 << 30));

    // ... and, the library having neither provider, the model runs on the CPU provider: the same output
    // as a CPU-only config, one WARN per missing provider naming it, no "none registered" WARN.
    let on_gpu_config = run_lite0(tmp.path(), &gpu);
    let cpu_only = run_lite0(tmp.path(), &ort_config("[\"cpu\"]", ""));
    assert_eq!(on_gpu_config, cpu_only);
    for name in ["`tensorrt`", "`cuda`"] {
        let w = logs::matching(
            Level::Warn,
            &["efficientnet-lite0-imagenet", name, "is not in this onnxruntime build; skipping it"],
        );
        assert!(!w.is_empty(), "no WARN naming {name}");
    }
    assert!(!logs::matching(Level::Info, &["efficientnet-lite0-imagenet", "onnxruntime providers [cpu]"]).is_empty());
    // TensorRT being absent, nothing was planned for it: no cache directory, no version probe.
    assert!(!cache.exists(), "{} was created for a provider that is not there", cache.display());
    assert!(logs::matching(Level::Info, &["TensorRT"]).is_empty());
    // The library's own version string was read (it keys the engine cache on a Jetson).
    let version = ort_library().file_name().unwrap().to_string_lossy().rsplit(".so.").next().unwrap().to_string();
    assert!(
        !logs::matching(Level::Info, &[&format!("onnxruntime {version} loaded from")]).is_empty(),
        "version {version}"
    );

    // Only GPU providers listed, none there: onnxruntime's CPU provider still runs it, with a WARN.
    let only_trt = run_lite0(tmp.path(), &ort_config("[\"tensorrt\"]", ""));
    assert_eq!(only_trt, cpu_only);
    assert!(!logs::matching(
        Level::Warn,
        &["none of the configured execution providers registered; onnxruntime uses its CPU provider"]
    )
    .is_empty());
}

#[test]
fn check_config_validates_and_shows_the_provider_options() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let models = "[prefilter]\nmodel = \"efficientnet-lite0\"\n";

    // Defaults: caches in <state dir>/tensorrt, auto precision; the line lists providers in order.
    let cfg = write(
        tmp.path(),
        "defaults.toml",
        format!("{}{models}", ort_config("[\"tensorrt\", \"cuda\", \"cpu\"]", "")).as_bytes(),
    );
    let out = whaled(&["check-config", cfg.to_str().unwrap()], &state);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let want = format!(
        "onnxruntime execution providers, in order: tensorrt (device 0, fp16 auto, int8 auto, engine cache on, \
         timing cache on, in {}, workspace default), cuda (device 0, memory limit none, arena next_power_of_two), cpu",
        state.join("tensorrt").display()
    );
    assert!(stdout.contains(&want), "{stdout}\nlacks: {want}");
    assert!(stdout.contains("ok (device_id"), "{stdout}");
    // check-config loads the models as start-up does, so the fallback shows there too.
    assert!(text(&out.stderr).contains("`tensorrt` is not in this onnxruntime build"), "{}", text(&out.stderr));

    // Options that take no effect: accepted, with a WARN naming the table.
    let tract =
        write(tmp.path(), "tract.toml", format!("[inference.onnxruntime.tensorrt]\nfp16 = true\n{models}").as_bytes());
    let out = whaled(&["check-config", tract.to_str().unwrap()], &state);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("WARN")
            && stderr.contains("inference.onnxruntime.tensorrt is set but inference.backend = \"tract\""),
        "{stderr}"
    );
    assert!(!text(&out.stdout).contains("onnxruntime execution providers"), "tract: no provider line");

    // Refused, naming the file, the line and the key.
    let blocker = write(tmp.path(), "not-a-dir", b"");
    let cases: &[(&str, &[&str])] = &[
        (
            "[inference.onnxruntime.tensorrt]\ndevice_id = -1\n",
            &["line 7", "expected a GPU index of 0 or more", "got -1"],
        ),
        (
            "[inference.onnxruntime.cuda]\nmemory_limit_mb = 0\n",
            &["line 7", "expected a whole number of at least 1, got 0"],
        ),
        (
            "[inference.onnxruntime.tensorrt]\nengine_cache_path = \"/x\"\n",
            &["line 7", "unknown field `engine_cache_path`"],
        ),
        (
            &format!("[inference.onnxruntime.tensorrt]\ncache_dir = \"{}/trt\"\n", blocker.display()),
            &["bad.toml:7:13: inference.onnxruntime.tensorrt.cache_dir: ", "not-a-dir is not a directory"],
        ),
    ];
    for (extra, wants) in cases {
        let bad = write(
            tmp.path(),
            "bad.toml",
            format!("{}{models}", ort_config("[\"tensorrt\", \"cuda\", \"cpu\"]", extra)).as_bytes(),
        );
        let out = whaled(&["check-config", bad.to_str().unwrap()], &state);
        assert!(!out.status.success(), "accepted:\n{extra}");
        let e = text(&out.stderr);
        for w in *wants {
            assert!(e.contains(w), "{extra}\n{e}\nlacks: {w}");
        }
    }
}

/// config/jetson.toml with its library pointed at the wheel's: its TensorRT and CUDA tables validate.
#[test]
fn the_jetson_example_sets_the_provider_options() {
    let text_ = std::fs::read_to_string(repo().join("config/jetson.toml")).unwrap();
    let cfg = Config::parse(&repo().join("config/jetson.toml"), &{
        let lib_line = text_.lines().find(|l| l.starts_with("library = ")).unwrap();
        text_.replace(lib_line, &format!("library = \"{}\"", ort_library().display()))
    })
    .unwrap();
    let names: Vec<_> = cfg.inference.onnxruntime.execution_providers.iter().map(ExecutionProvider::name).collect();
    assert_eq!(names, ["tensorrt", "cuda", "cpu"]);
    let t = cfg.inference.onnxruntime.tensorrt().unwrap();
    assert!(t.engine_cache && t.timing_cache);
    assert_eq!((t.fp16, t.int8), (Switch::Auto, Switch::Auto));
    assert!(cfg.inference.onnxruntime.cuda().is_some());
}
