//! whaled's own tract operators: kernels for the ops where `whaled bench --profile` showed tract 0.23
//! furthest from onnxruntime, substituted into a model at load time through tract's public op API
//! (nothing in tract is forked). Today: depthwise 2-D convolution ([`depthwise`]).
//!
//! A separate crate so that these loops are compiled optimised in every profile: whaled's own crate is
//! unoptimised in dev builds, and an unoptimised kernel would make the test suite's pipelines (with
//! their latency budgets) run a different speed class than the shipped binary.

pub mod depthwise;
