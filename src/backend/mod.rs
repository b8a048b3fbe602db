//! Inference backends behind one trait, [`Backend`]: pure-Rust tract (default) and onnxruntime
//! (optional cargo feature `onnxruntime`, library loaded at run time). The trait, what a backend is given
//! to load ([`LoadRequest`]) and the shape checks both share live here, beside their implementations;
//! [`crate::model::Model`] builds on them (this module never imports `model`).

pub mod onnxruntime;
pub mod tract;

use std::path::Path;

use crate::config::InferenceConfig;
use crate::error::{Error, Result};
use crate::manifest::{ModelManifest, Variant};

/// One inference engine instance holding one model. Implemented by tract and onnxruntime.
pub trait Backend: Send + Sync {
    /// Runs a batch-1 input laid out as the manifest says and returns the declared output, flattened.
    fn run(&self, input: &[f32]) -> Result<Vec<f32>>;
    /// How long building the backend took, by phase (`whaled bench`).
    fn load_times(&self) -> LoadTimes;
    /// Where one inference's time goes, by operator kind, averaged over `runs` runs of `input`
    /// (`whaled bench --profile`); `None` where the backend cannot say (onnxruntime: use its own profiler).
    fn profile(&self, _input: &[f32], _runs: usize) -> Result<Option<Vec<OpTime>>> {
        Ok(None)
    }
}

/// One operator kind's share of an inference: tract's op name (with its kernel where tract names one),
/// how many nodes of the plan run it, and their summed time per inference in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub op: String,
    pub nodes: usize,
    pub ms: f64,
}

/// Model load phases, milliseconds: parsing the ONNX graph (where the backend separates it) and
/// optimising it into something runnable (for onnxruntime, the whole session creation).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadTimes {
    pub parse_ms: Option<f64>,
    pub optimise_ms: f64,
}

/// What a backend needs to build itself from a model file.
pub struct LoadRequest<'a> {
    pub manifest: &'a ModelManifest,
    pub variant: &'a Variant,
    /// The ONNX file's bytes. The tract backend takes them (`Cell::take`) and drops them once it has
    /// decoded the protobuf, so a load never holds the file, the protobuf and tract's tensors at once
    /// (for the B4 74 MB each; the load's peak is `whaled identify`'s peak RSS). onnxruntime reads them.
    pub onnx: std::cell::Cell<Vec<u8>>,
    pub inference: &'a InferenceConfig,
}

/// Compares a graph's declared dims (`None` = symbolic/unknown) against the manifest's expectation.
/// Used by both backends so that they report mismatches in the same words.
pub(crate) fn check_dims(
    manifest: &Path,
    what: &str,
    name: &str,
    declared: &[Option<i64>],
    want: &[usize],
) -> Result<()> {
    let fmt = |d: &[Option<i64>]| {
        d.iter().map(|x| x.map_or("?".to_string(), |v| v.to_string())).collect::<Vec<_>>().join("x")
    };
    let want_i: Vec<Option<i64>> = want.iter().map(|&w| Some(w as i64)).collect();
    let ok = declared.len() == want.len()
        && declared.iter().zip(want).all(|(d, &w)| d.is_none_or(|d| d == w as i64 || (d <= 0)));
    if ok {
        Ok(())
    } else {
        Err(Error::model(
            manifest,
            format!(
                "the ONNX graph's {what} `{name}` is {}, but the manifest describes {}",
                fmt(declared),
                fmt(&want_i)
            ),
        ))
    }
}

/// The output shapes a manifest's output kind accepts: `[1, n]` or `[1, n, 1, 1]` (1x1 conv heads).
pub(crate) fn output_shape_ok(dims: &[usize], len: usize) -> bool {
    matches!(dims, [1, n] if *n == len) || matches!(dims, [1, n, 1, 1] if *n == len) || matches!(dims, [n] if *n == len)
}
