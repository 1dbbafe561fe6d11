//! Fused operations with forward and backward, as candle custom ops.
//!
//! Composed from small candle ops, a LayerNorm keeps six intermediate tensors alive in
//! the autograd graph and a softmax four, and each step of them is a pass over memory
//! with a fresh allocation; fused, each keeps only what its backward needs and runs
//! as one pass. Every kernel splits its rows over rayon's pool, the one candle's matrix
//! products use (see `sys::set_threads`), and is compiled twice, for baseline x86-64
//! and for AVX2 and AVX-512 (`kernel!`). The composed versions stay in `model.rs` as the
//! reference the tests compare against (forward, gradients, finite differences).
//!
//! Backward passes are custom ops too ([`LayerNormGrad`], [`SoftmaxGrad`], [`GeluGrad`],
//! and those of [`attention`] and [`linear`]): candle's reductions over the batch
//! dimension run element by element on one thread, which made summing bias gradients the
//! most expensive part of a step, and every node of candle's graph costs a zero-filled
//! gradient slot and an add, which one op per layer avoids.
//!
//! Here only the map: the kernels' shared plumbing is in `kernel.rs`; softmax, LayerNorm
//! and GELU in their own files. Multi-head
//! attention is in `attention.rs`, linear layers in `linear.rs`, and the matrix products
//! both run (f32 on the gemm crate, or bf16 on AMX tiles, `bf16.rs`) in `products.rs`.
//! Training and evaluation run each transformer block as one op ([`block`], `block.rs`),
//! built from the same kernels; the per-layer ops are its reference and what the probes
//! run, as they record what is inside a block. Mean pooling's sum over the tokens is
//! `token_sum.rs`.

// The shared plumbing first: its macros are used by every file declared after it.
#[macro_use]
mod kernel;

mod attention;
mod bf16;
mod block;
pub mod composed;
pub mod cpu;
mod fastmath;
mod gelu;
mod gemm;
mod layer_norm;
mod linear;
mod newton_schulz;
pub mod peak;
mod products;
mod softmax;
mod token_sum;
pub mod update;
pub use attention::attention;
pub use bf16::Kernel as Bf16Kernel;
pub use block::{block, BlockOutput, BlockShape, TILE_IMAGES};
pub use gelu::gelu;
pub use kernel::{BufferPool, Real};
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use newton_schulz::newton_schulz;
pub use products::{matmul_kind, matmul_short, time_products};
pub use softmax::scaled_softmax;
pub use token_sum::token_mean;

#[cfg(test)]
pub(crate) mod tests;
