//! The tract backend: pure Rust, no native library, the default on every board.
//!
//! The graph is typed with the manifest's fixed batch-1 input shape and optimised once at load time;
//! `threads > 1` gives the plan its own rayon pool (tract-linalg `multithread-mm`). The plan is
//! immutable and `Sync`: each `run` spawns a fresh state, so cameras can share one loaded model.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::backend::{check_dims, output_shape_ok, Backend, LoadRequest, LoadTimes, OpTime};
use crate::config::TractPrecision;
use crate::error::{Error, Result};

type Plan = Arc<TypedRunnableModel>;

pub struct TractBackend {
    plan: Plan,
    shape: [usize; 4],
    model_name: String,
    load_times: LoadTimes,
    /// The plan computes in f16 (`[inference] tract_precision = "f16"`): inputs and outputs are cast.
    f16: bool,
    /// The intra-op thread pool (`inference.threads > 1`), which the plan also holds; inferences run
    /// on it ([`whaled_tract_ops::on_pool`]). `None` with one thread or [`STOCK_ENV`].
    executor: Option<tract_linalg::multithread::Executor>,
    /// Inferences running now. Only one at a time runs *on* the pool: with `[pipeline] workers > 1`
    /// sharing this model, a pool thread waiting inside one inference could otherwise pick up another
    /// whole inference and stall the first behind it; the others run from their own threads, as tract
    /// does, and only their parallel ops go to the pool.
    in_flight: Gauge,
    /// Inferences running on a thread of the pool now: the rule above, observed (at most 1).
    on_pool: Gauge,
}

/// A count of inferences running now, and the most seen at once.
#[derive(Default)]
struct Gauge {
    now: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

/// The most inferences seen at once on one model since it was loaded ([`TractBackend::peaks`]): the
/// one-at-a-time rule of the pool made observable, for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peaks {
    /// Running at all (workers sharing the model).
    pub in_flight: usize,
    /// Running on a thread of the intra-op pool.
    pub on_pool: usize,
}

/// Counts an inference in a [`Gauge`] while it lives.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    /// Enters; returns whether this is the only inference counted.
    fn enter(gauge: &'a Gauge) -> (InFlight<'a>, bool) {
        use std::sync::atomic::Ordering::AcqRel;
        let before = gauge.now.fetch_add(1, AcqRel);
        gauge.peak.fetch_max(before + 1, AcqRel);
        (InFlight(gauge), before == 0)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl TractBackend {
    pub fn load(req: &LoadRequest) -> Result<Self> {
        let m = req.manifest;
        let err = |msg: String| Error::model(m.path(), msg);
        let te = |what: &str, e: TractError| err(format!("{what} {}: {e:#}", req.variant.file.display()));

        let stock = std::env::var_os(STOCK_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        if !stock {
            keep_activation_memory();
        }
        let started = std::time::Instant::now();
        // The protobuf is decoded straight from the file's bytes, which go as soon as it is decoded; the
        // protobuf goes once tract has its own tensors. (`model_for_read` would copy the file into a
        // buffer of its own first: up to four copies of the weights alive at the load's peak.)
        let onnx = req.onnx.take();
        let proto = <tract_onnx::pb::ModelProto as prost::Message>::decode(&onnx[..])
            .map_err(|e| err(format!("tract cannot parse ONNX file {}: {e}", req.variant.file.display())))?;
        drop(onnx);
        let mut model =
            tract_onnx::onnx().model_for_proto_model(&proto).map_err(|e| te("tract cannot parse ONNX file", e))?;
        drop(proto);

        let inputs = model.input_outlets().map_err(|e| te("no inputs in", e))?.to_vec();
        if inputs.len() != 1 {
            return Err(err(format!(
                "the ONNX graph has {} inputs; whaled models take exactly one image",
                inputs.len()
            )));
        }
        let in_name = model.node(inputs[0].node).name.clone();
        if in_name != m.input.name {
            return Err(err(format!("the ONNX graph's input is `{in_name}`, the manifest says `{}`", m.input.name)));
        }
        let shape = m.input.shape();
        let fact = model.input_fact(0).map_err(|e| te("no input fact in", e))?;
        let declared: Vec<Option<i64>> =
            fact.shape.dims().map(|d| d.concretize().and_then(|d| d.to_i64().ok())).collect();
        if !fact.shape.is_open() || !declared.is_empty() {
            check_dims(m.path(), "input", &in_name, &declared, &shape)?;
        }
        model.set_input_fact(0, f32::fact(shape).into()).map_err(|e| te("cannot set the input shape of", e))?;
        let out_name = m.output.name.as_str();
        model.select_outputs_by_name([out_name]).map_err(|_| {
            let names: Vec<String> = model
                .output_outlets()
                .map(|o| {
                    o.iter()
                        .filter_map(|o| {
                            model.outlet_label(*o).map(str::to_string).or_else(|| Some(model.node(o.node).name.clone()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            err(format!("the ONNX graph has no output `{out_name}` (it has: {})", names.join(", ")))
        })?;
        let parsed = std::time::Instant::now();
        let f16 = req.inference.tract_precision == TractPrecision::F16;
        let (typed, substituted) = optimise(model, stock, f16).map_err(|e| te("tract cannot optimise", e))?;
        log::debug!(
            "{}: {} depthwise convolutions on whaled's kernel ({}), {} stem, {} pointwise ({}), {} int8 pointwise ({}), \
             {} quantizations vectorised, {} lookup tables, {} u8 element-wise, {} trailing sums, {} max pools, {} expand-depthwise pairs{}",
            m.name,
            substituted.depthwise,
            whaled_tract_ops::depthwise::kernel_name(),
            substituted.stem,
            substituted.pointwise,
            whaled_tract_ops::pointwise::kernel_name(),
            substituted.int8_pointwise,
            whaled_tract_ops::qpointwise::kernel_name(),
            substituted.quantize,
            substituted.int8_tables,
            substituted.int8_binary,
            substituted.sums,
            substituted.pools,
            substituted.expand_depthwise,
            if stock { ", the rest stock tract ({STOCK_ENV} set)" } else { "" }
        );
        let out_dims: Vec<usize> = typed
            .output_fact(0)
            .map_err(|e| te("no output in", e))?
            .shape
            .as_concrete()
            .map(|d| d.to_vec())
            .ok_or_else(|| err(format!("the output `{out_name}` has no fixed shape")))?;
        if !output_shape_ok(&out_dims, m.output.kind.values()) {
            return Err(err(format!(
                "the ONNX graph's output `{out_name}` is {out_dims:?}, but the manifest describes {} values ({:?})",
                m.output.kind.values(),
                m.output.kind
            )));
        }
        let mut options = RunOptions::default();
        if req.inference.threads > 1 {
            options.executor = Some(tract_linalg::multithread::Executor::multithread(req.inference.threads));
        }
        // Stock: tract runs the plan from the calling thread, as it comes.
        let executor = if stock { None } else { options.executor.clone() };
        let plan = typed.into_runnable_with_options(&options).map_err(|e| te("tract cannot plan", e))?;
        release_load_memory();
        let load_times = LoadTimes {
            parse_ms: Some((parsed - started).as_secs_f64() * 1e3),
            optimise_ms: parsed.elapsed().as_secs_f64() * 1e3,
        };
        Ok(TractBackend {
            plan,
            shape,
            model_name: m.name.clone(),
            load_times,
            f16,
            executor,
            in_flight: Default::default(),
            on_pool: Default::default(),
        })
    }
}

/// A node's op for `whaled bench --profile`: its name, and for matrix products the kernel tract chose
/// (what differs between x86_64, aarch64 and armv7).
fn op_label(node: &TypedNode) -> String {
    let name = node.op().name().to_string();
    if name == "WhaledDepthwiseConv" {
        return format!("{name} [{}]", whaled_tract_ops::depthwise::kernel_name());
    }
    if name == "WhaledPointwiseConv" {
        return format!("{name} [{}]", whaled_tract_ops::pointwise::kernel_name());
    }
    let info = node.op().info().unwrap_or_default();
    // tract's matmul info reads "Mult: m:.. k:.. n:.. with [avx512_mmm_f32_32x6]".
    let kernel = info.iter().find_map(|l| l.split_once(" with [").and_then(|(_, k)| k.split_once(']')).map(|(k, _)| k));
    match kernel {
        Some(k) => format!("{name} [{k}]"),
        None => name,
    }
}

/// Set (to anything but `0`) to run tract as it comes: its own ops only (no substituted kernels), the
/// allocator left at its defaults, and inferences run from the calling thread. For before/after benchmarks and as an escape hatch; whaled's
/// kernels are tested against tract's and onnxruntime's.
pub const STOCK_ENV: &str = "WHALED_TRACT_STOCK";

/// Whether this CPU runs static-QDQ int8 models' 1x1 convolutions on whaled's integer op (AVX-512
/// VNNI; [`whaled_tract_ops::qpointwise`]): where int8 is the faster variant on tract.
pub fn int8_kernels() -> bool {
    whaled_tract_ops::pointwise::ENABLED && whaled_tract_ops::qpointwise::available()
}

/// How many nodes of a model [`optimise`] replaced by whaled's ops, by op.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Substituted {
    pub depthwise: usize,
    /// Dense convolutions over few input channels (a network's first layer).
    pub stem: usize,
    pub pointwise: usize,
    /// Integer (u8 x i8) pointwise convolutions of a static-QDQ int8 model.
    pub int8_pointwise: usize,
    /// tract's scalar `QuantizeLinearU8` nodes replaced by the vectorised one.
    pub quantize: usize,
    /// Dequantize -> unary ops -> quantize chains turned into lookup tables, and dequantized
    /// `Mul` / `Add` -> quantize kept in u8.
    pub int8_tables: usize,
    pub int8_binary: usize,
    /// Sums over trailing axes (squeeze-excitation squeezes), [`whaled_tract_ops::reduce`].
    pub sums: usize,
    /// 2-D max pools, [`whaled_tract_ops::maxpool`].
    pub pools: usize,
    /// Expand 1x1 -> depthwise pairs run as one op, [`whaled_tract_ops::expand`] (each also counted
    /// in `pointwise` and `depthwise`).
    pub expand_depthwise: usize,
}

/// Types, declutters and optimises a parsed model; in between, with `f16`, translates it to half
/// precision (tract's own `f32_to_f16` transform: input and output become f16 too), and unless `stock`
/// substitutes whaled's kernels for the ops it has better ones for (today: f32 depthwise, stem and
/// pointwise convolutions, [`whaled_tract_ops::depthwise`], [`whaled_tract_ops::stem`],
/// [`whaled_tract_ops::pointwise`], sums over trailing axes, [`whaled_tract_ops::reduce`], and max
/// pools, [`whaled_tract_ops::maxpool`]; in
/// static-QDQ int8 models, integer pointwise convolutions on CPUs with AVX-512 VNNI, [`whaled_tract_ops::qpointwise`],
/// and a vectorised `QuantizeLinear`, [`whaled_tract_ops::quantize`]). Returns the
/// optimised model and how many nodes were substituted.
pub fn optimise(model: InferenceModel, stock: bool, f16: bool) -> TractResult<(TypedModel, Substituted)> {
    let mut typed = model.into_typed()?.into_decluttered()?;
    if f16 {
        let Some(transform) = tract_onnx::tract_core::transform::get_transform("f32_to_f16")? else {
            return Err(tract_onnx::tract_core::internal::anyhow!("this tract has no f32_to_f16 transform"));
        };
        transform.transform(&mut typed)?;
    }
    let mut substituted = Substituted::default();
    if whaled_tract_ops::depthwise::ENABLED && !stock {
        substituted.depthwise = whaled_tract_ops::depthwise::substitute(&mut typed)?;
    }
    if whaled_tract_ops::stem::ENABLED && !stock {
        substituted.stem = whaled_tract_ops::stem::substitute(&mut typed)?;
    }
    if whaled_tract_ops::reduce::ENABLED && !stock {
        substituted.sums = whaled_tract_ops::reduce::substitute(&mut typed)?;
    }
    if whaled_tract_ops::maxpool::ENABLED && !stock {
        substituted.pools = whaled_tract_ops::maxpool::substitute(&mut typed)?;
    }
    // The int8 ops where the float ones are used (x86_64, aarch64; armv7 keeps tract's own), the integer
    // 1x1 op only on CPUs with AVX-512 VNNI. Before the float pointwise op, which would take the same
    // einsums as float convolutions.
    if whaled_tract_ops::pointwise::ENABLED && !stock {
        substituted.int8_pointwise = whaled_tract_ops::qpointwise::substitute(&mut typed)?;
        substituted.quantize = whaled_tract_ops::quantize::substitute(&mut typed)?;
        (substituted.int8_tables, substituted.int8_binary) = whaled_tract_ops::qelementwise::substitute(&mut typed)?;
    }
    if whaled_tract_ops::pointwise::ENABLED && !stock {
        substituted.pointwise = whaled_tract_ops::pointwise::substitute(&mut typed)?;
    }
    // After both ops' own substitutions: it fuses their nodes.
    if whaled_tract_ops::expand::ENABLED && !stock {
        substituted.expand_depthwise = whaled_tract_ops::expand::substitute(&mut typed)?;
    }
    Ok((typed.into_optimized()?, substituted))
}

/// Tells glibc's allocator to keep freed activation buffers for reuse instead of handing them back to
/// the kernel. tract allocates every node's output afresh; by default glibc serves blocks over 128 kB
/// (a dynamic threshold up to 32 MB) with `mmap` and unmaps them on free, so every inference faulted in
/// and zeroed its activation memory again: 320k page faults and about a third of a B4 inference at
/// 512 (docs/BENCHMARKS.md). With the heap serving them and trimming held off, the second inference
/// reuses the first one's pages. The price: the process keeps its peak heap (the largest model's
/// activations, some hundreds of MB for the B4 at 512) instead of returning it between frames, once
/// per glibc arena that ran inferences (each inference worker thread may get its own: `[pipeline]
/// workers = 2` can keep two peaks). Process-wide, set once, on glibc only (musl and others keep their
/// defaults); a threshold glibc refuses (its limit depends on the build and word size) falls back to
/// the next smaller one, and the debug log says what was set.
fn keep_activation_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // glibc refuses thresholds over its limit (build- and word-size-dependent): fall back.
            // SAFETY: mallopt only changes allocator parameters, under the allocator's own lock.
            let set = |v: usize| unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, v as libc::c_int) } == 1;
            let threshold = [256usize << 20, 32 << 20, 16 << 20].into_iter().find(|&v| set(v));
            // SAFETY: as above.
            let trim = unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, (512usize << 20).min(i32::MAX as usize) as libc::c_int)
            } == 1;
            log::debug!("allocator: mmap threshold {threshold:?} bytes, trim threshold set: {trim}");
        }
    });
}

/// Hands the memory the load freed (the file's bytes, the protobuf, tract's intermediate models) back
/// to the system. The allocator keeps freed memory for the activations (above), so without this a
/// process's RSS stays at the load's peak for its whole life; inference then reuses only what it needs.
fn release_load_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel, under the allocator's own lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl TractBackend {
    /// Counts an inference in for its lifetime (the guard), with the pool to run it on: the model's,
    /// unless another inference is running.
    fn enter(&self) -> (InFlight<'_>, Option<&tract_linalg::multithread::Executor>) {
        let (guard, alone) = InFlight::enter(&self.in_flight);
        (guard, if alone { self.executor.as_ref() } else { None })
    }

    /// Counts the calling thread in [`Self::on_pool`] while the guard lives, if it is one of the pool's.
    fn on_pool_thread(&self) -> Option<InFlight<'_>> {
        match &self.executor {
            Some(tract_linalg::multithread::Executor::MultiThread(pool)) if pool.current_thread_index().is_some() => {
                Some(InFlight::enter(&self.on_pool).0)
            }
            _ => None,
        }
    }

    /// The most inferences seen at once since load, in all and on the pool.
    pub fn peaks(&self) -> Peaks {
        let peak = |g: &Gauge| g.peak.load(std::sync::atomic::Ordering::Acquire);
        Peaks { in_flight: peak(&self.in_flight), on_pool: peak(&self.on_pool) }
    }

    /// The input as the plan takes it: f32, or cast to f16 for a half-precision plan.
    fn input_tensor(&self, input: &[f32]) -> TractResult<Tensor> {
        let tensor = Tensor::from_shape(&self.shape, input)?;
        if self.f16 {
            Ok(tensor.cast_to::<f16>()?.into_owned())
        } else {
            Ok(tensor)
        }
    }
}

impl Backend for TractBackend {
    fn load_times(&self) -> LoadTimes {
        self.load_times
    }

    fn run(&self, input: &[f32]) -> Result<Vec<f32>> {
        let fail = |e: TractError| Error::Inference {
            backend: "tract",
            model: self.model_name.clone(),
            msg: format!("{e:#}"),
        };
        // On the intra-op pool when no other inference is (tract's values are not `Send`: only the f32
        // result leaves it).
        let (_in_flight, pool) = self.enter();
        whaled_tract_ops::on_pool(pool, || {
            let _on_pool = self.on_pool_thread();
            let tensor = self.input_tensor(input)?;
            let outputs = self.plan.run(tvec![tensor.into_tvalue()])?;
            let out = outputs[0].cast_to::<f32>()?;
            let view = out.to_plain_array_view::<f32>()?;
            TractResult::Ok(view.iter().copied().collect::<Vec<f32>>())
        })
        .map_err(fail)
    }

    fn profile(&self, input: &[f32], runs: usize) -> Result<Option<Vec<OpTime>>> {
        let fail = |e: TractError| Error::Inference {
            backend: "tract",
            model: self.model_name.clone(),
            msg: format!("{e:#}"),
        };
        let runs = runs.max(1);
        // Per node: (op kind, seconds over all runs). On the pool, as `run` does.
        let (_in_flight, pool) = self.enter();
        let per_node = whaled_tract_ops::on_pool(pool, || {
            let tensor = self.input_tensor(input)?;
            let mut state = TypedSimpleState::new(&self.plan)?;
            let mut per_node: std::collections::HashMap<usize, (String, f64)> = Default::default();
            for _ in 0..runs {
                state.run_plan_with_eval(tvec![tensor.clone().into_tvalue()], |ctx, op_state, node, inputs| {
                    let t = std::time::Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    let dt = t.elapsed().as_secs_f64();
                    per_node.entry(node.id).or_insert_with(|| (op_label(node), 0.0)).1 += dt;
                    out
                })?;
            }
            TractResult::Ok(per_node)
        })
        .map_err(fail)?;
        let mut by_op: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
        for (op, secs) in per_node.into_values() {
            let e = by_op.entry(op).or_default();
            e.0 += 1;
            e.1 += secs;
        }
        let mut ops: Vec<OpTime> =
            by_op.into_iter().map(|(op, (nodes, secs))| OpTime { op, nodes, ms: secs * 1e3 / runs as f64 }).collect();
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(Some(ops))
    }
}
