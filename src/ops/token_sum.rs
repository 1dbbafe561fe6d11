//! The sum over each sequence's tokens, (B, T, D) into (B, D): mean pooling's sum.
//! candle's sum over a middle dimension finds each value's destination with two
//! integer divisions, about 1% of a training step for a micro-batch's 196,608
//! additions. Here each image's rows are added in token order from zero, the order
//! candle adds them in, so the bits are the same; the gradient is candle's own (the
//! output's gradient broadcast over the tokens).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::kernel::{add_rows_chunk, Real};

#[derive(Debug, Clone, Copy)]
struct TokenSum;

/// Each of B images' T rows of D values summed in order (zeros where T is 0).
fn sum_tokens<T: Real>(x: &[T], (b, t, d): (usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::zero(); b * d];
    if t * d == 0 {
        return out;
    }
    for (sums, image) in out.chunks_exact_mut(d).zip(x.chunks_exact(t * d)) {
        add_rows_chunk(image, sums);
    }
    out
}

impl CustomOp1 for TokenSum {
    fn name(&self) -> &'static str {
        "token-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = layout.shape().dims3()?;
        let out = by_dtype!(self.name(), |x| sum_tokens(x, (b, t, d)), (storage, layout));
        Ok((out, Shape::from((b, d))))
    }

    fn bwd(&self, x: &Tensor, _sums: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.unsqueeze(1)?.broadcast_as(x.shape())?))
    }
}

/// The mean over the tokens of (B, T, D): (B, D), the same bits as `x.mean(1)`
/// (candle's sum, then times 1/T) forward and backward.
pub fn token_mean(x: &Tensor) -> Result<Tensor> {
    let scale = 1f64 / x.dim(1)? as f64;
    x.contiguous()?.apply_op1(TokenSum)? * scale
}
