//! One transformer block and its layers (linear maps, multi-head self-attention, the
//! MLP), each with its fused forward and, beside it, the composed forward the fused
//! ops are checked against and the probes record through; and where the norms sit
//! (`model.norm`: pre, post or none).

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::capture::Capture;
use super::norm::{norm_or_residual, LayerNorm};
use crate::config::{AttentionKind, ModelConfig, NormKind, Placement};
use crate::ops::BlockOutput;

/// A linear map y = x W^T + b over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
    /// Whether the product multiplies bf16 factors (`model.matmul`; the blocks' layers).
    pub bf16: bool,
}

impl Linear {
    pub(super) fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize, bf16: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?,
            bias: vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?,
            bf16,
        })
    }

    pub(super) fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            bf16: self.bf16,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear(x, &self.weight, &self.bias, self.bf16)
    }

    /// The same op by op: the reference for [`crate::ops::linear`].
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::composed::linear(x, &self.weight, &self.bias)
    }
}

/// Multi-head self-attention with its weights computed explicitly.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub heads: usize,
    pub head_dim: usize,
    /// Whether QKᵀ and PV multiply bf16 factors (`model.matmul`).
    pub bf16: bool,
    /// Locality self-attention (`model.attention = "lsa"`): each head's learned scale
    /// of Q Kᵀ, (heads); the diagonal is masked then. None: 1/√d_k, nothing masked.
    pub scale: Option<Tensor>,
}

impl Attention {
    pub(super) fn new(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let bf16 = cfg.bf16();
        Ok(Self {
            qkv: Linear::new(&vb.pp("qkv"), cfg.dim, 3 * cfg.dim, bf16)?,
            proj: Linear::new(&vb.pp("proj"), cfg.dim, cfg.dim, bf16)?,
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
            bf16,
            scale: match cfg.attention {
                AttentionKind::Standard => None,
                AttentionKind::Locality => {
                    Some(vb.get_with_hints(cfg.heads, "scale", Init::Const(0.0))?)
                }
            },
        })
    }

    /// The fixed scale of Q Kᵀ without locality self-attention: 1/√d_k.
    pub fn fixed_scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// Sets where the products multiply bf16 factors: QKᵀ, PV and both layers.
    pub fn set_bf16(&mut self, bf16: bool) {
        (self.bf16, self.qkv.bf16, self.proj.bf16) = (bf16, bf16, bf16);
    }

    pub(super) fn forward(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let y = match (capture, &self.scale) {
            // Probes record the weights: the composed form computes them explicitly.
            // Locality self-attention runs fused only inside the fused block.
            (Some(c), _) => self.heads_composed(&qkv, Some(c))?,
            (None, Some(_)) => self.heads_composed(&qkv, None)?,
            (None, None) => crate::ops::attention(&qkv, self.heads, self.fixed_scale(), self.bf16)?,
        };
        self.proj.forward(&y)
    }

    /// softmax(QKᵀ/√d_k)V per head from the packed projections, op by op (with
    /// locality self-attention softmax(s_h · QKᵀ, own token masked)V): the reference for
    /// [`crate::ops::attention`] and the fused block's, and what probes use to record
    /// weights.
    pub fn heads_composed(&self, qkv: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        let (b, t, c3) = qkv.dims3()?;
        let qkv = qkv
            .reshape((b, t, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?; // (3, B, H, T, hd)
                                        // With bf16 products the factors are rounded as the fused op rounds them (f32
                                        // values only; f64 stays the exact reference).
        let round = |x: Tensor| -> Result<Tensor> {
            match self.bf16 && x.dtype() == DType::F32 {
                true => x.to_dtype(DType::BF16)?.to_dtype(DType::F32),
                false => Ok(x),
            }
        };
        let q = round(qkv.get(0)?.contiguous()?)?;
        let k = round(qkv.get(1)?.contiguous()?)?;
        let v = round(qkv.get(2)?.contiguous()?)?;
        // (B, H, T, T): row i = where query i looks. The 1/sqrt(d_k) is applied inside.
        let scores = q.matmul(&k.t()?)?;
        let weights = match &self.scale {
            None => crate::ops::scaled_softmax(&scores, self.fixed_scale())?,
            Some(scale) => {
                let z = scores.broadcast_mul(&scale.reshape((1, self.heads, 1, 1))?)?;
                let z = z.broadcast_add(&diagonal_mask(t, z.dtype())?)?;
                crate::ops::scaled_softmax(&z, 1.0)?
            }
        };
        if let Some(c) = capture {
            c.attention.push(weights.detach());
        }
        round(weights)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, c3 / 3))
    }
}

/// (T, T): −∞ on the diagonal (when there is another token to look at), else 0.
fn diagonal_mask(t: usize, dtype: DType) -> Result<Tensor> {
    let mask: Vec<f64> = (0..t * t)
        .map(|i| match i / t == i % t && t > 1 {
            true => f64::NEG_INFINITY,
            false => 0.0,
        })
        .collect();
    Tensor::from_vec(mask, (t, t), &candle_core::Device::Cpu)?.to_dtype(dtype)
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Fused GELU (exact erf, as candle's `gelu_erf`) with a one-pass backward.
        self.fc2.forward(&crate::ops::gelu(&self.fc1.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    /// None when `placement` is [`Placement::None`].
    pub norm1: Option<LayerNorm>,
    pub attn: Attention,
    pub norm2: Option<LayerNorm>,
    pub mlp: Mlp,
    pub placement: Placement,
}

impl Block {
    pub(super) fn new(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let placement = cfg.norm;
        let kind = cfg.norm_kind;
        let norm = |name: &str| -> Result<Option<LayerNorm>> {
            match placement {
                Placement::None => Ok(None),
                _ => LayerNorm::new(&vb.pp(name), cfg.dim, cfg.layer_norm_eps, kind).map(Some),
            }
        };
        Ok(Self {
            norm1: norm("norm1")?,
            attn: Attention::new(&vb.pp("attn"), cfg)?,
            norm2: norm("norm2")?,
            mlp: Mlp {
                fc1: Linear::new(&vb.pp("mlp").pp("fc1"), cfg.dim, cfg.mlp_dim, cfg.bf16())?,
                fc2: Linear::new(&vb.pp("mlp").pp("fc2"), cfg.mlp_dim, cfg.dim, cfg.bf16())?,
            },
            placement,
        })
    }

    /// Whether the fused block op computes this block: pre-norm LayerNorm only.
    pub fn is_fused(&self) -> bool {
        self.placement == Placement::Pre
            && [&self.norm1, &self.norm2]
                .iter()
                .all(|n| n.as_ref().is_some_and(|n| n.kind == NormKind::LayerNorm))
    }

    /// Sets whether every product in the block multiplies bf16 factors.
    pub fn set_bf16(&mut self, bf16: bool) {
        self.attn.set_bf16(bf16);
        (self.mlp.fc1.bf16, self.mlp.fc2.bf16) = (bf16, bf16);
    }

    /// The block as one fused op ([`crate::ops::block`]) where it can be, else layer by
    /// layer (variants, and when the probes capture what is inside).
    pub(super) fn forward(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        match capture {
            None if self.is_fused() => self.forward_fused(x, BlockOutput::AllTokens),
            capture => self.forward_ops(x, capture),
        }
    }

    /// The fused block, with every token's output or (the last block) only CLS's.
    pub fn forward_fused(&self, x: &Tensor, output: BlockOutput) -> Result<Tensor> {
        crate::ops::block(x, &self.packed_params()?, self.shape(), output)
    }

    pub fn shape(&self) -> crate::ops::BlockShape {
        crate::ops::BlockShape {
            dim: self.attn.proj.bias.elem_count(),
            heads: self.attn.heads,
            mlp_dim: self.mlp.fc1.bias.elem_count(),
            eps: self.norm1.as_ref().map_or(1e-5, |n| n.eps),
            bf16: self.attn.bf16,
            lsa: self.attn.scale.is_some(),
        }
    }

    /// The parameters in one vector, as [`crate::ops::BlockShape::param_lens`] orders
    /// them. The copy is differentiable: gradients flow back to each parameter. Only
    /// for a fused block (pre-norm LayerNorm).
    pub fn packed_params(&self) -> Result<Tensor> {
        let norm = |n: &Option<LayerNorm>| -> Result<(Tensor, Tensor)> {
            match n {
                Some(LayerNorm {
                    gamma,
                    beta: Some(beta),
                    ..
                }) => Ok((gamma.clone(), beta.clone())),
                _ => candle_core::bail!("only a pre-norm LayerNorm block runs fused"),
            }
        };
        let ((g1, b1), (g2, b2)) = (norm(&self.norm1)?, norm(&self.norm2)?);
        let linears = [
            &self.attn.qkv,
            &self.attn.proj,
            &self.mlp.fc1,
            &self.mlp.fc2,
        ];
        let [qkv_w, proj_w, fc1_w, fc2_w] = linears.map(|l| l.weight.flatten_all());
        let (qkv_w, proj_w, fc1_w, fc2_w) = (qkv_w?, proj_w?, fc1_w?, fc2_w?);
        let mut pieces = vec![
            &g1,
            &b1,
            &qkv_w,
            &self.attn.qkv.bias,
            &proj_w,
            &self.attn.proj.bias,
            &g2,
            &b2,
            &fc1_w,
            &self.mlp.fc1.bias,
            &fc2_w,
            &self.mlp.fc2.bias,
        ];
        pieces.extend(&self.attn.scale);
        Tensor::cat(&pieces, 0)
    }

    /// The block layer by layer (a fused op per layer), capturing the norms' inputs and
    /// outputs (the residual stream at their places without norms), attention weights
    /// and the output when asked: the reference for the fused block, what the probes
    /// run, and what the variants train with.
    pub fn forward_ops(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        self.forward_masked(x, capture, None)
    }

    /// [`Block::forward_ops`] with each image's attention and MLP branch scaled by
    /// `masks` ((B, 1, 1) each): stochastic depth.
    pub fn forward_masked(
        &self,
        x: &Tensor,
        mut capture: Option<&mut Capture>,
        masks: Option<&[Tensor; 2]>,
    ) -> Result<Tensor> {
        let (n1, n2) = (self.norm1.as_ref(), self.norm2.as_ref());
        let branch = |y: Tensor, k: usize| match masks {
            Some(m) => y.broadcast_mul(&m[k]),
            None => Ok(y),
        };
        let x = match self.placement {
            Placement::Pre | Placement::None => {
                let h = norm_or_residual(n1, x, capture.as_deref_mut())?;
                let x = (x + branch(self.attn.forward(&h, capture.as_deref_mut())?, 0)?)?;
                let h = norm_or_residual(n2, &x, capture.as_deref_mut())?;
                (&x + branch(self.mlp.forward(&h)?, 1)?)?
            }
            Placement::Post => {
                let a = (x + branch(self.attn.forward(x, capture.as_deref_mut())?, 0)?)?;
                let x = norm_or_residual(n1, &a, capture.as_deref_mut())?;
                let m = (&x + branch(self.mlp.forward(&x)?, 1)?)?;
                norm_or_residual(n2, &m, capture.as_deref_mut())?
            }
        };
        if let Some(c) = capture {
            c.hidden.push(x.detach());
        }
        Ok(x)
    }
}
