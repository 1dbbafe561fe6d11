//! The fused exact GELU (erf form) and its backward, element-wise over chunks on the
//! rayon pool: candle's GELU runs on one thread and keeps its intermediates.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::kernel::{par_rows, Real};

/// GELU with the exact erf: x * Φ(x) = 0.5 x (1 + erf(x / √2)).
#[derive(Debug, Clone, Copy)]
pub(super) struct Gelu;

/// Elements per chunk for element-wise kernels.
pub(super) const ELEMENT_CHUNK: usize = 4096;

pub(super) fn gelu_values<T: Real>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    gelu_into(x, &mut out);
    out
}

/// Runs an element-wise kernel over chunks of `out` in parallel: `f(span, dst)` fills
/// `dst` = `out[span]`.
pub(super) fn par_elements<T: Send + Sync>(
    out: &mut [T],
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
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

pub(super) fn gelu_into<T: Real>(x: &[T], out: &mut [T]) {
    par_elements(out, |span, dst| gelu_chunk(&x[span], dst));
}

/// g · GELU'(x) into `out`, with y = GELU(x).
pub(super) fn gelu_grad_into<T: Real>(x: &[T], y: &[T], g: &[T], out: &mut [T]) {
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
pub(super) fn gelu_grad_at<T: Real, const FMA: bool>(x: T, y: T, g: T) -> T {
    let half = T::from(0.5).expect("a float");
    let inv_sqrt_2pi = T::from(0.398_942_280_401_432_7).expect("a float");
    let cdf = if x == T::zero() { half } else { y / x };
    let pdf = inv_sqrt_2pi * (-half * x * x).fast_exp::<FMA>();
    g * (cdf + x * pdf)
}

/// GELU(x) = x Φ(x) = 0.5 x (1 + erf(x / √2)).
#[inline(always)]
pub(super) fn gelu_at<T: Real, const FMA: bool>(x: T) -> T {
    let half = T::from(0.5).expect("a float");
    let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("a float");
    half * x * (T::one() + (x * inv_sqrt2).erf::<FMA>())
}

kernel! {
pub(super) fn gelu_chunk<T: Real>(src: &[T], dst: &mut [T]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = gelu_at::<T, FMA>(v);
    }
}
}

kernel! {
pub(super) fn gelu_grad_chunk<T: Real>(x: &[T], y: &[T], g: &[T], dst: &mut [T]) {
    for (((d, &x), &y), &g) in dst.iter_mut().zip(x).zip(y).zip(g) {
        *d = gelu_grad_at::<T, FMA>(x, y, g);
    }
}
}

/// GELU's gradient: g * (Φ(x) + x φ(x)).
#[derive(Debug, Clone, Copy)]
pub(super) struct GeluGrad;

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
