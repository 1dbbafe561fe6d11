//! Linear layers (product + bias) as one op with its backward: the per-layer
//! reference of the fused block's layers, and what the patch embedding and head run.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::bf16::{PackedLhs, PackedRhs};
use super::kernel::{add_row_sums, add_rows_chunk, unpack, Real};
use super::products::{
    gemm_parallelism, pack_gradient, pack_weight, product_onto_row, product_packed, product_with,
    Factors, SumsFrom,
};

/// y = x Wᵀ + b over the last dimension of x, as one op: one node in the autograd
/// graph instead of four (reshape, transpose, product, bias). Candle's backward
/// zero-fills a gradient slot for every node and adds into it; with one node per
/// linear layer there is one slot per input, and the three gradients are three
/// products and a column sum.
#[derive(Debug, Clone, Copy)]
struct Linear {
    /// Whether the products multiply bf16 factors ([`bf16`]).
    bf16: bool,
}

fn linear_forward<T: Real>(x: &[T], w: &[T], b: &[T], bf16: bool) -> Vec<T> {
    let (out_dim, in_dim) = (b.len(), w.len() / b.len().max(1));
    let rows = x.len() / in_dim.max(1);
    let mut y = vec![T::zero(); rows * out_dim];
    let wt = bf16
        .then(|| pack_weight(w, (out_dim, in_dim), true))
        .flatten();
    linear_into(x, w, b, &mut y, Start::Bias, (wt.as_ref(), None));
    y
}

/// What [`linear_into`] starts y's rows from before it adds the product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Start {
    /// The bias: whatever y held is overwritten.
    Bias,
    /// What y holds, the bias included already (a residual stream and the bias
    /// written in one pass, see [`residual_plus_bias`]).
    Ready,
}

/// y = start + x Wᵀ over rows, in place: the rows start from the bias, or from what
/// they hold (a residual plus the bias), and the product is added onto them, so there
/// is no zero fill and no separate pass for the bias (the AMX tiles load the bias
/// themselves). `packed`: Wᵀ packed for bf16 products, and x too where it was packed
/// already (as the left factor: the same rows as packing it here).
pub(super) fn linear_into<T: Real>(
    x: &[T],
    w: &[T],
    b: &[T],
    y: &mut [T],
    start: Start,
    packed: (Option<&PackedRhs>, Option<&PackedLhs>),
) {
    let (out_dim, in_dim) = (b.len(), w.len() / b.len().max(1));
    let rows = x.len() / in_dim.max(1);
    assert_eq!(y.len(), rows * out_dim, "linear: output size");
    let (bf16_wt, packed_x) = packed;
    if let (Some(wt), Some(px)) = (bf16_wt, packed_x) {
        let from = match start {
            Start::Bias => SumsFrom::Row(b),
            Start::Ready => SumsFrom::Dst,
        };
        // SAFETY: y is rows x out_dim (checked); the product checks the packed shapes.
        unsafe { product_packed(y.as_mut_ptr(), out_dim, px, wt, from) };
        return;
    }
    let factors = bf16_wt.map_or(Factors::F32, Factors::Bf16Packed);
    // SAFETY: y is rows x out_dim (checked), x rows x in_dim, w out_dim x in_dim
    // (read as Wᵀ; a packed Wᵀ is checked by the product), b out_dim values.
    unsafe {
        if start == Start::Bias {
            product_onto_row(
                (rows, out_dim, in_dim),
                y.as_mut_ptr(),
                out_dim,
                x.as_ptr(),
                (in_dim, 1),
                w.as_ptr(),
                (1, in_dim),
                factors,
                (b, gemm_parallelism()),
            );
            return;
        }
        product_with(
            (rows, out_dim, in_dim),
            y.as_mut_ptr(),
            (out_dim, 1),
            x.as_ptr(),
            (in_dim, 1),
            w.as_ptr(),
            (1, in_dim),
            factors,
            (true, gemm_parallelism()),
        );
    }
}

/// `dst` = `x` + `bias` in every row, in one pass: a residual stream with the bias of
/// the layer that adds onto it ([`Start::Ready`]).
pub(super) fn plus_bias<T: Real>(dst: &mut [T], x: &[T], bias: &[T]) {
    assert_eq!(dst.len(), x.len(), "plus_bias: sizes");
    for (dst, x) in dst
        .chunks_exact_mut(bias.len())
        .zip(x.chunks_exact(bias.len()))
    {
        for ((d, &x), &b) in dst.iter_mut().zip(x).zip(bias) {
            *d = x + b;
        }
    }
}

/// Appends `x` + `bias` (in every row) to `y` in one pass: a residual stream with the
/// bias of the layer that adds onto it ([`Start::Ready`]).
pub(super) fn residual_plus_bias<T: Real>(y: &mut Vec<T>, x: &[T], bias: &[T]) {
    assert!(
        !bias.is_empty() && x.len().is_multiple_of(bias.len()),
        "residual_plus_bias: whole rows"
    );
    let len = y.len();
    y.reserve(x.len());
    let spare = &mut y.spare_capacity_mut()[..x.len()];
    for (dst, src) in spare
        .chunks_exact_mut(bias.len())
        .zip(x.chunks_exact(bias.len()))
    {
        for ((d, &x), &b) in dst.iter_mut().zip(src).zip(bias) {
            d.write(x + b);
        }
    }
    // SAFETY: the x.len() values after len were written above (x is whole rows).
    unsafe { y.set_len(len + x.len()) };
}

/// [dx | dW | db] for y = x Wᵀ + b (W out_dim x in_dim) and the gradient g of y.
fn linear_backward<T: Real>(x: &[T], w: &[T], g: &[T], out_dim: usize, bf16: bool) -> Vec<T> {
    let (nx, nw) = (x.len(), w.len());
    let mut out = vec![T::zero(); nx + nw + out_dim];
    let (dx, rest) = out.split_at_mut(nx);
    let (dw, db) = rest.split_at_mut(nw);
    let packed = bf16
        .then(|| pack_weight(w, (out_dim, nw / out_dim.max(1)), false))
        .flatten();
    let packed = Packed {
        w: packed.as_ref(),
        x: None,
    };
    linear_grads_into(x, w, g, Some(dx), dw, db, packed);
    out
}

/// The factors of a layer's bf16 gradient products packed already: W (for dx = g W)
/// and the layer's input x (for dW = gᵀ x, packed by the forward pass). No W: f32
/// products.
#[derive(Clone, Copy, Default)]
pub(super) struct Packed<'a> {
    pub w: Option<&'a PackedRhs>,
    pub x: Option<&'a PackedRhs>,
}

/// The gradients of y = x Wᵀ + b for the gradient g of y: dx = g W written over `dx`
/// (when wanted); dW = gᵀ x and db = the column sums of g added into `dw` and `db`, so
/// that blocks of rows can add up their parts. `x` is not read where it comes packed
/// (`packed.x`), and may then be empty: the rows are g's.
pub(super) fn linear_grads_into<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: &mut [T],
    packed: Packed,
) {
    let out_dim = db.len();
    let in_dim = w.len() / out_dim.max(1);
    let rows = g.len() / out_dim.max(1);
    assert_eq!(g.len(), rows * out_dim, "linear: output gradient size");
    assert_eq!(dw.len(), w.len(), "linear: weight gradient size");
    // x is read unless both factors of dW's product come packed.
    let reads_x = !matches!(
        packed,
        Packed {
            w: Some(_),
            x: Some(_)
        }
    );
    if reads_x || !x.is_empty() {
        assert_eq!(x.len(), rows * in_dim, "linear: input size");
    }
    if let Some(dx) = &dx {
        assert_eq!(dx.len(), rows * in_dim, "linear: input gradient size");
    }
    // Where both other factors come packed, both products' left factor is g (as g and
    // as gᵀ): packed in one pass.
    let g_packed = match (packed.w, packed.x) {
        (Some(_), Some(_)) => pack_gradient(g, out_dim),
        _ => None,
    };
    // SAFETY: each destination is its own slice of the size its shape needs (checked);
    // shapes as in the forward pass, packed ones checked by the products.
    unsafe {
        if let (Some(wp), Some(xp), Some((g_rows, g_t))) = (packed.w, packed.x, g_packed) {
            if let Some(dx) = dx {
                product_packed(dx.as_mut_ptr(), in_dim, &g_rows, wp, SumsFrom::Zero);
            }
            product_packed(dw.as_mut_ptr(), in_dim, &g_t, xp, SumsFrom::Dst);
        } else {
            let (dx_factors, dw_factors) = match (packed.w, packed.x) {
                (Some(w), Some(x)) => (Factors::Bf16Packed(w), Factors::Bf16Packed(x)),
                (Some(w), None) => (Factors::Bf16Packed(w), Factors::Bf16),
                (None, _) => (Factors::F32, Factors::F32),
            };
            if let Some(dx) = dx {
                // dx = g W: (rows x out) · (out x in)
                product_with(
                    (rows, in_dim, out_dim),
                    dx.as_mut_ptr(),
                    (in_dim, 1),
                    g.as_ptr(),
                    (out_dim, 1),
                    w.as_ptr(),
                    (in_dim, 1),
                    dx_factors,
                    (false, gemm_parallelism()),
                );
            }
            // dW += gᵀ x: (out x rows) · (rows x in)
            product_with(
                (out_dim, in_dim, rows),
                dw.as_mut_ptr(),
                (in_dim, 1),
                g.as_ptr(),
                (1, out_dim),
                x.as_ptr(),
                (in_dim, 1),
                dw_factors,
                (true, gemm_parallelism()),
            );
        }
    }
    add_row_sums(rows, db, |range, partial| {
        add_rows_chunk(&g[range.start * out_dim..range.end * out_dim], partial);
    });
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (out_dim, in_dim) = l2.shape().dims2()?;
        if l3.shape().elem_count() != out_dim || l1.dims().last() != Some(&in_dim) {
            bail!(
                "{name}: x {:?}, weight {:?} and bias {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let bf16 = self.bf16;
        let out = by_dtype!(
            name,
            |x, w, b| linear_forward(x, w, b, bf16),
            (s1, l1),
            (s2, l2),
            (s3, l3)
        );
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("checked above") = out_dim;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = LinearGrad { bf16: self.bf16 };
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let [dx, dw, db] = unpack(&packed, [x.shape(), w.shape(), b.shape()]);
        Ok((Some(dx?), Some(dw?), Some(db?)))
    }
}

/// The three gradients of [`Linear`], packed as [dx | dW | db].
#[derive(Debug, Clone, Copy)]
struct LinearGrad {
    bf16: bool,
}

impl CustomOp3 for LinearGrad {
    fn name(&self) -> &'static str {
        "linear-grad"
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
        let (out_dim, _) = l2.shape().dims2()?;
        let len = l1.shape().elem_count() + l2.shape().elem_count() + out_dim;
        let bf16 = self.bf16;
        let out = by_dtype!(
            name,
            |x, w, g| linear_backward(x, w, g, out_dim, bf16),
            (s1, l1),
            (s2, l2),
            (s3, l3)
        );
        Ok((out, Shape::from(len)))
    }
}

/// x Wᵀ + b over the last dimension of x (W is out x in, as stored), fused, with backward.
/// `bf16`: the products multiply bf16 factors ([`bf16`]).
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, bf16: bool) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear { bf16 })
}
