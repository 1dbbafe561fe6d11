//! Fused operations with forward and backward, as candle custom ops.
//!
//! Composed from small candle ops, a LayerNorm keeps six intermediate tensors alive in
//! the autograd graph and a softmax four; fused, each keeps only its output. That is
//! what brings training under 1 GiB. The composed versions stay in `model.rs` as the
//! reference the tests compare against (forward, gradients and finite differences).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};
use num_traits::Float;

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: expects a contiguous input"),
    }
}

/// softmax(scale * x) over the last dimension.
#[derive(Debug, Clone, Copy)]
struct ScaledSoftmax {
    scale: f64,
}

fn softmax_rows<T: Float>(x: &[T], dim: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).expect("a float");
    let mut out = vec![T::zero(); x.len()];
    for (src, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let max = src.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = ((s - max) * scale).exp();
            sum = sum + *d;
        }
        let inv = T::one() / sum;
        for d in dst.iter_mut() {
            *d = *d * inv;
        }
    }
    out
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = layout.dims().last().copied().unwrap_or(1).max(1);
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(softmax_rows(
                contiguous(v, layout, self.name())?,
                dim,
                self.scale,
            )),
            CpuStorage::F64(v) => CpuStorage::F64(softmax_rows(
                contiguous(v, layout, self.name())?,
                dim,
                self.scale,
            )),
            _ => bail!("scaled-softmax: expects f32 or f64"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // y = softmax(s x): dx = s * y * (g - sum(g * y))
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        let dx = (grad_res.broadcast_sub(&dot)? * res)?.affine(self.scale, 0.0)?;
        Ok(Some(dx))
    }
}

/// softmax(scale * x) over the last dimension, fused (keeps only its output for backward).
pub fn scaled_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ScaledSoftmax { scale })
}

/// LayerNorm over the last dimension with gamma and beta.
#[derive(Debug, Clone, Copy)]
struct LayerNormOp {
    eps: f64,
}

fn layer_norm_rows<T: Float>(x: &[T], gamma: &[T], beta: &[T], eps: f64) -> Vec<T> {
    let dim = gamma.len();
    let n = T::from(dim).expect("a float");
    let eps = T::from(eps).expect("a float");
    let mut out = vec![T::zero(); x.len()];
    for (src, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean = src.iter().fold(T::zero(), |a, &v| a + v) / n;
        let var = src
            .iter()
            .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
            / n;
        let inv = T::one() / (var + eps).sqrt();
        for (i, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
            *d = (s - mean) * inv * gamma[i] + beta[i];
        }
    }
    out
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let dim = l1.dims().last().copied().unwrap_or(0);
        if l2.shape().elem_count() != dim || l3.shape().elem_count() != dim {
            bail!("layer-norm: gamma and beta must have {dim} values");
        }
        let name = self.name();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                CpuStorage::F32(layer_norm_rows(
                    contiguous(x, l1, name)?,
                    contiguous(g, l2, name)?,
                    contiguous(b, l3, name)?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                CpuStorage::F64(layer_norm_rows(
                    contiguous(x, l1, name)?,
                    contiguous(g, l2, name)?,
                    contiguous(b, l3, name)?,
                    self.eps,
                ))
            }
            _ => bail!("layer-norm: x, gamma and beta must all be f32 or all f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With x_hat = (x - mean) / sigma and gx = g * gamma:
        // dx = (gx - mean(gx) - x_hat * mean(gx * x_hat)) / sigma,
        // dgamma = sum over rows of g * x_hat, dbeta = sum over rows of g.
        let dim = gamma.elem_count();
        let rows = x.elem_count() / dim.max(1);
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_sigma = var.affine(1.0, self.eps)?.sqrt()?.recip()?;
        let x_hat = centred.broadcast_mul(&inv_sigma)?;
        let g2 = grad.reshape((rows, dim))?;
        let dgamma = (&g2 * x_hat.reshape((rows, dim))?)?
            .sum(0)?
            .reshape(gamma.shape())?;
        let dbeta = g2.sum(0)?.reshape(gamma.shape())?;
        let gx = grad.broadcast_mul(gamma)?;
        let term = (&x_hat * &gx)?.mean_keepdim(D::Minus1)?;
        let dx = gx
            .broadcast_sub(&gx.mean_keepdim(D::Minus1)?)?
            .sub(&x_hat.broadcast_mul(&term)?)?
            .broadcast_mul(&inv_sigma)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// gamma * (x - mean) / sqrt(var + eps) + beta over the last dimension, fused.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{layer_norm_composed, softmax_last_dim};
    use candle_core::{DType, Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn fused_softmax_matches_the_composed_one_forward_and_backward() {
        let x = Var::from_tensor(&random(&[2, 3, 5, 7], 1)).unwrap();
        let weights = random(&[2, 3, 5, 7], 2);
        let scale = 0.37;
        let fused = scaled_softmax(x.as_tensor(), scale).unwrap();
        let composed = softmax_last_dim(&x.as_tensor().affine(scale, 0.0).unwrap()).unwrap();
        assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g_fused.get(x.as_tensor()).unwrap(),
            g_comp.get(x.as_tensor()).unwrap(),
        );
        assert_close(&values(a), &values(b), 1e-12, "gradient");
        // f32 works too.
        let y = scaled_softmax(&x.as_tensor().to_dtype(DType::F32).unwrap(), 1.0).unwrap();
        let sums: Vec<f32> = y
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_one_forward_and_backward() {
        let x = Var::from_tensor(&random(&[3, 4, 6], 3)).unwrap();
        let gamma = Var::from_tensor(&random(&[6], 4)).unwrap();
        let beta = Var::from_tensor(&random(&[6], 5)).unwrap();
        let weights = random(&[3, 4, 6], 6);
        let eps = 1e-5;
        let fused = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), eps).unwrap();
        let composed =
            layer_norm_composed(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), eps).unwrap();
        assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
            let (a, b) = (
                g_fused.get(v.as_tensor()).unwrap(),
                g_comp.get(v.as_tensor()).unwrap(),
            );
            assert_close(&values(a), &values(b), 1e-10, name);
        }
    }

    #[test]
    fn fused_layer_norm_gradient_matches_finite_differences() {
        let x0 = values(&random(&[2, 5], 7));
        let gamma = random(&[5], 8);
        let beta = random(&[5], 9);
        let weights = random(&[2, 5], 10);
        let loss = |x: &[f64]| -> f64 {
            let x = Tensor::from_vec(x.to_vec(), (2, 5), &Device::Cpu).unwrap();
            let y = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let x =
            Var::from_tensor(&Tensor::from_vec(x0.clone(), (2, 5), &Device::Cpu).unwrap()).unwrap();
        let y = layer_norm(x.as_tensor(), &gamma, &beta, 1e-5).unwrap();
        let grads = (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = values(grads.get(x.as_tensor()).unwrap());
        for i in 0..x0.len() {
            let h = 1e-6;
            let (mut up, mut down) = (x0.clone(), x0.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (loss(&up) - loss(&down)) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{i}: {numeric} vs {}",
                analytic[i]
            );
        }
    }

    #[test]
    fn mismatched_inputs_are_errors_not_panics() {
        let x = random(&[2, 5], 1);
        assert!(layer_norm(&x, &random(&[4], 2), &random(&[5], 3), 1e-5).is_err());
        let ints = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
        assert!(scaled_softmax(&ints, 1.0).is_err());
    }
}
