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
//!
//! Here the whole model, its initialisation and its cost; the block and its layers are
//! in `block.rs`, the norms in `norm.rs`, the loss in `loss.rs`; the training step that
//! runs it is `crate::train::step`.

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{
    ModelConfig, NormKind, PatchTokens, Placement, PosEmbed, CHANNELS, IMAGE_SIZE,
};
use crate::data::{mix_seed, NUM_CLASSES};
use crate::ops::{token_mean, BlockOutput};

mod block;
mod capture;
mod drop_path;
mod loss;
mod norm;
pub mod shifted_patches;
pub use block::{Attention, Block, Linear, Mlp};
pub use capture::Capture;
pub use drop_path::{Branch, DropPath};
pub use loss::{correct_predictions, smoothed_cross_entropy};
pub use norm::{rms_norm, LayerNorm};

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
    /// The LayerNorm over a token's values with shifted patch tokens; none for plain ones.
    pub patch_norm: Option<LayerNorm>,
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
        let pos_embed = match cfg.pos_embed {
            PosEmbed::None => None,
            PosEmbed::Sincos => Some(
                Tensor::from_vec(
                    sincos_position_embedding(cfg),
                    (1, cfg.tokens(), cfg.dim),
                    vb.device(),
                )?
                .to_dtype(vb.dtype())?,
            ),
            PosEmbed::Learned => Some(vb.get_with_hints(
                (1, cfg.tokens(), cfg.dim),
                "pos_embed",
                Init::Const(0.0),
            )?),
        };
        let patch_norm = match cfg.patch_tokens {
            PatchTokens::Plain => None,
            PatchTokens::Shifted => Some(LayerNorm::new(
                &vb.pp("patch_norm"),
                cfg.token_values(),
                cfg.layer_norm_eps,
                NormKind::LayerNorm,
            )?),
        };
        Ok(Self {
            config: cfg.clone(),
            patch_norm,
            patch_embed: Linear::new(&vb.pp("patch_embed"), cfg.token_values(), cfg.dim, false)?,
            cls_token: match cfg.has_cls() {
                true => Some(vb.get_with_hints((1, 1, cfg.dim), "cls_token", Init::Const(0.0))?),
                false => None,
            },
            pos_embed,
            blocks,
            norm: LayerNorm::new(&vb.pp("norm"), cfg.dim, cfg.layer_norm_eps, cfg.norm_kind)?,
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
        let mut x = self.embed(images)?;
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
        self.head.forward(&self.pool(&x)?)
    }

    /// Patch embeddings, CLS token and position embedding: the residual stream's start.
    fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let (b, p) = (images.dim(0)?, self.config.patch_size);
        let patches = match &self.patch_norm {
            Some(norm) => norm.forward(&patchify(
                &shifted_patches::shifted_copies(images, p / 2)?,
                p,
            )?)?,
            None => patchify(images, p)?,
        };
        let x = self.patch_embed.forward(&patches)?;
        let x = match &self.cls_token {
            Some(cls) => Tensor::cat(&[&cls.broadcast_as((b, 1, self.config.dim))?, &x], 1)?,
            None => x,
        };
        match &self.pos_embed {
            Some(pos) => x.broadcast_add(pos),
            None => Ok(x),
        }
    }

    /// The model's own pooling of tokens (B, T, D) into (B, D): CLS, or the mean.
    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        match self.cls_token {
            Some(_) => x.i((.., 0)),
            None => token_mean(x),
        }
    }

    /// Per layer (after the embeddings, then after each block): the pooled residual
    /// stream (B, D) and the logits the model's own final norm, pooling and head give
    /// from there (B, classes), the logit lens. At the last layer these are the
    /// model's logits. Fused blocks, no capture: for many images at once.
    pub fn forward_layers(&self, images: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let view = |x: &Tensor| -> Result<(Tensor, Tensor)> {
            let lens = self.head.forward(&self.pool(&self.norm.forward(x)?)?)?;
            Ok((self.pool(x)?, lens))
        };
        let mut x = self.embed(images)?;
        let mut out = vec![view(&x)?];
        for block in &self.blocks {
            x = block.forward(&x, None)?;
            out.push(view(&x)?);
        }
        Ok(out)
    }

    /// The same weights (shared storage) without gradient tracking: a forward pass
    /// through it keeps no graph, so evaluation and probes free each tensor at once.
    pub fn detached(&self) -> Self {
        Self {
            config: self.config.clone(),
            patch_norm: self.patch_norm.as_ref().map(LayerNorm::detached),
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
                        scale: b.attn.scale.as_ref().map(Tensor::detach),
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
        let pytorch = cfg.init == crate::config::Init::Pytorch;
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
                // Locality self-attention's scales start where the standard one is.
                _ if name.ends_with("attn.scale") => {
                    vec![1.0 / (cfg.head_dim() as f64).sqrt(); var.elem_count()]
                }
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
    let patch = 2.0 * cfg.patches() as f64 * cfg.token_values() as f64 * d;
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
pub(crate) mod tests;
