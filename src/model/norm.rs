//! The normalisation layers: LayerNorm (a fused op with its own backward) and RMSNorm
//! (composed from candle ops, so autograd differentiates it), and the composed
//! LayerNorm the fused one is checked against. Where a variant has no norm, the
//! captures still record the residual stream at its place ([`record_residual`]).

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::capture::Capture;
use crate::config::NormKind;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub gamma: Tensor,
    /// The shift; RMSNorm has none.
    pub beta: Option<Tensor>,
    pub eps: f64,
    pub kind: NormKind,
}

impl LayerNorm {
    pub(super) fn new(vb: &VarBuilder, dim: usize, eps: f64, kind: NormKind) -> Result<Self> {
        let beta = match kind {
            NormKind::LayerNorm => Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            NormKind::RmsNorm => None,
        };
        Ok(Self {
            gamma: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            beta,
            eps,
            kind,
        })
    }

    pub(super) fn detached(&self) -> Self {
        Self {
            gamma: self.gamma.detach(),
            beta: self.beta.as_ref().map(Tensor::detach),
            eps: self.eps,
            kind: self.kind,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.kind, &self.beta) {
            (NormKind::LayerNorm, Some(beta)) => {
                crate::ops::layer_norm(x, &self.gamma, beta, self.eps)
            }
            _ => rms_norm(x, &self.gamma, self.eps),
        }
    }

    pub(super) fn forward_captured(
        &self,
        x: &Tensor,
        capture: Option<&mut Capture>,
    ) -> Result<Tensor> {
        let y = self.forward(x)?;
        if let Some(c) = capture {
            c.ln_inputs.push(x.detach());
            c.ln_outputs.push(y.detach());
        }
        Ok(y)
    }
}

/// `norm` of `x` when there is one; without, `x` itself, recorded at the norm's place
/// (input = output: the residual stream), so every tab finds the same places.
pub(super) fn norm_or_residual(
    norm: Option<&LayerNorm>,
    x: &Tensor,
    capture: Option<&mut Capture>,
) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward_captured(x, capture),
        None => {
            record_residual(x, capture);
            Ok(x.clone())
        }
    }
}

fn record_residual(x: &Tensor, capture: Option<&mut Capture>) {
    if let Some(c) = capture {
        c.ln_inputs.push(x.detach());
        c.ln_outputs.push(x.detach());
    }
}

/// RMSNorm over the last dimension, composed (differentiable by candle's autograd).
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&mean_square.affine(1.0, eps)?.sqrt()?)?
        .broadcast_mul(gamma)
}
