//! The crate's error type: every failure names the thing it is about (a file, a key, a model, an image)
//! so that an operator reading one log line knows what to fix.

use std::path::{Path, PathBuf};

/// Errors from loading configuration and models and from running inference.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is unreadable, malformed or invalid. The message carries file, line and key.
    #[error("{0}")]
    Config(String),
    /// A model manifest, or a file it names, is missing, malformed or does not match the ONNX graph.
    #[error("model {manifest}: {msg}")]
    Model { manifest: PathBuf, msg: String },
    /// The inference backend failed at run time (not at load time).
    #[error("{backend} inference failed for model {model}: {msg}")]
    Inference { backend: &'static str, model: String, msg: String },
    /// An input image could not be read or decoded.
    #[error("image {source_name}: {msg}")]
    Image { source_name: String, msg: String },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A camera could not be opened or stopped delivering. `refused`: it rejected whaled's credentials,
    /// which no retry can fix until someone changes them (logged at ERROR; other camera failures are
    /// recovered by reopening and logged at WARN).
    #[error("camera {camera}: {msg}")]
    Camera { camera: String, msg: String, refused: bool },
    /// Bad input that is none of the above (an evaluation manifest, a command-line argument).
    #[error("{0}")]
    Input(String),
}

impl Error {
    pub(crate) fn model(manifest: &Path, msg: impl Into<String>) -> Self {
        Error::Model { manifest: manifest.to_path_buf(), msg: msg.into() }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
