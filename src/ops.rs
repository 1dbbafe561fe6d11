//! Fused operations with forward and backward, as candle custom ops.
//!
//! Composed from small candle ops, a LayerNorm keeps six intermediate tensors alive in
//! the autograd graph and a softmax four, and each step of them is a pass over memory
//! with a fresh allocation; fused, each keeps only what its backward needs and runs
//! as one pass. Every kernel splits its rows over candle's own CPU workers (no second
//! thread pool competing for the cores). The composed versions stay in `model.rs` as
//! the reference the tests compare against (forward, gradients, finite differences).
//!
//! Backward passes are custom ops too ([`LayerNormGrad`], [`SoftmaxGrad`], [`GeluGrad`],
//! [`SumRows`]): candle's reductions over the batch dimension run element by element
//! on one thread, which made summing bias gradients the most expensive part of a step.

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

/// The element types the kernels run on: f32 for training, f64 for the exact tests.
pub trait Real: Float + std::ops::AddAssign + Send + Sync + std::iter::Sum + 'static {
    fn erf(self) -> Self;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

impl Real for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Real for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// A pointer the workers may share: each writes only its own disjoint rows.
struct SharedMut<T>(*mut T);
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    // A method, so closures capture the whole (Sync) wrapper, not the raw field.
    fn at(&self, offset: usize) -> *mut T {
        // SAFETY: callers stay within the slice the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// Runs `f(rows, out_rows)` over disjoint chunks of `rows` rows of `row_len` values
/// on candle's CPU workers; `out` holds `rows * row_len` values.
fn par_rows<T: Send + Sync>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let base = SharedMut(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        // SAFETY: the ranges execute_chunked hands out are disjoint and within `rows`,
        // so each chunk is a distinct part of `out`, which outlives the call.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(base.at(range.start * row_len), range.len() * row_len)
        };
        f(range, chunk);
    });
}

/// Rows per block for reductions over rows: each block sums into its own partial.
const BLOCK_ROWS: usize = 128;

/// Sums `per_block(rows) -> partial of len` over blocks of rows in parallel, then the
/// partials in order (deterministic for a given shape).
fn par_row_sums<T: Real>(
    rows: usize,
    len: usize,
    per_block: impl Fn(Range<usize>, &mut [T]) + Sync,
) -> Vec<T> {
    let blocks = rows.div_ceil(BLOCK_ROWS);
    let mut partials = vec![T::zero(); blocks * len];
    par_rows(&mut partials, len, |block_range, out| {
        for (b, partial) in block_range.zip(out.chunks_exact_mut(len)) {
            per_block(b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(rows), partial);
        }
    });
    let mut total = vec![T::zero(); len];
    for partial in partials.chunks_exact(len) {
        for (t, &p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    total
}

fn unary<T: Real>(
    s: &CpuStorage,
    l: &Layout,
    name: &str,
    f: impl Fn(&[T]) -> Vec<T>,
) -> Result<CpuStorage> {
    let Some(v) = T::slice(s) else {
        bail!("{name}: unexpected dtype")
    };
    Ok(T::wrap(f(contiguous(v, l, name)?)))
}

/// Dispatches an f32 / f64 kernel on one input.
macro_rules! by_dtype {
    ($s:expr, $l:expr, $name:expr, $f:expr) => {
        match $s {
            CpuStorage::F32(_) => unary::<f32>($s, $l, $name, $f),
            CpuStorage::F64(_) => unary::<f64>($s, $l, $name, $f),
            _ => bail!("{}: expects f32 or f64", $name),
        }
    };
}

/// Two inputs of the same float type, both contiguous.
fn pair<'a, T: Real>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    name: &str,
) -> Result<(&'a [T], &'a [T])> {
    match (T::slice(s1), T::slice(s2)) {
        (Some(a), Some(b)) => Ok((contiguous(a, l1, name)?, contiguous(b, l2, name)?)),
        _ => bail!("{name}: both inputs must be f32 or both f64"),
    }
}

// ---------------------------------------------------------------- softmax

/// softmax(scale * x) over the last dimension.
#[derive(Debug, Clone, Copy)]
struct ScaledSoftmax {
    scale: f64,
}

fn softmax_rows<T: Real>(x: &[T], dim: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).expect("a float");
    let mut out = vec![T::zero(); x.len()];
    par_rows(&mut out, dim, |rows, dst| {
        let src = &x[rows.start * dim..rows.end * dim];
        for (src, dst) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)) {
            let max = src.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
            let mut sum = T::zero();
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = ((s - max) * scale).exp();
                sum += *d;
            }
            let inv = T::one() / sum;
            for d in dst.iter_mut() {
                *d = *d * inv;
            }
        }
    });
    out
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = layout.dims().last().copied().unwrap_or(1).max(1);
        let scale = self.scale;
        let out = by_dtype!(storage, layout, self.name(), |x| softmax_rows(
            x, dim, scale
        ))?;
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
            let mut out = vec![T::zero(); y.len()];
            par_rows(&mut out, dim, |rows, dst| {
                let span = rows.start * dim..rows.end * dim;
                for ((y, g), d) in y[span.clone()]
                    .chunks_exact(dim)
                    .zip(g[span].chunks_exact(dim))
                    .zip(dst.chunks_exact_mut(dim))
                {
                    let dot = y.iter().zip(g).fold(T::zero(), |a, (&y, &g)| a + y * g);
                    for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                        *d = s * y * (g - dot);
                    }
                }
            });
            out
        }
        let out = match s1 {
            CpuStorage::F32(_) => {
                let (y, g) = pair::<f32>(s1, l1, s2, l2, self.name())?;
                CpuStorage::F32(run(y, g, dim, self.scale))
            }
            CpuStorage::F64(_) => {
                let (y, g) = pair::<f64>(s1, l1, s2, l2, self.name())?;
                CpuStorage::F64(run(y, g, dim, self.scale))
            }
            _ => bail!("{}: expects f32 or f64", self.name()),
        };
        Ok((out, l1.shape().clone()))
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
fn row_moments<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from(row.len()).expect("a float");
    let mean = row.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = row
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        / n;
    (mean, T::one() / (var + eps).sqrt())
}

fn layer_norm_rows<T: Real>(x: &[T], gamma: &[T], beta: &[T], eps: f64) -> Vec<T> {
    let dim = gamma.len();
    let eps = T::from(eps).expect("a float");
    let mut out = vec![T::zero(); x.len()];
    par_rows(&mut out, dim, |rows, dst| {
        let src = &x[rows.start * dim..rows.end * dim];
        for (src, dst) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)) {
            let (mean, inv) = row_moments(src, eps);
            for (i, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
                *d = (s - mean) * inv * gamma[i] + beta[i];
            }
        }
    });
    out
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
        let name = self.name();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                CpuStorage::F32(layer_norm_rows(
                    contiguous(x, l1, name)?,
                    contiguous(g, l2, name)?,
                    contiguous(b, l3, name)?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                CpuStorage::F64(layer_norm_rows(
                    contiguous(x, l1, name)?,
                    contiguous(g, l2, name)?,
                    contiguous(b, l3, name)?,
                    self.eps,
                ))
            }
            _ => bail!("layer-norm: x, gamma and beta must all be f32 or all f64"),
        };
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
        let dim = gamma.elem_count();
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(
            &gamma.contiguous()?,
            &grad.contiguous()?,
            &LayerNormGrad { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, dim)?.reshape(gamma.shape())?;
        let dbeta = packed.narrow(0, n + dim, dim)?.reshape(gamma.shape())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
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
    let dim = gamma.len();
    let rows = x.len() / dim.max(1);
    let eps = T::from(eps).expect("a float");
    let n = T::from(dim).expect("a float");
    let mut out = vec![T::zero(); x.len() + 2 * dim];
    let (dx, _) = out.split_at_mut(x.len());
    par_rows(dx, dim, |rows, dst| {
        let span = rows.start * dim..rows.end * dim;
        for ((x, g), d) in x[span.clone()]
            .chunks_exact(dim)
            .zip(g[span].chunks_exact(dim))
            .zip(dst.chunks_exact_mut(dim))
        {
            let (mean, inv) = row_moments(x, eps);
            let (mut sum_gx, mut sum_gx_xhat) = (T::zero(), T::zero());
            for i in 0..dim {
                let gx = g[i] * gamma[i];
                sum_gx += gx;
                sum_gx_xhat += gx * (x[i] - mean) * inv;
            }
            let (mean_gx, mean_gx_xhat) = (sum_gx / n, sum_gx_xhat / n);
            for i in 0..dim {
                let x_hat = (x[i] - mean) * inv;
                d[i] = (g[i] * gamma[i] - mean_gx - x_hat * mean_gx_xhat) * inv;
            }
        }
    });
    let sums = par_row_sums(rows, 2 * dim, |rows, partial| {
        let (dgamma, dbeta) = partial.split_at_mut(dim);
        for r in rows {
            let (x, g) = (&x[r * dim..(r + 1) * dim], &g[r * dim..(r + 1) * dim]);
            let (mean, inv) = row_moments(x, eps);
            for i in 0..dim {
                dgamma[i] += g[i] * (x[i] - mean) * inv;
                dbeta[i] += g[i];
            }
        }
    });
    out[x.len()..].copy_from_slice(&sums);
    out
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
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(gamma), CpuStorage::F32(g)) => {
                CpuStorage::F32(layer_norm_grad(
                    contiguous(x, l1, name)?,
                    contiguous(gamma, l2, name)?,
                    contiguous(g, l3, name)?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(gamma), CpuStorage::F64(g)) => {
                CpuStorage::F64(layer_norm_grad(
                    contiguous(x, l1, name)?,
                    contiguous(gamma, l2, name)?,
                    contiguous(g, l3, name)?,
                    self.eps,
                ))
            }
            _ => bail!("{name}: x, gamma and the gradient must all be f32 or all f64"),
        };
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

// ---------------------------------------------------------------- bias add

/// x + b with x of shape (rows, n) and b of shape (n).
#[derive(Debug, Clone, Copy)]
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l2.shape().elem_count();
        if l1.dims().last().copied() != Some(n) {
            bail!(
                "bias-add: the bias has {n} values, x rows have {:?}",
                l1.dims().last()
            );
        }
        fn run<T: Real>(x: &[T], b: &[T]) -> Vec<T> {
            let n = b.len();
            let mut out = vec![T::zero(); x.len()];
            par_rows(&mut out, n, |rows, dst| {
                let src = &x[rows.start * n..rows.end * n];
                for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                    for ((d, &s), &b) in d.iter_mut().zip(s).zip(b) {
                        *d = s + b;
                    }
                }
            });
            out
        }
        let out = match s1 {
            CpuStorage::F32(_) => {
                let (x, b) = pair::<f32>(s1, l1, s2, l2, self.name())?;
                CpuStorage::F32(run(x, b))
            }
            CpuStorage::F64(_) => {
                let (x, b) = pair::<f64>(s1, l1, s2, l2, self.name())?;
                CpuStorage::F64(run(x, b))
            }
            _ => bail!("bias-add: expects f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad
            .contiguous()?
            .apply_op1_no_bwd(&SumRows)?
            .reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// x + b over the last dimension (b has one value per column), fused; the bias
/// gradient is a parallel sum over rows.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

/// Sums over all leading dimensions: (..., n) -> (n).
#[derive(Debug, Clone, Copy)]
struct SumRows;

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let out = by_dtype!(storage, layout, self.name(), |x| {
            par_row_sums(x.len() / n, n, |rows, partial| {
                for row in x[rows.start * n..rows.end * n].chunks_exact(n) {
                    for (p, &v) in partial.iter_mut().zip(row) {
                        *p += v;
                    }
                }
            })
        })?;
        Ok((out, Shape::from(n)))
    }
}

/// Column sums of a (..., n) tensor (no gradient).
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SumRows)
}

// ---------------------------------------------------------------- GELU

/// GELU with the exact erf: x * Φ(x) = 0.5 x (1 + erf(x / √2)).
#[derive(Debug, Clone, Copy)]
struct Gelu;

/// Elements per chunk for element-wise kernels.
const ELEMENT_CHUNK: usize = 4096;

fn gelu_values<T: Real>(x: &[T]) -> Vec<T> {
    let half = T::from(0.5).expect("a float");
    let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("a float");
    let mut out = vec![T::zero(); x.len()];
    let len = out.len();
    par_rows(
        &mut out[..len - len % ELEMENT_CHUNK],
        ELEMENT_CHUNK,
        |chunks, dst| {
            let src = &x[chunks.start * ELEMENT_CHUNK..chunks.end * ELEMENT_CHUNK];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = half * v * (T::one() + (v * inv_sqrt2).erf());
            }
        },
    );
    for i in len - len % ELEMENT_CHUNK..len {
        out[i] = half * x[i] * (T::one() + (x[i] * inv_sqrt2).erf());
    }
    out
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(storage, layout, self.name(), gelu_values)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// GELU's gradient: g * (Φ(x) + x φ(x)).
#[derive(Debug, Clone, Copy)]
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
            let half = T::from(0.5).expect("a float");
            let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("a float");
            let inv_sqrt_2pi = T::from(0.398_942_280_401_432_7).expect("a float");
            let f = |x: T, g: T| {
                let cdf = half * (T::one() + (x * inv_sqrt2).erf());
                let pdf = inv_sqrt_2pi * (-half * x * x).exp();
                g * (cdf + x * pdf)
            };
            let mut out = vec![T::zero(); x.len()];
            let len = out.len();
            par_rows(
                &mut out[..len - len % ELEMENT_CHUNK],
                ELEMENT_CHUNK,
                |chunks, dst| {
                    let span = chunks.start * ELEMENT_CHUNK..chunks.end * ELEMENT_CHUNK;
                    for ((d, &x), &g) in dst.iter_mut().zip(&x[span.clone()]).zip(&g[span]) {
                        *d = f(x, g);
                    }
                },
            );
            for i in len - len % ELEMENT_CHUNK..len {
                out[i] = f(x[i], g[i]);
            }
            out
        }
        let out = match s1 {
            CpuStorage::F32(_) => {
                let (x, g) = pair::<f32>(s1, l1, s2, l2, self.name())?;
                CpuStorage::F32(run(x, g))
            }
            CpuStorage::F64(_) => {
                let (x, g) = pair::<f64>(s1, l1, s2, l2, self.name())?;
                CpuStorage::F64(run(x, g))
            }
            _ => bail!("gelu-grad: expects f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// GELU (exact erf form), fused with a one-pass backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

#[cfg(test)]
mod tests {
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
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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
        let grads = (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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

    /// d/dx of sum(weights * f(x)) by central differences, per element.
    fn numeric_gradient(
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
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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
        let grads = (gelu(v.as_tensor()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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
    fn fused_bias_add_matches_broadcast_add_and_sums_rows_exactly() {
        let x = Var::from_tensor(&random(&[300, 7], 15)).unwrap();
        let b = Var::from_tensor(&random(&[7], 16)).unwrap();
        let weights = random(&[300, 7], 17);
        let fused = bias_add(x.as_tensor(), b.as_tensor()).unwrap();
        let reference = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
        assert_close(&values(&fused), &values(&reference), 0.0, "forward");
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("bias", &b)] {
            let (a, r) = (
                g_fused.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert_close(&values(a), &values(r), 1e-12, name);
        }
        // Column sums over several blocks of rows, by hand.
        let rows: Vec<f64> = (0..1000 * 3)
            .map(|i| (i % 3) as f64 + (i / 3) as f64)
            .collect();
        let t = Tensor::from_vec(rows, (10, 100, 3), &Device::Cpu).unwrap();
        let expected: f64 = (0..1000).map(f64::from).sum();
        assert_eq!(
            values(&sum_rows(&t).unwrap()),
            vec![expected, expected + 1000.0, expected + 2000.0]
        );
        assert!(bias_add(x.as_tensor(), &random(&[6], 1)).is_err());
    }

    #[test]
    fn fused_softmax_gradient_matches_finite_differences() {
        let x0 = random(&[2, 6], 18);
        let w = random(&[2, 6], 19);
        let v = Var::from_tensor(&x0).unwrap();
        let grads = (scaled_softmax(v.as_tensor(), 0.7).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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

    #[test]
    fn mismatched_inputs_are_errors_not_panics() {
        let x = random(&[2, 5], 1);
        assert!(layer_norm(&x, &random(&[4], 2), &random(&[5], 3), 1e-5).is_err());
        let ints = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
        assert!(scaled_softmax(&ints, 1.0).is_err());
    }
}
