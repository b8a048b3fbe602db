//! The `whaled` command line: a thin layer over the library. Parses arguments, sets up logging (stderr)
//! and signals, and dispatches: `run` to [`whaled::daemon`], `identify`, `eval`, `bench`, `cameras` and
//! `check-config` to their library functions. Results go to stdout, logs to stderr.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use whaled::config::{Config, Origin};
use whaled::config::{ExecutionProvider, InferenceConfig, OrtConfig};
use whaled::detection::{Detection, FrameMeta};
use whaled::identify::{GalleryAccess, Identifier};
use whaled::manifest::{BackendKind, ModelManifest};
use whaled::model::Model;
use whaled::pipeline::Shutdown;
use whaled::source::FrameData;
use whaled::{eval, images, Error};

#[derive(Parser)]
#[command(name = "whaled", version, about = "Identify individual whales and dolphins at the edge")]
struct Cli {
    /// Log level for stderr (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info")]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the configured cameras until SIGINT/SIGTERM (or every source ends): detections as JSON lines on stdout.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Identify photos: one Detection JSON object per image on stdout.
    Identify {
        /// Config file (default: $WHALED_CONFIG, ~/.config/whaled/whaled.toml, /etc/whaled/whaled.toml, built-in).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Identify every photo whatever the gates say: the pre-filter still runs and reports its score, at
        /// threshold 0, and the zero-shot gate is off. Needs an identification model.
        #[arg(long)]
        no_prefilter: bool,
        /// Image files or directories (searched recursively for .jpg/.jpeg/.png).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Measure the pre-filter (and identification) on a labelled manifest CSV.
    Eval {
        #[arg(long)]
        config: Option<PathBuf>,
        /// CSV with columns relpath,label[,individual_id,...]; label is cetacean or non_cetacean.
        #[arg(long)]
        manifest: PathBuf,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the ROC curve as an SVG image here.
        #[arg(long)]
        roc: Option<PathBuf>,
    },
    /// Time a model's preprocessing and inference on this machine.
    Bench {
        /// A shipped model name or a path to a model.toml.
        #[arg(long, default_value = "marine-gate-v2")]
        model: String,
        /// Which ONNX file of the model (default: the manifest's preference for the backend).
        #[arg(long)]
        variant: Option<String>,
        #[arg(long, value_enum, default_value = "tract")]
        backend: BackendArg,
        /// Intra-op threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// onnxruntime library (default: $ORT_DYLIB_PATH).
        #[arg(long)]
        ort_library: Option<PathBuf>,
        /// Image to feed (default: a synthetic 1920x1080 frame).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Instead of timing the pipeline, print where one inference's time goes, by operator
        /// (tract only; averaged over the timed runs).
        #[arg(long)]
        profile: bool,
        /// The float type tract computes in (`[inference] tract_precision`).
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
        /// Untimed runs first (the seed's protocol: 10).
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Timed runs (the seed's protocol: 100).
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// One JSON object instead of the key=value line.
        #[arg(long)]
        json: bool,
    },
    /// List V4L2 cameras with their formats, frame sizes and rates (like v4l2-ctl --list-formats-ext),
    /// or, with --probe URL, what a network camera's stream offers.
    Cameras {
        /// A stream to describe instead (rtsp://, http://, file://): codec, size, rate. Needs the
        /// `gstreamer` feature. Credentials in the URL are used and never printed.
        #[arg(long, value_name = "URL")]
        probe: Option<String>,
        /// How long --probe waits for the stream.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Galleries: a crew's own catalogue of individuals, searched beside the ArcFace head.
    Gallery {
        #[command(subcommand)]
        command: GalleryCommand,
    },
    /// Validate a config file (and the model manifests it names); exit 0 if valid.
    CheckConfig { file: PathBuf },
}

#[derive(Subcommand)]
enum GalleryCommand {
    /// Build a new gallery from labelled photos: DIR/<individual id>/*.jpg, or a CSV with columns
    /// path (or image, relpath), individual_id[, species].
    Build {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The gallery file to create.
        #[arg(long)]
        out: PathBuf,
        /// Recorded as who added the rows (default: $USER@hostname).
        #[arg(long)]
        added_by: Option<String>,
        input: PathBuf,
    },
    /// Add photos of one individual (to the configured gallery, or --gallery).
    Enroll {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        gallery: Option<PathBuf>,
        /// The individual's id (a new one or one the gallery or head knows).
        #[arg(long)]
        id: String,
        /// Species (default: the head's record of the id, else "unknown").
        #[arg(long)]
        species: Option<String>,
        #[arg(long)]
        added_by: Option<String>,
        #[arg(required = true)]
        photos: Vec<PathBuf>,
    },
    /// Print a gallery's binding, version and individuals.
    List {
        gallery: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove every photo of an individual.
    Remove {
        gallery: PathBuf,
        #[arg(long)]
        id: String,
    },
    /// Add the rows of other galleries (same embedder) that this one lacks.
    Merge {
        gallery: PathBuf,
        #[arg(required = true)]
        others: Vec<PathBuf>,
    },
    /// Write the delta that turns gallery OLD into NEW's content (for shore updates).
    Delta {
        old: PathBuf,
        new: PathBuf,
        /// The version the delta creates (default: NEW's version).
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Make an Ed25519 key pair for signing shore updates: the private key goes to --out (mode 0600),
    /// the public key is printed as the line boats pin in [mqtt.gallery_keys].
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// The name boats log as the signer.
        #[arg(long, default_value = "shore")]
        name: String,
    },
    /// Sign a gallery or delta file for `cmd/gallery_update`: writes the whole MQTT message (signed
    /// header line, newline, the file) to --out, ready for e.g. `mosquitto_pub -f`.
    Sign {
        /// Private key from `whaled gallery keygen`.
        #[arg(long)]
        key: PathBuf,
        /// A gallery or a delta (`whaled gallery delta`).
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The version the boat must have now for the update to apply (required with --force).
        #[arg(long)]
        replaces: Option<u64>,
        /// Install a whole gallery even if it is not newer (a rollback); needs --replaces.
        #[arg(long)]
        force: bool,
        /// Echoed in the boat's reply.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Time a nearest-neighbour query over a synthetic gallery.
    Bench {
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 512)]
        dim: usize,
        #[arg(long, default_value_t = 20_000)]
        individuals: usize,
        #[arg(long, default_value_t = 50)]
        runs: usize,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PrecisionArg {
    F32,
    F16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Tract,
    Onnxruntime,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new().filter_level(cli.log_level).parse_env("RUST_LOG").format_timestamp_millis().init();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Identify { config, no_prefilter, paths } => identify(config, no_prefilter, &paths),
        Command::Eval { config, manifest, json, roc } => run_eval(config, &manifest, json, roc),
        Command::CheckConfig { file } => check_config(&file),
        Command::Cameras { probe: None, .. } => cameras(),
        Command::Cameras { probe: Some(url), timeout } => probe(&url, timeout),
        Command::Gallery { command } => gallery(command),
        Command::Bench {
            model,
            variant,
            backend,
            threads,
            ort_library,
            image,
            profile,
            precision,
            warmup,
            runs,
            json,
        } => {
            let precision = match precision {
                PrecisionArg::F32 => whaled::config::TractPrecision::F32,
                PrecisionArg::F16 => whaled::config::TractPrecision::F16,
            };
            bench(
                &model,
                variant.as_deref(),
                backend,
                threads,
                ort_library,
                image,
                profile,
                precision,
                warmup,
                runs,
                json,
            )
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(2)
        }
    }
}

fn load(config: Option<PathBuf>, access: GalleryAccess) -> Result<(Config, Identifier), Error> {
    let cfg = Config::discover(config.as_deref())?;
    match &cfg.origin {
        Origin::File(p) => log::info!("config {}", p.display()),
        Origin::Defaults => log::info!("no config file found; using built-in defaults"),
    }
    let identifier =
        whaled::service::extending_start_timeout("loading models", || Identifier::from_config(&cfg, access))?;
    if !identifier.has_identification() {
        log::info!(
            "no identification model configured: frames that pass the pre-filter are reported as cetacean_unidentified"
        );
    }
    Ok((cfg, identifier))
}

fn run(config: Option<PathBuf>) -> Result<ExitCode, Error> {
    let (cfg, identifier) = load(config, GalleryAccess::ReadWrite)?;
    let shutdown = Shutdown::new();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while shutting down exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, shutdown.flag())
            .and_then(|_| signal_hook::flag::register(signal, shutdown.flag()))
            .map_err(|e| Error::Input(format!("cannot install signal handler: {e}")))?;
    }
    let reexec = whaled::daemon::watch_reload(&shutdown, cfg.origin.clone())?;
    let stopped = whaled::daemon::run(cfg, identifier, &shutdown)?;
    for s in stopped.stats {
        log::info!("final stats {}", serde_json::to_string(&s).unwrap_or_default());
    }
    log::info!("stopped{}", if stopped.on_request { " on request" } else { ": every source ended" });
    if reexec.load(std::sync::atomic::Ordering::SeqCst) {
        // SIGHUP with a valid new config: start over in place (same PID, so systemd keeps tracking it).
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().map_err(|e| Error::Input(format!("cannot find my own executable: {e}")))?;
        log::info!("restarting {} with the new configuration", exe.display());
        let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec();
        return Err(Error::Input(format!("re-exec after SIGHUP failed: {err}")));
    }
    Ok(ExitCode::SUCCESS)
}

fn identify(config: Option<PathBuf>, no_prefilter: bool, paths: &[PathBuf]) -> Result<ExitCode, Error> {
    let (cfg, mut identifier) = load(config, GalleryAccess::ReadOnly)?;
    if no_prefilter {
        if !identifier.has_identification() {
            return Err(Error::Input(
                "--no-prefilter needs an identification model ([identification] model = \".../model.toml\"): \
                 without one there is nothing to run past the gate"
                    .into(),
            ));
        }
        identifier.open_gates();
        log::info!("--no-prefilter: every photo is identified; the pre-filter's score is reported, not applied");
    }
    let files = images::expand(paths)?;
    if files.is_empty() {
        return Err(Error::Input(format!(
            "no images found in {}",
            paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    let mut ws = identifier.workspace();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut failed = 0usize;
    for path in &files {
        let meta = FrameMeta {
            image_ind: path
                .file_name()
                .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned()),
            source: path.display().to_string(),
            captured_at: images::mtime(path),
        };
        let name = path.display().to_string();
        let assessed = FrameData::read_file(path).and_then(|frame| identifier.assess(&mut ws, &frame, &name));
        let detection = match assessed {
            Ok(a) => Detection::from_assessment(&a, &meta, &cfg.device_id),
            Err(e @ (Error::Image { .. } | Error::Io { .. })) => {
                log::warn!("{e}");
                Detection::corrupted(&meta, &cfg.device_id, identifier.model_version(), e.to_string())
            }
            Err(e) => {
                log::error!("{}: {e}", path.display());
                failed += 1;
                continue;
            }
        };
        let line = serde_json::to_string(&detection).map_err(|e| Error::Input(e.to_string()))?;
        writeln!(out, "{line}").map_err(|e| Error::Input(format!("stdout: {e}")))?;
    }
    out.flush().map_err(|e| Error::Input(format!("stdout: {e}")))?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn run_eval(
    config: Option<PathBuf>,
    manifest: &std::path::Path,
    json: bool,
    roc: Option<PathBuf>,
) -> Result<ExitCode, Error> {
    let mut cfg = Config::discover(config.as_deref())?;
    if cfg.zero_shot.take().is_some() {
        log::info!("eval measures the pre-filter: the [zero_shot] stage is not applied");
    }
    let identifier = Identifier::from_config(&cfg, GalleryAccess::ReadOnly)?;
    let samples = eval::read_manifest(manifest)?;
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(samples.len() as u64), indicatif::ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images {elapsed_precise} (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = eval::evaluate(&identifier, manifest, &samples, || bar.inc(1))?;
    bar.finish_and_clear();
    if let Some(p) = roc {
        std::fs::write(&p, report.roc_svg()).map_err(|e| Error::Io { path: p.clone(), source: e })?;
        log::info!("ROC curve written to {}", p.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| Error::Input(e.to_string()))?);
    } else {
        print!("{}", report.table());
    }
    Ok(ExitCode::SUCCESS)
}

fn cameras() -> Result<ExitCode, Error> {
    let nodes = whaled::source::v4l2::device_nodes();
    if nodes.is_empty() {
        println!("no V4L2 devices (/dev/video*)");
    }
    for node in nodes {
        match whaled::source::v4l2::describe(&node) {
            Ok(text) => print!("{text}"),
            Err(e) => println!("{e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "gstreamer")]
fn probe(url: &str, timeout: std::time::Duration) -> Result<ExitCode, Error> {
    print!("{}", whaled::source::gst::probe(url, timeout)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "gstreamer"))]
fn probe(_url: &str, _timeout: std::time::Duration) -> Result<ExitCode, Error> {
    Err(Error::Input("--probe needs whaled built with the `gstreamer` feature".into()))
}

fn gallery(command: GalleryCommand) -> Result<ExitCode, Error> {
    use whaled::catalogue;
    use whaled::gallery::Gallery;
    let report = |g: &Gallery, skipped: &[PathBuf], path: &std::path::Path| {
        println!(
            "{}: version {}, {} photos of {} individuals{}",
            path.display(),
            g.version(),
            g.len(),
            g.individuals(),
            if skipped.is_empty() { String::new() } else { format!(" ({} unreadable photos skipped)", skipped.len()) }
        );
        if skipped.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    };
    match command {
        GalleryCommand::Build { config, out, added_by, input } => {
            let (_cfg, identifier) = load(config, GalleryAccess::ReadOnly)?;
            let by = added_by.unwrap_or_else(catalogue::default_added_by);
            let (g, skipped) = catalogue::build(&identifier, &input, &out, &by)?;
            Ok(report(&g, &skipped, &out))
        }
        GalleryCommand::Enroll { config, gallery, id, species, added_by, photos } => {
            let (_cfg, identifier) = load(config, GalleryAccess::ReadOnly)?;
            let path = match gallery.or_else(|| identifier.gallery_path().map(std::path::Path::to_path_buf)) {
                Some(p) => p,
                None => return Err(Error::Input("no gallery: pass --gallery or set [identification] gallery".into())),
            };
            let by = added_by.unwrap_or_else(catalogue::default_added_by);
            let (g, skipped) = catalogue::enroll(&identifier, &path, &id, species.as_deref(), &photos, &by)?;
            if identifier.gallery_path() == Some(path.as_path()) {
                log::info!("a running whaled uses the new rows after `systemctl reload whaled` (SIGHUP)");
            }
            Ok(report(&g, &skipped, &path))
        }
        GalleryCommand::List { gallery, json } => {
            let g = Gallery::open(&gallery)?;
            let individuals = whaled::gallery::summary(&g);
            if json {
                let v = serde_json::json!({
                    "gallery": gallery.display().to_string(),
                    "version": g.version(),
                    "dim": g.dim(),
                    "embedder_sha256": g.embedder_sha256(),
                    "photos": g.len(),
                    "individuals": individuals.iter().map(|(id, sp, n)| serde_json::json!({"individual_id": id, "species": sp, "photos": n})).collect::<Vec<_>>(),
                });
                println!("{v}");
            } else {
                println!(
                    "{}: version {}, {} photos of {} individuals, {}-d, embedder {}",
                    gallery.display(),
                    g.version(),
                    g.len(),
                    g.individuals(),
                    g.dim(),
                    g.embedder_sha256()
                );
                for (id, sp, n) in individuals {
                    println!("{id}\t{sp}\t{n}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        GalleryCommand::Remove { gallery, id } => {
            let (g, n) = Gallery::remove(&gallery, &id)?;
            println!("removed {n} photos of {id}");
            Ok(report(&g, &[], &gallery))
        }
        GalleryCommand::Merge { gallery, others } => {
            let others = others.iter().map(|p| Gallery::open(p)).collect::<Result<Vec<_>, _>>()?;
            let (g, n) = Gallery::merge(&gallery, &others)?;
            println!("added {n} photos");
            Ok(report(&g, &[], &gallery))
        }
        GalleryCommand::Delta { old, new, version, out } => {
            let (o, n) = (Gallery::open(&old)?, Gallery::open(&new)?);
            let d = catalogue::delta(&o, &n, version.unwrap_or(n.version()))?;
            std::fs::write(&out, d.to_bytes()).map_err(|e| Error::Io { path: out.clone(), source: e })?;
            println!(
                "{}: version {} -> {}, removes {} individuals, adds {} photos",
                out.display(),
                d.base_version,
                d.version,
                d.removes.len(),
                d.adds.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        GalleryCommand::Keygen { out, name } => {
            let key = whaled::signing::SigningKey::generate(&out)?;
            eprintln!("private key written to {} (keep it on shore; mode 0600)", out.display());
            println!("[mqtt.gallery_keys]\n{name:?} = \"{}\"", key.public_hex());
            Ok(ExitCode::SUCCESS)
        }
        GalleryCommand::Sign { key, file, out, replaces, force, request_id } => {
            let key = whaled::signing::SigningKey::load(&key)?;
            let bytes = std::fs::read(&file).map_err(|e| Error::Io { path: file.clone(), source: e })?;
            let what = file.display().to_string();
            let message =
                whaled::mqtt::signed_gallery_update(&bytes, &what, &key, replaces, force, request_id.as_deref())?;
            std::fs::write(&out, &message).map_err(|e| Error::Io { path: out.clone(), source: e })?;
            println!("{}: {} bytes, signed by key {}", out.display(), message.len(), key.public_hex());
            Ok(ExitCode::SUCCESS)
        }
        GalleryCommand::Bench { rows, dim, individuals, runs } => {
            let ms = catalogue::bench_query(rows, dim, individuals, runs)?;
            println!("gallery_rows={rows} dim={dim} individuals={individuals} runs={runs} query_median_ms={ms:.3}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check_config(file: &std::path::Path) -> Result<ExitCode, Error> {
    let cfg = Config::load(file)?;
    for line in whaled::identify::check(&cfg)? {
        println!("{line}");
    }
    #[cfg(feature = "gstreamer")]
    for cam in &cfg.cameras {
        if matches!(cam.source, whaled::config::SourceConfig::Rtsp(_) | whaled::config::SourceConfig::Gstreamer(_)) {
            whaled::source::gst::check(cam)?;
            println!("camera {}: every GStreamer element it names is installed", cam.name);
        }
    }
    if cfg.inference.backend == BackendKind::Onnxruntime {
        println!("{}", cfg.inference.onnxruntime.summary());
    }
    println!("{}: ok (device_id {}, backend {})", file.display(), cfg.device_id, cfg.inference.backend.name());
    Ok(ExitCode::SUCCESS)
}

/// `whaled bench --profile`: the backend's per-operator times, largest first.
fn bench_profile(
    model: &Model,
    frame: &image::RgbImage,
    warmup: usize,
    runs: usize,
    json: bool,
) -> Result<ExitCode, Error> {
    let mut pre = whaled::preprocess::Preprocessor::new(&model.manifest().input);
    let mut input = Vec::new();
    pre.run(frame, &mut input)?;
    for _ in 0..warmup {
        model.run(&input)?;
    }
    let Some(ops) = model.profile(&input, runs)? else {
        return Err(Error::Input(format!(
            "the {} backend cannot report a per-operator profile (tract can; for onnxruntime use its own profiler)",
            model.backend_kind().name()
        )));
    };
    let total: f64 = ops.iter().map(|o| o.ms).sum();
    if json {
        let v: Vec<_> = ops.iter().map(|o| serde_json::json!({"op": o.op, "nodes": o.nodes, "ms": o.ms})).collect();
        println!(
            "{}",
            serde_json::json!({"model": model.manifest().name, "variant": model.variant().name, "runs": runs.max(1), "total_ms": total, "ops": v})
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} {} on {}: {total:.2} ms per inference in {} kinds of operator",
        model.manifest().name,
        model.variant().name,
        model.backend_kind().name(),
        ops.len()
    );
    for o in &ops {
        println!("{:>9.3} ms {:>5.1} %  {:>4} x {}", o.ms, 100.0 * o.ms / total.max(1e-9), o.nodes, o.op);
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn bench(
    model: &str,
    variant: Option<&str>,
    backend: BackendArg,
    threads: usize,
    ort_library: Option<PathBuf>,
    image: Option<PathBuf>,
    profile: bool,
    precision: whaled::config::TractPrecision,
    warmup: usize,
    runs: usize,
    json: bool,
) -> Result<ExitCode, Error> {
    let backend = match backend {
        BackendArg::Tract => BackendKind::Tract,
        BackendArg::Onnxruntime => BackendKind::Onnxruntime,
    };
    let manifest =
        whaled::config::resolve_model(&std::env::current_dir().unwrap_or_default(), model).map_err(Error::Input)?;
    let inference = InferenceConfig {
        backend,
        threads: threads.max(1),
        jpeg_dct_scaling: true,
        tract_precision: precision,
        onnxruntime: OrtConfig { library: ort_library, execution_providers: vec![ExecutionProvider::Cpu], sessions: 1 },
    };
    let model = Model::load(ModelManifest::load(&manifest)?, variant, &inference)?;
    // The frame as a camera would deliver it: the given JPEG, or the synthetic frame as 4:2:2 MJPEG.
    let jpeg = match &image {
        Some(p) => std::fs::read(p).map_err(|e| Error::Io { path: p.clone(), source: e })?,
        None => images::encode_jpeg(&whaled::bench::synthetic_frame())?,
    };
    let frame = whaled::decode::decode_image(&jpeg, "bench frame")?;
    if profile {
        return bench_profile(&model, &frame, warmup, runs, json);
    }
    let f = whaled::bench::bench_frame(&model, &FrameData::Encoded(jpeg.into()), warmup, runs)?;
    let r = whaled::bench::bench_model(&model, &frame, warmup, runs)?;
    let overhead = |decode: f64, pre: f64| 100.0 * (decode + pre) / r.inference.median;
    let (read_ms, load) = model.load_times();
    if json {
        let v = serde_json::json!({
            "model": model.manifest().name, "variant": model.variant().name, "backend": backend.name(),
            "threads": inference.threads, "frame": [frame.width(), frame.height()], "warmup": warmup, "runs": runs.max(1),
            "load_ms": {"read_verify": read_ms, "parse": load.parse_ms, "optimise": load.optimise_ms},
            "inference_ms": r.inference.json(), "preprocess_ms": r.preprocess.json(),
            "decode_full_ms": f.full_decode.json(), "decode_scaled_ms": f.scaled_decode.json(),
            "dct_scale": [f.scale.0, f.scale.1],
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "model={} variant={} backend={} threads={} frame={}x{} warmup={} runs={} load_read_ms={:.1} load_parse_ms={} load_optimise_ms={:.1} \
         inference_mean_ms={:.2} inference_std_ms={:.2} inference_p50_ms={:.2} inference_p95_ms={:.2} \
         preprocess_median_ms={:.2} inference_median_ms={:.2} inference_p90_ms={:.2} inference_min_ms={:.2} \
         decode_full_ms={:.2} preprocess_full_ms={:.2} overhead_full_pct={:.1} dct_scale={}/{} decoded={}x{} decode_scaled_ms={:.2} preprocess_scaled_ms={:.2} overhead_scaled_pct={:.1}",
        model.manifest().name, model.variant().name, backend.name(), inference.threads, frame.width(), frame.height(), warmup, runs.max(1),
        read_ms, load.parse_ms.map_or("-".to_string(), |p| format!("{p:.1}")), load.optimise_ms,
        r.inference.mean, r.inference.std, r.inference.median, r.inference.p95,
        r.preprocess.median, r.inference.median, r.inference.p90, r.inference.min,
        f.full_decode.median, f.full_preprocess.median, overhead(f.full_decode.median, f.full_preprocess.median),
        f.scale.0, f.scale.1, f.scaled_size.0, f.scaled_size.1, f.scaled_decode.median, f.scaled_preprocess.median,
        overhead(f.scaled_decode.median, f.scaled_preprocess.median),
    );
    Ok(ExitCode::SUCCESS)
}
