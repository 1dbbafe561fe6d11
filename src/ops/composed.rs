//! The fused ops' references, composed from candle's own ops so that candle's autograd
//! differentiates them: the tests hold every fused kernel to these (forward, gradients,
//! finite differences), and where no fused op exists the model uses them directly (the
//! loss's log-softmax, the probes' softmax over logits).

use candle_core::{Result, Tensor, D};

/// Softmax over the last dimension composed from candle ops (the max is a constant
/// shift): the reference for the fused [`crate::ops::scaled_softmax`].
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// log(softmax(x)) over the last dimension, differentiable.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}
/// LayerNorm composed from candle ops: the reference for the fused [`crate::ops::layer_norm`].
pub fn layer_norm_composed(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    normed.broadcast_mul(gamma)?.broadcast_add(beta)
}

/// y = x Wᵀ + b op by op (one 2-D product over all leading dimensions, then the bias):
/// the reference for [`super::linear`].
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim;
    let y = x
        .reshape((rows, in_dim))?
        .matmul(&weight.t()?)?
        .broadcast_add(bias)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("at least one dimension") = weight.dim(0)?;
    y.reshape(out_dims)
}

/// Newton-Schulz iterations X ← a·X + (b·A + c·A²)·X, A = X Xᵀ, on a stack of
/// matrices by candle's batched products: the reference for
/// [`crate::ops::newton_schulz`] (and how Muon ran them before it).
pub fn newton_schulz(x: &Tensor, steps: usize, (a, b, c): (f64, f64, f64)) -> Result<Tensor> {
    let mut x = x.clone();
    for _ in 0..steps {
        let xx = x.matmul(&x.transpose(1, 2)?)?;
        let poly = (xx.affine(b, 0.0)? + xx.matmul(&xx)?.affine(c, 0.0)?)?;
        x = (x.affine(a, 0.0)? + poly.matmul(&x)?)?;
    }
    Ok(x)
}
