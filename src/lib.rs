//! whaled: identify individual whales and dolphins at the edge.
//!
//! The library holds everything the `whaled` binary does, so that tests drive the same code: config and
//! model manifests parsed into validated types, tract/onnxruntime backends behind one trait, the
//! upstream-compatible preprocessing and scoring, and the `identify` / `eval` front ends.
//! See ARCHITECTURE.md for the map.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod error;
pub mod manifest;
pub mod model;

pub use error::{Error, Result};
pub mod bench;
pub mod catalogue;
pub mod clock;
pub mod decode;
pub mod detection;
pub mod eval;
pub mod gallery;
pub mod gps;
pub mod head;
pub mod health;
pub mod identify;
pub mod images;
pub mod jitter;
pub mod locate;
pub mod mqtt;
pub mod outbox;
pub mod pipeline;
pub mod preprocess;
pub mod resample;
pub mod scoring;
pub mod service;
pub mod sighting;
pub mod signing;
pub mod sink;
pub mod source;
pub mod values;
