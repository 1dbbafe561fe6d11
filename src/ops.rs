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
//! Here: softmax, LayerNorm and GELU, and the helpers every kernel uses. Multi-head
//! attention is in `attention.rs`, linear layers in `linear.rs`, and the matrix products
//! both run (f32 on the gemm crate, or bf16 on AMX tiles, `bf16.rs`) in `products.rs`.
//! Training and evaluation run each transformer block as one op ([`block`], `block.rs`),
//! built from the same kernels; the per-layer ops are its reference and what the probes
//! run, as they record what is inside a block.

use std::ops::Range;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use num_traits::Float;

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: expects a contiguous input"),
    }
}

/// The gradients packed one after another in `packed` (1-D, as the backward ops
/// return them), cut apart into tensors of `shapes`, in order.
fn unpack<const N: usize>(packed: &Tensor, shapes: [&Shape; N]) -> [Result<Tensor>; N] {
    let mut start = 0;
    shapes.map(|shape| {
        let len = shape.elem_count();
        let piece = packed.narrow(0, start, len).and_then(|p| p.reshape(shape));
        start += len;
        piece
    })
}

/// The element types the kernels run on: f32 for training, f64 for the exact tests.
pub trait Real: Float + std::ops::AddAssign + Send + Sync + std::iter::Sum + 'static {
    /// erf: vectorisable for f32 ([`crate::ops::fastmath`], within 3e-7), exact for f64.
    /// `FMA`: fused multiply-adds (only in kernels compiled for them, see `kernel!`).
    fn erf<const FMA: bool>(self) -> Self;
    /// e^x: vectorisable for f32 ([`crate::ops::fastmath`]), exact for f64.
    fn fast_exp<const FMA: bool>(self) -> Self;
    /// The pool of freed buffers of this type.
    fn pool() -> &'static BufferPool<Self>;
}

impl Real for f32 {
    #[inline(always)]
    fn erf<const FMA: bool>(self) -> Self {
        crate::ops::fastmath::erf::<FMA>(self)
    }
    #[inline(always)]
    fn fast_exp<const FMA: bool>(self) -> Self {
        crate::ops::fastmath::exp::<FMA>(self)
    }
    fn pool() -> &'static BufferPool<Self> {
        static POOL: BufferPool<f32> = BufferPool::new();
        &POOL
    }
}

impl Real for f64 {
    #[inline(always)]
    fn erf<const FMA: bool>(self) -> Self {
        libm::erf(self)
    }
    #[inline(always)]
    fn fast_exp<const FMA: bool>(self) -> Self {
        self.exp()
    }
    fn pool() -> &'static BufferPool<Self> {
        static POOL: BufferPool<f64> = BufferPool::new();
        &POOL
    }
}

/// Freed work buffers kept for reuse. A training step fills the same few dozen
/// activation buffers of the same sizes every time; taken from here they are
/// overwritten as they are, where a fresh allocation would be zero-filled first (a
/// whole extra pass over memory).
pub struct BufferPool<T> {
    free: std::sync::Mutex<Vec<Vec<T>>>,
}

/// Buffers kept at most: more than one step's activations of the default model on
/// two lanes; beyond that, freed buffers go back to the allocator.
const POOLED_BUFFERS: usize = 256;

impl<T: Real> BufferPool<T> {
    const fn new() -> Self {
        Self {
            free: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A vector of at least `len` values with unspecified contents: the shortest free
    /// one that is long enough, else a new one. Vectors stay at their full length in
    /// the pool, so handing one out never writes to it.
    fn take(&self, len: usize) -> Vec<T> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = (free.iter().enumerate())
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        reused.unwrap_or_else(|| vec![T::zero(); len])
    }

    fn give(&self, buffer: Vec<T>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOLED_BUFFERS && !buffer.is_empty() {
            free.push(buffer);
        }
    }
}

/// `len` values of work memory from [`BufferPool`], which they go back to when
/// dropped.
struct Buffer<T: Real> {
    data: Vec<T>,
    len: usize,
}

impl<T: Real> Buffer<T> {
    fn new(len: usize) -> Self {
        Self {
            data: T::pool().take(len),
            len,
        }
    }
}

impl<T: Real> Drop for Buffer<T> {
    fn drop(&mut self) {
        T::pool().give(std::mem::take(&mut self.data));
    }
}

impl<T: Real> std::ops::Deref for Buffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data[..self.len]
    }
}

impl<T: Real> std::ops::DerefMut for Buffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data[..self.len]
    }
}

/// Runs `f(rows, out_rows)` over disjoint chunks of `rows` rows of `row_len` values
/// on the rayon pool that candle's matrix products run on, so the kernels and the
/// products share the same worker threads instead of two pools competing for the
/// cores; `out` holds `rows * row_len` values.
fn par_rows<T: Send + Sync>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    use rayon::prelude::*;
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    if rows == 0 {
        return;
    }
    // A few chunks per thread: balance without much scheduling overhead.
    let chunk_rows = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    if rows <= chunk_rows {
        f(0..rows, out);
        return;
    }
    out.par_chunks_mut(chunk_rows * row_len)
        .enumerate()
        .for_each(|(i, chunk)| {
            let start = i * chunk_rows;
            f(start..start + chunk.len() / row_len, chunk);
        });
}

/// Whether the kernels may use 256-bit vectors with FMA ([`cpu::level`], checked once).
fn wide_vectors() -> bool {
    cpu::level() >= cpu::Level::Avx2
}

/// Defines a kernel function compiled three times: for the baseline target (SSE2), for
/// AVX2 + FMA and for AVX-512, picked at run time ([`cpu::level`], which
/// `VITSCOPE_CPU` caps). The loops vectorise twice as wide in the second and again in
/// the third, and the body's `FMA` (a const generic it can pass on to [`Real::erf`]
/// and [`Real::fast_exp`]) is true in both, for fused multiply-adds.
macro_rules! kernel {
    ($(#[$meta:meta])* fn $name:ident<T: Real>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name<T: Real>($($arg: $ty),*) {
            #[inline(always)]
            fn body<T: Real, const FMA: bool>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn widest<T: Real>($($arg: $ty),*) {
                    body::<T, true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide<T: Real>($($arg: $ty),*) {
                    body::<T, true>($($arg),*)
                }
                if cpu::level() >= cpu::Level::Avx512 {
                    // SAFETY: taken only when the CPU has AVX-512 F, BW, DQ and VL.
                    unsafe { widest($($arg),*) };
                    return;
                }
                if wide_vectors() {
                    // SAFETY: taken only when the CPU has AVX2 and FMA.
                    unsafe { wide($($arg),*) };
                    return;
                }
            }
            body::<T, false>($($arg),*)
        }
    };
}

/// Rows per block for reductions over rows: each block sums into its own partial.
const BLOCK_ROWS: usize = 128;

/// Adds into `total` what `per_block(rows, partial)` sums into a zeroed partial of
/// `total.len()` values for each block of rows: the blocks run in parallel, their
/// partials are summed in order (deterministic for a given shape), then added.
fn add_row_sums<T: Real>(
    rows: usize,
    total: &mut [T],
    per_block: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    let len = total.len();
    let mut partials = vec![T::zero(); rows.div_ceil(BLOCK_ROWS) * len];
    par_rows(&mut partials, len, |block_range, out| {
        for (b, partial) in block_range.zip(out.chunks_exact_mut(len)) {
            per_block(b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(rows), partial);
        }
    });
    let mut sums = vec![T::zero(); len];
    add_partials(&mut sums, &partials);
    add_partials(total, &sums);
}

kernel! {
/// Adds each row of `src` into `partial` (rows of `partial.len()` values).
fn add_rows_chunk<T: Real>(src: &[T], partial: &mut [T]) {
    for row in src.chunks_exact(partial.len()) {
        for (p, &v) in partial.iter_mut().zip(row) {
            *p += v;
        }
    }
}
}

/// Adds each `total.len()`-long partial of `partials` into `total`, in order.
fn add_partials<T: Real>(total: &mut [T], partials: &[T]) {
    for partial in partials.chunks_exact(total.len()) {
        for (t, &p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
}

/// What a kernel returns: its output, or its output or an error.
trait KernelOutput<T> {
    fn into_result(self) -> Result<Vec<T>>;
}

impl<T> KernelOutput<T> for Vec<T> {
    fn into_result(self) -> Result<Vec<T>> {
        Ok(self)
    }
}

impl<T> KernelOutput<T> for Result<Vec<T>> {
    fn into_result(self) -> Result<Vec<T>> {
        self
    }
}

/// Runs a kernel on one, two or three contiguous inputs of one float type, f32 or
/// f64: `$f` is expanded once per type, so one closure serves both; it returns a
/// vector, or a `Result` of one ([`KernelOutput`]). Bails out of the calling function
/// (naming the op) on other types, mixed types, strided inputs or the kernel's error.
macro_rules! by_dtype {
    (@run $f:expr, $($input:expr),+) => {
        crate::ops::KernelOutput::into_result(($f)($($input),+))?
    };
    ($name:expr, $f:expr, ($s1:expr, $l1:expr)) => {
        match $s1 {
            CpuStorage::F32(a) => {
                CpuStorage::F32(by_dtype!(@run $f, contiguous(a, $l1, $name)?))
            }
            CpuStorage::F64(a) => {
                CpuStorage::F64(by_dtype!(@run $f, contiguous(a, $l1, $name)?))
            }
            _ => bail!("{}: expects f32 or f64", $name),
        }
    };
    ($name:expr, $f:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr)) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(by_dtype!(
                @run $f,
                contiguous(a, $l1, $name)?,
                contiguous(b, $l2, $name)?
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(by_dtype!(
                @run $f,
                contiguous(a, $l1, $name)?,
                contiguous(b, $l2, $name)?
            )),
            _ => bail!("{}: inputs must all be f32 or all f64", $name),
        }
    };
    ($name:expr, $f:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr)) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => {
                CpuStorage::F32(by_dtype!(
                    @run $f,
                    contiguous(a, $l1, $name)?,
                    contiguous(b, $l2, $name)?,
                    contiguous(c, $l3, $name)?
                ))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => {
                CpuStorage::F64(by_dtype!(
                    @run $f,
                    contiguous(a, $l1, $name)?,
                    contiguous(b, $l2, $name)?,
                    contiguous(c, $l3, $name)?
                ))
            }
            _ => bail!("{}: inputs must all be f32 or all f64", $name),
        }
    };
}

// The fused transformer block, built from the kernels below (declared after the
// macros above, which it uses).
mod attention;
mod bf16;
mod block;
pub mod cpu;
mod fastmath;
mod gemm;
mod linear;
pub mod peak;
mod products;
pub use attention::attention;
use attention::*;
pub use bf16::Kernel as Bf16Kernel;
pub use block::{block, BlockOutput, BlockShape, TILE_IMAGES};
pub use linear::linear;
use linear::*;
pub use products::{matmul_kind, matmul_short, time_products};

// ---------------------------------------------------------------- softmax

/// softmax(scale * x) over the last dimension.
#[derive(Debug, Clone, Copy)]
struct ScaledSoftmax {
    scale: f64,
}

/// Lanes for row reductions: independent accumulators let the compiler use vector
/// registers instead of one long chain of dependent scalar operations.
const LANES: usize = 8;

/// Maximum of a row (NaN-free input assumed, as softmax logits are).
#[inline(always)]
fn row_max<T: Real>(row: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// Sum of a row, in lanes.
#[inline(always)]
fn row_sum<T: Real>(row: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let tail = chunks.remainder().iter().fold(T::zero(), |s, &v| s + v);
    acc.iter().fold(tail, |s, &v| s + v)
}

fn softmax_rows<T: Real>(x: &[T], dim: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).expect("a float");
    let mut out = x.to_vec();
    par_rows(&mut out, dim, |_, rows| softmax_in_place(rows, dim, scale));
    out
}

kernel! {
/// Replaces each row of `dim` values x by softmax(scale · x).
fn softmax_in_place<T: Real>(rows: &mut [T], dim: usize, scale: T) {
    for row in rows.chunks_exact_mut(dim) {
        let max = row_max(row);
        for v in row.iter_mut() {
            *v = ((*v - max) * scale).fast_exp::<FMA>();
        }
        let inv = T::one() / row_sum(row);
        for v in row.iter_mut() {
            *v = *v * inv;
        }
    }
}
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = layout.dims().last().copied().unwrap_or(1).max(1);
        let scale = self.scale;
        let out = by_dtype!(
            self.name(),
            |x| softmax_rows(x, dim, scale),
            (storage, layout)
        );
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &grad,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// The softmax gradient from its output y and the incoming gradient g:
/// dx = s * y * (g - sum(g * y)) per row.
#[derive(Debug, Clone, Copy)]
struct SoftmaxGrad {
    scale: f64,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "scaled-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = l1.dims().last().copied().unwrap_or(1).max(1);
        fn run<T: Real>(y: &[T], g: &[T], dim: usize, scale: f64) -> Vec<T> {
            let s = T::from(scale).expect("a float");
            let mut out = g.to_vec();
            par_rows(&mut out, dim, |rows, dst| {
                softmax_grad_in_place(&y[rows.start * dim..rows.end * dim], dst, dim, s);
            });
            out
        }
        let scale = self.scale;
        let out = by_dtype!(
            self.name(),
            |y, g| run(y, g, dim, scale),
            (s1, l1),
            (s2, l2)
        );
        Ok((out, l1.shape().clone()))
    }
}

kernel! {
/// Replaces each row of the gradient `g` of y = softmax(s · x) by the gradient of x.
fn softmax_grad_in_place<T: Real>(y: &[T], g: &mut [T], dim: usize, s: T) {
    for (y, g) in y.chunks_exact(dim).zip(g.chunks_exact_mut(dim)) {
        let mut lanes = [T::zero(); LANES];
        let mut yc = y.chunks_exact(LANES);
        let mut gc = g.chunks_exact(LANES);
        for (yl, gl) in (&mut yc).zip(&mut gc) {
            for ((a, &y), &g) in lanes.iter_mut().zip(yl).zip(gl) {
                *a += y * g;
            }
        }
        let tail = yc
            .remainder()
            .iter()
            .zip(gc.remainder())
            .fold(T::zero(), |a, (&y, &g)| a + y * g);
        let dot = lanes.iter().fold(tail, |a, &v| a + v);
        for (g, &y) in g.iter_mut().zip(y) {
            *g = s * y * (*g - dot);
        }
    }
}
}

/// softmax(scale * x) over the last dimension, fused (keeps only its output for backward).
pub fn scaled_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ScaledSoftmax { scale })
}

// ---------------------------------------------------------------- layer norm

/// LayerNorm over the last dimension with gamma and beta.
#[derive(Debug, Clone, Copy)]
struct LayerNormOp {
    eps: f64,
}

/// Mean and 1 / sqrt(var + eps) of one row.
#[inline(always)]
fn row_moments<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from(row.len()).expect("a float");
    let mean = row_sum(row) / n;
    let var = lane_sum(row.len(), |i| (row[i] - mean) * (row[i] - mean)) / n;
    (mean, T::one() / (var + eps).sqrt())
}

/// Sum over i < len of `term(i)`, in lanes (see [`row_sum`]).
#[inline(always)]
fn lane_sum<T: Real>(len: usize, term: impl Fn(usize) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let full = len - len % LANES;
    for start in (0..full).step_by(LANES) {
        for (lane, a) in acc.iter_mut().enumerate() {
            *a += term(start + lane);
        }
    }
    let tail = (full..len).fold(T::zero(), |s, i| s + term(i));
    acc.iter().fold(tail, |s, &v| s + v)
}

fn layer_norm_rows<T: Real>(x: &[T], gamma: &[T], beta: &[T], eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    layer_norm_into(x, gamma, beta, eps, &mut out);
    out
}

/// LayerNorm of the rows of `x` into `out` (same length).
fn layer_norm_into<T: Real>(x: &[T], gamma: &[T], beta: &[T], eps: f64, out: &mut [T]) {
    let dim = gamma.len();
    let eps = T::from(eps).expect("a float");
    par_rows(out, dim, |rows, dst| {
        layer_norm_chunk(&x[rows.start * dim..rows.end * dim], dst, gamma, beta, eps);
    });
}

kernel! {
fn layer_norm_chunk<T: Real>(src: &[T], dst: &mut [T], gamma: &[T], beta: &[T], eps: T) {
    let dim = gamma.len();
    for (src, dst) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)) {
        let (mean, inv) = row_moments(src, eps);
        for (((d, &s), &g), &b) in dst.iter_mut().zip(src).zip(gamma).zip(beta) {
            *d = (s - mean) * inv * g + b;
        }
    }
}
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = l1.dims().last().copied().unwrap_or(0);
        if l2.shape().elem_count() != dim || l3.shape().elem_count() != dim {
            bail!("layer-norm: gamma and beta must have {dim} values");
        }
        let eps = self.eps;
        let out = by_dtype!(
            self.name(),
            |x, g, b| layer_norm_rows(x, g, b, eps),
            (s1, l1),
            (s2, l2),
            (s3, l3)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(
            &gamma.contiguous()?,
            &grad.contiguous()?,
            &LayerNormGrad { eps: self.eps },
        )?;
        let [dx, dgamma, dbeta] = unpack(&packed, [x.shape(), gamma.shape(), gamma.shape()]);
        Ok((Some(dx?), Some(dgamma?), Some(dbeta?)))
    }
}

/// LayerNorm's three gradients in one pass, packed as [dx, dgamma, dbeta]. With
/// x_hat = (x - mean) / sigma and gx = g * gamma:
/// dx = (gx - mean(gx) - x_hat * mean(gx * x_hat)) / sigma,
/// dgamma = sum over rows of g * x_hat, dbeta = sum over rows of g.
#[derive(Debug, Clone, Copy)]
struct LayerNormGrad {
    eps: f64,
}

fn layer_norm_grad<T: Real>(x: &[T], gamma: &[T], g: &[T], eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() + 2 * gamma.len()];
    let (dx, params) = out.split_at_mut(x.len());
    layer_norm_grads_into(x, gamma, g, eps, dx, params);
    out
}

/// LayerNorm's gradients for input rows `x` and output gradient `g`: dx is added
/// into `dx` (a residual stream's gradient can already be there), [dgamma | dbeta]
/// into `params`. One pass: blocks of rows in parallel, each adding its
/// rows' dgamma and dbeta into its own partial sums, summed in order at the end.
fn layer_norm_grads_into<T: Real>(
    x: &[T],
    gamma: &[T],
    g: &[T],
    eps: f64,
    dx: &mut [T],
    params: &mut [T],
) {
    use rayon::prelude::*;
    let dim = gamma.len();
    let rows = x.len() / dim.max(1);
    let eps = T::from(eps).expect("a float");
    let mut partials = vec![T::zero(); rows.div_ceil(BLOCK_ROWS) * 2 * dim];
    let block = BLOCK_ROWS * dim;
    dx.par_chunks_mut(block)
        .zip(partials.par_chunks_mut(2 * dim))
        .enumerate()
        .for_each(|(b, (dst, partial))| {
            let span = b * block..b * block + dst.len();
            layer_norm_grad_chunk(&x[span.clone()], &g[span], gamma, dst, partial, eps);
        });
    add_partials(params, &partials);
}

kernel! {
/// For rows `x` and gradients `g`: adds dx into `dx`, and each row's g · x_hat and g
/// into `partial` = [dgamma | dbeta].
fn layer_norm_grad_chunk<T: Real>(
    x: &[T],
    g: &[T],
    gamma: &[T],
    dx: &mut [T],
    partial: &mut [T],
    eps: T,
) {
    let dim = gamma.len();
    let n = T::from(dim).expect("a float");
    let (dgamma, dbeta) = partial.split_at_mut(dim);
    for ((x, g), dx) in x
        .chunks_exact(dim)
        .zip(g.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
    {
        let (mean, inv) = row_moments(x, eps);
        let mean_gx = lane_sum(dim, |i| g[i] * gamma[i]) / n;
        let mean_gx_xhat = lane_sum(dim, |i| g[i] * gamma[i] * (x[i] - mean) * inv) / n;
        // Equal lengths, stated, so the loop runs without bounds checks.
        let (gamma, dgamma, dbeta) = (&gamma[..dim], &mut dgamma[..dim], &mut dbeta[..dim]);
        let (x, g, dx) = (&x[..dim], &g[..dim], &mut dx[..dim]);
        for i in 0..dim {
            let x_hat = (x[i] - mean) * inv;
            dx[i] += (g[i] * gamma[i] - mean_gx - x_hat * mean_gx_xhat) * inv;
            dgamma[i] += g[i] * x_hat;
            dbeta[i] += g[i];
        }
    }
}
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let dim = l2.shape().elem_count();
        let len = l1.shape().elem_count() + 2 * dim;
        let eps = self.eps;
        let out = by_dtype!(
            name,
            |x, gamma, g| layer_norm_grad(x, gamma, g, eps),
            (s1, l1),
            (s2, l2),
            (s3, l3)
        );
        Ok((out, Shape::from(len)))
    }
}

/// gamma * (x - mean) / sqrt(var + eps) + beta over the last dimension, fused.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps },
    )
}

// ---------------------------------------------------------------- GELU

/// GELU with the exact erf: x * Φ(x) = 0.5 x (1 + erf(x / √2)).
#[derive(Debug, Clone, Copy)]
struct Gelu;

/// Elements per chunk for element-wise kernels.
const ELEMENT_CHUNK: usize = 4096;

fn gelu_values<T: Real>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    gelu_into(x, &mut out);
    out
}

/// Runs an element-wise kernel over chunks of `out` in parallel: `f(span, dst)` fills
/// `dst` = `out[span]`.
fn par_elements<T: Send + Sync>(out: &mut [T], f: impl Fn(Range<usize>, &mut [T]) + Sync) {
    let len = out.len();
    let (whole, tail) = out.split_at_mut(len - len % ELEMENT_CHUNK);
    par_rows(whole, ELEMENT_CHUNK, |chunks, dst| {
        f(
            chunks.start * ELEMENT_CHUNK..chunks.end * ELEMENT_CHUNK,
            dst,
        )
    });
    f(len - tail.len()..len, tail);
}

fn gelu_into<T: Real>(x: &[T], out: &mut [T]) {
    par_elements(out, |span, dst| gelu_chunk(&x[span], dst));
}

/// g · GELU'(x) into `out`, with y = GELU(x).
fn gelu_grad_into<T: Real>(x: &[T], y: &[T], g: &[T], out: &mut [T]) {
    par_elements(out, |span, dst| {
        gelu_grad_chunk(&x[span.clone()], &y[span.clone()], &g[span], dst)
    });
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(self.name(), gelu_values, (storage, layout));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            res,
            &grad.contiguous()?,
            &GeluGrad,
        )?))
    }
}

/// g * GELU'(x) = g * (Φ(x) + x φ(x)), with Φ(x) = y / x from the forward output
/// y = x Φ(x): one exp instead of erf's two polynomials and exp again.
#[inline(always)]
fn gelu_grad_at<T: Real, const FMA: bool>(x: T, y: T, g: T) -> T {
    let half = T::from(0.5).expect("a float");
    let inv_sqrt_2pi = T::from(0.398_942_280_401_432_7).expect("a float");
    let cdf = if x == T::zero() { half } else { y / x };
    let pdf = inv_sqrt_2pi * (-half * x * x).fast_exp::<FMA>();
    g * (cdf + x * pdf)
}

/// GELU(x) = x Φ(x) = 0.5 x (1 + erf(x / √2)).
#[inline(always)]
fn gelu_at<T: Real, const FMA: bool>(x: T) -> T {
    let half = T::from(0.5).expect("a float");
    let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("a float");
    half * x * (T::one() + (x * inv_sqrt2).erf::<FMA>())
}

kernel! {
fn gelu_chunk<T: Real>(src: &[T], dst: &mut [T]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = gelu_at::<T, FMA>(v);
    }
}
}

kernel! {
fn gelu_grad_chunk<T: Real>(x: &[T], y: &[T], g: &[T], dst: &mut [T]) {
    for (((d, &x), &y), &g) in dst.iter_mut().zip(x).zip(y).zip(g) {
        *d = gelu_grad_at::<T, FMA>(x, y, g);
    }
}
}

/// GELU's gradient: g * (Φ(x) + x φ(x)).
#[derive(Debug, Clone, Copy)]
struct GeluGrad;

impl CustomOp3 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], y: &[T], g: &[T]) -> Vec<T> {
            let mut out = vec![T::zero(); x.len()];
            gelu_grad_into(x, y, g, &mut out);
            out
        }
        let out = by_dtype!(self.name(), run, (s1, l1), (s2, l2), (s3, l3));
        Ok((out, l1.shape().clone()))
    }
}

/// GELU (exact erf form), fused with a one-pass backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{layer_norm_composed, softmax_last_dim};
    use candle_core::{DType, Device, Var, D};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn fused_softmax_matches_the_composed_one_forward_and_backward() {
        let x = Var::from_tensor(&random(&[2, 3, 5, 7], 1)).unwrap();
        let weights = random(&[2, 3, 5, 7], 2);
        let scale = 0.37;
        let fused = scaled_softmax(x.as_tensor(), scale).unwrap();
        let composed = softmax_last_dim(&x.as_tensor().affine(scale, 0.0).unwrap()).unwrap();
        assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
        let g_fused = weighted_grads(fused, &weights);
        let g_comp = weighted_grads(composed, &weights);
        let (a, b) = (
            g_fused.get(x.as_tensor()).unwrap(),
            g_comp.get(x.as_tensor()).unwrap(),
        );
        assert_close(&values(a), &values(b), 1e-12, "gradient");
        // f32 works too.
        let y = scaled_softmax(&x.as_tensor().to_dtype(DType::F32).unwrap(), 1.0).unwrap();
        let sums: Vec<f32> = y
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_one_forward_and_backward() {
        let x = Var::from_tensor(&random(&[3, 4, 6], 3)).unwrap();
        let gamma = Var::from_tensor(&random(&[6], 4)).unwrap();
        let beta = Var::from_tensor(&random(&[6], 5)).unwrap();
        let weights = random(&[3, 4, 6], 6);
        let eps = 1e-5;
        let fused = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), eps).unwrap();
        let composed =
            layer_norm_composed(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), eps).unwrap();
        assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
        let g_fused = weighted_grads(fused, &weights);
        let g_comp = weighted_grads(composed, &weights);
        for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
            let (a, b) = (
                g_fused.get(v.as_tensor()).unwrap(),
                g_comp.get(v.as_tensor()).unwrap(),
            );
            assert_close(&values(a), &values(b), 1e-10, name);
        }
    }

    #[test]
    fn fused_layer_norm_gradient_matches_finite_differences() {
        let x0 = values(&random(&[2, 5], 7));
        let gamma = random(&[5], 8);
        let beta = random(&[5], 9);
        let weights = random(&[2, 5], 10);
        let loss = |x: &[f64]| -> f64 {
            let x = Tensor::from_vec(x.to_vec(), (2, 5), &Device::Cpu).unwrap();
            let y = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let x =
            Var::from_tensor(&Tensor::from_vec(x0.clone(), (2, 5), &Device::Cpu).unwrap()).unwrap();
        let y = layer_norm(x.as_tensor(), &gamma, &beta, 1e-5).unwrap();
        let grads = weighted_grads(y, &weights);
        let analytic = values(grads.get(x.as_tensor()).unwrap());
        for i in 0..x0.len() {
            let h = 1e-6;
            let (mut up, mut down) = (x0.clone(), x0.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (loss(&up) - loss(&down)) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{i}: {numeric} vs {}",
                analytic[i]
            );
        }
    }

    /// The gradients of sum(weights * y).
    pub(crate) fn weighted_grads(y: Tensor, weights: &Tensor) -> candle_core::backprop::GradStore {
        (y * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    /// d/dx of sum(weights * f(x)) by central differences, per element.
    pub(crate) fn numeric_gradient(
        x0: &[f64],
        shape: &[usize],
        f: impl Fn(&Tensor) -> Tensor,
        weights: &Tensor,
    ) -> Vec<f64> {
        let loss = |x: &[f64]| -> f64 {
            let x = Tensor::from_vec(x.to_vec(), shape, &Device::Cpu).unwrap();
            (f(&x) * weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        (0..x0.len())
            .map(|i| {
                let h = 1e-6;
                let (mut up, mut down) = (x0.to_vec(), x0.to_vec());
                up[i] += h;
                down[i] -= h;
                (loss(&up) - loss(&down)) / (2.0 * h)
            })
            .collect()
    }

    #[test]
    fn fused_gelu_matches_candle_and_finite_differences() {
        // Long enough to use the parallel chunks and the tail.
        let shape = [3, 4100];
        let x = Var::from_tensor(&random(&shape, 11)).unwrap();
        let weights = random(&shape, 12);
        let fused = gelu(x.as_tensor()).unwrap();
        let reference = x.as_tensor().gelu_erf().unwrap();
        assert_close(&values(&fused), &values(&reference), 1e-12, "forward");
        let g_fused = weighted_grads(fused, &weights);
        let g_ref = weighted_grads(reference, &weights);
        let analytic = values(g_fused.get(x.as_tensor()).unwrap());
        // candle's own GELU gradient is computed differently: equal to ~1e-8.
        assert_close(
            &analytic,
            &values(g_ref.get(x.as_tensor()).unwrap()),
            1e-6,
            "gradient",
        );
        let small = random(&[2, 5], 13);
        let w = random(&[2, 5], 14);
        let v = Var::from_tensor(&small).unwrap();
        let grads = weighted_grads(gelu(v.as_tensor()).unwrap(), &w);
        let numeric = numeric_gradient(&values(&small), &[2, 5], |t| gelu(t).unwrap(), &w);
        assert_close(
            &values(grads.get(v.as_tensor()).unwrap()),
            &numeric,
            1e-6,
            "finite differences",
        );
        // f32 uses the same erf as candle.
        let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
        let a: Vec<f32> = gelu(&x32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = x32
            .gelu_erf()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(a
            .iter()
            .zip(&b)
            .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs())));
    }

    #[test]
    fn column_sums_over_many_blocks_by_hand() {
        // 1000 rows of (r, r + 1, r + 2): more rows than one block, a partial last block.
        let rows: Vec<f64> = (0..1000)
            .flat_map(|r| [f64::from(r), f64::from(r) + 1.0, f64::from(r) + 2.0])
            .collect();
        // Added into what is there.
        let mut sums = vec![1.0, 2.0, 3.0];
        add_row_sums(1000, &mut sums, |range, partial| {
            add_rows_chunk(&rows[range.start * 3..range.end * 3], partial);
        });
        let expected: f64 = (0..1000).map(f64::from).sum();
        assert_eq!(
            sums,
            vec![expected + 1.0, expected + 1002.0, expected + 2003.0]
        );
    }

    #[test]
    fn fused_softmax_gradient_matches_finite_differences() {
        let x0 = random(&[2, 6], 18);
        let w = random(&[2, 6], 19);
        let v = Var::from_tensor(&x0).unwrap();
        let grads = weighted_grads(scaled_softmax(v.as_tensor(), 0.7).unwrap(), &w);
        let numeric = numeric_gradient(
            &values(&x0),
            &[2, 6],
            |t| scaled_softmax(t, 0.7).unwrap(),
            &w,
        );
        assert_close(
            &values(grads.get(v.as_tensor()).unwrap()),
            &numeric,
            1e-6,
            "finite differences",
        );
    }

    /// Attention op by op, with candle's composed softmax: the reference.
    fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (b, t, c3) = qkv.dims3().unwrap();
        let hd = c3 / 3 / heads;
        let qkv = qkv
            .reshape((b, t, 3, heads, hd))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let part = |i: usize| qkv.get(i).unwrap().contiguous().unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        let scores = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .affine(scale, 0.0)
            .unwrap();
        softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, c3 / 3))
            .unwrap()
    }

    #[test]
    fn fused_attention_matches_the_composed_one_forward_and_backward() {
        // 3 images, 7 tokens, 2 heads of 5: enough to exercise every stride.
        let qkv = Var::from_tensor(&random(&[3, 7, 30], 21)).unwrap();
        let weights = random(&[3, 7, 10], 22);
        let scale = 1.0 / 5f64.sqrt();
        let fused = attention(qkv.as_tensor(), 2, scale, false).unwrap();
        let composed = attention_composed(qkv.as_tensor(), 2, scale);
        assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
        let g_fused = weighted_grads(fused, &weights);
        let g_comp = weighted_grads(composed, &weights);
        assert_close(
            &values(g_fused.get(qkv.as_tensor()).unwrap()),
            &values(g_comp.get(qkv.as_tensor()).unwrap()),
            1e-10,
            "gradient",
        );
        // Finite differences on a small case.
        let small = random(&[1, 3, 12], 23);
        let w = random(&[1, 3, 4], 24);
        let v = Var::from_tensor(&small).unwrap();
        let grads = weighted_grads(attention(v.as_tensor(), 2, 0.7, false).unwrap(), &w);
        let numeric = numeric_gradient(
            &values(&small),
            &[1, 3, 12],
            |t| attention(t, 2, 0.7, false).unwrap(),
            &w,
        );
        assert_close(
            &values(grads.get(v.as_tensor()).unwrap()),
            &numeric,
            1e-6,
            "finite differences",
        );
        // f32 agrees with f64 to f32 precision.
        let f32_out = attention(
            &qkv.as_tensor().to_dtype(DType::F32).unwrap(),
            2,
            scale,
            false,
        )
        .unwrap();
        assert_close(
            &values(&f32_out),
            &values(&attention_composed(qkv.as_tensor(), 2, scale)),
            1e-5,
            "f32",
        );
        assert!(
            attention(&random(&[2, 3, 10], 1), 2, 1.0, false).is_err(),
            "10 values do not split into 3 x 2 heads"
        );
        assert!(
            attention(&random(&[2, 0, 12], 1), 2, 1.0, false).is_err(),
            "no tokens"
        );
    }

    #[test]
    fn fused_linear_matches_product_plus_bias_forward_and_backward() {
        let x = Var::from_tensor(&random(&[3, 5, 7], 31)).unwrap();
        let w = Var::from_tensor(&random(&[4, 7], 32)).unwrap();
        let b = Var::from_tensor(&random(&[4], 33)).unwrap();
        let weights = random(&[3, 5, 4], 34);
        let fused = linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), false).unwrap();
        let reference = crate::model::Linear {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            bf16: false,
        };
        let composed = reference.forward_composed(x.as_tensor()).unwrap();
        assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
        let g_fused = weighted_grads(fused, &weights);
        let g_comp = weighted_grads(composed, &weights);
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            assert_close(
                &values(g_fused.get(v.as_tensor()).unwrap()),
                &values(g_comp.get(v.as_tensor()).unwrap()),
                1e-12,
                name,
            );
        }
        // Finite differences for the weight.
        let w0 = random(&[4, 7], 32);
        let numeric = numeric_gradient(
            &values(&w0),
            &[4, 7],
            |t| linear(x.as_tensor(), t, b.as_tensor(), false).unwrap(),
            &weights,
        );
        assert_close(
            &values(g_fused.get(w.as_tensor()).unwrap()),
            &numeric,
            1e-6,
            "finite differences",
        );
        assert!(linear(x.as_tensor(), &random(&[4, 6], 1), b.as_tensor(), false).is_err());
    }

    #[test]
    fn the_buffer_pool_hands_out_the_shortest_free_buffer_that_fits() {
        let pool = BufferPool::<f64>::new();
        for len in [30, 10, 20] {
            pool.give(vec![len as f64; len]);
        }
        // Handed out as they are (no zero fill), at their full length.
        assert_eq!(pool.take(15), vec![20.0; 20]);
        assert_eq!(pool.take(5), vec![10.0; 10]);
        assert_eq!(pool.take(31), vec![0.0; 31], "none fits: a new one");
        assert_eq!(pool.take(30).len(), 30);
        assert!(pool.free.lock().unwrap().is_empty());
    }

    #[test]
    fn mismatched_inputs_are_errors_not_panics() {
        let x = random(&[2, 5], 1);
        assert!(layer_norm(&x, &random(&[4], 2), &random(&[5], 3), 1e-5).is_err());
        let ints = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
        assert!(scaled_softmax(&ints, 1.0).is_err());
    }
}
