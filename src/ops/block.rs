//! A whole pre-norm transformer block, x + MHSA(LN(x)) then x + MLP(LN(x)), as one
//! op with its own backward: what training and evaluation run.
//!
//! With one op per layer, candle's backward still zero-fills a gradient slot for every
//! node of the graph, adds each gradient into it, and copies the packed gradients of
//! each op apart: about a fifth of a training step. As one op per block the graph has
//! a node per block; the activations backward needs (LayerNorm outputs, projections,
//! attention weights, the MLP's hidden layer) are kept by the op itself in buffers
//! reused from step to step ([`super::BufferPool`]), and the backward pass is the
//! chain rule written out, the residual gradients added in place.
//!
//! The per-layer ops (`model::Block::forward_ops`) are the reference the tests compare
//! against, forward and every gradient.

use std::any::Any;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::bf16::{PackedLhs, PackedRhs};
use super::products::{pack_activation, pack_input, pack_weight, packs_native};

use super::attention::{
    attention_backward_into, attention_forward_into, AttentionShape, KeptFactors,
};
use super::gelu::{gelu_grad_into, gelu_into};
use super::kernel::{image_rows, pieces, pieces_mut, span, unpack, Buffer, Real};
use super::layer_norm::{layer_norm_grads_into, layer_norm_into};
use super::linear::{linear_grads_into, linear_into, plus_bias, residual_plus_bias, Packed, Start};

/// The sizes of one block. Its parameters travel packed in one vector, in the order
/// of [`BlockShape::param_lens`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockShape {
    pub dim: usize,
    pub heads: usize,
    pub mlp_dim: usize,
    /// LayerNorm's epsilon (both norms).
    pub eps: f64,
    /// Whether the four linear layers multiply bf16 factors (`model.matmul`).
    pub bf16: bool,
    /// Locality self-attention (`model.attention = "lsa"`): each query's own token
    /// masked, and a learned scale of Q Kᵀ per head, the last packed parameters.
    pub lsa: bool,
}

impl BlockShape {
    /// Lengths of the packed parameters: norm1 γ, β; qkv W (3D x D), b; proj W (D x D),
    /// b; norm2 γ, β; fc1 W (M x D), b; fc2 W (D x M), b; the heads' scales (none
    /// without `lsa`). Weights are row-major, as stored (out x in).
    pub fn param_lens(&self) -> [usize; 13] {
        let (d, m) = (self.dim, self.mlp_dim);
        let scales = if self.lsa { self.heads } else { 0 };
        [
            d,
            d,
            3 * d * d,
            3 * d,
            d * d,
            d,
            d,
            d,
            m * d,
            m,
            d * m,
            d,
            scales,
        ]
    }

    pub fn param_count(&self) -> usize {
        self.param_lens().iter().sum()
    }

    fn attention(&self, batch: usize, z: Sizes) -> AttentionShape {
        AttentionShape {
            batch,
            tokens: z.tokens,
            queries: z.queries,
            heads: self.heads,
            head_dim: self.dim / self.heads,
            bf16: self.bf16,
            mask_diagonal: self.lsa,
        }
    }

    /// Each head's scale of Q Kᵀ: the learned ones with `lsa`, else 1/√d_k.
    fn scales<T: Real>(&self, learned: &[T]) -> Vec<T> {
        match self.lsa {
            true => learned.to_vec(),
            false => {
                let fixed = 1.0 / ((self.dim / self.heads) as f64).sqrt();
                vec![T::from(fixed).expect("a float"); self.heads]
            }
        }
    }
}

/// Which tokens' outputs a block computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BlockOutput {
    /// Every token: (batch, tokens, dim).
    AllTokens,
    /// Only CLS, token 0: (batch, 1, dim). The last block's other outputs are read by
    /// nothing (the head reads CLS), so it computes keys and values for every token but
    /// queries, the projection and the MLP for CLS alone, and its backward pass only
    /// what flows back from CLS. Logits and gradients are the same as with every token.
    ClsOnly,
}

/// A call's sizes: images, tokens per image, and query tokens per image (the first
/// ones), whose outputs are computed.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    batch: usize,
    tokens: usize,
    queries: usize,
}

/// Images per tile. The block runs a few images at a time (everything in it but the
/// parameter gradients is per image), so that what one step writes is still in the
/// core's cache when the next step reads it: a tile of the default model holds about
/// 1 MB of intermediate values, a micro-batch of 32 images ten times the L2 cache.
pub const TILE_IMAGES: usize = 4;

/// What the forward pass keeps for the backward pass (for the whole batch when kept,
/// for one tile when only evaluating).
struct Activations<T: Real> {
    /// LN1(x): tokens x D per image; with heads_out and h2, for one tile only where the
    /// backward pass reads the packed copies instead ([`reads_inputs`]).
    h1: Buffer<T>,
    /// The packed q|k|v projections: tokens x 3D per image; for one tile only where
    /// the attention's backward pass reads its kept factors instead ([`reads_qkv`]).
    qkv: Buffer<T>,
    /// softmax(QKᵀ/√d_k) per image and head: queries x tokens.
    weights: Buffer<T>,
    /// From here on, queries rows per image. The heads' outputs, concatenated: D.
    heads_out: Buffer<T>,
    /// x + attention: D.
    x2: Buffer<T>,
    /// LN2(x2): D.
    h2: Buffer<T>,
    /// fc1's output before GELU: M.
    u: Buffer<T>,
    /// GELU(u): M.
    g: Buffer<T>,
    /// Each row's mean and 1 / sqrt(var + eps) in LN1 (tokens rows per image) and LN2
    /// (queries rows): two values a row, read by their backward passes (kept only).
    moments1: Buffer<T>,
    moments2: Buffer<T>,
    /// Per tile, the inputs of the four linear layers (h1, heads_out, h2, g) packed for
    /// their weight gradients' bf16 products (kept, bf16 blocks only).
    packed: Vec<[PackedRhs; 4]>,
    /// Per image and head, the attention's factors of its backward products, packed
    /// (kept, bf16 blocks on a bf16 instruction only).
    attention: Vec<KeptFactors>,
}

/// Whether the attention's backward pass reads the projections q|k|v: not where the
/// forward pass packs its factors (bf16 on a bf16 instruction) and no learned scale
/// needs Q Kᵀ again. Elsewhere they are kept for it: 74 KB per image and block of
/// the default model, about a sixth of what a training step writes and reads back.
fn reads_qkv<T: Real>(s: BlockShape) -> bool {
    !(s.bf16 && packs_native::<T>()) || s.lsa
}

/// Whether the backward pass reads the linear layers' inputs h1, heads_out and h2 as
/// f32 values: not where the forward pass packs them for the weight gradients (bf16
/// blocks of f32 values), whose products read only the packed copies. Elsewhere they
/// are kept for it: 3D values per token and block, 74 KB per image of the default
/// model, written to memory by the forward pass and read back by nothing.
fn reads_inputs<T: Real>(s: BlockShape) -> bool {
    !(s.bf16 && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
}

impl<T: Real> Activations<T> {
    /// Buffers for `images` (the batch or one tile), the projections of `qkv_images`
    /// and the linear layers' inputs of `input_images`.
    fn new(
        s: BlockShape,
        (images, qkv_images, input_images): (usize, usize, usize),
        z: Sizes,
    ) -> Self {
        let queries = images * z.queries;
        let (d, m) = (s.dim, s.mlp_dim);
        Self {
            h1: Buffer::new(input_images * z.tokens * d),
            qkv: Buffer::new(qkv_images * z.tokens * 3 * d),
            weights: Buffer::new(s.attention(images, z).weights_len()),
            heads_out: Buffer::new(input_images * z.queries * d),
            x2: Buffer::new(queries * d),
            h2: Buffer::new(input_images * z.queries * d),
            u: Buffer::new(queries * m),
            g: Buffer::new(queries * m),
            moments1: Buffer::new(2 * images * z.tokens),
            moments2: Buffer::new(2 * queries),
            packed: Vec::new(),
            attention: Vec::new(),
        }
    }
}

/// The four weights (qkv, proj, fc1, fc2) packed for bf16 products when the block runs
/// them (f32 values only): read as Wᵀ by the forward pass (`transposed`), as W by the
/// input gradients. Packed once per call, read by every tile.
fn packed_weights<T: Real>(
    s: BlockShape,
    weights: [&[T]; 4],
    transposed: bool,
) -> [Option<PackedRhs>; 4] {
    let (d, m) = (s.dim, s.mlp_dim);
    let shapes = [(3 * d, d), (d, d), (m, d), (d, m)];
    std::array::from_fn(|i| {
        s.bf16
            .then(|| pack_weight(weights[i], shapes[i], transposed))
            .flatten()
    })
}

/// Starts bringing a packed factor into the cache, if there is one.
fn prefetch_packed(packed: Option<&PackedRhs>) {
    if let Some(p) = packed {
        p.prefetch();
    }
}

/// The tiles of a batch: (first image, images).
fn tiles(batch: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..batch)
        .step_by(TILE_IMAGES)
        .map(move |first| (first, TILE_IMAGES.min(batch - first)))
}

/// The block's output for input rows `x` (batch x tokens x D): queries x D per image,
/// and its activations when `keep` (else only a tile's worth of buffers is used, and
/// freed).
fn block_forward<T: Real>(
    x: &[T],
    params: &[T],
    s: BlockShape,
    z: Sizes,
    keep: bool,
) -> (Vec<T>, Option<Activations<T>>) {
    let (d, m, t, nq) = (s.dim, s.mlp_dim, z.tokens, z.queries);
    let [n1g, n1b, qkv_w, qkv_b, proj_w, proj_b, n2g, n2b, fc1_w, fc1_b, fc2_w, fc2_b, learned] =
        pieces(params, s.param_lens());
    let scales = s.scales(learned);
    let tile = TILE_IMAGES.min(z.batch);
    let kept_images = if keep { z.batch } else { tile };
    let keep_qkv = keep && reads_qkv::<T>(s);
    let qkv_images = if keep_qkv { z.batch } else { tile };
    let keep_inputs = keep && reads_inputs::<T>(s);
    let input_images = if keep_inputs { z.batch } else { tile };
    let mut a = Activations::new(s, (kept_images, qkv_images, input_images), z);
    let [qkv_wt, proj_wt, fc1_wt, fc2_wt] = packed_weights(s, [qkv_w, proj_w, fc1_w, fc2_w], true);
    let mut y = Vec::with_capacity(z.batch * nq * d);
    for (first, images) in tiles(z.batch) {
        // The tile's images in the input, and where they are in the activations.
        let kept_first = if keep { first } else { 0 };
        let (r, k) = (
            image_rows(first, images, t),
            image_rows(kept_first, images, t),
        );
        let (rq, kq) = (
            image_rows(first, images, nq),
            image_rows(kept_first, images, nq),
        );
        let attention = s.attention(images, z);
        let weights = span(&k, s.heads * nq);
        let kqkv = match keep_qkv {
            true => span(&k, 3 * d),
            false => span(&image_rows(0, images, t), 3 * d),
        };
        // Where the linear layers' inputs go: beside the other activations, or in
        // one tile's buffers.
        let input_first = if keep_inputs { kept_first } else { 0 };
        let (ki, kiq) = (
            image_rows(input_first, images, t),
            image_rows(input_first, images, nq),
        );
        let moments1 = keep.then(|| &mut a.moments1[span(&k, 2)]);
        layer_norm_into(
            &x[span(&r, d)],
            n1g,
            n1b,
            s.eps,
            &mut a.h1[span(&ki, d)],
            moments1,
        );
        // Each linear layer's input, where its weight gradient will read it packed,
        // is packed for both its products at once (on a bf16 instruction): the
        // forward product reads it as the left factor.
        let both = keep && s.bf16;
        let h1_p = both.then(|| pack_input(&a.h1[span(&ki, d)], d)).flatten();
        let qkv = &mut a.qkv[kqkv.clone()];
        let packed = (qkv_wt.as_ref(), h1_p.as_ref().map(|(lhs, _)| lhs));
        linear_into(&a.h1[span(&ki, d)], qkv_w, qkv_b, qkv, Start::Bias, packed);
        attention_forward_into(
            &a.qkv[kqkv],
            attention,
            &scales,
            (&mut a.heads_out[span(&kiq, d)], &mut a.weights[weights]),
            keep.then_some(&mut a.attention),
        );
        // The residual stream of the query tokens (the first nq rows of each image)
        // plus the projection's bias, then the projection added.
        let x2 = &mut a.x2[span(&kq, d)];
        for (image, x2) in x2.chunks_exact_mut(nq * d).enumerate() {
            let start = (r.start + image * t) * d;
            plus_bias(x2, &x[start..start + nq * d], proj_b);
        }
        let heads_p = both
            .then(|| pack_input(&a.heads_out[span(&kiq, d)], d))
            .flatten();
        linear_into(
            &a.heads_out[span(&kiq, d)],
            proj_w,
            proj_b,
            x2,
            Start::Ready,
            (proj_wt.as_ref(), heads_p.as_ref().map(|(lhs, _)| lhs)),
        );
        layer_norm_into(
            &a.x2[span(&kq, d)],
            n2g,
            n2b,
            s.eps,
            &mut a.h2[span(&kiq, d)],
            keep.then(|| &mut a.moments2[span(&kq, 2)]),
        );
        let h2_p = both.then(|| pack_input(&a.h2[span(&kiq, d)], d)).flatten();
        let u = &mut a.u[span(&kq, m)];
        let packed = (fc1_wt.as_ref(), h2_p.as_ref().map(|(lhs, _)| lhs));
        linear_into(&a.h2[span(&kiq, d)], fc1_w, fc1_b, u, Start::Bias, packed);
        gelu_into(&a.u[span(&kq, m)], &mut a.g[span(&kq, m)]);
        let g_p = both.then(|| pack_input(&a.g[span(&kq, m)], m)).flatten();
        residual_plus_bias(&mut y, &a.x2[span(&kq, d)], fc2_b);
        linear_into(
            &a.g[span(&kq, m)],
            fc2_w,
            fc2_b,
            &mut y[span(&rq, d)],
            Start::Ready,
            (fc2_wt.as_ref(), g_p.as_ref().map(|(lhs, _)| lhs)),
        );
        if both {
            // The inputs as their weight gradients read them: packed above, or (the
            // rounded kernel, no bf16 instruction) packed now.
            let rhs = |packed: Option<(PackedLhs, PackedRhs)>, x: &[T], cols: usize| {
                packed
                    .map(|(_, rhs)| rhs)
                    .or_else(|| pack_activation(x, cols))
            };
            let inputs = [
                rhs(h1_p, &a.h1[span(&ki, d)], d),
                rhs(heads_p, &a.heads_out[span(&kiq, d)], d),
                rhs(h2_p, &a.h2[span(&kiq, d)], d),
                rhs(g_p, &a.g[span(&kq, m)], m),
            ];
            if let [Some(h1), Some(heads), Some(h2), Some(g)] = inputs {
                a.packed.push([h1, heads, h2, g]);
            }
        }
    }
    (y, keep.then_some(a))
}

/// [dx | d(packed parameters)] for the gradient `dy` of the block's output (queries x
/// D per image), tile by tile; the parameter gradients add up over the tiles.
fn block_backward<T: Real>(
    x: &[T],
    params: &[T],
    dy: &[T],
    a: &Activations<T>,
    s: BlockShape,
    z: Sizes,
) -> Vec<T> {
    let (d, m, t, nq) = (s.dim, s.mlp_dim, z.tokens, z.queries);
    let [n1g, _, qkv_w, _, proj_w, _, n2g, _, fc1_w, _, fc2_w, _, learned] =
        pieces(params, s.param_lens());
    let scales = s.scales(learned);
    // The linear layers' inputs, where the backward pass reads them as values (else
    // their products read the packed copies alone).
    let reads = reads_inputs::<T>(s);
    fn input<T>(buffer: &[T], values: std::ops::Range<usize>, reads: bool) -> &[T] {
        if reads {
            &buffer[values]
        } else {
            &[]
        }
    }
    let [qkv_wp, proj_wp, fc1_wp, fc2_wp] = packed_weights(s, [qkv_w, proj_w, fc1_w, fc2_w], false);
    // Aligned (the weight gradients' products store into it tile by tile), zeroed.
    let mut dparams = Buffer::new(s.param_count());
    dparams.fill(T::zero());
    // LayerNorm's γ and β are adjacent: their gradients are one piece each.
    let lens = s.param_lens();
    let [d_norm1, d_qkv_w, d_qkv_b, d_proj_w, d_proj_b, d_norm2, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b, d_scales] =
        pieces_mut(
            &mut dparams,
            [
                2 * d,
                3 * d * d,
                3 * d,
                d * d,
                d,
                2 * d,
                m * d,
                m,
                d * m,
                d,
                lens[12],
            ],
        );
    // dx, tile by tile, then the parameter gradients.
    let mut out = Vec::with_capacity(z.batch * t * d + s.param_count());
    // One tile's work buffers.
    let tile_images = TILE_IMAGES.min(z.batch);
    let (mut dg, mut du) = (
        Buffer::new(tile_images * nq * m),
        Buffer::new(tile_images * nq * m),
    );
    let mut dx2 = Buffer::new(tile_images * nq * d);
    let mut d_rows = Buffer::new(tile_images * t * d);
    let mut dqkv = Buffer::new(tile_images * t * 3 * d);
    for (tile, (first, images)) in tiles(z.batch).enumerate() {
        let (r, rq) = (image_rows(first, images, t), image_rows(first, images, nq));
        let (tq, tt) = (0..images * nq, 0..images * t);
        // The layers' inputs as the forward pass packed them, where it did.
        let [h1_p, heads_p, h2_p, g_p] = match a.packed.get(tile) {
            Some([h1, heads, h2, g]) => [Some(h1), Some(heads), Some(h2), Some(g)],
            None => [None; 4],
        };
        let (dg, du) = (&mut dg[span(&tq, m)], &mut du[span(&tq, m)]);
        let (dx2, dqkv) = (&mut dx2[span(&tq, d)], &mut dqkv[span(&tt, 3 * d)]);
        // MLP: y = x2 + fc2(GELU(fc1(LN2(x2)))); dx2 starts as the residual's dy.
        let g = &a.g[span(&rq, m)];
        let dy = &dy[span(&rq, d)];
        dx2.copy_from_slice(dy);
        let wp = Packed {
            w: fc2_wp.as_ref(),
            x: g_p,
        };
        // Each layer's packed input is fetched while the layer before it in the
        // backward pass runs: the forward pass packed it long ago, and a product whose
        // right factor comes from memory runs at about four fifths of the rate.
        prefetch_packed(h2_p);
        linear_grads_into(g, fc2_w, dy, Some(dg), d_fc2_w, d_fc2_b, wp);
        gelu_grad_into(&a.u[span(&rq, m)], g, dg, du);
        let dh2 = &mut d_rows[span(&tq, d)];
        let (h2, wp) = (
            input(&a.h2, span(&rq, d), reads),
            Packed {
                w: fc1_wp.as_ref(),
                x: h2_p,
            },
        );
        prefetch_packed(heads_p);
        linear_grads_into(h2, fc1_w, du, Some(dh2), d_fc1_w, d_fc1_b, wp);
        let moments2 = Some(&a.moments2[span(&rq, 2)]);
        layer_norm_grads_into(
            &a.x2[span(&rq, d)],
            n2g,
            dh2,
            s.eps,
            (dx2, d_norm2),
            moments2,
        );
        // Attention: x2 = x + proj(heads(qkv(LN1(x)))) for the query tokens.
        let d_heads = &mut d_rows[span(&tq, d)];
        let heads_out = input(&a.heads_out, span(&rq, d), reads);
        let wp = Packed {
            w: proj_wp.as_ref(),
            x: heads_p,
        };
        linear_grads_into(
            heads_out,
            proj_w,
            dx2,
            Some(d_heads),
            d_proj_w,
            d_proj_b,
            wp,
        );
        prefetch_packed(h1_p);
        attention_backward_into(
            reads_qkv::<T>(s).then(|| &a.qkv[span(&r, 3 * d)]),
            d_heads,
            s.attention(images, z),
            &scales,
            (
                Some(&a.weights[span(&r, s.heads * nq)]),
                a.attention.get(first * s.heads..(first + images) * s.heads),
            ),
            dqkv,
            s.lsa.then_some(&mut *d_scales),
        );
        let dh1 = &mut d_rows[span(&tt, d)];
        let (h1, wp) = (
            input(&a.h1, span(&r, d), reads),
            Packed {
                w: qkv_wp.as_ref(),
                x: h1_p,
            },
        );
        prefetch_packed(a.packed.get(tile + 1).map(|[.., g]| g));
        linear_grads_into(h1, qkv_w, dqkv, Some(dh1), d_qkv_w, d_qkv_b, wp);
        // dx: the residual's dx2 at the query tokens, plus LN1's part everywhere.
        for dx2 in dx2.chunks_exact(nq * d) {
            out.extend_from_slice(dx2);
            out.resize(out.len() + (t - nq) * d, T::zero());
        }
        let dx = &mut out[span(&r, d)];
        let moments1 = Some(&a.moments1[span(&r, 2)]);
        layer_norm_grads_into(&x[span(&r, d)], n1g, dh1, s.eps, (dx, d_norm1), moments1);
    }
    out.extend_from_slice(&dparams);
    out
}

/// Activations kept between a forward pass and its backward pass, type-erased
/// (`Activations<f32>` or `Activations<f64>`).
type Kept = Arc<Mutex<Option<Box<dyn Any + Send>>>>;

/// The block as a candle op on (x, packed parameters).
struct BlockOp {
    shape: BlockShape,
    output: BlockOutput,
    /// Whether a backward pass can follow (an input tracks gradients): only then are
    /// the activations kept.
    keep: bool,
    kept: Kept,
}

/// Checks x (batch, tokens, dim) and the packed parameters; returns the sizes.
fn check(
    s: BlockShape,
    output: BlockOutput,
    x: &Layout,
    params: &Layout,
    name: &str,
) -> Result<Sizes> {
    let (batch, tokens, dim) = match x.dims() {
        [b, t, d] => (*b, *t, *d),
        dims => bail!("{name}: expects x of (batch, tokens, dim), got {dims:?}"),
    };
    if dim != s.dim || s.heads == 0 || dim % s.heads != 0 {
        bail!(
            "{name}: x has {dim} channels for a block of dim {} and {} heads",
            s.dim,
            s.heads
        );
    }
    if params.shape().elem_count() != s.param_count() {
        bail!(
            "{name}: {} packed parameters for a block that has {}",
            params.shape().elem_count(),
            s.param_count()
        );
    }
    if tokens == 0 {
        bail!("{name}: expects at least one token (CLS)");
    }
    let queries = match output {
        BlockOutput::AllTokens => tokens,
        BlockOutput::ClsOnly => 1,
    };
    Ok(Sizes {
        batch,
        tokens,
        queries,
    })
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "transformer-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let z = check(self.shape, self.output, l1, l2, name)?;
        fn forward<T: Real>(op: &BlockOp, x: &[T], params: &[T], z: Sizes) -> Vec<T> {
            let (y, activations) = block_forward(x, params, op.shape, z, op.keep);
            if let Some(activations) = activations {
                *op.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(activations));
            }
            y
        }
        let out = by_dtype!(
            name,
            |x, params| forward(self, x, params, z),
            (s1, l1),
            (s2, l2)
        );
        Ok((out, Shape::from((z.batch, z.queries, self.shape.dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = BlockGrad {
            shape: self.shape,
            output: self.output,
            kept: self.kept.clone(),
        };
        let packed = x.apply_op3_no_bwd(params, &grad.contiguous()?, &op)?;
        let [dx, dparams] = unpack(&packed, [x.shape(), params.shape()]);
        Ok((Some(dx?), Some(dparams?)))
    }
}

/// The block's gradients from the activations its forward pass kept, packed as
/// [dx | d(packed parameters)]. It uses the activations up, so their buffers are
/// free again as soon as the block's backward pass is done.
struct BlockGrad {
    shape: BlockShape,
    output: BlockOutput,
    kept: Kept,
}

impl CustomOp3 for BlockGrad {
    fn name(&self) -> &'static str {
        "transformer-block-grad"
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
        let z = check(self.shape, self.output, l1, l2, name)?;
        if l3.dims() != [z.batch, z.queries, self.shape.dim] {
            bail!(
                "{name}: gradient of shape {:?} for x {:?}",
                l3.dims(),
                l1.dims()
            );
        }
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(kept) = kept else {
            bail!("{name}: no activations kept (one backward pass per forward pass)");
        };
        fn run<T: Real>(
            kept: Box<dyn Any + Send>,
            (x, params, dy): (&[T], &[T], &[T]),
            s: BlockShape,
            z: Sizes,
        ) -> Result<Vec<T>> {
            match kept.downcast::<Activations<T>>() {
                Ok(a) => Ok(block_backward(x, params, dy, &a, s, z)),
                Err(_) => bail!("transformer-block-grad: activations of another type"),
            }
        }
        let shape = self.shape;
        let out = by_dtype!(
            name,
            |x, params, dy| run(kept, (x, params, dy), shape, z),
            (s1, l1),
            (s2, l2),
            (s3, l3)
        );
        Ok((
            out,
            Shape::from(l1.shape().elem_count() + self.shape.param_count()),
        ))
    }
}

/// One pre-norm transformer block on x (batch, tokens, dim), its parameters packed
/// in one vector as [`BlockShape::param_lens`] lists them, fused, with backward. The
/// output is (batch, tokens, dim), or (batch, 1, dim) for [`BlockOutput::ClsOnly`].
pub fn block(
    x: &Tensor,
    params: &Tensor,
    shape: BlockShape,
    output: BlockOutput,
) -> Result<Tensor> {
    let keep = x.track_op() || params.track_op();
    x.contiguous()?.apply_op2(
        &params.contiguous()?,
        BlockOp {
            shape,
            output,
            keep,
            kept: Kept::default(),
        },
    )
}
