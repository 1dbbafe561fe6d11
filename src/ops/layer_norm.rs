//! The fused LayerNorm over the last dimension and its backward (input, gamma and beta
//! gradients in one op): one pass forward, one backward, where the composed LayerNorm
//! in `model/norm.rs` keeps six intermediate tensors alive.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use std::ops::Range;

use super::kernel::{add_partials, par_rows, par_rows_with, unpack, Real, BLOCK_ROWS};
use super::softmax::{lane_sum, row_sum};

/// LayerNorm over the last dimension with gamma and beta.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerNormOp {
    eps: f64,
}

/// Mean and 1 / sqrt(var + eps) of one row.
#[inline(always)]
pub(super) fn row_moments<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from(row.len()).expect("a float");
    let mean = row_sum(row) / n;
    let var = lane_sum([row, row, row], |v, _, _| (v - mean) * (v - mean)) / n;
    (mean, T::one() / (var + eps).sqrt())
}

pub(super) fn layer_norm_rows<T: Real>(x: &[T], gamma: &[T], beta: &[T], eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    layer_norm_into(x, gamma, beta, eps, &mut out, None);
    out
}

/// LayerNorm of the rows of `x` into `out` (same length), and each row's mean and
/// 1 / sqrt(var + eps) into `moments` (two values per row) when asked: what the
/// backward pass would otherwise compute again, in two more passes over each row.
pub(super) fn layer_norm_into<T: Real>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
    out: &mut [T],
    moments: Option<&mut [T]>,
) {
    let dim = gamma.len();
    let eps = T::from(eps).expect("a float");
    let src = |rows: Range<usize>| &x[rows.start * dim..rows.end * dim];
    match moments {
        None => par_rows(out, dim, |rows, dst| {
            layer_norm_chunk(src(rows), dst, gamma, beta, &mut [], eps);
        }),
        Some(moments) => par_rows_with((out, dim), (moments, 2), |rows, dst, moments| {
            layer_norm_chunk(src(rows), dst, gamma, beta, moments, eps);
        }),
    }
}

kernel! {
/// `moments`: each row's (mean, 1 / sqrt(var + eps)) written there, unless empty.
pub(super) fn layer_norm_chunk<T: Real>(
    src: &[T],
    dst: &mut [T],
    gamma: &[T],
    beta: &[T],
    moments: &mut [T],
    eps: T,
) {
    let dim = gamma.len();
    for (r, (src, dst)) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)).enumerate() {
        let (mean, inv) = row_moments(src, eps);
        if !moments.is_empty() {
            moments[2 * r] = mean;
            moments[2 * r + 1] = inv;
        }
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
pub(super) struct LayerNormGrad {
    eps: f64,
}

pub(super) fn layer_norm_grad<T: Real>(x: &[T], gamma: &[T], g: &[T], eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() + 2 * gamma.len()];
    let (dx, params) = out.split_at_mut(x.len());
    layer_norm_grads_into(x, gamma, g, eps, (dx, params), None);
    out
}

/// LayerNorm's gradients for input rows `x` and output gradient `g`: dx is added
/// into `dx` (a residual stream's gradient can already be there), [dgamma | dbeta]
/// into `params`. One pass: blocks of rows in parallel, each adding its
/// rows' dgamma and dbeta into its own partial sums, summed in order at the end.
/// `moments`: each row's mean and 1 / sqrt(var + eps) as the forward pass wrote them
/// ([`layer_norm_into`]), or None to compute them again (the same values).
pub(super) fn layer_norm_grads_into<T: Real>(
    x: &[T],
    gamma: &[T],
    g: &[T],
    eps: f64,
    (dx, params): (&mut [T], &mut [T]),
    moments: Option<&[T]>,
) {
    use rayon::prelude::*;
    let dim = gamma.len();
    let rows = x.len() / dim.max(1);
    if let Some(moments) = moments {
        assert_eq!(
            moments.len(),
            2 * rows,
            "layer-norm-grad: two moments per row"
        );
    }
    let eps = T::from(eps).expect("a float");
    let mut partials = vec![T::zero(); rows.div_ceil(BLOCK_ROWS) * 2 * dim];
    let block = BLOCK_ROWS * dim;
    dx.par_chunks_mut(block)
        .zip(partials.par_chunks_mut(2 * dim))
        .enumerate()
        .for_each(|(b, (dst, partial))| {
            let span = b * block..b * block + dst.len();
            let rows = span.start / dim.max(1)..span.end / dim.max(1);
            let moments = moments.map_or(&[][..], |m| &m[2 * rows.start..2 * rows.end]);
            let (x, g) = (&x[span.clone()], &g[span]);
            layer_norm_grad_chunk(x, g, gamma, dst, partial, moments, eps);
        });
    add_partials(params, &partials);
}

kernel! {
/// For rows `x` and gradients `g`: adds dx into `dx`, and each row's g · x_hat and g
/// into `partial` = [dgamma | dbeta]. The rows' moments from `moments` (mean,
/// 1 / sqrt(var + eps) per row), or computed here where it is empty.
pub(super) fn layer_norm_grad_chunk<T: Real>(
    x: &[T],
    g: &[T],
    gamma: &[T],
    dx: &mut [T],
    partial: &mut [T],
    moments: &[T],
    eps: T,
) {
    let dim = gamma.len();
    let n = T::from(dim).expect("a float");
    let (dgamma, dbeta) = partial.split_at_mut(dim);
    for (r, ((x, g), dx)) in x
        .chunks_exact(dim)
        .zip(g.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
        .enumerate()
    {
        let (mean, inv) = match moments.is_empty() {
            true => row_moments(x, eps),
            false => (moments[2 * r], moments[2 * r + 1]),
        };
        let mean_gx = lane_sum([g, gamma, gamma], |g, gamma, _| g * gamma) / n;
        let mean_gx_xhat =
            lane_sum([g, gamma, x], |g, gamma, x| g * gamma * (x - mean) * inv) / n;
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
