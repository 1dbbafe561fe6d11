//! The Vision Transformer, written out explicitly so that what the dashboard shows is
//! what trains: one forward pass serves training, evaluation and the probes, and can
//! capture LayerNorm inputs and outputs, attention weights and hidden states on the way.
//!
//! Pre-norm blocks: x + MHSA(LN(x)), then x + MLP(LN(x)); a final LayerNorm; a linear
//! head on the CLS token (or on the mean of the patch tokens, `model.pool = "mean"`).
//! candle-nn 0.11's fused `softmax_last_dim` and `layer_norm` have no backward, so
//! LayerNorm and the attention softmax are our own fused ops with a backward
//! ([`crate::ops`]); their composed versions here are the reference. Without a capture,
//! each block runs as one fused op (`crate::ops::block`), checked against the same
//! block layer by layer (`Block::forward_ops`).

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{ModelConfig, CHANNELS, IMAGE_SIZE};
use crate::data::{mix_seed, NUM_CLASSES};
use crate::ops::BlockOutput;

mod drop_path;
mod norm;
pub use drop_path::{Branch, DropPath};
pub use norm::{layer_norm_composed, rms_norm, LayerNorm, NormKind};

/// Intermediate tensors recorded by a forward pass (all detached from the graph).
#[derive(Debug, Default)]
pub struct Capture {
    /// Inputs of each LayerNorm in order: block 0 norm1, block 0 norm2, ..., final norm; (B, T, D).
    pub ln_inputs: Vec<Tensor>,
    /// Outputs of the same LayerNorms; (B, T, D).
    pub ln_outputs: Vec<Tensor>,
    /// Attention weights softmax(QK^T / sqrt(d_k)) per block; (B, H, T, T).
    pub attention: Vec<Tensor>,
    /// The residual stream: after the embeddings, then after each block; (B, T, D).
    pub hidden: Vec<Tensor>,
}

/// A linear map y = x W^T + b over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
    /// Whether the product multiplies bf16 factors (`model.matmul`; the blocks' layers).
    pub bf16: bool,
}

impl Linear {
    fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize, bf16: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?,
            bias: vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?,
            bf16,
        })
    }

    fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            bf16: self.bf16,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear(x, &self.weight, &self.bias, self.bf16)
    }

    /// The same op by op (one 2-D product over all leading dimensions, then the bias):
    /// the reference for [`crate::ops::linear`].
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let y = x
            .reshape((rows, in_dim))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("at least one dimension") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

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

/// Multi-head self-attention with its weights computed explicitly.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub heads: usize,
    pub head_dim: usize,
    /// Whether QKᵀ and PV multiply bf16 factors (`model.matmul`).
    pub bf16: bool,
}

impl Attention {
    fn new(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let bf16 = cfg.bf16();
        Ok(Self {
            qkv: Linear::new(&vb.pp("qkv"), cfg.dim, 3 * cfg.dim, bf16)?,
            proj: Linear::new(&vb.pp("proj"), cfg.dim, cfg.dim, bf16)?,
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
            bf16,
        })
    }

    /// Sets where the products multiply bf16 factors: QKᵀ, PV and both layers.
    pub fn set_bf16(&mut self, bf16: bool) {
        (self.bf16, self.qkv.bf16, self.proj.bf16) = (bf16, bf16, bf16);
    }

    fn forward(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = match capture {
            // Probes record the weights: the composed form computes them explicitly.
            Some(c) => self.heads_composed(&qkv, scale, Some(c))?,
            None => crate::ops::attention(&qkv, self.heads, scale, self.bf16)?,
        };
        self.proj.forward(&y)
    }

    /// softmax(QKᵀ/√d_k)V per head from the packed projections, op by op: the
    /// reference for [`crate::ops::attention`], and what probes use to record weights.
    pub fn heads_composed(
        &self,
        qkv: &Tensor,
        scale: f64,
        capture: Option<&mut Capture>,
    ) -> Result<Tensor> {
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
        let weights = crate::ops::scaled_softmax(&q.matmul(&k.t()?)?, scale)?;
        if let Some(c) = capture {
            c.attention.push(weights.detach());
        }
        round(weights)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, c3 / 3))
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Fused GELU (exact erf, as candle's `gelu_erf`) with a one-pass backward.
        self.fc2.forward(&crate::ops::gelu(&self.fc1.forward(x)?)?)
    }
}

/// Where a block's norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// x + MHSA(norm1(x)), then x + MLP(norm2(x)): the ViT's.
    Pre,
    /// norm1(x + MHSA(x)), then norm2(x + MLP(x)): the original Transformer's.
    Post,
    /// x + MHSA(x), then x + MLP(x).
    None,
}

impl Placement {
    pub fn from_config(name: &str) -> Self {
        match name {
            "post" => Self::Post,
            "none" => Self::None,
            _ => Self::Pre,
        }
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
    fn new(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let placement = Placement::from_config(&cfg.norm);
        let kind = NormKind::from_config(&cfg.norm_kind);
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
    fn forward(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
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
        Tensor::cat(
            &[
                &g1,
                &b1,
                &qkv_w?,
                &self.attn.qkv.bias,
                &proj_w?,
                &self.attn.proj.bias,
                &g2,
                &b2,
                &fc1_w?,
                &self.mlp.fc1.bias,
                &fc2_w?,
                &self.mlp.fc2.bias,
            ],
            0,
        )
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
        use norm::norm_or_residual;
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

/// Cuts images (B, C, 32, 32) into flattened patches (B, N, p*p*C), patches in
/// row-major grid order, each flattened as (row, column, channel).
pub fn patchify(images: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let (gy, gx) = (h / patch, w / patch);
    images
        .reshape((b, c, gy, patch, gx, patch))?
        .permute((0, 2, 4, 3, 5, 1))?
        .reshape((b, gy * gx, patch * patch * c))
}

#[derive(Debug, Clone)]
pub struct VisionTransformer {
    pub config: ModelConfig,
    pub patch_embed: Linear,
    /// (1, 1, dim); none with `pool = "mean"`.
    pub cls_token: Option<Tensor>,
    /// (1, tokens, dim): learned (a variable), fixed sine-cosine, or none.
    pub pos_embed: Option<Tensor>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Linear,
}

impl VisionTransformer {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&vb.pp("blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let pos_embed = match cfg.pos_embed.as_str() {
            "none" => None,
            "sincos" => Some(
                Tensor::from_vec(
                    sincos_position_embedding(cfg),
                    (1, cfg.tokens(), cfg.dim),
                    vb.device(),
                )?
                .to_dtype(vb.dtype())?,
            ),
            _ => Some(vb.get_with_hints(
                (1, cfg.tokens(), cfg.dim),
                "pos_embed",
                Init::Const(0.0),
            )?),
        };
        Ok(Self {
            config: cfg.clone(),
            patch_embed: Linear::new(&vb.pp("patch_embed"), cfg.patch_values(), cfg.dim, false)?,
            cls_token: match cfg.has_cls() {
                true => Some(vb.get_with_hints((1, 1, cfg.dim), "cls_token", Init::Const(0.0))?),
                false => None,
            },
            pos_embed,
            blocks,
            norm: LayerNorm::new(
                &vb.pp("norm"),
                cfg.dim,
                cfg.layer_norm_eps,
                NormKind::from_config(&cfg.norm_kind),
            )?,
            head: Linear::new(&vb.pp("head"), cfg.dim, NUM_CLASSES, false)?,
        })
    }

    /// Whether every block runs as the fused op (the default model).
    pub fn is_fused(&self) -> bool {
        self.blocks.iter().all(Block::is_fused)
    }

    /// Logits (B, classes) for normalised images (B, 3, 32, 32).
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_with(images, None)
    }

    /// The forward pass, recording intermediate tensors into `capture` when given.
    pub fn forward_with(&self, images: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        self.forward_inner(images, capture, None)
    }

    /// The training forward pass of images `range` of a step's batch, with stochastic
    /// depth when `drop` is given: a block whose rate is above 0 runs layer by layer
    /// with its branches masked per image.
    pub fn forward_train(
        &self,
        images: &Tensor,
        drop: Option<&DropPath>,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        self.forward_inner(images, None, drop.map(|d| (d, range)))
    }

    fn forward_inner(
        &self,
        images: &Tensor,
        mut capture: Option<&mut Capture>,
        drop: Option<(&DropPath, std::ops::Range<usize>)>,
    ) -> Result<Tensor> {
        let b = images.dim(0)?;
        let patches = patchify(images, self.config.patch_size)?;
        let x = self.patch_embed.forward(&patches)?;
        let mut x = match &self.cls_token {
            Some(cls) => Tensor::cat(&[&cls.broadcast_as((b, 1, self.config.dim))?, &x], 1)?,
            None => x,
        };
        if let Some(pos) = &self.pos_embed {
            x = x.broadcast_add(pos)?;
        }
        if let Some(c) = capture.as_deref_mut() {
            c.hidden.push(x.detach());
        }
        let (depth, dtype) = (self.blocks.len(), x.dtype());
        let last = depth.saturating_sub(1);
        for (i, block) in self.blocks.iter().enumerate() {
            let dropping = drop
                .as_ref()
                .map(|(d, range)| (d, range, d.block_rate(i, depth)))
                .filter(|&(_, _, p)| p > 0.0);
            if let Some((d, range, p)) = dropping {
                let masks = [Branch::Attention, Branch::Mlp]
                    .map(|branch| d.mask((i, branch, p), range.clone(), dtype));
                let [a, m] = masks;
                x = block.forward_masked(&x, None, Some(&[a?, m?]))?;
                continue;
            }
            x = match capture.as_deref_mut() {
                // The head reads only CLS: the last block computes only what CLS needs.
                None if i == last && block.is_fused() && self.cls_token.is_some() => {
                    block.forward_fused(&x, BlockOutput::ClsOnly)?
                }
                capture => block.forward(&x, capture)?,
            };
        }
        let x = self.norm.forward_captured(&x, capture)?;
        let pooled = match self.cls_token {
            Some(_) => x.i((.., 0))?,
            None => x.mean(1)?,
        };
        self.head.forward(&pooled)
    }

    /// The same weights (shared storage) without gradient tracking: a forward pass
    /// through it keeps no graph, so evaluation and probes free each tensor at once.
    pub fn detached(&self) -> Self {
        Self {
            config: self.config.clone(),
            patch_embed: self.patch_embed.detached(),
            cls_token: self.cls_token.as_ref().map(Tensor::detach),
            pos_embed: self.pos_embed.as_ref().map(Tensor::detach),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    norm1: b.norm1.as_ref().map(LayerNorm::detached),
                    attn: Attention {
                        qkv: b.attn.qkv.detached(),
                        proj: b.attn.proj.detached(),
                        ..b.attn.clone()
                    },
                    norm2: b.norm2.as_ref().map(LayerNorm::detached),
                    mlp: Mlp {
                        fc1: b.mlp.fc1.detached(),
                        fc2: b.mlp.fc2.detached(),
                    },
                    placement: b.placement,
                })
                .collect(),
            norm: self.norm.detached(),
            head: self.head.detached(),
        }
    }

    /// The norms' places in capture order, with display names; `None` where a variant
    /// has no norm (the probes record the residual stream there).
    pub fn layer_norms(&self) -> Vec<(String, Option<&LayerNorm>)> {
        let kind = match self.norm.kind {
            NormKind::LayerNorm => "norm",
            NormKind::RmsNorm => "rmsnorm",
        };
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let (first, second) = match b.placement {
                Placement::Pre => ("1 (before attention)", "2 (before MLP)"),
                Placement::Post => ("1 (after attention + residual)", "2 (after MLP + residual)"),
                Placement::None => (
                    "1 place: no norm, residual stream before attention",
                    "2 place: no norm, residual stream before MLP",
                ),
            };
            out.push((format!("block {i} {kind}{first}"), b.norm1.as_ref()));
            out.push((format!("block {i} {kind}{second}"), b.norm2.as_ref()));
        }
        out.push((format!("final {kind} (before head)"), Some(&self.norm)));
        out
    }
}

/// The fixed 2-D sine-cosine position embedding (as in MAE): for a patch at (row, col),
/// the first half of the channels encode the row and the second the column, each as
/// sin and cos of the position at dim/4 frequencies 1/10000^(k/(dim/4)); CLS (if any)
/// gets zeros.
/// Row-major (tokens, dim).
pub fn sincos_position_embedding(cfg: &ModelConfig) -> Vec<f32> {
    let (d, grid) = (cfg.dim, cfg.grid());
    let quarter = (d / 4).max(1);
    let mut out = vec![0f32; cfg.tokens() * d];
    let first = usize::from(cfg.has_cls());
    for p in 0..grid * grid {
        let row = &mut out[(p + first) * d..(p + first + 1) * d];
        for (half, pos) in [(0, p / grid), (1, p % grid)] {
            for k in 0..quarter.min(d / 4) {
                let omega = 1.0 / 10000f64.powf(k as f64 / quarter as f64);
                let angle = pos as f64 * omega;
                row[half * d / 2 + k] = angle.sin() as f32;
                row[half * d / 2 + quarter + k] = angle.cos() as f32;
            }
        }
    }
    out
}

/// The model with its variables, created and initialised deterministically from a seed.
pub struct ModelState {
    pub varmap: VarMap,
    pub model: VisionTransformer,
}

impl ModelState {
    pub fn new(cfg: &ModelConfig, seed: u64, dtype: DType) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let model = VisionTransformer::new(cfg, vb)?;
        let state = Self { varmap, model };
        state.initialise(seed, cfg)?;
        Ok(state)
    }

    /// Variables sorted by name, so that every listing (optimizer, checkpoint) agrees.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    pub fn parameter_count(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// LayerNorm gamma 1, beta 0; position embedding and CLS token truncated-normal(0,
    /// init_std); linear layers by `cfg.init`: "trunc_normal" weights like those and zero
    /// biases (timm's ViT), or "pytorch": weights and biases uniform in ±1/√fan_in
    /// (nn.Linear's default, which starts each block's branch 2-4x larger and learns
    /// faster on CIFAR-10 in short runs). Seeded per variable, so it is reproducible.
    fn initialise(&self, seed: u64, cfg: &ModelConfig) -> Result<()> {
        let vars = self.named_vars();
        let pytorch = cfg.init == "pytorch";
        // A linear layer's fan-in, from its weight's shape (out, in), by the layer's prefix.
        let fan_in = |prefix: &str| {
            vars.iter()
                .find(|(n, _)| n.strip_suffix(".weight") == Some(prefix))
                .and_then(|(_, v)| v.dims().get(1).copied())
        };
        for (index, (name, var)) in vars.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(mix_seed(seed, 0x1417, index as u64));
            let is_norm = name.contains("norm");
            let prefix = name
                .strip_suffix(".weight")
                .or_else(|| name.strip_suffix(".bias"))
                .unwrap_or(name);
            let bound = fan_in(prefix).map(|f| 1.0 / (f as f64).sqrt());
            let values: Vec<f64> = match bound {
                _ if is_norm && name.ends_with("bias") => vec![0.0; var.elem_count()],
                _ if is_norm => vec![1.0; var.elem_count()],
                Some(bound) if pytorch => (0..var.elem_count())
                    .map(|_| rng.random_range(-bound..bound))
                    .collect(),
                _ if name.ends_with("bias") => vec![0.0; var.elem_count()],
                _ => (0..var.elem_count())
                    .map(|_| truncated_normal(&mut rng) * cfg.init_std)
                    .collect(),
            };
            let t = Tensor::from_vec(values, var.shape(), &Device::Cpu)?.to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }
}

/// A standard normal sample redrawn until it lies within two standard deviations.
fn truncated_normal(rng: &mut StdRng) -> f64 {
    loop {
        // Box-Muller.
        let u1: f64 = rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = rng.random();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        if z.abs() <= 2.0 {
            return z;
        }
    }
}

/// Mean cross-entropy against targets smoothed towards uniform by `smoothing`.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &[u32], smoothing: f64) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let off = smoothing / k as f64;
    let mut target = vec![off; b * k];
    for (row, &label) in labels.iter().enumerate() {
        target[row * k + label as usize] += 1.0 - smoothing;
    }
    let target = Tensor::from_vec(target, (b, k), logits.device())?.to_dtype(logits.dtype())?;
    let log_probs = log_softmax_last_dim(logits)?;
    (target * log_probs)?.sum(1)?.mean(0)?.neg()
}

/// What the forward and backward passes of one optimisation step produced.
pub struct StepResult {
    /// Mean loss over the batch.
    pub loss: f64,
    pub correct: usize,
    /// Gradients of the mean loss, one per variable (in the order given), detached.
    pub grads: Vec<Option<Tensor>>,
    pub forward_secs: f64,
    pub backward_secs: f64,
}

/// Thread pools that run micro-batches side by side, one lane per core (the default
/// batch of 128 in micro-batches of 32 is two rounds of two on 2 cores). Each lane is
/// single-threaded, with no synchronisation inside: at these sizes candle's per-op
/// parallel regions (a wake-up and a join per product and kernel) cost more than they
/// save, so two single-threaded micro-batches at once beat one two-threaded after the
/// other.
pub struct Workers {
    pools: Vec<rayon::ThreadPool>,
}

impl Workers {
    /// `threads` split over `lanes` pools of at least one thread each.
    pub fn new(threads: usize, lanes: usize) -> Self {
        let lanes = lanes.clamp(1, threads.max(1));
        let pools = (0..lanes)
            .map(|lane| {
                let share = threads / lanes + usize::from(lane < threads % lanes);
                rayon::ThreadPoolBuilder::new()
                    .num_threads(share.max(1))
                    .thread_name(move |i| format!("vitscope-lane{lane}-{i}"))
                    .build()
                    .expect("a thread pool")
            })
            .collect();
        Self { pools }
    }

    /// One single-threaded lane per tensor thread: for work items that are many and
    /// alike, such as evaluation batches.
    pub fn per_thread() -> Self {
        let threads = candle_core::utils::get_num_threads();
        Self::new(threads, threads)
    }

    /// As many lanes as a batch has micro-batches, up to the tensor threads.
    pub fn for_batches(batch_size: usize, micro_batch_size: usize) -> Self {
        let micro = micro_batch_len(batch_size, micro_batch_size);
        let threads = candle_core::utils::get_num_threads();
        Self::new(threads, batch_size.div_ceil(micro))
    }

    pub fn lanes(&self) -> usize {
        self.pools.len()
    }

    /// `f` of each of `items`, on all lanes at once: each lane takes the next item not
    /// yet taken until none is left, so a lane that finishes early does not wait for
    /// the others until the very end. The results come back in the items' order; the
    /// first error (in item order) is returned, and the lanes stop taking items.
    pub fn map<I: Sync, T: Send>(
        &self,
        items: &[I],
        f: impl Fn(&I) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
        let (f, next, failed) = (&f, &next, &failed);
        let lane = move || {
            let mut done = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let result = f(item);
                failed.fetch_or(result.is_err(), Ordering::Relaxed);
                done.push((i, result));
            }
            done
        };
        let per_lane = std::thread::scope(|scope| {
            let handles: Vec<_> = (self.pools.iter().take(items.len()))
                .map(|pool| scope.spawn(move || pool.install(lane)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| candle_core::Error::Msg("a worker thread panicked".into()))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut slots: Vec<Option<Result<T>>> = items.iter().map(|_| None).collect();
        for (i, result) in per_lane.into_iter().flatten() {
            slots[i] = Some(result);
        }
        // In order: the first error, or all results (an item is only left undone
        // after an error).
        slots
            .into_iter()
            .map_while(|slot| slot)
            .collect::<Result<Vec<T>>>()
            .and_then(|done| match done.len() == items.len() {
                true => Ok(done),
                false => Err(candle_core::Error::Msg("a work item was not run".into())),
            })
    }
}

/// Images per micro-batch for `train.micro_batch_size` = `micro` (0: the whole batch),
/// at least 1.
pub fn micro_batch_len(batch: usize, micro: usize) -> usize {
    match micro {
        0 => batch,
        n => n.min(batch),
    }
    .max(1)
}

/// Micro-batches handed to the lanes at once, per lane.
const MICRO_BATCHES_PER_LANE: usize = 8;

/// One micro-batch's share of a step.
struct MicroResult {
    loss: f64,
    correct: usize,
    grads: Vec<Option<Tensor>>,
    forward_secs: f64,
    backward_secs: f64,
}

/// Forward and backward of images `range` of the batch; loss and gradients are
/// scaled by the micro-batch's share of the batch.
fn micro_step(
    model: &VisionTransformer,
    vars: &[Var],
    (pixels, labels): (&[f32], &[u32]),
    range: std::ops::Range<usize>,
    (smoothing, drop): (f64, Option<&DropPath>),
) -> Result<MicroResult> {
    let batch = labels.len();
    let per_image = pixels.len() / batch.max(1);
    let n = range.len();
    let t = std::time::Instant::now();
    let images = images_tensor(
        pixels[range.start * per_image..range.end * per_image].to_vec(),
        n,
        model.patch_embed.weight.dtype(),
    )?;
    let part = &labels[range.clone()];
    let logits = model.forward_train(&images, drop, range)?;
    let loss = smoothed_cross_entropy(&logits, part, smoothing)?;
    let share = n as f64 / batch as f64;
    let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * share;
    let correct = correct_predictions(&logits, part)?;
    let forward_secs = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let grads = loss.affine(share, 0.0)?.backward()?;
    std::mem::drop((logits, loss));
    // Detached: a gradient computed from activations would otherwise keep this
    // micro-batch's whole autograd graph alive through its own graph links.
    let grads = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).map(Tensor::detach))
        .collect();
    Ok(MicroResult {
        loss: loss_value,
        correct,
        grads,
        forward_secs,
        backward_secs: t.elapsed().as_secs_f64(),
    })
}

/// Forward and backward over a batch of normalised images (B, 3, 32, 32) in
/// micro-batches of at most `micro` images, summing gradients. The loss is a mean, so
/// this is the whole batch's gradient, for a fraction of the activation memory (the
/// default model keeps about 2 MB per image for its backward pass). Micro-batches run
/// side by side on the `workers`' lanes, each lane taking the next one as it
/// finishes; the sums are taken in batch order, so the result does not depend on
/// which finished first. The reported times are a lane's mean time per phase.
/// `drop`: this step's stochastic depth, if any.
pub fn forward_backward(
    model: &VisionTransformer,
    vars: &[Var],
    (pixels, labels): (&[f32], &[u32]),
    (smoothing, drop): (f64, Option<&DropPath>),
    micro: usize,
    workers: &Workers,
) -> Result<StepResult> {
    let batch = labels.len();
    let micro = micro_batch_len(batch, micro);
    let ranges: Vec<std::ops::Range<usize>> = (0..batch)
        .step_by(micro)
        .map(|start| start..(start + micro).min(batch))
        .collect();
    let mut total: Vec<Option<Tensor>> = vec![None; vars.len()];
    let (mut loss_sum, mut correct) = (0.0, 0);
    let (mut forward_secs, mut backward_secs) = (0.0, 0.0);
    let lanes = workers.lanes().min(ranges.len()).max(1);
    // A few micro-batches per lane at a time, so that tiny micro-batches do not hold
    // every gradient at once.
    for part in ranges.chunks(MICRO_BATCHES_PER_LANE * lanes) {
        let results = workers.map(part, |range| {
            micro_step(
                model,
                vars,
                (pixels, labels),
                range.clone(),
                (smoothing, drop),
            )
        })?;
        for result in results {
            loss_sum += result.loss;
            correct += result.correct;
            forward_secs += result.forward_secs / lanes as f64;
            backward_secs += result.backward_secs / lanes as f64;
            for (slot, g) in total.iter_mut().zip(result.grads) {
                if let Some(g) = g {
                    *slot = Some(match slot.take() {
                        Some(a) => (a + g)?,
                        None => g,
                    });
                }
            }
        }
    }
    Ok(StepResult {
        loss: loss_sum,
        correct,
        grads: total,
        forward_secs,
        backward_secs,
    })
}

/// Number of rows whose arg-max equals the label.
pub fn correct_predictions(logits: &Tensor, labels: &[u32]) -> Result<usize> {
    let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(predicted.iter().zip(labels).filter(|(p, l)| p == l).count())
}

/// Multiply-adds x 2 of one image's forward pass as it runs (the matrix products
/// only; the element-wise work is a few percent more). With a CLS token the last block
/// computes keys and values for every token but the rest for CLS alone, and is counted
/// so; with mean pooling every block computes every token.
pub fn forward_flops_per_image(cfg: &ModelConfig) -> f64 {
    let (t, d, m, h, hd) = (
        cfg.tokens() as f64,
        cfg.dim as f64,
        cfg.mlp_dim as f64,
        cfg.heads as f64,
        cfg.head_dim() as f64,
    );
    let patch = 2.0 * cfg.patches() as f64 * cfg.patch_values() as f64 * d;
    // A block whose outputs are computed for `queries` tokens.
    let block = |queries: f64| {
        2.0 * t * d * 3.0 * d // qkv, every token
            + 2.0 * 2.0 * h * queries * t * hd // Q Kᵀ and weights · V
            + 2.0 * queries * d * d // projection
            + 2.0 * 2.0 * queries * d * m // MLP
    };
    let last = if cfg.has_cls() { block(1.0) } else { block(t) };
    let blocks = (cfg.depth - 1) as f64 * block(t) + last;
    patch + blocks + 2.0 * d * NUM_CLASSES as f64
}

/// Normalised images as a (B, 3, 32, 32) tensor of `dtype`.
pub fn images_tensor(pixels: Vec<f32>, batch: usize, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(
        pixels,
        (batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE),
        &Device::Cpu,
    )?
    .to_dtype(dtype)
}

#[cfg(test)]
mod tests;
