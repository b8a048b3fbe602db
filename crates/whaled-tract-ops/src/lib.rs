//! whaled's own tract operators: kernels for the ops where `whaled bench --profile` showed tract 0.23
//! furthest from onnxruntime, substituted into a model at load time through tract's public op API
//! (nothing in tract is forked). Today: depthwise 2-D convolution ([`depthwise`]) and pointwise (1x1)
//! convolution ([`pointwise`]), each with the ReLU / ReLU6 that follows it fused ([`fuse`]), the
//! pointwise one also with the squeeze-excitation product before it; dense convolutions as an im2col
//! and the pointwise kernel ([`stem`]); an expand 1x1 conv and the depthwise conv after it as one op ([`expand`]); sums over trailing axes ([`reduce`]); max pooling ([`maxpool`]); and for int8 graphs
//! [`qpointwise`], [`quantize`] and [`qelementwise`].
//!
//! A separate crate so that these loops are compiled optimised in every profile: whaled's own crate is
//! unoptimised in dev builds, and an unoptimised kernel would make the test suite's pipelines (with
//! their latency budgets) run a different speed class than the shipped binary.

mod blocked;
pub mod depthwise;
pub mod expand;
mod fuse;
pub mod maxpool;
pub mod pointwise;
pub mod qelementwise;
pub mod qpointwise;
pub mod quantize;
pub mod reduce;
pub mod stem;
#[cfg(test)]
mod test_util;

use tract_linalg::multithread::Executor;

/// Runs `f` on one of `executor`'s threads when it is a thread pool (else here), so that a whole
/// inference runs inside tract's intra-op pool: each parallel op then wakes one idle thread instead of
/// parking the caller and waking two. The calling thread waits for the result. Measured on the Lite0
/// at 2 threads: docs/BENCHMARKS.md ("tract speed work"). Callers run one inference at a time this way
/// per pool: a pool thread that waits inside one may run another queued whole inference meanwhile.
pub fn on_pool<R: Send>(executor: Option<&Executor>, f: impl FnOnce() -> R + Send) -> R {
    match executor {
        Some(Executor::MultiThread(pool)) if pool.current_num_threads() > 1 => pool.install(f),
        _ => f(),
    }
}
