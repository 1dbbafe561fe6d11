//! What each layer knows: the model's pooled representation after the embeddings and
//! after each block, on fixed, unaugmented images, asked three questions at an
//! evaluation.
//!
//! - **Linear probe**: a closed-form ridge classifier per layer, fitted on the first
//!   `probe.layers_train_images` training images (file order) and scored on the first
//!   `probe.layers_test_images` test images. Features are standardised with the
//!   training images' mean and standard deviation per channel; targets are one-hot,
//!   centred (the intercept is their mean); the weights minimise
//!   (1/n)‖ZW − Y‖² + λ‖W‖² (λ = `probe.ridge_lambda`), i.e. (ZᵀZ + nλI) W = ZᵀY.
//! - **Logit lens**: the model's own final norm, pooling and head applied to that
//!   layer's residual stream, scored on the same test images; at the last layer it is
//!   the model's own prediction.
//! - **Layer similarity**: linear CKA between every pair of layers' pooled test
//!   features, ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) with both centred (Kornblith et al., 2019).
//!
//! Pooling is the model's (`model.pool`): the CLS token, or the mean of the patch
//! tokens, taken from the residual stream before the final norm.

use candle_core::{DType, Device, Result, Tensor};

use crate::data::batch::{images_f32, Normalizer};
use crate::data::{Split, NUM_CLASSES};
use crate::model::{images_tensor, VisionTransformer};

/// Per layer, for a run of images: pooled features (images × dim) and the logit lens's
/// predicted class per image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerOutputs {
    pub dim: usize,
    pub pooled: Vec<Vec<f64>>,
    pub predicted: Vec<Vec<u32>>,
}

impl LayerOutputs {
    pub fn images(&self) -> usize {
        self.predicted.first().map_or(0, Vec::len)
    }

    /// Batches' outputs one after another, in order.
    pub fn concat(parts: Vec<LayerOutputs>) -> Self {
        let mut out = Self::default();
        for part in parts {
            if out.pooled.is_empty() {
                out = part;
                continue;
            }
            for (a, b) in out.pooled.iter_mut().zip(part.pooled) {
                a.extend(b);
            }
            for (a, b) in out.predicted.iter_mut().zip(part.predicted) {
                a.extend(b);
            }
        }
        out
    }
}

/// The model's per-layer outputs for a batch of normalised images (B, 3, 32, 32).
pub fn layer_outputs(model: &VisionTransformer, images: &Tensor) -> Result<LayerOutputs> {
    let mut out = LayerOutputs {
        dim: model.config.dim,
        ..Default::default()
    };
    for (pooled, lens) in model.forward_layers(images)? {
        out.pooled
            .push(pooled.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?);
        out.predicted
            .push(lens.argmax(1)?.to_dtype(DType::U32)?.to_vec1()?);
    }
    Ok(out)
}

/// The fixed images the layers are asked about.
#[derive(Debug, Clone)]
pub struct KnowledgeSet {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
    pub train_labels: Vec<u8>,
    pub test_labels: Vec<u8>,
}

impl KnowledgeSet {
    /// The first `train_images` training and `test_images` test images.
    pub fn new(train: &Split, test: &Split, train_images: usize, test_images: usize) -> Self {
        let train_idx: Vec<usize> = (0..train_images.min(train.len())).collect();
        let test_idx: Vec<usize> = (0..test_images.min(test.len())).collect();
        Self {
            train_labels: train_idx.iter().map(|&i| train.labels[i]).collect(),
            test_labels: test_idx.iter().map(|&i| test.labels[i]).collect(),
            train: train_idx,
            test: test_idx,
        }
    }

    /// One batch's outputs, its images normalised only now (the set holds no pixels).
    pub fn run(
        model: &VisionTransformer,
        split: &Split,
        indices: &[usize],
        norm: &Normalizer,
    ) -> Result<LayerOutputs> {
        let pixels = images_f32(split, indices, norm);
        let images = images_tensor(pixels, indices.len(), model.patch_embed.weight.dtype())?;
        layer_outputs(model, &images)
    }
}

/// The three answers, per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Knowledge {
    pub probe_accuracy: Vec<f64>,
    pub lens_accuracy: Vec<f64>,
    pub cka: Vec<Vec<f64>>,
}

/// Probe, lens and CKA from the training and test images' outputs.
pub fn measure(
    train: &LayerOutputs,
    train_labels: &[u8],
    test: &LayerOutputs,
    test_labels: &[u8],
    lambda: f64,
) -> Result<Knowledge> {
    let d = train.dim;
    let layers = test.pooled.len();
    let mut probe_accuracy = Vec::with_capacity(layers);
    let mut lens_accuracy = Vec::with_capacity(layers);
    for l in 0..layers {
        let ridge = Ridge::fit(&train.pooled[l], train_labels, d, NUM_CLASSES, lambda)?;
        probe_accuracy.push(ridge.accuracy(&test.pooled[l], test_labels));
        lens_accuracy.push(accuracy(&test.predicted[l], test_labels));
    }
    let centred: Vec<Tensor> = test
        .pooled
        .iter()
        .map(|x| centred_columns(x, d))
        .collect::<Result<_>>()?;
    let cka = linear_cka_matrix(&centred)?;
    Ok(Knowledge {
        probe_accuracy,
        lens_accuracy,
        cka,
    })
}

fn accuracy(predicted: &[u32], labels: &[u8]) -> f64 {
    let right = predicted
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p == u32::from(**l))
        .count();
    right as f64 / labels.len().max(1) as f64
}

/// A ridge classifier on standardised features.
#[derive(Debug, Clone)]
pub struct Ridge {
    mean: Vec<f64>,
    std: Vec<f64>,
    /// (dim × classes), row-major.
    weights: Vec<f64>,
    bias: Vec<f64>,
    classes: usize,
}

impl Ridge {
    /// Fits `x` (n × d, row-major) to one-hot `labels`: see the module's header.
    pub fn fit(x: &[f64], labels: &[u8], d: usize, classes: usize, lambda: f64) -> Result<Self> {
        let n = labels.len();
        if n == 0 || x.len() != n * d {
            candle_core::bail!("ridge probe: {} values for {n} images of {d}", x.len());
        }
        let mut mean = vec![0.0; d];
        for row in x.chunks_exact(d) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / n as f64;
            }
        }
        let mut std = vec![0.0; d];
        for row in x.chunks_exact(d) {
            for ((s, v), m) in std.iter_mut().zip(row).zip(&mean) {
                *s += (v - m).powi(2) / n as f64;
            }
        }
        // A constant feature carries nothing; left at 0 after centring.
        let std: Vec<f64> = std
            .iter()
            .map(|s| if *s > 0.0 { s.sqrt() } else { 1.0 })
            .collect();
        let z: Vec<f64> = x
            .chunks_exact(d)
            .flat_map(|row| {
                (0..d)
                    .map(|j| (row[j] - mean[j]) / std[j])
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut bias = vec![0.0; classes];
        for &l in labels {
            bias[usize::from(l)] += 1.0 / n as f64;
        }
        let mut y = vec![0.0; n * classes];
        for (row, &l) in y.chunks_exact_mut(classes).zip(labels) {
            for (k, v) in row.iter_mut().enumerate() {
                *v = f64::from(u8::from(usize::from(l) == k)) - bias[k];
            }
        }
        let zt = Tensor::from_vec(z, (n, d), &Device::Cpu)?;
        let yt = Tensor::from_vec(y, (n, classes), &Device::Cpu)?;
        let gram = zt.t()?.matmul(&zt)?;
        let rhs = zt.t()?.matmul(&yt)?;
        let mut a: Vec<f64> = gram.flatten_all()?.to_vec1()?;
        for j in 0..d {
            a[j * d + j] += n as f64 * lambda;
        }
        let mut weights: Vec<f64> = rhs.flatten_all()?.to_vec1()?;
        cholesky_solve(&mut a, d, &mut weights, classes)?;
        Ok(Self {
            mean,
            std,
            weights,
            bias,
            classes,
        })
    }

    /// Class scores of one feature row.
    pub fn scores(&self, row: &[f64]) -> Vec<f64> {
        let mut s = self.bias.clone();
        for (j, v) in row.iter().enumerate() {
            let z = (v - self.mean[j]) / self.std[j];
            for (k, sk) in s.iter_mut().enumerate() {
                *sk += z * self.weights[j * self.classes + k];
            }
        }
        s
    }

    /// Share of rows of `x` whose highest score is their label.
    pub fn accuracy(&self, x: &[f64], labels: &[u8]) -> f64 {
        let d = self.mean.len();
        let predicted: Vec<u32> = x
            .chunks_exact(d)
            .map(|row| {
                let s = self.scores(row);
                (0..s.len())
                    .max_by(|&a, &b| s[a].total_cmp(&s[b]))
                    .unwrap_or(0) as u32
            })
            .collect();
        accuracy(&predicted, labels)
    }
}

/// Solves A X = B in place (A: d × d symmetric positive definite, row-major, is
/// overwritten by its Cholesky factor; B: d × c becomes X).
pub fn cholesky_solve(a: &mut [f64], d: usize, b: &mut [f64], c: usize) -> Result<()> {
    for j in 0..d {
        let mut diag = a[j * d + j];
        for k in 0..j {
            diag -= a[j * d + k] * a[j * d + k];
        }
        if diag <= 0.0 || !diag.is_finite() {
            candle_core::bail!("ridge probe: the regularised Gram matrix is not positive definite");
        }
        let diag = diag.sqrt();
        a[j * d + j] = diag;
        for i in j + 1..d {
            let mut v = a[i * d + j];
            for k in 0..j {
                v -= a[i * d + k] * a[j * d + k];
            }
            a[i * d + j] = v / diag;
        }
    }
    for col in 0..c {
        // L y = b, then Lᵀ x = y.
        for i in 0..d {
            let mut v = b[i * c + col];
            for k in 0..i {
                v -= a[i * d + k] * b[k * c + col];
            }
            b[i * c + col] = v / a[i * d + i];
        }
        for i in (0..d).rev() {
            let mut v = b[i * c + col];
            for k in i + 1..d {
                v -= a[k * d + i] * b[k * c + col];
            }
            b[i * c + col] = v / a[i * d + i];
        }
    }
    Ok(())
}

/// `x` (n × d, row-major) with each column's mean taken away, as a tensor.
fn centred_columns(x: &[f64], d: usize) -> Result<Tensor> {
    let n = x.len() / d.max(1);
    let t = Tensor::from_vec(x.to_vec(), (n, d), &Device::Cpu)?;
    t.broadcast_sub(&t.mean_keepdim(0)?)
}

/// Linear CKA of every pair of centred feature matrices (n × dᵢ each).
pub fn linear_cka_matrix(centred: &[Tensor]) -> Result<Vec<Vec<f64>>> {
    let frob2 = |a: &Tensor, b: &Tensor| -> Result<f64> {
        a.t()?.matmul(b)?.sqr()?.sum_all()?.to_scalar::<f64>()
    };
    let self_norms: Vec<f64> = centred
        .iter()
        .map(|x| frob2(x, x).map(f64::sqrt))
        .collect::<Result<_>>()?;
    let n = centred.len();
    let mut out = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in i..n {
            let denom = self_norms[i] * self_norms[j];
            let v = match denom > 0.0 {
                true => frob2(&centred[i], &centred[j])? / denom,
                false => 0.0,
            };
            (out[i][j], out[j][i]) = (v, v);
        }
    }
    Ok(out)
}

/// Linear CKA of two feature matrices (n × dx and n × dy, row-major).
pub fn linear_cka(x: &[f64], dx: usize, y: &[f64], dy: usize) -> Result<f64> {
    let m = linear_cka_matrix(&[centred_columns(x, dx)?, centred_columns(y, dy)?])?;
    Ok(m[0][1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    #[test]
    fn cholesky_solves_a_small_system_by_hand() {
        // [[4, 2], [2, 3]] x = [[2], [1]]: x = [0.5, 0].
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let mut b = vec![2.0, 1.0];
        cholesky_solve(&mut a, 2, &mut b, 1).unwrap();
        assert!((b[0] - 0.5).abs() < 1e-15 && b[1].abs() < 1e-15, "{b:?}");
        let mut singular = vec![1.0, 1.0, 1.0, 1.0];
        assert!(cholesky_solve(&mut singular, 2, &mut [1.0, 1.0], 1).is_err());
    }

    #[test]
    fn ridge_matches_its_normal_equations_and_separates_separable_classes() {
        // 1-D by hand: x = [-1, 1] standardises to z = [-1, 1] (std 1); labels 0, 1;
        // centred one-hot y = [[0.5, -0.5], [-0.5, 0.5]]: (zᵀz + nλ) w = zᵀy gives
        // w = [-1, 1] / (2 + 2λ).
        let lambda = 0.5;
        let r = Ridge::fit(&[-1.0, 1.0], &[0, 1], 1, 2, lambda).unwrap();
        let w = 1.0 / (2.0 + 2.0 * lambda);
        assert!((r.weights[0] + w).abs() < 1e-15 && (r.weights[1] - w).abs() < 1e-15);
        assert_eq!(r.bias, vec![0.5, 0.5]);
        let scores = r.scores(&[1.0]);
        assert!((scores[0] - (0.5 - w)).abs() < 1e-15 && (scores[1] - (0.5 + w)).abs() < 1e-15);
        // Three classes, each a cluster around its own corner in 4-D: all right.
        let mut rng = StdRng::seed_from_u64(3);
        let (mut x, mut labels) = (Vec::new(), Vec::new());
        for i in 0..300 {
            let class = (i % 3) as u8;
            for j in 0..4 {
                let centre = if j == usize::from(class) { 3.0 } else { 0.0 };
                x.push(centre + rng.random_range(-1.0..1.0));
            }
            labels.push(class);
        }
        let r = Ridge::fit(&x, &labels, 4, 3, 1e-2).unwrap();
        assert_eq!(r.accuracy(&x, &labels), 1.0);
        // Random labels on noise: chance on fresh noise.
        let noise = random(4 * 300, 9);
        let shuffled: Vec<u8> = (0..300).map(|i| ((i * 7 + 1) % 3) as u8).collect();
        let r = Ridge::fit(&noise, &shuffled, 4, 3, 1e-2).unwrap();
        let fresh = random(4 * 300, 10);
        assert!(r.accuracy(&fresh, &shuffled) < 0.45);
    }

    #[test]
    fn the_logit_lens_at_the_last_layer_is_the_model_itself() {
        let cfg = crate::model::tests::tiny_config();
        for pool in [crate::config::Pool::Mean, crate::config::Pool::Cls] {
            let mut cfg = cfg.clone();
            cfg.pool = pool;
            let state = crate::model::ModelState::new(&cfg, 2, DType::F32).unwrap();
            let images = crate::model::tests::random_images(6, 3, DType::F32);
            let out = layer_outputs(&state.model, &images).unwrap();
            assert_eq!(out.pooled.len(), cfg.depth + 1);
            assert_eq!(out.pooled[0].len(), 6 * cfg.dim);
            let own: Vec<u32> = state
                .model
                .forward(&images)
                .unwrap()
                .argmax(1)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(out.predicted[cfg.depth], own, "{pool:?}");
            let labels: Vec<u8> = own.iter().map(|&p| p as u8).collect();
            let k = measure(&out, &labels, &out, &labels, 1e-2).unwrap();
            assert_eq!(k.lens_accuracy[cfg.depth], 1.0);
            assert_eq!(k.cka.len(), cfg.depth + 1);
            assert!((k.cka[1][1] - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn cka_is_one_on_itself_and_blind_to_rotation_and_scale() {
        let (n, d) = (50, 4);
        let x = random(n * d, 1);
        assert!((linear_cka(&x, d, &x, d).unwrap() - 1.0).abs() < 1e-12);
        // A rotation in the (0, 1) plane and a reflection of channel 3, times 2.5.
        let (c, s) = (0.6f64, 0.8f64);
        let y: Vec<f64> = x
            .chunks_exact(d)
            .flat_map(|r| {
                [
                    2.5 * (c * r[0] - s * r[1]),
                    2.5 * (s * r[0] + c * r[1]),
                    2.5 * r[2],
                    -2.5 * r[3],
                ]
            })
            .collect();
        assert!((linear_cka(&x, d, &y, d).unwrap() - 1.0).abs() < 1e-12);
        // Independent noise is far from it; and by hand on a tiny case: x = [1, 2, 3]
        // against y = [1, 3, 2] (centred: [-1, 0, 1] and [-1, 1, 0]): (xᵀy)² /
        // (xᵀx yᵀy) = 1 / 4.
        let z = random(n * d, 2);
        assert!(linear_cka(&x, d, &z, d).unwrap() < 0.5);
        let v = linear_cka(&[1.0, 2.0, 3.0], 1, &[1.0, 3.0, 2.0], 1).unwrap();
        assert!((v - 0.25).abs() < 1e-15, "{v}");
    }
}
