//! Multi-head self-attention as one op with its backward, from the packed q|k|v
//! projections: what the fused block and the per-layer path both run. With locality
//! self-attention (`model.attention = "lsa"`) the fused block also masks each query's
//! own token and learns a scale per head, whose gradient the backward pass returns.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::bf16::PackedRhs;
use super::kernel::{prefetch, Buffer, Real};
use super::products::{pack_native, product_with, Factors, IN_TASK};
use super::softmax::{softmax_grad_in_place, softmax_in_place};

/// Multi-head self-attention from the packed projections: qkv (B, T, 3·H·d) with the
/// last dimension ordered (q|k|v, head, d), to (B, T, H·d) =
/// concat over heads of softmax(scale · Q Kᵀ) V. One task per (image, head) on rayon's
/// pool, each with single-threaded products on its small matrices: candle's batched
/// matmul makes one multi-threaded gemm call per (image, head), whose dispatch cost
/// exceeds the product itself at 65 x 32. The weights are recomputed in backward rather
/// than kept (FlashAttention's trade: a little compute for no T x T tensor per head).
#[derive(Debug, Clone, Copy)]
struct Attention {
    heads: usize,
    scale: f64,
    bf16: bool,
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttentionShape {
    pub(super) batch: usize,
    pub(super) tokens: usize,
    /// The first `queries` tokens of each image are the queries (all of them but in
    /// the last block, where only CLS is read).
    pub(super) queries: usize,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
    /// Whether the products multiply bf16 factors (`model.matmul`).
    pub(super) bf16: bool,
    /// Locality self-attention's diagonal mask: query i gives token i no weight.
    pub(super) mask_diagonal: bool,
}

impl AttentionShape {
    pub(super) fn of(layout: &Layout, heads: usize, bf16: bool, name: &str) -> Result<Self> {
        let dims = layout.dims();
        let (batch, tokens, packed) = match dims {
            [b, t, c] => (*b, *t, *c),
            _ => bail!("{name}: expects (batch, tokens, 3 * dim), got {dims:?}"),
        };
        if heads == 0 || packed % (3 * heads) != 0 || packed == 0 {
            bail!("{name}: {packed} values per token do not split into q, k, v for {heads} heads");
        }
        if tokens == 0 {
            bail!("{name}: expects at least one token");
        }
        Ok(Self {
            batch,
            tokens,
            queries: tokens,
            heads,
            head_dim: packed / (3 * heads),
            bf16,
            mask_diagonal: false,
        })
    }

    /// How the products multiply.
    pub(super) fn factors(&self) -> Factors<'static> {
        match self.bf16 {
            true => Factors::Bf16,
            false => Factors::F32,
        }
    }

    pub(super) fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Values of the weights P of all images and heads (queries x tokens each).
    pub(super) fn weights_len(&self) -> usize {
        self.batch * self.heads * self.queries * self.tokens
    }

    /// Values of the output (or its gradient): queries x H·d per image.
    pub(super) fn out_len(&self) -> usize {
        self.batch * self.queries * self.dim()
    }
}

/// One (image, head)'s right-hand factors of the backward products, packed by the
/// forward pass while Q, K and V are in cache (bf16 products on a bf16 instruction
/// only): by the backward pass they have left it, and it reads half the bytes (bf16
/// pairs, not f32) and rounds nothing. The same pairs as packing them then, so the same
/// products. dV = Pᵀ dY packs P's transpose as its left factor from the f32 weights,
/// which the softmax's gradient reads next: taken as (dYᵀ P)ᵀ with P kept packed, its
/// rows were stored across dqkv one value at a time, a third of the other products'
/// rate (3.9 against 1.5 µs in a step).
pub(super) struct KeptFactors {
    /// Vᵀ (d_k x T), for dP = dY Vᵀ.
    vt: PackedRhs,
    /// K (T x d_k), for dQ = dS K.
    k: PackedRhs,
    /// Q (queries x d_k), for dK = dSᵀ Q.
    q: PackedRhs,
}

impl KeptFactors {
    /// Starts bringing the three factors into the cache.
    fn prefetch(&self) {
        for f in [&self.vt, &self.k, &self.q] {
            f.prefetch();
        }
    }

    /// Packs image b's head h from the projections, when the products run on a bf16
    /// instruction (None elsewhere).
    fn pack<T: Real>(qkv: &[T], s: AttentionShape, b: usize, h: usize) -> Option<Self> {
        let (t, nq, hd, d, d3) = (s.tokens, s.queries, s.head_dim, s.dim(), 3 * s.dim());
        if !s.bf16 {
            return None;
        }
        let base = b * t * d3 + h * hd;
        let (q, k, v) = (&qkv[base..], &qkv[base + d..], &qkv[base + 2 * d..]);
        let rows = |n: usize| n.saturating_sub(1) * d3 + hd;
        assert!(
            q.len() >= rows(nq) && v.len() >= rows(t),
            "attention: packed input size"
        );
        // SAFETY: each matrix lies inside qkv (checked above).
        unsafe {
            Some(Self {
                vt: pack_native((hd, t), v.as_ptr(), (1, d3))?,
                k: pack_native((t, hd), k.as_ptr(), (d3, 1))?,
                q: pack_native((nq, hd), q.as_ptr(), (d3, 1))?,
            })
        }
    }
}

/// A pointer that tasks share, each writing only its own (image, head) block.
struct Shared<T>(*mut T);
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}
impl<T> Shared<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// S = Q Kᵀ for one (image, head) into `p` (queries x T).
fn attention_scores<T: Real>(qkv: &[T], s: AttentionShape, b: usize, h: usize, p: &mut [T]) {
    let (t, nq, hd, d3) = (s.tokens, s.queries, s.head_dim, 3 * s.dim());
    let base = b * t * d3;
    let q = qkv[base + h * hd..].as_ptr();
    let k = qkv[base + s.dim() + h * hd..].as_ptr();
    assert_eq!(p.len(), nq * t, "one queries x t matrix");
    // SAFETY: q and k rows are `d3` apart, hd values each, t rows, all inside qkv;
    // `p` is queries x t (checked).
    unsafe {
        product_with(
            (nq, t, hd),
            p.as_mut_ptr(),
            (t, 1),
            q,
            (d3, 1),
            k,
            (1, d3),
            s.factors(),
            IN_TASK,
        );
    }
}

/// P = softmax(scale · Q Kᵀ) for one (image, head) into `p` (queries x T), each query's
/// own token masked out when `s.mask_diagonal` (and there is another token to look at).
fn attention_weights<T: Real>(
    qkv: &[T],
    s: AttentionShape,
    b: usize,
    h: usize,
    scale: T,
    p: &mut [T],
) {
    attention_scores(qkv, s, b, h, p);
    if s.mask_diagonal && s.tokens > 1 {
        // Scaled before the row maxima are taken, as the composed form does: a learned
        // scale may turn negative.
        for v in p.iter_mut() {
            *v = *v * scale;
        }
        for i in 0..s.queries {
            p[i * s.tokens + i] = T::neg_infinity();
        }
        softmax_in_place(p, s.tokens, T::one());
    } else {
        softmax_in_place(p, s.tokens, scale);
    }
}

/// One (image, head)'s part of its scale's gradient Σ dL/dZ ⊙ S, with Z = scale · S,
/// from P, dL/dP and S: per row Σ P·dP·S − (Σ P·dP)(Σ P·S), since
/// dL/dZ = P ⊙ (dP − Σ P·dP). Masked entries have P = 0 and add nothing.
fn scale_grad_part<T: Real>(p: &[T], dp: &[T], scores: &[T], t: usize) -> T {
    let rows = p
        .chunks_exact(t)
        .zip(dp.chunks_exact(t))
        .zip(scores.chunks_exact(t));
    rows.fold(T::zero(), |acc, ((p, dp), s)| {
        let (mut pgs, mut pg, mut ps) = (T::zero(), T::zero(), T::zero());
        for ((&p, &g), &v) in p.iter().zip(dp).zip(s) {
            pgs += p * g * v;
            pg += p * g;
            ps += p * v;
        }
        acc + pgs - pg * ps
    })
}

/// The same scale for every head.
fn same_scale<T: Real>(s: AttentionShape, scale: f64) -> Vec<T> {
    vec![T::from(scale).expect("a float"); s.heads]
}

fn attention_forward<T: Real>(qkv: &[T], s: AttentionShape, scale: f64) -> Vec<T> {
    let mut out = vec![T::zero(); s.out_len()];
    let mut weights = vec![T::zero(); s.weights_len()];
    let scales = same_scale(s, scale);
    attention_forward_into(qkv, s, &scales, (&mut out, &mut weights), None);
    out
}

/// Attention of every (image, head) into `out` (B, queries, H·d), keeping the weights
/// P in `weights` (B, H, queries, T); `scales`: each head's scale of Q Kᵀ. With `kept`,
/// each (image, head)'s [`KeptFactors`] are appended to it, in the weights' order
/// (nothing where the products do not run on a bf16 instruction).
pub(super) fn attention_forward_into<T: Real>(
    qkv: &[T],
    s: AttentionShape,
    scales: &[T],
    (out, weights): (&mut [T], &mut [T]),
    kept: Option<&mut Vec<KeptFactors>>,
) {
    use rayon::prelude::*;
    let (t, nq, hd, d, d3) = (s.tokens, s.queries, s.head_dim, s.dim(), 3 * s.dim());
    // The tasks write through a shared pointer: the sizes are checked, not assumed.
    assert_eq!(qkv.len(), s.batch * t * d3, "attention: packed input size");
    assert_eq!(out.len(), s.out_len(), "attention: output size");
    assert_eq!(weights.len(), s.weights_len(), "attention: weights size");
    assert_eq!(scales.len(), s.heads, "attention: a scale per head");
    let dst = Shared(out.as_mut_ptr());
    let keep = kept.is_some();
    let packed: Vec<Option<KeptFactors>> = weights
        .par_chunks_exact_mut(nq * t)
        .enumerate()
        .map(|(task, p)| {
            let (b, h) = (task / s.heads, task % s.heads);
            attention_weights(qkv, s, b, h, scales[h], p);
            let v = qkv[b * t * d3 + 2 * d + h * hd..].as_ptr();
            // SAFETY: this task alone writes columns h*hd..(h+1)*hd of image b's rows.
            unsafe {
                let o = dst.get().add(b * nq * d + h * hd);
                product_with(
                    (nq, hd, t),
                    o,
                    (d, 1),
                    p.as_ptr(),
                    (t, 1),
                    v,
                    (d3, 1),
                    s.factors(),
                    IN_TASK,
                );
            }
            keep.then(|| KeptFactors::pack(qkv, s, b, h)).flatten()
        })
        .collect();
    if let Some(kept) = kept {
        kept.extend(packed.into_iter().flatten());
    }
}

fn attention_backward<T: Real>(qkv: &[T], grad: &[T], s: AttentionShape, scale: f64) -> Vec<T> {
    let mut dqkv = vec![T::zero(); qkv.len()];
    let scales = same_scale(s, scale);
    attention_backward_into(Some(qkv), grad, s, &scales, (None, None), &mut dqkv, None);
    dqkv
}

/// The gradient of the packed projections into `dqkv` (every value written), from
/// the weights kept by the forward pass, or recomputed when `weights` is None, and the
/// factors it packed (`kept`: one per (image, head), or None to read Q, K, V, P). With
/// `dscales`, each head's scale gradient Σ dL/dZ ⊙ Q Kᵀ (Z = scale · Q Kᵀ) is added to
/// it, summed over the images in order whatever the threads: Q Kᵀ is recomputed for it.
/// `qkv` (the projections) may be None only with `weights`, `kept` and no `dscales`,
/// where nothing reads them: the fused block then keeps no copy of them.
pub(super) fn attention_backward_into<T: Real>(
    qkv: Option<&[T]>,
    grad: &[T],
    s: AttentionShape,
    scales: &[T],
    (weights, kept): (Option<&[T]>, Option<&[KeptFactors]>),
    dqkv: &mut [T],
    dscales: Option<&mut [T]>,
) {
    use rayon::prelude::*;
    let (t, nq, hd, d, d3) = (s.tokens, s.queries, s.head_dim, s.dim(), 3 * s.dim());
    // The tasks write through a shared pointer: the sizes are checked, not assumed.
    assert!(
        qkv.is_none_or(|qkv| qkv.len() == s.batch * t * d3),
        "attention: packed input size"
    );
    assert!(
        qkv.is_some() || (weights.is_some() && kept.is_some() && dscales.is_none()),
        "attention: the projections are read without weights, kept factors or with scales"
    );
    assert_eq!(dqkv.len(), s.batch * t * d3, "attention: gradient size");
    assert!(nq <= t, "attention: more queries than tokens");
    assert_eq!(grad.len(), s.out_len(), "attention: output gradient size");
    assert!(
        weights.is_none_or(|w| w.len() == s.weights_len()),
        "attention: weights size"
    );
    assert_eq!(scales.len(), s.heads, "attention: a scale per head");
    assert!(
        kept.is_none_or(|k| k.len() == s.batch * s.heads),
        "attention: kept factors per (image, head)"
    );
    assert!(
        dscales.as_ref().is_none_or(|d| d.len() == s.heads),
        "attention: a scale gradient per head"
    );
    let with_scales = dscales.is_some();
    let dst = Shared(dqkv.as_mut_ptr());
    // Queries x t work matrices per rayon job (not per task): dP, then dS in its
    // place; P where it is recomputed; Q Kᵀ for the scales' gradient. Each is written
    // whole before it is read (aligned pool buffers, see `Buffer`).
    let work = || {
        let scores = if with_scales { nq * t } else { 0 };
        (
            Buffer::new(nq * t),
            Buffer::new(nq * t),
            Buffer::new(scores),
        )
    };
    let tasks = 0..s.batch * s.heads;
    // Each task's part of its head's scale gradient (zero without `dscales`).
    let parts: Vec<T> = tasks
        .into_par_iter()
        .map_init(work, |(dp, recomputed, scores), task| {
            let (b, h) = (task / s.heads, task % s.heads);
            let scale = scales[h];
            let p = match (weights, qkv) {
                (Some(w), _) => &w[task * nq * t..(task + 1) * nq * t],
                (None, Some(qkv)) => {
                    attention_weights(qkv, s, b, h, scale, recomputed);
                    &recomputed[..]
                }
                (None, None) => unreachable!("the weights or the projections (asserted)"),
            };
            let base = b * t * d3;
            // Q, K and V where they are kept; where they are not, every product reads
            // its kept factor instead (asserted above).
            let at = |offset: usize| qkv.map_or(std::ptr::null(), |qkv| qkv[offset..].as_ptr());
            let (q, k, v) = (
                at(base + h * hd),
                at(base + d + h * hd),
                at(base + 2 * d + h * hd),
            );
            let dy = grad[b * nq * d + h * hd..].as_ptr();
            // The next task's kept factors and weights, written by the forward pass
            // long ago, fetched while this one runs: read cold, the products that take
            // them ran at two thirds of the rate of those that do not.
            if let Some(next) = kept.and_then(|k| k.get(task + 1)) {
                next.prefetch();
            }
            if let Some(next) =
                weights.and_then(|w| w.get((task + 1) * nq * t..(task + 2) * nq * t))
            {
                prefetch(next);
            }
            let kept = kept.map(|k| &k[task]);
            // The right-hand factor packed by the forward pass, if it was.
            let packed = |f: fn(&KeptFactors) -> &PackedRhs| match kept {
                Some(k) => Factors::Bf16Packed(f(k)),
                None => s.factors(),
            };
            // SAFETY: inputs as in the forward pass; this task alone writes the q, k and v
            // columns of head h for image b in dqkv.
            unsafe {
                let out = dst.get().add(base + h * hd);
                // dV = Pᵀ dY
                product_with(
                    (t, hd, nq),
                    out.add(2 * d),
                    (d3, 1),
                    p.as_ptr(),
                    (1, t),
                    dy,
                    (d, 1),
                    s.factors(),
                    IN_TASK,
                );
                // dP = dY Vᵀ
                product_with(
                    (nq, t, hd),
                    dp.as_mut_ptr(),
                    (t, 1),
                    dy,
                    (d, 1),
                    v,
                    (1, d3),
                    packed(|k| &k.vt),
                    IN_TASK,
                );
            }
            let part = match (with_scales, qkv) {
                (true, Some(qkv)) => {
                    attention_scores(qkv, s, b, h, scores);
                    scale_grad_part(p, dp, scores, t)
                }
                _ => T::zero(),
            };
            // dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)), in dP's place.
            softmax_grad_in_place(p, dp, t, scale);
            let ds = dp;
            unsafe {
                let out = dst.get().add(base + h * hd);
                // dQ = dS K, dK = dSᵀ Q; tokens that are no query get no dQ.
                product_with(
                    (nq, hd, t),
                    out,
                    (d3, 1),
                    ds.as_ptr(),
                    (t, 1),
                    k,
                    (d3, 1),
                    packed(|k| &k.k),
                    IN_TASK,
                );
                for row in nq..t {
                    std::ptr::write_bytes(out.add(row * d3), 0, hd);
                }
                product_with(
                    (t, hd, nq),
                    out.add(d),
                    (d3, 1),
                    ds.as_ptr(),
                    (1, t),
                    q,
                    (d3, 1),
                    packed(|k| &k.q),
                    IN_TASK,
                );
            }
            part
        })
        .collect();
    if let Some(dscales) = dscales {
        for (task, part) in parts.into_iter().enumerate() {
            dscales[task % s.heads] += part;
        }
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = AttentionShape::of(layout, self.heads, self.bf16, self.name())?;
        let scale = self.scale;
        let out = by_dtype!(
            self.name(),
            |x| attention_forward(x, s, scale),
            (storage, layout)
        );
        Ok((out, Shape::from((s.batch, s.tokens, s.dim()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &grad,
            &AttentionGrad {
                heads: self.heads,
                scale: self.scale,
                bf16: self.bf16,
            },
        )?))
    }
}

/// The gradient of [`Attention`] with respect to its packed input.
#[derive(Debug, Clone, Copy)]
struct AttentionGrad {
    heads: usize,
    scale: f64,
    bf16: bool,
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = AttentionShape::of(l1, self.heads, self.bf16, self.name())?;
        if l2.dims() != [s.batch, s.tokens, s.dim()] {
            bail!(
                "{}: gradient of shape {:?} for {:?}",
                self.name(),
                l2.dims(),
                l1.dims()
            );
        }
        let scale = self.scale;
        let out = by_dtype!(
            self.name(),
            |x, g| attention_backward(x, g, s, scale),
            (s1, l1),
            (s2, l2)
        );
        Ok((out, l1.shape().clone()))
    }
}

/// softmax(scale · Q Kᵀ) V for every head, from the packed (B, T, 3·H·d) projections,
/// fused, with backward. `model::Attention` keeps the composed form as the reference
/// (and for probes, which record the weights). `bf16`: the products multiply bf16
/// factors ([`bf16`]).
pub fn attention(qkv: &Tensor, heads: usize, scale: f64, bf16: bool) -> Result<Tensor> {
    qkv.contiguous()?
        .apply_op1(Attention { heads, scale, bf16 })
}
