//! The tract backend: pure Rust, no native library, the default on every board.
//!
//! The graph is typed with the manifest's fixed batch-1 input shape and optimised once at load time;
//! `threads > 1` gives the plan its own rayon pool (tract-linalg `multithread-mm`). The plan is
//! immutable and `Sync`: each `run` spawns a fresh state, so cameras can share one loaded model.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::backend::{check_dims, output_shape_ok, Backend, LoadRequest, LoadTimes};
use crate::error::{Error, Result};

type Plan = Arc<TypedRunnableModel>;

pub struct TractBackend {
    plan: Plan,
    shape: [usize; 4],
    model_name: String,
    load_times: LoadTimes,
}

impl TractBackend {
    pub fn load(req: &LoadRequest) -> Result<Self> {
        let m = req.manifest;
        let err = |msg: String| Error::model(m.path(), msg);
        let te = |what: &str, e: TractError| err(format!("{what} {}: {e:#}", req.variant.file.display()));

        let started = std::time::Instant::now();
        let mut model =
            tract_onnx::onnx().model_for_read(&mut &req.onnx[..]).map_err(|e| te("tract cannot parse ONNX file", e))?;

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
        let typed = model.into_optimized().map_err(|e| te("tract cannot optimise", e))?;
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
        let plan = typed.into_runnable_with_options(&options).map_err(|e| te("tract cannot plan", e))?;
        let load_times = LoadTimes {
            parse_ms: Some((parsed - started).as_secs_f64() * 1e3),
            optimise_ms: parsed.elapsed().as_secs_f64() * 1e3,
        };
        Ok(TractBackend { plan, shape, model_name: m.name.clone(), load_times })
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
        let tensor = Tensor::from_shape(&self.shape, input).map_err(fail)?;
        let outputs = self.plan.run(tvec![tensor.into_tvalue()]).map_err(fail)?;
        let view = outputs[0].to_plain_array_view::<f32>().map_err(fail)?;
        Ok(view.iter().copied().collect())
    }
}
