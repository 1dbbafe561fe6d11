//! Probes: what the model does inside, measured by the training model's own forward
//! pass on a fixed set of test images, turned into plain Rust data for the dashboard
//! and stored compactly (safetensors, f16 for the large arrays) in the run directory.

use std::collections::HashMap;

use candle_core::{DType, Result as CandleResult, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::ProbeConfig;
use crate::data::batch::{images_f32, Normalizer};
use crate::data::{Split, IMAGE_BYTES};
use crate::model::{images_tensor, Capture, VisionTransformer};
use crate::ops::composed::softmax_last_dim;

/// Percentile ranks stored per distribution: TensorBoard's bands (min, mean -/+ 1.5, 1,
/// 0.5 standard deviations of a normal, median, max), in percent.
pub const PERCENTILE_RANKS: [f32; 9] = [0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0];

pub const FORMAT: &str = "vitscope-probe-1";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Stats {
    pub mean: f32,
    pub std: f32,
    pub min: f32,
    pub max: f32,
}

impl Stats {
    pub fn of(values: &[f32]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        Self {
            mean: mean as f32,
            std: var.sqrt() as f32,
            min: values.iter().copied().fold(f32::INFINITY, f32::min),
            max: values.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        }
    }
}

/// Counts over fixed, equal bins of [lo, hi); values outside are counted apart,
/// so the bins never move between probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub lo: f32,
    pub hi: f32,
    pub counts: Vec<u32>,
    /// Values below `lo` (not in any bin).
    pub below: u32,
    /// Values at or above `hi` (not in any bin).
    pub above: u32,
}

impl Histogram {
    pub fn new(values: &[f32], bins: usize, lo: f32, hi: f32) -> Self {
        let mut h = Self {
            lo,
            hi,
            counts: vec![0; bins],
            below: 0,
            above: 0,
        };
        let width = (hi - lo) / bins as f32;
        for &v in values {
            if v < lo {
                h.below += 1;
            } else if v >= hi || v.is_nan() {
                h.above += 1;
            } else {
                let bin = (((v - lo) / width) as usize).min(bins - 1);
                h.counts[bin] += 1;
            }
        }
        h
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum::<u64>()
            + u64::from(self.below)
            + u64::from(self.above)
    }

    /// The value range [start, end) of bin `i`.
    pub fn bin_range(&self, i: usize) -> (f32, f32) {
        let width = (self.hi - self.lo) / self.counts.len() as f32;
        (self.lo + width * i as f32, self.lo + width * (i + 1) as f32)
    }
}

/// Linear-interpolated percentiles of `values` at `ranks` (percent); sorts `values`.
pub fn percentiles(values: &mut [f32], ranks: &[f32]) -> Vec<f32> {
    if values.is_empty() {
        return vec![0.0; ranks.len()];
    }
    values.sort_by(f32::total_cmp);
    let last = (values.len() - 1) as f32;
    ranks
        .iter()
        .map(|r| {
            let pos = (r / 100.0 * last).clamp(0.0, last);
            let (i, frac) = (pos.floor() as usize, pos.fract());
            let next = values[(i + 1).min(values.len() - 1)];
            values[i] + (next - values[i]) * frac
        })
        .collect()
}

/// The distribution of a set of values: moments, tail share, percentiles, histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub stats: Stats,
    /// Share of values with |x| > 3.
    pub beyond_3: f32,
    /// Values at [`PERCENTILE_RANKS`].
    pub percentiles: Vec<f32>,
    pub histogram: Histogram,
}

impl Distribution {
    pub fn of(values: &[f32], bins: usize, range: f32) -> Self {
        let beyond = values.iter().filter(|v| v.abs() > 3.0).count();
        let mut sorted = values.to_vec();
        Self {
            stats: Stats::of(values),
            beyond_3: beyond as f32 / values.len().max(1) as f32,
            percentiles: percentiles(&mut sorted, &PERCENTILE_RANKS),
            histogram: Histogram::new(values, bins, -range, range),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerNormProbe {
    pub name: String,
    /// What goes into the LayerNorm (the residual stream) over all probe tokens.
    pub input: Distribution,
    /// What comes out.
    pub output: Distribution,
    pub gamma: Stats,
    pub beta: Stats,
}

/// Everything but the large arrays; stored as JSON in the safetensors header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeMeta {
    /// Optimizer steps completed when the probe was taken.
    pub step: u64,
    /// 1-based epoch in progress.
    pub epoch: u64,
    pub images: usize,
    /// Tokens per image: the CLS token (if `cls`) followed by the patches.
    pub tokens: usize,
    /// Whether token 0 is a CLS token (`model.pool = "cls"`); probes recorded before
    /// pooling was an option always had one.
    #[serde(default = "has_cls_by_default")]
    pub cls: bool,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub classes: usize,
    pub layer_norms: Vec<LayerNormProbe>,
    /// Locality self-attention (`model.attention = "lsa"`): each block's learned scales
    /// of Q Kᵀ, (depth, heads), each query's own token masked; empty for the standard
    /// attention (1/√d_k, nothing masked) and in probes recorded before the option.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention_scales: Vec<f32>,
}

fn has_cls_by_default() -> bool {
    true
}

impl ProbeMeta {
    /// Index of the first patch token: 1 after a CLS token, else 0.
    pub fn first_patch(&self) -> usize {
        usize::from(self.cls)
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.tokens
            .saturating_sub(self.first_patch())
            .isqrt()
            .max(1)
    }

    /// A token's name for labels: "CLS", or "patch n (row r, col c)".
    pub fn token_name(&self, token: usize) -> String {
        if self.cls && token == 0 {
            return "CLS".to_string();
        }
        let (p, grid) = (token - self.first_patch(), self.grid());
        format!("patch {p} (row {}, col {})", p / grid, p % grid)
    }
}

/// One probe of the model on the probe images.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSnapshot {
    pub meta: ProbeMeta,
    /// (images, depth, heads, tokens, tokens): attention weights; row = query token.
    pub attention: Vec<f32>,
    /// (images, depth + 1, tokens, dim): residual stream after the embeddings and each block.
    pub hidden: Vec<f32>,
    /// (images, classes): predicted class probabilities.
    pub probabilities: Vec<f32>,
    /// (tokens, dim): the learned position embeddings (CLS first); empty in probes
    /// recorded before they were.
    pub position_embedding: Vec<f32>,
    /// (dim, patch x patch x 3): the patch-embedding filters, each flattened as
    /// (row, column, channel) like the patches; empty in older probes.
    pub patch_filters: Vec<f32>,
}

impl ProbeSnapshot {
    /// The (tokens x tokens) attention matrix of one image, block and head.
    pub fn attention_matrix(&self, image: usize, layer: usize, head: usize) -> &[f32] {
        let m = &self.meta;
        let size = m.tokens * m.tokens;
        let start = ((image * m.depth + layer) * m.heads + head) * size;
        &self.attention[start..start + size]
    }

    /// The (tokens x dim) hidden state of one image after `layer` blocks (0 = embeddings).
    pub fn hidden_state(&self, image: usize, layer: usize) -> &[f32] {
        let m = &self.meta;
        let size = m.tokens * m.dim;
        let start = (image * (m.depth + 1) + layer) * size;
        &self.hidden[start..start + size]
    }

    /// Values per patch-embedding filter (patch x patch x 3).
    pub fn patch_values(&self) -> usize {
        self.patch_filters.len() / self.meta.dim.max(1)
    }

    pub fn image_probabilities(&self, image: usize) -> &[f32] {
        &self.probabilities[image * self.meta.classes..(image + 1) * self.meta.classes]
    }

    /// Serialises as safetensors: f16 attention and hidden states, f32 probabilities,
    /// the rest as JSON metadata.
    pub fn to_bytes(&self) -> Vec<u8> {
        let m = &self.meta;
        let f16_bytes = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        };
        let attention = f16_bytes(&self.attention);
        let hidden = f16_bytes(&self.hidden);
        let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let probabilities = f32_bytes(&self.probabilities);
        let position = f32_bytes(&self.position_embedding);
        let filters = f32_bytes(&self.patch_filters);
        let views = [
            (
                "attention",
                TensorView::new(
                    Dtype::F16,
                    vec![m.images, m.depth, m.heads, m.tokens, m.tokens],
                    &attention,
                ),
            ),
            (
                "hidden",
                TensorView::new(
                    Dtype::F16,
                    vec![m.images, m.depth + 1, m.tokens, m.dim],
                    &hidden,
                ),
            ),
            (
                "probabilities",
                TensorView::new(Dtype::F32, vec![m.images, m.classes], &probabilities),
            ),
            (
                "position_embedding",
                TensorView::new(
                    Dtype::F32,
                    vec![self.position_embedding.len() / m.dim.max(1), m.dim],
                    &position,
                ),
            ),
            (
                "patch_filters",
                TensorView::new(Dtype::F32, vec![m.dim, self.patch_values()], &filters),
            ),
        ];
        let views: Vec<(&str, TensorView)> = views
            .into_iter()
            .map(|(name, view)| (name, view.expect("shapes match the data")))
            .collect();
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "meta".to_string(),
                serde_json::to_string(m).expect("probe meta serialises"),
            ),
        ]);
        safetensors::serialize(views, Some(metadata)).expect("probe serialises")
    }

    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let info = header.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(format!("not a {FORMAT} file"));
        }
        let meta: ProbeMeta = serde_json::from_str(info.get("meta").map_or("", String::as_str))
            .map_err(|e| format!("bad probe metadata: {e}"))?;
        let tensors = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let read = |name: &str, expected: usize| -> std::result::Result<Vec<f32>, String> {
            let view = tensors.tensor(name).map_err(|e| format!("{name}: {e}"))?;
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                other => return Err(format!("{name}: unexpected dtype {other:?}")),
            };
            if values.len() != expected {
                return Err(format!(
                    "{name}: {} values, expected {expected}",
                    values.len()
                ));
            }
            Ok(values)
        };
        let optional = |name: &str, expected: usize| match tensors.tensor(name) {
            Ok(_) => read(name, expected),
            Err(_) => Ok(Vec::new()),
        };
        let m = &meta;
        Ok(Self {
            attention: read(
                "attention",
                m.images * m.depth * m.heads * m.tokens * m.tokens,
            )?,
            hidden: read("hidden", m.images * (m.depth + 1) * m.tokens * m.dim)?,
            probabilities: read("probabilities", m.images * m.classes)?,
            position_embedding: optional("position_embedding", m.tokens * m.dim)?,
            patch_filters: match tensors.tensor("patch_filters") {
                Ok(view) => {
                    let expected = view.shape().iter().product();
                    read("patch_filters", expected)?
                }
                Err(_) => Vec::new(),
            },
            meta,
        })
    }
}

/// The fixed probe images: the first `probe.images` images of the test split.
#[derive(Debug, Clone)]
pub struct ProbeSet {
    pub indices: Vec<usize>,
    pub labels: Vec<u8>,
    /// Raw bytes (images, 3, 32, 32), for drawing.
    pub pixels: Vec<u8>,
    /// Normalised as the model sees them.
    normalised: Vec<f32>,
}

impl ProbeSet {
    pub fn new(test: &Split, count: usize, norm: &Normalizer) -> Self {
        let indices: Vec<usize> = (0..count.min(test.len())).collect();
        Self {
            labels: indices.iter().map(|&i| test.labels[i]).collect(),
            pixels: indices
                .iter()
                .flat_map(|&i| test.image(i).iter().copied())
                .collect(),
            normalised: images_f32(test, &indices, norm),
            indices,
        }
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Runs the model on the probe images and summarises what it captured.
    pub fn probe(
        &self,
        model: &VisionTransformer,
        cfg: &ProbeConfig,
        step: u64,
        epoch: u64,
    ) -> CandleResult<ProbeSnapshot> {
        let images = images_tensor(
            self.normalised.clone(),
            self.len(),
            model.patch_embed.weight.dtype(),
        )?;
        let mut capture = Capture::default();
        let logits = model.forward_with(&images, Some(&mut capture))?;
        let flat = |t: &Tensor| -> CandleResult<Vec<f32>> {
            t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
        };
        let mut layer_norms = Vec::new();
        for (i, (name, ln)) in model.layer_norms().into_iter().enumerate() {
            let (bins, range) = (cfg.histogram_bins, cfg.histogram_range as f32);
            layer_norms.push(LayerNormProbe {
                name,
                input: Distribution::of(&flat(&capture.ln_inputs[i])?, bins, range),
                output: Distribution::of(&flat(&capture.ln_outputs[i])?, bins, range),
                // No norm at this place (or no shift, RMSNorm): empty statistics.
                gamma: match ln {
                    Some(ln) => Stats::of(&flat(&ln.gamma)?),
                    None => Stats::default(),
                },
                beta: match ln.and_then(|ln| ln.beta.as_ref()) {
                    Some(beta) => Stats::of(&flat(beta)?),
                    None => Stats::default(),
                },
            });
        }
        // (depth, B, H, T, T) -> (B, depth, H, T, T)
        let attention = flat(&Tensor::stack(&capture.attention, 0)?.transpose(0, 1)?)?;
        let hidden = flat(&Tensor::stack(&capture.hidden, 0)?.transpose(0, 1)?)?;
        let probabilities = flat(&softmax_last_dim(&logits)?)?;
        let mc = &model.config;
        Ok(ProbeSnapshot {
            meta: ProbeMeta {
                step,
                epoch,
                images: self.len(),
                tokens: mc.tokens(),
                cls: mc.has_cls(),
                dim: mc.dim,
                depth: mc.depth,
                heads: mc.heads,
                classes: logits.dim(1)?,
                layer_norms,
                attention_scales: model
                    .blocks
                    .iter()
                    .filter_map(|b| b.attn.scale.as_ref().map(flat))
                    .collect::<CandleResult<Vec<_>>>()?
                    .concat(),
            },
            attention,
            hidden,
            probabilities,
            position_embedding: match &model.pos_embed {
                Some(pos) => flat(pos)?,
                None => Vec::new(),
            },
            patch_filters: flat(&model.patch_embed.weight)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::data::synthetic;
    use crate::model::ModelState;

    #[test]
    fn histogram_bins_values_and_counts_outliers_apart() {
        let h = Histogram::new(
            &[-5.0, -1.0, -0.5, 0.0, 0.49, 0.5, 1.99, 2.0, 7.0, f32::NAN],
            4,
            -2.0,
            2.0,
        );
        // bins [-2,-1) [-1,0) [0,1) [1,2)
        assert_eq!(h.counts, vec![0, 2, 3, 1]);
        assert_eq!((h.below, h.above), (1, 3));
        assert_eq!(h.total(), 10);
        assert_eq!(h.bin_range(1), (-1.0, 0.0));
    }

    #[test]
    fn percentiles_interpolate_between_sorted_values() {
        let mut v: Vec<f32> = (0..=100).rev().map(|i| i as f32).collect();
        let p = percentiles(&mut v, &PERCENTILE_RANKS);
        let expected = [0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0];
        for (a, b) in p.iter().zip(expected) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let mut two = vec![1.0, 3.0];
        assert_eq!(
            percentiles(&mut two, &[0.0, 25.0, 50.0, 100.0]),
            vec![1.0, 1.5, 2.0, 3.0]
        );
        assert_eq!(percentiles(&mut [], &[50.0]), vec![0.0]);
    }

    #[test]
    fn stats_and_distribution_by_hand() {
        let v = [1.0, 2.0, 3.0, 4.0, -4.0];
        let s = Stats::of(&v);
        assert!((s.mean - 1.2).abs() < 1e-6);
        assert!((s.std - (38.8f32 / 5.0).sqrt()).abs() < 1e-5);
        assert_eq!((s.min, s.max), (-4.0, 4.0));
        let d = Distribution::of(&v, 8, 4.0);
        assert!((d.beyond_3 - 0.4).abs() < 1e-6);
        assert_eq!(d.histogram.above, 1); // 4.0 is at the open end
    }

    #[test]
    fn probe_captures_the_model_and_round_trips_through_bytes() {
        let config = Config::default();
        let mut mc = config.model.clone();
        mc.depth = 2;
        let state = ModelState::new(&mc, 1, DType::F32).unwrap();
        let set = synthetic::generate(1, 20, 10);
        let norm = Normalizer::from_split(&set.train);
        let probes = ProbeSet::new(&set.test, 3, &norm);
        let snap = probes.probe(&state.model, &config.probe, 40, 2).unwrap();
        assert_eq!(snap.meta.layer_norms.len(), 5);
        // The default: 64 tokens (mean pooling, no CLS).
        assert_eq!(snap.attention.len(), 3 * 2 * 3 * 64 * 64);
        assert_eq!(snap.hidden.len(), 3 * 3 * 64 * 96);
        assert!(!snap.meta.cls);
        let row_sum: f32 = snap.attention_matrix(2, 1, 2)[64..128].iter().sum();
        assert!((row_sum - 1.0).abs() < 1e-5);
        let p: f32 = snap.image_probabilities(1).iter().sum();
        assert!((p - 1.0).abs() < 1e-5);
        // LayerNorm outputs with gamma = 1, beta = 0 are standardised per token.
        let out = &snap.meta.layer_norms[0].output.stats;
        assert!(
            out.mean.abs() < 1e-4 && (out.std - 1.0).abs() < 1e-2,
            "{out:?}"
        );
        assert_eq!(
            snap.meta.layer_norms[0].gamma,
            Stats {
                mean: 1.0,
                std: 0.0,
                min: 1.0,
                max: 1.0
            }
        );

        let back = ProbeSnapshot::from_bytes(&snap.to_bytes()).unwrap();
        assert_eq!(back.meta, snap.meta);
        assert_eq!(back.probabilities, snap.probabilities);
        assert_eq!(snap.position_embedding.len(), 64 * 96);
        assert_eq!(snap.patch_values(), 48);
        // Shifted patch tokens: a filter weighs the image and its four shifted copies.
        mc.patch_tokens = crate::config::PatchTokens::Shifted;
        let shifted = ModelState::new(&mc, 1, DType::F32).unwrap();
        let snap2 = probes.probe(&shifted.model, &config.probe, 40, 2).unwrap();
        assert_eq!(snap2.patch_values(), 5 * 48);
        assert!(snap.meta.attention_scales.is_empty());
        // Locality self-attention: the scales (1/√d_k at the start) and the mask.
        mc.attention = crate::config::AttentionKind::Locality;
        let lsa = ModelState::new(&mc, 1, DType::F32).unwrap();
        let snap3 = probes.probe(&lsa.model, &config.probe, 40, 2).unwrap();
        assert_eq!(snap3.meta.attention_scales, vec![1.0 / 32f32.sqrt(); 2 * 3]);
        assert_eq!(
            snap3.attention_matrix(0, 1, 2)[65],
            0.0,
            "query 1 on itself"
        );
        let back3 = ProbeSnapshot::from_bytes(&snap3.to_bytes()).unwrap();
        assert_eq!(back3.meta, snap3.meta);
        assert_eq!(back.position_embedding, snap.position_embedding);
        assert_eq!(back.patch_filters, snap.patch_filters);
        for (a, b) in back.attention.iter().zip(&snap.attention) {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1e-2), "{a} vs {b}");
        }
        assert!(ProbeSnapshot::from_bytes(b"junk").is_err());
    }
}
