//! Inference backends behind [`crate::model::Backend`]: pure-Rust tract (default) and onnxruntime
//! (optional cargo feature `onnxruntime`, library loaded at run time).

pub mod onnxruntime;
pub mod tract;
