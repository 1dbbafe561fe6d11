//! The Vision Transformer, written out explicitly so that what the dashboard shows is
//! what trains: one forward pass serves training, evaluation and the probes, and can
//! capture LayerNorm inputs and outputs, attention weights and hidden states on the way.
//!
//! Pre-norm blocks: x + MHSA(LN(x)), then x + MLP(LN(x)); a final LayerNorm; a linear
//! head on the CLS token. candle-nn 0.11's fused `softmax_last_dim` and `layer_norm`
//! have no backward, so LayerNorm and the attention softmax are our own fused ops with
//! a backward ([`crate::ops`]); their composed versions here are the reference. Without
//! a capture, each block runs as one fused op (`crate::ops::block`), checked against
//! the same block layer by layer (`Block::forward_ops`).

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{ModelConfig, CHANNELS, IMAGE_SIZE};
use crate::data::{mix_seed, NUM_CLASSES};
use crate::ops::BlockOutput;

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
}

impl Linear {
    fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?,
            bias: vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?,
        })
    }

    fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear(x, &self.weight, &self.bias)
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

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    fn new(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gamma: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            beta: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    fn detached(&self) -> Self {
        Self {
            gamma: self.gamma.detach(),
            beta: self.beta.detach(),
            eps: self.eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm(x, &self.gamma, &self.beta, self.eps)
    }

    fn forward_captured(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        let y = self.forward(x)?;
        if let Some(c) = capture {
            c.ln_inputs.push(x.detach());
            c.ln_outputs.push(y.detach());
        }
        Ok(y)
    }
}

/// LayerNorm composed from candle ops: the reference for the fused [`crate::ops::layer_norm`].
pub fn layer_norm_composed(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    normed.broadcast_mul(gamma)?.broadcast_add(beta)
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
}

impl Attention {
    fn new(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            qkv: Linear::new(&vb.pp("qkv"), cfg.dim, 3 * cfg.dim)?,
            proj: Linear::new(&vb.pp("proj"), cfg.dim, cfg.dim)?,
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = match capture {
            // Probes record the weights: the composed form computes them explicitly.
            Some(c) => self.heads_composed(&qkv, scale, Some(c))?,
            None => crate::ops::attention(&qkv, self.heads, scale)?,
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
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        // (B, H, T, T): row i = where query i looks. The 1/sqrt(d_k) is applied inside.
        let weights = crate::ops::scaled_softmax(&q.matmul(&k.t()?)?, scale)?;
        if let Some(c) = capture {
            c.attention.push(weights.detach());
        }
        weights.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c3 / 3))
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

#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    fn new(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&vb.pp("norm1"), cfg.dim, cfg.layer_norm_eps)?,
            attn: Attention::new(&vb.pp("attn"), cfg)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), cfg.dim, cfg.layer_norm_eps)?,
            mlp: Mlp {
                fc1: Linear::new(&vb.pp("mlp").pp("fc1"), cfg.dim, cfg.mlp_dim)?,
                fc2: Linear::new(&vb.pp("mlp").pp("fc2"), cfg.mlp_dim, cfg.dim)?,
            },
        })
    }

    /// The block as one fused op ([`crate::ops::block`]), or layer by layer when the
    /// probes capture what is inside.
    fn forward(&self, x: &Tensor, capture: Option<&mut Capture>) -> Result<Tensor> {
        match capture {
            None => self.forward_fused(x, BlockOutput::AllTokens),
            capture => self.forward_ops(x, capture),
        }
    }

    /// The fused block, with every token's output or (the last block) only CLS's.
    pub fn forward_fused(&self, x: &Tensor, output: BlockOutput) -> Result<Tensor> {
        crate::ops::block(x, &self.packed_params()?, self.shape(), output)
    }

    pub fn shape(&self) -> crate::ops::BlockShape {
        crate::ops::BlockShape {
            dim: self.norm1.gamma.elem_count(),
            heads: self.attn.heads,
            mlp_dim: self.mlp.fc1.bias.elem_count(),
            eps: self.norm1.eps,
        }
    }

    /// The parameters in one vector, as [`crate::ops::BlockShape::param_lens`] orders
    /// them. The copy is differentiable: gradients flow back to each parameter.
    pub fn packed_params(&self) -> Result<Tensor> {
        let linears = [
            &self.attn.qkv,
            &self.attn.proj,
            &self.mlp.fc1,
            &self.mlp.fc2,
        ];
        let [qkv_w, proj_w, fc1_w, fc2_w] = linears.map(|l| l.weight.flatten_all());
        Tensor::cat(
            &[
                &self.norm1.gamma,
                &self.norm1.beta,
                &qkv_w?,
                &self.attn.qkv.bias,
                &proj_w?,
                &self.attn.proj.bias,
                &self.norm2.gamma,
                &self.norm2.beta,
                &fc1_w?,
                &self.mlp.fc1.bias,
                &fc2_w?,
                &self.mlp.fc2.bias,
            ],
            0,
        )
    }

    /// The block layer by layer (a fused op per layer), capturing LayerNorms,
    /// attention weights and the output when asked: the reference for the fused
    /// block, and what the probes run.
    pub fn forward_ops(&self, x: &Tensor, mut capture: Option<&mut Capture>) -> Result<Tensor> {
        let h = self.norm1.forward_captured(x, capture.as_deref_mut())?;
        let x = (x + self.attn.forward(&h, capture.as_deref_mut())?)?;
        let h = self.norm2.forward_captured(&x, capture.as_deref_mut())?;
        let x = (&x + self.mlp.forward(&h)?)?;
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
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: Linear,
}

impl VisionTransformer {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&vb.pp("blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            patch_embed: Linear::new(&vb.pp("patch_embed"), cfg.patch_values(), cfg.dim)?,
            cls_token: vb.get_with_hints((1, 1, cfg.dim), "cls_token", Init::Const(0.0))?,
            pos_embed: vb.get_with_hints(
                (1, cfg.tokens(), cfg.dim),
                "pos_embed",
                Init::Const(0.0),
            )?,
            blocks,
            norm: LayerNorm::new(&vb.pp("norm"), cfg.dim, cfg.layer_norm_eps)?,
            head: Linear::new(&vb.pp("head"), cfg.dim, NUM_CLASSES)?,
        })
    }

    /// Logits (B, classes) for normalised images (B, 3, 32, 32).
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_with(images, None)
    }

    /// The forward pass, recording intermediate tensors into `capture` when given.
    pub fn forward_with(
        &self,
        images: &Tensor,
        mut capture: Option<&mut Capture>,
    ) -> Result<Tensor> {
        let b = images.dim(0)?;
        let patches = patchify(images, self.config.patch_size)?;
        let x = self.patch_embed.forward(&patches)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.config.dim))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos_embed)?;
        if let Some(c) = capture.as_deref_mut() {
            c.hidden.push(x.detach());
        }
        let last = self.blocks.len().saturating_sub(1);
        for (i, block) in self.blocks.iter().enumerate() {
            x = match capture.as_deref_mut() {
                // The head reads only CLS: the last block computes only what CLS needs.
                None if i == last => block.forward_fused(&x, BlockOutput::ClsOnly)?,
                capture => block.forward(&x, capture)?,
            };
        }
        let x = self.norm.forward_captured(&x, capture)?;
        self.head.forward(&x.i((.., 0))?)
    }

    /// The same weights (shared storage) without gradient tracking: a forward pass
    /// through it keeps no graph, so evaluation and probes free each tensor at once.
    pub fn detached(&self) -> Self {
        Self {
            config: self.config.clone(),
            patch_embed: self.patch_embed.detached(),
            cls_token: self.cls_token.detach(),
            pos_embed: self.pos_embed.detach(),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    norm1: b.norm1.detached(),
                    attn: Attention {
                        qkv: b.attn.qkv.detached(),
                        proj: b.attn.proj.detached(),
                        ..b.attn.clone()
                    },
                    norm2: b.norm2.detached(),
                    mlp: Mlp {
                        fc1: b.mlp.fc1.detached(),
                        fc2: b.mlp.fc2.detached(),
                    },
                })
                .collect(),
            norm: self.norm.detached(),
            head: self.head.detached(),
        }
    }

    /// The LayerNorms in capture order, with display names.
    pub fn layer_norms(&self) -> Vec<(String, &LayerNorm)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            out.push((format!("block {i} norm1 (before attention)"), &b.norm1));
            out.push((format!("block {i} norm2 (before MLP)"), &b.norm2));
        }
        out.push(("final norm (before head)".to_string(), &self.norm));
        out
    }
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
    smoothing: f64,
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
    let part = &labels[range];
    let logits = model.forward(&images)?;
    let loss = smoothed_cross_entropy(&logits, part, smoothing)?;
    let share = n as f64 / batch as f64;
    let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * share;
    let correct = correct_predictions(&logits, part)?;
    let forward_secs = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let grads = loss.affine(share, 0.0)?.backward()?;
    drop((logits, loss));
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
pub fn forward_backward(
    model: &VisionTransformer,
    vars: &[Var],
    (pixels, labels): (&[f32], &[u32]),
    smoothing: f64,
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
            micro_step(model, vars, (pixels, labels), range.clone(), smoothing)
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
/// only; the element-wise work is a few percent more). The last block computes keys
/// and values for every token but the rest for CLS alone, and is counted so.
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
    let blocks = (cfg.depth - 1) as f64 * block(t) + block(1.0);
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
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ops::tests::weighted_grads;

    pub fn tiny_config() -> ModelConfig {
        let mut cfg = Config::default().model;
        cfg.patch_size = 16;
        cfg.dim = 8;
        cfg.heads = 2;
        cfg.depth = 2;
        cfg.mlp_dim = 12;
        cfg.init = "trunc_normal".into();
        cfg.init_std = 0.5;
        cfg
    }

    fn random_images(batch: usize, seed: u64, dtype: DType) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let pixels: Vec<f32> = (0..batch * CHANNELS * IMAGE_SIZE * IMAGE_SIZE)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        images_tensor(pixels, batch, dtype).unwrap()
    }

    #[test]
    fn shapes_of_outputs_and_captures() {
        let cfg = Config::default().model;
        let state = ModelState::new(&cfg, 1, DType::F32).unwrap();
        let images = random_images(2, 1, DType::F32);
        let mut cap = Capture::default();
        let logits = state.model.forward_with(&images, Some(&mut cap)).unwrap();
        assert_eq!(logits.dims(), &[2, 10]);
        assert_eq!(cap.attention.len(), 6);
        assert_eq!(cap.attention[0].dims(), &[2, 3, 65, 65]);
        assert_eq!(cap.hidden.len(), 7);
        assert_eq!(cap.hidden[6].dims(), &[2, 65, 96]);
        assert_eq!(cap.ln_inputs.len(), 13);
        assert_eq!(cap.ln_outputs[12].dims(), &[2, 65, 96]);
        assert_eq!(state.model.layer_norms().len(), 13);
        // patch 48x96+96, cls 96, pos 65x96, 6 blocks, final norm 192, head 96x10+10
        let block = 96 * 288 + 288 + 96 * 96 + 96 + 96 * 192 + 192 + 192 * 96 + 96 + 4 * 96;
        assert_eq!(
            state.parameter_count(),
            48 * 96 + 96 + 96 + 65 * 96 + 6 * block + 192 + 970
        );
    }

    #[test]
    fn attention_rows_sum_to_one() {
        let state = ModelState::new(&Config::default().model, 2, DType::F32).unwrap();
        let mut cap = Capture::default();
        state
            .model
            .forward_with(&random_images(2, 2, DType::F32), Some(&mut cap))
            .unwrap();
        for att in &cap.attention {
            let sums: Vec<f32> = att
                .sum(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
                "row sums {:?}",
                &sums[..4]
            );
            let min: f32 = att
                .flatten_all()
                .unwrap()
                .min(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(min >= 0.0);
        }
    }

    #[test]
    fn layer_norm_output_has_zero_mean_unit_variance_with_identity_affine() {
        let cfg = Config::default().model;
        let state = ModelState::new(&cfg, 3, DType::F64).unwrap();
        let mut cap = Capture::default();
        state
            .model
            .forward_with(&random_images(2, 3, DType::F64), Some(&mut cap))
            .unwrap();
        let per_token = |t: &Tensor| -> (Vec<f64>, Vec<f64>) {
            let mean = t.mean_keepdim(D::Minus1).unwrap();
            let var = t
                .broadcast_sub(&mean)
                .unwrap()
                .sqr()
                .unwrap()
                .mean(D::Minus1)
                .unwrap();
            (values(&mean), values(&var))
        };
        for (input, output) in cap.ln_inputs.iter().zip(&cap.ln_outputs) {
            let (_, in_var) = per_token(input);
            let (out_mean, out_var) = per_token(output);
            assert!(out_mean.iter().all(|m| m.abs() < 1e-12));
            // Variance 1, shrunk only by the epsilon under the square root.
            for (v_in, v_out) in in_var.iter().zip(&out_var) {
                let expected = v_in / (v_in + cfg.layer_norm_eps);
                assert!((v_out - expected).abs() < 1e-9, "{v_out} vs {expected}");
                assert!(*v_out > 0.98);
            }
        }
    }

    #[test]
    fn patchify_puts_the_expected_pixels_in_each_patch() {
        let pixels: Vec<f32> = (0..CHANNELS * 32 * 32).map(|i| i as f32).collect();
        let images = images_tensor(pixels, 1, DType::F32).unwrap();
        let patches = patchify(&images, 4).unwrap();
        assert_eq!(patches.dims(), &[1, 64, 48]);
        let patch: Vec<f32> = patches.i((0, 8 + 3)).unwrap().to_vec1().unwrap(); // grid row 1, col 3
        for py in 0..4 {
            for px in 0..4 {
                for c in 0..3 {
                    let (y, x) = (4 + py, 12 + px);
                    assert_eq!(patch[(py * 4 + px) * 3 + c], (c * 1024 + y * 32 + x) as f32);
                }
            }
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The whole forward pass with plain loops, from the model's own weights.
    fn naive_logits(m: &VisionTransformer, image: &[f64]) -> Vec<f64> {
        let cfg = &m.config;
        let (p, d, t, grid) = (cfg.patch_size, cfg.dim, cfg.tokens(), cfg.grid());
        let linear = |l: &Linear, x: &[f64]| -> Vec<f64> {
            let (w, b) = (values(&l.weight), values(&l.bias));
            let (o, i) = (b.len(), x.len());
            (0..o)
                .map(|r| b[r] + (0..i).map(|c| w[r * i + c] * x[c]).sum::<f64>())
                .collect()
        };
        let layer_norm = |ln: &LayerNorm, x: &[f64]| -> Vec<f64> {
            let (g, b) = (values(&ln.gamma), values(&ln.beta));
            let mean = x.iter().sum::<f64>() / x.len() as f64;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64;
            x.iter()
                .enumerate()
                .map(|(i, v)| g[i] * (v - mean) / (var + ln.eps).sqrt() + b[i])
                .collect()
        };
        let (cls, pos) = (values(&m.cls_token), values(&m.pos_embed));
        let mut x: Vec<Vec<f64>> = vec![cls.clone()];
        for gy in 0..grid {
            for gx in 0..grid {
                let mut patch = Vec::new();
                for py in 0..p {
                    for px in 0..p {
                        for c in 0..3 {
                            patch.push(image[c * 1024 + (gy * p + py) * 32 + gx * p + px]);
                        }
                    }
                }
                x.push(linear(&m.patch_embed, &patch));
            }
        }
        for (i, row) in x.iter_mut().enumerate() {
            for j in 0..d {
                row[j] += pos[i * d + j];
            }
        }
        for block in &m.blocks {
            let h: Vec<Vec<f64>> = x.iter().map(|r| layer_norm(&block.norm1, r)).collect();
            let qkv: Vec<Vec<f64>> = h.iter().map(|r| linear(&block.attn.qkv, r)).collect();
            let (heads, hd) = (block.attn.heads, block.attn.head_dim);
            let mut concat = vec![vec![0.0; d]; t];
            for head in 0..heads {
                for i in 0..t {
                    let q = &qkv[i][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..t)
                        .map(|j| {
                            let k = &qkv[j][d + head * hd..d + (head + 1) * hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = exp.iter().sum();
                    for j in 0..t {
                        for e in 0..hd {
                            concat[i][head * hd + e] += exp[j] / z * qkv[j][2 * d + head * hd + e];
                        }
                    }
                }
            }
            for i in 0..t {
                let a = linear(&block.attn.proj, &concat[i]);
                for j in 0..d {
                    x[i][j] += a[j];
                }
                let h = layer_norm(&block.norm2, &x[i]);
                let hidden: Vec<f64> = linear(&block.mlp.fc1, &h)
                    .iter()
                    .map(|v| 0.5 * v * (1.0 + libm_erf(v / std::f64::consts::SQRT_2)))
                    .collect();
                let out = linear(&block.mlp.fc2, &hidden);
                for j in 0..d {
                    x[i][j] += out[j];
                }
            }
        }
        linear(&m.head, &layer_norm(&m.norm, &x[0]))
    }

    /// erf by its Maclaurin series, ample for |x| < 3 at f64.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..200 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn forward_matches_a_hand_computation() {
        let mut cfg = tiny_config();
        cfg.patch_size = 8; // 16 patches + CLS
        let state = ModelState::new(&cfg, 4, DType::F64).unwrap();
        let images = random_images(2, 4, DType::F64);
        let logits = values(&state.model.forward(&images).unwrap());
        for b in 0..2 {
            let image = values(&images.get(b).unwrap());
            let expected = naive_logits(&state.model, &image);
            for (k, e) in expected.iter().enumerate() {
                let got = logits[b * 10 + k];
                assert!((got - e).abs() < 1e-9, "image {b} class {k}: {got} vs {e}");
            }
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient_matching_finite_differences() {
        let cfg = tiny_config();
        let state = ModelState::new(&cfg, 5, DType::F64).unwrap();
        let images = random_images(3, 5, DType::F64);
        let labels = [1u32, 7, 3];
        let loss_of = |m: &VisionTransformer| -> f64 {
            let logits = m.forward(&images).unwrap();
            smoothed_cross_entropy(&logits, &labels, 0.1)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let loss =
            smoothed_cross_entropy(&state.model.forward(&images).unwrap(), &labels, 0.1).unwrap();
        let grads = loss.backward().unwrap();
        let mut rng = StdRng::seed_from_u64(6);
        for (name, var) in state.named_vars() {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let grad = values(grad);
            assert!(
                grad.iter().any(|g| g.abs() > 1e-12),
                "{name}: gradient is all zero"
            );
            let original = values(var.as_tensor());
            for _ in 0..3 {
                let i = rng.random_range(0..original.len());
                let h = 1e-5;
                let probe = |delta: f64| {
                    let mut v = original.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(&state.model)
                };
                let numeric = (probe(h) - probe(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let tolerance = 1e-6 + 1e-4 * numeric.abs().max(grad[i].abs());
                assert!(
                    (numeric - grad[i]).abs() < tolerance,
                    "{name}[{i}]: backprop {} vs finite difference {numeric}",
                    grad[i]
                );
            }
        }
    }

    /// Random (batch, tokens, dim) f64 activations.
    fn random_rows(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Runs `a` and `b` (two ways of computing the same thing from a block's input) on
    /// 9 images (two whole tiles and one of a single image), and checks that their
    /// outputs agree, that `a` detached (evaluation: no activations kept, one tile's
    /// buffers reused) gives the same values, and that the gradients of x and of all 12
    /// parameters agree.
    fn assert_same_block_function(
        block: &Block,
        seed: u64,
        a: impl Fn(&Tensor) -> Tensor,
        b: impl Fn(&Tensor) -> Tensor,
    ) {
        let images = 2 * crate::ops::TILE_IMAGES + 1;
        let dim = block.shape().dim;
        let x = Var::from_tensor(&random_rows((images, 5, dim), seed)).unwrap();
        let (ya, yb) = (a(x.as_tensor()), b(x.as_tensor()));
        assert_eq!(ya.dims(), yb.dims());
        let (va, vb) = (values(&ya), values(&yb));
        for (i, (u, v)) in va.iter().zip(&vb).enumerate() {
            assert!((u - v).abs() < 1e-12, "output {i}: {u} vs {v}");
        }
        assert_eq!(values(&a(&x.as_tensor().detach())), va);
        let (n, t, _) = ya.dims3().unwrap();
        let weights = random_rows((n, t, dim), seed + 1);
        let (ga, gb) = (weighted_grads(ya, &weights), weighted_grads(yb, &weights));
        let inputs = [
            ("x", x.as_tensor()),
            ("norm1.gamma", &block.norm1.gamma),
            ("norm1.beta", &block.norm1.beta),
            ("qkv.weight", &block.attn.qkv.weight),
            ("qkv.bias", &block.attn.qkv.bias),
            ("proj.weight", &block.attn.proj.weight),
            ("proj.bias", &block.attn.proj.bias),
            ("norm2.gamma", &block.norm2.gamma),
            ("norm2.beta", &block.norm2.beta),
            ("fc1.weight", &block.mlp.fc1.weight),
            ("fc1.bias", &block.mlp.fc1.bias),
            ("fc2.weight", &block.mlp.fc2.weight),
            ("fc2.bias", &block.mlp.fc2.bias),
        ];
        for (name, t) in inputs {
            let gradient = |g: &candle_core::backprop::GradStore| {
                values(g.get(t).unwrap_or_else(|| panic!("{name}: no gradient")))
            };
            let (u, v) = (gradient(&ga), gradient(&gb));
            assert_eq!(u.len(), t.elem_count(), "{name}");
            for (i, (u, v)) in u.iter().zip(&v).enumerate() {
                assert!(
                    (u - v).abs() < 1e-10 * (1.0 + v.abs()),
                    "{name}[{i}]: {u} vs {v}"
                );
            }
        }
    }

    #[test]
    fn fused_block_matches_the_layer_by_layer_block_forward_and_backward() {
        let state = ModelState::new(&tiny_config(), 11, DType::F64).unwrap();
        let block = &state.model.blocks[1];
        assert_same_block_function(
            block,
            12,
            |x| block.forward(x, None).unwrap(),
            |x| block.forward_ops(x, None).unwrap(),
        );
    }

    #[test]
    fn the_cls_only_block_gives_the_cls_row_and_its_gradients_exactly() {
        let state = ModelState::new(&tiny_config(), 21, DType::F64).unwrap();
        let block = &state.model.blocks[1];
        let cls = |x: &Tensor| block.forward_fused(x, BlockOutput::ClsOnly).unwrap();
        assert_eq!(cls(&random_rows((3, 5, 8), 1)).dims(), &[3, 1, 8]);
        assert_same_block_function(block, 22, cls, |x| {
            let all = block.forward_fused(x, BlockOutput::AllTokens).unwrap();
            all.narrow(1, 0, 1).unwrap()
        });
    }

    #[test]
    fn fused_block_gradient_of_its_input_matches_finite_differences() {
        let cfg = tiny_config();
        let state = ModelState::new(&cfg, 14, DType::F64).unwrap();
        let block = &state.model.blocks[0];
        let x0 = random_rows((2, 3, cfg.dim), 15);
        let weights = random_rows((2, 3, cfg.dim), 16);
        let x = Var::from_tensor(&x0).unwrap();
        let grads = weighted_grads(block.forward(x.as_tensor(), None).unwrap(), &weights);
        let analytic = values(grads.get(x.as_tensor()).unwrap());
        let numeric = crate::ops::tests::numeric_gradient(
            &values(&x0),
            &[2, 3, cfg.dim],
            |t| block.forward(t, None).unwrap(),
            &weights,
        );
        for (i, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
            assert!(
                (a - n).abs() < 1e-6 * (1.0 + n.abs()),
                "x[{i}]: backprop {a} vs finite difference {n}"
            );
        }
    }

    #[test]
    fn fused_block_rejects_bad_inputs_and_a_second_backward() {
        let cfg = tiny_config();
        let state = ModelState::new(&cfg, 17, DType::F64).unwrap();
        let block = &state.model.blocks[0];
        let params = block.packed_params().unwrap();
        let x = random_rows((2, 3, cfg.dim), 18);
        let err = |r: Result<Tensor>| r.unwrap_err().to_string();
        let short = params.narrow(0, 0, params.elem_count() - 1).unwrap();
        assert!(err(crate::ops::block(
            &x,
            &short,
            block.shape(),
            BlockOutput::AllTokens
        ))
        .contains("packed parameters"));
        let narrow_x = random_rows((2, 3, cfg.dim + 1), 19);
        assert!(err(crate::ops::block(
            &narrow_x,
            &params,
            block.shape(),
            BlockOutput::AllTokens
        ))
        .contains("channels"));
        let no_tokens = random_rows((2, 0, cfg.dim), 20);
        let cls = BlockOutput::ClsOnly;
        assert!(err(crate::ops::block(&no_tokens, &params, block.shape(), cls)).contains("token"));
        let f32_x = x.to_dtype(DType::F32).unwrap();
        assert!(err(crate::ops::block(
            &f32_x,
            &params,
            block.shape(),
            BlockOutput::AllTokens
        ))
        .contains("f32"));
        // The activations are used up by the first backward pass.
        let v = Var::from_tensor(&x).unwrap();
        let loss = block
            .forward(v.as_tensor(), None)
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(loss.backward().is_ok());
        let second = loss.backward().map(drop).unwrap_err().to_string();
        assert!(
            second.contains("one backward pass per forward pass"),
            "{second}"
        );
    }

    #[test]
    fn forward_flops_count_the_products_as_they_run() {
        // Default model: 65 tokens of 96, 3 heads of 32, MLP 192, 64 patches of 48.
        let patch = 2 * 64 * 48 * 96;
        let qkv = 2 * 65 * 96 * 288;
        let full_block = qkv + 4 * 3 * 65 * 65 * 32 + 2 * 65 * 96 * 96 + 4 * 65 * 96 * 192;
        let cls_block = qkv + 4 * 3 * 65 * 32 + 2 * 96 * 96 + 4 * 96 * 192;
        let expected = patch + 5 * full_block + cls_block + 2 * 96 * 10;
        assert_eq!(expected, 60_338_304);
        assert_eq!(
            forward_flops_per_image(&Config::default().model),
            expected as f64
        );
    }

    #[test]
    fn workers_run_every_item_once_in_order_on_all_lanes_and_report_the_first_error() {
        let workers = Workers::new(2, 2);
        let items: Vec<usize> = (0..25).collect();
        let squares = workers.map(&items, |&i| Ok(i * i)).unwrap();
        assert_eq!(squares, items.iter().map(|i| i * i).collect::<Vec<_>>());
        // Slow items: both lanes take some.
        let lanes = workers
            .map(&items, |_| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(std::thread::current().name().unwrap_or("").to_string())
            })
            .unwrap();
        let distinct: std::collections::BTreeSet<_> = lanes.iter().collect();
        assert_eq!(distinct.len(), 2, "{distinct:?}");
        let failing = workers.map(&items, |&i| match i {
            7 | 19 => Err(candle_core::Error::Msg(format!("item {i} failed"))),
            i => Ok(i),
        });
        assert!(failing.unwrap_err().to_string().contains("item 7 failed"));
        assert!(workers.map(&items[..0], |&i| Ok(i)).unwrap().is_empty());
    }

    #[test]
    fn micro_batches_give_the_whole_batch_gradient() {
        let cfg = tiny_config();
        let state = ModelState::new(&cfg, 9, DType::F64).unwrap();
        let vars: Vec<Var> = state.named_vars().into_iter().map(|(_, v)| v).collect();
        let images = random_images(5, 9, DType::F64);
        let pixels: Vec<f32> = images
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let labels = [0u32, 3, 3, 9, 1];
        let one = Workers::new(1, 1);
        let whole =
            forward_backward(&state.model, &vars, (&pixels, &labels), 0.1, 0, &one).unwrap();
        // Three micro-batches (2 + 2 + 1) over two lanes: side by side, then alone.
        let split = forward_backward(
            &state.model,
            &vars,
            (&pixels, &labels),
            0.1,
            2,
            &Workers::new(2, 2),
        )
        .unwrap();
        assert!(
            (whole.loss - split.loss).abs() < 1e-12,
            "{} vs {}",
            whole.loss,
            split.loss
        );
        assert_eq!(whole.correct, split.correct);
        for (i, (name, _)) in state.named_vars().into_iter().enumerate() {
            let a = values(whole.grads[i].as_ref().unwrap());
            let b = values(split.grads[i].as_ref().unwrap());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-12, "{name}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn initialisation_is_reproducible_for_a_seed() {
        let cfg = tiny_config();
        let a = ModelState::new(&cfg, 7, DType::F32).unwrap();
        let b = ModelState::new(&cfg, 7, DType::F32).unwrap();
        let c = ModelState::new(&cfg, 8, DType::F32).unwrap();
        for ((name, va), ((_, vb), (_, vc))) in a
            .named_vars()
            .iter()
            .zip(b.named_vars().iter().zip(c.named_vars().iter()))
        {
            assert_eq!(values(va.as_tensor()), values(vb.as_tensor()), "{name}");
            if name.ends_with("weight") && !name.contains("norm") {
                assert_ne!(values(va.as_tensor()), values(vc.as_tensor()), "{name}");
            }
        }
    }

    #[test]
    fn pytorch_initialisation_is_uniform_within_one_over_root_fan_in() {
        let mut cfg = Config::default().model;
        cfg.init = "pytorch".into();
        let state = ModelState::new(&cfg, 3, DType::F32).unwrap();
        let vars = state.named_vars();
        let fan_in = |name: &str| {
            let prefix = name.rsplit_once('.').unwrap().0;
            let (_, w) = vars
                .iter()
                .find(|(n, _)| *n == format!("{prefix}.weight"))
                .unwrap();
            w.dims()[1] as f64
        };
        let mut checked = 0;
        for (name, var) in &vars {
            let v = values(var.as_tensor());
            if name.contains("norm") {
                let want = if name.ends_with("weight") { 1.0 } else { 0.0 };
                assert!(v.iter().all(|&x| x == want), "{name}");
            } else if name == "cls_token" || name == "pos_embed" {
                assert!(
                    v.iter().all(|x| x.abs() <= 2.0 * cfg.init_std + 1e-6),
                    "{name}"
                );
            } else {
                let bound = 1.0 / fan_in(name).sqrt();
                assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
                // Uniform(-b, b) has standard deviation b / sqrt(3).
                let std = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
                let tolerance = if v.len() > 1000 { 0.05 } else { 0.35 };
                assert!(
                    (std / (bound / 3f64.sqrt()) - 1.0).abs() < tolerance,
                    "{name}: std {std}, bound {bound}"
                );
                checked += 1;
            }
        }
        // patch embedding, head, and 4 linear layers x 2 (weight, bias) per block.
        assert_eq!(checked, 4 + 8 * cfg.depth);
    }

    #[test]
    fn smoothed_cross_entropy_matches_its_formula() {
        let logits = Tensor::new(&[[1.0f64, 2.0, 0.5], [0.0, 0.0, 3.0]], &Device::Cpu).unwrap();
        let loss: f64 = smoothed_cross_entropy(&logits, &[1, 0], 0.3)
            .unwrap()
            .to_scalar()
            .unwrap();
        let row = |l: [f64; 3], y: usize| {
            let z = l.iter().map(|v| v.exp()).sum::<f64>().ln();
            let logp: Vec<f64> = l.iter().map(|v| v - z).collect();
            -(0.7 * logp[y] + 0.1 * logp.iter().sum::<f64>())
        };
        let expected = (row([1.0, 2.0, 0.5], 1) + row([0.0, 0.0, 3.0], 0)) / 2.0;
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");
        assert_eq!(correct_predictions(&logits, &[1, 0]).unwrap(), 1);
    }
}
