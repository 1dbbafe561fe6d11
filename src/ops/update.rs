//! The optimizer's elementwise updates as in-place ops: AdamW's two moments and its
//! step, Muon's momentum, and a weight's decay with an update subtracted, each one pass
//! over a parameter's values. Composed from candle's ops each term was a pass and a
//! fresh tensor: about 800 small ops a step for the default model, more time than
//! their arithmetic. The arithmetic here is candle's, term by term in the same order
//! and precision (`x * mul + add` for an affine map), so an update gives the composed
//! ops' bits; the tests hold the whole step to them (`train/optim.rs`).

use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use num_traits::Float;

/// The values a layout covers, which must be contiguous.
fn span<'a, T>(values: &'a [T], layout: &Layout, name: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => bail!("{name}: expects contiguous tensors"),
    }
}

fn span_mut<'a, T>(values: &'a mut [T], layout: &Layout, name: &str) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut values[start..end]),
        None => bail!("{name}: expects contiguous tensors"),
    }
}

/// `f64` to the tensor's type as candle's affine map converts its factors.
fn cast<T: Float>(v: f64) -> T {
    T::from(v).expect("a float")
}

/// An elementwise update of a tensor from another of its shape, written once for f32
/// and f64 ([`InPlace`] runs it on candle's storage).
trait Pairwise: Copy {
    const NAME: &'static str;
    fn apply<T: Float>(self, dst: &mut [T], src: &[T]);
}

/// A [`Pairwise`] update as candle's in-place op on its first tensor.
struct InPlace<P>(P);

impl<P: Pairwise> InplaceOp2 for InPlace<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = P::NAME;
        if l1.shape() != l2.shape() {
            bail!("{name}: shapes {:?} and {:?}", l1.dims(), l2.dims());
        }
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                self.0.apply(span_mut(d, l1, name)?, span(s, l2, name)?)
            }
            (CpuStorage::F64(d), CpuStorage::F64(s)) => {
                self.0.apply(span_mut(d, l1, name)?, span(s, l2, name)?)
            }
            _ => bail!("{name}: expects two f32 or two f64 tensors"),
        }
        Ok(())
    }
}

/// dst ← dst·a + f(src)·b, elementwise: `f` squares for AdamW's second moment; no `b`
/// adds f(src) itself (candle's `x + g`, not `x + g·1 + 0`, which differ in a zero's sign).
#[derive(Debug, Clone, Copy)]
struct Blend {
    a: f64,
    b: Option<f64>,
    square: bool,
}

impl Pairwise for Blend {
    const NAME: &'static str = "optimizer-blend";

    fn apply<T: Float>(self, dst: &mut [T], src: &[T]) {
        let (a, zero) = (cast::<T>(self.a), T::zero());
        let b = self.b.map(cast::<T>);
        for (d, &s) in dst.iter_mut().zip(src) {
            let s = if self.square { s * s } else { s };
            let term = match b {
                Some(b) => s * b + zero,
                None => s,
            };
            *d = (*d * a + zero) + term;
        }
    }
}

/// A moving average in place: avg ← β·avg + (1 − β)·x (AdamW's first moment, the
/// weights' EMA).
pub fn moving_average(avg: &Tensor, x: &Tensor, beta: f64) -> Result<()> {
    avg.inplace_op2(
        x,
        &InPlace(Blend {
            a: beta,
            b: Some(1.0 - beta),
            square: false,
        }),
    )
}

/// AdamW's second moment in place: v ← β·v + (1 − β)·g².
pub fn second_moment(v: &Tensor, g: &Tensor, beta: f64) -> Result<()> {
    v.inplace_op2(
        g,
        &InPlace(Blend {
            a: beta,
            b: Some(1.0 - beta),
            square: true,
        }),
    )
}

/// Muon's momentum buffer in place: b ← μ·b + g (the Nesterov direction g + μ·b is
/// taken from it after).
pub fn momentum(buffer: &Tensor, g: &Tensor, mu: f64) -> Result<()> {
    buffer.inplace_op2(
        g,
        &InPlace(Blend {
            a: mu,
            b: None,
            square: false,
        }),
    )
}

/// θ ← θ·keep − u·rate: a decayed weight with an update subtracted (Muon's step).
#[derive(Debug, Clone, Copy)]
struct Descend {
    keep: f64,
    rate: f64,
}

impl Pairwise for Descend {
    const NAME: &'static str = "optimizer-descend";

    fn apply<T: Float>(self, theta: &mut [T], update: &[T]) {
        let (keep, rate, zero) = (cast::<T>(self.keep), cast::<T>(self.rate), T::zero());
        for (w, &u) in theta.iter_mut().zip(update) {
            *w = (*w * keep + zero) - (u * rate + zero);
        }
    }
}

/// Muon's step in place: θ ← θ·(1 − lr·wd) − rate·o.
pub fn decay_and_descend(theta: &Tensor, update: &Tensor, keep: f64, rate: f64) -> Result<()> {
    theta.inplace_op2(update, &InPlace(Descend { keep, rate }))
}

/// AdamW's step from its moments: θ ← θ·keep − lr·(m / c1) / (√(v / c2) + ε), where
/// `keep` is 1 − lr·wd for a decayed weight and `None` leaves θ as it is.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub correction1: f64,
    pub correction2: f64,
    pub eps: f64,
    pub lr: f64,
    pub keep: Option<f64>,
}

fn adam_step<T: Float>(theta: &mut [T], m: &[T], v: &[T], op: AdamStep) {
    let zero = T::zero();
    let (inv1, inv2) = (
        cast::<T>(1.0 / op.correction1),
        cast::<T>(1.0 / op.correction2),
    );
    let (one, eps, lr) = (T::one(), cast::<T>(op.eps), cast::<T>(op.lr));
    let keep = op.keep.map(cast::<T>);
    for ((w, &m), &v) in theta.iter_mut().zip(m).zip(v) {
        // candle's: v.affine(1/c2, 0).sqrt().affine(1, eps), m.affine(1/c1, 0) / that.
        let denom = (v * inv2 + zero).sqrt() * one + eps;
        let update = (m * inv1 + zero) / denom;
        let kept = match keep {
            Some(k) => *w * k + zero,
            None => *w,
        };
        *w = kept - (update * lr + zero);
    }
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            bail!(
                "{}: shapes {:?}, {:?}, {:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let name = self.name();
        match (s1, s2, s3) {
            (CpuStorage::F32(w), CpuStorage::F32(m), CpuStorage::F32(v)) => adam_step(
                span_mut(w, l1, name)?,
                span(m, l2, name)?,
                span(v, l3, name)?,
                *self,
            ),
            (CpuStorage::F64(w), CpuStorage::F64(m), CpuStorage::F64(v)) => adam_step(
                span_mut(w, l1, name)?,
                span(m, l2, name)?,
                span(v, l3, name)?,
                *self,
            ),
            _ => bail!("{name}: expects three f32 or three f64 tensors"),
        }
        Ok(())
    }
}

/// AdamW's step in place on θ from its (already updated) moments.
pub fn adam_step_in_place(theta: &Tensor, m: &Tensor, v: &Tensor, step: AdamStep) -> Result<()> {
    theta.inplace_op3(m, v, &step)
}
