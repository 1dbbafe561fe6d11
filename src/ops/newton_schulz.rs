//! Muon's Newton-Schulz iterations over a stack of matrices as one op: each matrix on
//! a task of its own, its three products per iteration on that thread into buffers
//! made once, in bf16 factors where the model's products are (Muon's own recipe runs
//! them in bf16) or in f32. Composed from candle's batched matmul and elementwise ops,
//! the iterations were most of a Muon step here: fresh tensors and small ops, not
//! arithmetic. The composed form stays in `train/optim.rs` as the reference.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::kernel::{Buffer, Real};
use super::products::{product_with, Factors, IN_TASK};

/// `steps` iterations X ← a·X + (b·A + c·A²)·X with A = X Xᵀ, on each of a stack of
/// (rows x cols) matrices.
#[derive(Debug, Clone, Copy)]
struct NewtonSchulz {
    steps: usize,
    coefficients: (f64, f64, f64),
    bf16: bool,
}

/// The iterations on each (rows x cols) matrix of `x`, on its wide side: a tall
/// matrix X (rows > cols) is iterated as Xᵀ is, in its own layout. With Y = Xᵀ,
/// A = Y Yᵀ = Xᵀ X, and the step a·Y + P·Y (P = b·A + c·A², symmetric) is
/// (a·X + X·P)ᵀ: the same products over the same inner index in the same order
/// (A and P come out symmetric to the bit), so the same values as transposing X,
/// iterating and transposing back, without the two copies.
fn iterate<T: Real>(x: &[T], (rows, cols): (usize, usize), op: NewtonSchulz) -> Vec<T> {
    use rayon::prelude::*;
    // w: the wide side's rows (the Gram matrix's size); l: its columns.
    let (w, l) = (rows.min(cols), rows.max(cols));
    let tall = rows > cols;
    let factors = match op.bf16 {
        true => Factors::Bf16,
        false => Factors::F32,
    };
    let t = |v: f64| T::from(v).expect("a float");
    let (a, b, cc) = (
        t(op.coefficients.0),
        t(op.coefficients.1),
        t(op.coefficients.2),
    );
    let mut out = x.to_vec();
    // Work buffers per rayon job: A, then b·A + c·A² (A² written first), then the next X.
    let work = || (Buffer::new(w * w), Buffer::new(w * w), Buffer::new(w * l));
    out.par_chunks_exact_mut(w * l)
        .for_each_init(work, |(gram, poly, next), x| {
            for _ in 0..op.steps {
                // SAFETY: every matrix is its buffer's size (w x w, or rows x cols
                // row-major), and no destination is also an input.
                unsafe {
                    // A = X Xᵀ (wide: X read transposed as the right factor), or Xᵀ X
                    // (tall: X read transposed as the left factor).
                    let (lhs, rhs) = match tall {
                        false => ((l, 1), (1, l)),
                        true => ((1, w), (w, 1)),
                    };
                    product_with(
                        (w, w, l),
                        gram.as_mut_ptr(),
                        (w, 1),
                        x.as_ptr(),
                        lhs,
                        x.as_ptr(),
                        rhs,
                        factors,
                        IN_TASK,
                    );
                    product_with(
                        (w, w, w),
                        poly.as_mut_ptr(),
                        (w, 1),
                        gram.as_ptr(),
                        (w, 1),
                        gram.as_ptr(),
                        (w, 1),
                        factors,
                        IN_TASK,
                    );
                }
                for (p, &g) in poly.iter_mut().zip(gram.iter()) {
                    *p = b * g + cc * *p;
                }
                for (y, &v) in next.iter_mut().zip(x.iter()) {
                    *y = a * v;
                }
                // SAFETY: as above; `next` (rows x cols) is added to.
                unsafe {
                    match tall {
                        // a·X + P·X
                        false => product_with(
                            (w, l, w),
                            next.as_mut_ptr(),
                            (l, 1),
                            poly.as_ptr(),
                            (w, 1),
                            x.as_ptr(),
                            (l, 1),
                            factors,
                            (true, IN_TASK.1),
                        ),
                        // a·X + X·P
                        true => product_with(
                            (l, w, w),
                            next.as_mut_ptr(),
                            (w, 1),
                            x.as_ptr(),
                            (w, 1),
                            poly.as_ptr(),
                            (w, 1),
                            factors,
                            (true, IN_TASK.1),
                        ),
                    }
                }
                x.copy_from_slice(&next[..]);
            }
        });
    out
}

impl CustomOp1 for NewtonSchulz {
    fn name(&self) -> &'static str {
        "newton-schulz"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = match layout.dims() {
            [_, r, c] if *r > 0 && *c > 0 => (*r, *c),
            dims => bail!(
                "{}: expects (matrices, rows, cols), got {dims:?}",
                self.name()
            ),
        };
        let op = *self;
        let out = by_dtype!(
            self.name(),
            |x| iterate(x, (rows, cols), op),
            (storage, layout)
        );
        Ok((out, layout.shape().clone()))
    }
}

/// `steps` Newton-Schulz iterations X ← a·X + (b·A + c·A²)·X, A = X Xᵀ, on each matrix
/// of the stack `x` (matrices, rows, cols; a tall one's iterations run on Xᵀ, in X's
/// layout, which keeps the products small), with
/// `coefficients` (a, b, c). `bf16`: the products multiply bf16 factors (f32 values
/// only; f64 stays exact). No gradient: an optimizer's step.
pub fn newton_schulz(
    x: &Tensor,
    steps: usize,
    coefficients: (f64, f64, f64),
    bf16: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&NewtonSchulz {
        steps,
        coefficients,
        bf16,
    })
}

#[cfg(test)]
mod tests {
    use super::super::composed;
    use super::super::tests::values;
    use super::*;
    use candle_core::{DType, Device};

    /// A stack of `n` (rows x cols) matrices, normalised as Muon normalises them.
    fn stack(n: usize, rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f64> = (0..n * rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let g = Tensor::from_vec(v, (n, rows, cols), &Device::Cpu).unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_keepdim(2)
            .unwrap()
            .sum_keepdim(1)
            .unwrap();
        g.broadcast_div(&norm.sqrt().unwrap()).unwrap()
    }

    const MUON: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

    #[test]
    fn the_fused_iterations_are_the_composed_ones() {
        // Muon's shapes (wide side first) and a ragged one that fills no tile.
        for (n, rows, cols) in [(6, 96, 288), (6, 96, 192), (2, 17, 45)] {
            let x = stack(n, rows, cols, rows as u64);
            let reference = values(&composed::newton_schulz(&x, 5, MUON).unwrap());
            // f64: the same arithmetic, summed in another order.
            let fused = values(&newton_schulz(&x, 5, MUON, false).unwrap());
            let worst = fused
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-12, "f64 {rows}x{cols}: {worst}");
            // f32, and bf16 factors: the error relative to the whole (Frobenius), in
            // units of the factors' own rounding (2^-24 for f32, 2^-8 for bf16). The
            // iterations amplify a rounding a few times over (the polynomial's slope
            // at small singular values is a = 3.4), so a few units, not one: measured
            // 4.7-6.2 units in bf16 and 16-25 in f32 at these shapes.
            let x32 = x.to_dtype(DType::F32).unwrap();
            let norm = reference.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (bf16, unit, units) in [(false, 2f64.powi(-24), 64.0), (true, 2f64.powi(-8), 8.0)] {
                let got = values(&newton_schulz(&x32, 5, MUON, bf16).unwrap());
                let error = got
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    .sqrt()
                    / norm;
                assert!(
                    error <= units * unit,
                    "bf16 {bf16} {rows}x{cols}: relative error {error:.3e} = {:.2} units",
                    error / unit
                );
            }
        }
    }

    /// A tall stack is iterated on its transposes in its own layout: the same values,
    /// to the bit, as transposing it, iterating and transposing back (what Muon did
    /// before), in f64, f32 and bf16 factors on this CPU's product kind.
    #[test]
    fn a_tall_stack_gives_the_bits_of_its_transposes_iterations() {
        for (n, rows, cols) in [(6, 288, 96), (6, 192, 96), (2, 45, 17)] {
            let x = stack(n, rows, cols, cols as u64);
            for (dtype, bf16) in [(DType::F64, false), (DType::F32, false), (DType::F32, true)] {
                let x = x.to_dtype(dtype).unwrap();
                let tall = values(&newton_schulz(&x, 5, MUON, bf16).unwrap());
                let wide = x.transpose(1, 2).unwrap().contiguous().unwrap();
                let wide = newton_schulz(&wide, 5, MUON, bf16).unwrap();
                let back = values(&wide.transpose(1, 2).unwrap().contiguous().unwrap());
                let bits = |v: &[f64]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&tall),
                    bits(&back),
                    "{rows}x{cols} {dtype:?} bf16 {bf16}"
                );
                assert_ne!(values(&x), tall, "iterated");
            }
        }
    }

    #[test]
    fn each_matrix_of_a_stack_is_iterated_alone_and_repeats_exactly() {
        let x = stack(3, 24, 40, 7).to_dtype(DType::F32).unwrap();
        for bf16 in [false, true] {
            let whole = values(&newton_schulz(&x, 5, MUON, bf16).unwrap());
            let again = values(&newton_schulz(&x, 5, MUON, bf16).unwrap());
            assert_eq!(whole, again, "bf16 {bf16}: the same bits every time");
            let one = values(&newton_schulz(&x.narrow(0, 1, 1).unwrap(), 5, MUON, bf16).unwrap());
            assert_eq!(&whole[24 * 40..2 * 24 * 40], &one[..], "bf16 {bf16}");
        }
    }
}
