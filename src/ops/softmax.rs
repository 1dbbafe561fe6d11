//! The fused softmax(scale · x) over the last dimension and its backward: one pass
//! each, keeping only the output for the backward (the composed softmax in `model.rs`
//! keeps four tensors). Also the lane-wise row reductions the other kernels reuse.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::kernel::{par_rows, Real};

/// softmax(scale * x) over the last dimension.
#[derive(Debug, Clone, Copy)]
pub(super) struct ScaledSoftmax {
    scale: f64,
}

/// Lanes for row reductions: independent accumulators let the compiler use vector
/// registers instead of one long chain of dependent scalar operations.
pub(super) const LANES: usize = 8;

/// Maximum of a row (NaN-free input assumed, as softmax logits are).
#[inline(always)]
pub(super) fn row_max<T: Real>(row: &[T]) -> T {
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

/// Sum of a row, in lanes ([`lane_sum`] of the values themselves).
#[inline(always)]
pub(super) fn row_sum<T: Real>(row: &[T]) -> T {
    lane_sum([row, row, row], |v, _, _| v)
}

/// Sum over i of `term(a[i], b[i], c[i])` (b and c as long as a at least), in
/// lanes: lane l adds the terms l, l + LANES, ..., then the tail and the lanes
/// are added in order. Whole chunks of slices, not indices, so that the compiler sees
/// no bounds to check and runs the lanes as one vector.
#[inline(always)]
pub(super) fn lane_sum<T: Real>([a, b, c]: [&[T]; 3], term: impl Fn(T, T, T) -> T) -> T {
    let len = a.len();
    let (b, c) = (&b[..len], &c[..len]);
    let mut acc = [T::zero(); LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tail = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .fold(T::zero(), |s, ((&a, &b), &c)| s + term(a, b, c));
    for ((ca, cb), cc) in ca.zip(cb).zip(cc) {
        for (lane, acc) in acc.iter_mut().enumerate() {
            *acc += term(ca[lane], cb[lane], cc[lane]);
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

pub(super) fn softmax_rows<T: Real>(x: &[T], dim: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).expect("a float");
    let mut out = x.to_vec();
    par_rows(&mut out, dim, |_, rows| softmax_in_place(rows, dim, scale));
    out
}

kernel! {
/// Replaces each row of `dim` values x by softmax(scale · x).
pub(super) fn softmax_in_place<T: Real>(rows: &mut [T], dim: usize, scale: T) {
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
pub(super) struct SoftmaxGrad {
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
pub(super) fn softmax_grad_in_place<T: Real>(y: &[T], g: &mut [T], dim: usize, s: T) {
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
