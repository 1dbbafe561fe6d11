//! Measures of attention matrices: per-head statistics (of one matrix, or of every
//! head of a probe image), attention rollout, locality self-attention's learned scales
//! against the standard one, and the scales that turn weights into shades.
//!
//! A matrix is row-major (tokens x tokens): the CLS token first if the model has one,
//! then the patches in row-major grid order; row i is where query i puts its weight.

use super::probe::{ProbeMeta, ProbeSnapshot};

/// Per-head summary of one attention matrix.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HeadStats {
    /// Mean over queries of the entropy of their row, in nats (ln(tokens) = uniform).
    pub entropy: f64,
    /// Mean over patch queries of the weighted distance to the patch keys, in pixels,
    /// the weights renormalised over the patches (ViT paper, Fig. 7 right).
    pub mean_distance: f64,
    /// Mean weight of a query on itself.
    pub diagonal: f64,
    /// Mean weight on the CLS token; none in a model without one.
    pub cls: Option<f64>,
    /// Mean over patch queries of the weight on patches within 1.5 patch widths (the
    /// query's own patch and its 8 neighbours), renormalised over the patches.
    pub near: f64,
    /// How alike the queries' rows are: 1 − the mean total-variation distance of each
    /// row from the mean row (1: every query attends the same way).
    pub shared: f64,
    /// ln of the number of tokens: the entropy of uniform attention.
    pub uniform_entropy: f64,
}

/// The seed's attention patterns, as a head's numbers earn them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Weight spread nearly evenly: entropy at least [`BROAD_ENTROPY`] of uniform.
    Broad,
    /// Every query looks at the same keys: rows at least [`SHARED_ROWS`] alike.
    QueryIndependent,
    /// Weight near the query: at least [`LOCAL_NEAR`] on the 3×3 neighbourhood.
    Local,
    Mixed,
}

pub const BROAD_ENTROPY: f64 = 0.9;
pub const SHARED_ROWS: f64 = 0.7;
pub const LOCAL_NEAR: f64 = 0.5;

impl Pattern {
    pub fn label(self) -> &'static str {
        match self {
            Self::Broad => "broad",
            Self::QueryIndependent => "query-independent",
            Self::Local => "local",
            Self::Mixed => "mixed",
        }
    }
}

impl HeadStats {
    /// The pattern, checked broad first (a uniform head is also "shared").
    pub fn pattern(&self) -> Pattern {
        if self.uniform_entropy > 0.0 && self.entropy >= BROAD_ENTROPY * self.uniform_entropy {
            Pattern::Broad
        } else if self.shared >= SHARED_ROWS {
            Pattern::QueryIndependent
        } else if self.near >= LOCAL_NEAR {
            Pattern::Local
        } else {
            Pattern::Mixed
        }
    }

    /// The pattern with the number that earns it: "local (62% within 1 patch)".
    pub fn pattern_reason(&self) -> String {
        match self.pattern() {
            Pattern::Broad => format!(
                "broad ({:.0}% of uniform entropy)",
                100.0 * self.entropy / self.uniform_entropy
            ),
            Pattern::QueryIndependent => {
                format!("query-independent ({:.0}% alike)", 100.0 * self.shared)
            }
            Pattern::Local => format!("local ({:.0}% near)", 100.0 * self.near),
            Pattern::Mixed => format!(
                "mixed ({:.0}% alike, {:.0}% near)",
                100.0 * self.shared,
                100.0 * self.near
            ),
        }
    }
}

/// Distance in pixels between the centres of patches `a` and `b` (0-based patch indices).
fn patch_distance(a: usize, b: usize, grid: usize, patch: usize) -> f64 {
    let (ay, ax) = ((a / grid) as f64, (a % grid) as f64);
    let (by, bx) = ((b / grid) as f64, (b % grid) as f64);
    ((ay - by).powi(2) + (ax - bx).powi(2)).sqrt() * patch as f64
}

/// Statistics of one head's (tokens x tokens) matrix whose patches start at token
/// `first` (1 after a CLS token, else 0) and form a `grid` x `grid` of `patch`-pixel patches.
pub fn head_stats(
    matrix: &[f32],
    tokens: usize,
    first: usize,
    (grid, patch): (usize, usize),
) -> HeadStats {
    if tokens <= first || matrix.len() < tokens * tokens {
        return HeadStats::default();
    }
    let row = |i: usize| &matrix[i * tokens..(i + 1) * tokens];
    let mut entropy = 0.0;
    let mut diagonal = 0.0;
    let mut cls = 0.0;
    for i in 0..tokens {
        let r = row(i);
        entropy -= r
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| f64::from(p) * f64::from(p).ln())
            .sum::<f64>();
        diagonal += f64::from(r[i]);
        cls += f64::from(r[0]);
    }
    let patches = tokens - first;
    let mut distance = 0.0;
    let mut near = 0.0;
    let mut counted = 0;
    let neighbour = 1.5 * patch as f64;
    for q in 0..patches {
        let r = &row(q + first)[first..];
        let mass: f64 = r.iter().map(|&p| f64::from(p)).sum();
        if mass > 0.0 {
            let (mut d, mut close) = (0.0, 0.0);
            for (k, &p) in r.iter().enumerate() {
                let dist = patch_distance(q, k, grid, patch);
                d += f64::from(p) * dist;
                if dist <= neighbour {
                    close += f64::from(p);
                }
            }
            distance += d / mass;
            near += close / mass;
            counted += 1;
        }
    }
    let n = tokens as f64;
    let mean_row: Vec<f64> = (0..tokens)
        .map(|k| (0..tokens).map(|i| f64::from(row(i)[k])).sum::<f64>() / n)
        .collect();
    let apart: f64 = (0..tokens)
        .map(|i| {
            0.5 * row(i)
                .iter()
                .zip(&mean_row)
                .map(|(&p, m)| (f64::from(p) - m).abs())
                .sum::<f64>()
        })
        .sum::<f64>()
        / n;
    HeadStats {
        entropy: entropy / n,
        mean_distance: if counted > 0 {
            distance / counted as f64
        } else {
            0.0
        },
        diagonal: diagonal / n,
        cls: (first > 0).then_some(cls / n),
        near: if counted > 0 {
            near / counted as f64
        } else {
            0.0
        },
        shared: 1.0 - apart,
        uniform_entropy: n.ln(),
    }
}

/// Statistics of every head of the shown image.
pub fn all_stats(probe: &ProbeSnapshot, image: usize, patch: usize) -> Vec<Vec<HeadStats>> {
    let m = &probe.meta;
    let (first, grid) = (m.first_patch(), m.grid());
    (0..m.depth)
        .map(|l| {
            (0..m.heads)
                .map(|h| {
                    let matrix = probe.attention_matrix(image, l, h);
                    head_stats(matrix, m.tokens, first, (grid, patch))
                })
                .collect()
        })
        .collect()
}

/// Each head's learned scale as a multiple of the standard 1/√d_k, with locality
/// self-attention (the probe's `attention_scales`); none for the standard attention.
pub fn relative_scale(meta: &ProbeMeta, layer: usize, head: usize) -> Option<f64> {
    let d_k = meta.dim / meta.heads.max(1);
    meta.attention_scales
        .get(layer * meta.heads + head)
        .map(|&s| f64::from(s) * (d_k as f64).sqrt())
}

/// Attention rollout (Abnar & Zuidema 2020): per layer, average the heads, add the
/// identity for the residual connection and renormalise the rows; multiply through the
/// layers, last layer on the left. `layers[l]` holds the head-averaged matrix of layer l.
pub fn rollout(layers: &[Vec<f64>], tokens: usize) -> Vec<f64> {
    let mut result: Vec<f64> = (0..tokens * tokens)
        .map(|i| if i / tokens == i % tokens { 1.0 } else { 0.0 })
        .collect();
    for layer in layers {
        let mut a: Vec<f64> = layer.clone();
        for i in 0..tokens {
            a[i * tokens + i] += 1.0;
            let sum: f64 = a[i * tokens..(i + 1) * tokens].iter().sum();
            if sum > 0.0 {
                for v in &mut a[i * tokens..(i + 1) * tokens] {
                    *v /= sum;
                }
            }
        }
        // result = a * result
        let mut next = vec![0.0; tokens * tokens];
        for i in 0..tokens {
            for k in 0..tokens {
                let aik = a[i * tokens + k];
                if aik != 0.0 {
                    for j in 0..tokens {
                        next[i * tokens + j] += aik * result[k * tokens + j];
                    }
                }
            }
        }
        result = next;
    }
    result
}

/// The mean over heads of one layer's matrices (heads x tokens x tokens, row-major).
pub fn head_average(heads: &[&[f32]], tokens: usize) -> Vec<f64> {
    let mut out = vec![0.0; tokens * tokens];
    for h in heads {
        for (o, &v) in out.iter_mut().zip(h.iter()) {
            *o += f64::from(v);
        }
    }
    let n = heads.len().max(1) as f64;
    out.iter_mut().for_each(|v| *v /= n);
    out
}

/// How attention weights become shades. Trained attention is heavy-tailed: relative
/// to the map's largest weight most cells are nearly black, so each query's own
/// pattern and a log scale are a key away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scale {
    /// Each weight over the largest in the map.
    #[default]
    MapMax,
    /// Each weight over the largest in its row: every query's own pattern.
    RowMax,
    /// log10 of the weight, from 1/T·10⁻² (black) to 1 (full).
    Log,
}

impl Scale {
    pub fn next(self) -> Self {
        match self {
            Self::MapMax => Self::RowMax,
            Self::RowMax => Self::Log,
            Self::Log => Self::MapMax,
        }
    }

    /// A short name for headers.
    pub fn name(self) -> &'static str {
        match self {
            Self::MapMax => "map max",
            Self::RowMax => "row max",
            Self::Log => "log",
        }
    }

    /// The smallest weight the log scale shows above black, for `tokens` keys.
    pub fn log_floor(tokens: usize) -> f64 {
        0.01 / tokens.max(1) as f64
    }

    /// Levels in [0, 1] of `values` (`rows` x `cols`, row-major) that are weights over
    /// `tokens` keys.
    pub fn levels(self, values: &[f64], (rows, cols): (usize, usize), tokens: usize) -> Vec<f64> {
        let over = |v: f64, max: f64| if max > 0.0 { v / max } else { 0.0 };
        let largest = |vs: &[f64]| vs.iter().copied().fold(0.0, f64::max);
        let values = &values[..(rows * cols).min(values.len())];
        match self {
            Self::MapMax => {
                let max = largest(values);
                values.iter().map(|&v| over(v, max)).collect()
            }
            Self::RowMax => values
                .chunks(cols.max(1))
                .flat_map(|row| {
                    let max = largest(row);
                    row.iter().map(move |&v| over(v, max))
                })
                .collect(),
            Self::Log => {
                let floor = Self::log_floor(tokens).log10();
                values
                    .iter()
                    .map(|&v| {
                        let level = (v.max(f64::MIN_POSITIVE).log10() - floor) / -floor;
                        if level.is_finite() {
                            level.clamp(0.0, 1.0)
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(t: usize) -> Vec<f32> {
        (0..t * t)
            .map(|i| if i / t == i % t { 1.0 } else { 0.0 })
            .collect()
    }

    #[test]
    fn identity_attention_has_zero_distance_full_diagonal_zero_entropy() {
        let s = head_stats(&identity(5), 5, 1, (2, 4));
        assert_eq!(s.mean_distance, 0.0);
        assert_eq!(s.diagonal, 1.0);
        assert_eq!(s.entropy, 0.0);
        // Only the CLS query attends to CLS.
        assert!((s.cls.unwrap() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn uniform_attention_has_the_average_pairwise_distance_and_maximal_entropy() {
        // 2x2 grid of 4-pixel patches plus CLS: 5 tokens, uniform rows.
        let t = 5;
        let m = vec![0.2f32; t * t];
        let s = head_stats(&m, t, 1, (2, 4));
        // From any patch: distances 0, 4, 4, 4*sqrt(2) to the four patches, averaged.
        let expected = (0.0 + 4.0 + 4.0 + 4.0 * 2f64.sqrt()) / 4.0;
        assert!(
            (s.mean_distance - expected).abs() < 1e-6,
            "{}",
            s.mean_distance
        );
        assert!((s.entropy - 5f64.ln()).abs() < 1e-6);
        assert!((s.cls.unwrap() - 0.2).abs() < 1e-6 && (s.diagonal - 0.2).abs() < 1e-6);
        // The default 8x8 grid: the known mean distance between two random cells of an
        // 8x8 grid (computed by brute force here), times the 4-pixel patch.
        let t = 65;
        let m = vec![1.0 / 65.0; t * t];
        let mut brute = 0.0;
        for a in 0..64 {
            for b in 0..64 {
                brute += patch_distance(a, b, 8, 4);
            }
        }
        let s = head_stats(&m, t, 1, (8, 4));
        assert!((s.mean_distance - brute / 4096.0).abs() < 1e-4);
        assert!(
            (s.mean_distance - 16.546).abs() < 1e-3,
            "{}",
            s.mean_distance
        );
    }

    #[test]
    fn without_cls_every_token_is_a_patch() {
        // 2x2 grid, no CLS: the 4 tokens are the patches; query 0 looks half at itself
        // and half at its right neighbour (4 px away), the others at themselves.
        let mut m = identity(4);
        m[0] = 0.5;
        m[1] = 0.5;
        let s = head_stats(&m, 4, 0, (2, 4));
        assert_eq!(s.cls, None);
        assert!((s.mean_distance - 0.5).abs() < 1e-9, "{}", s.mean_distance);
        assert!((s.diagonal - 3.5 / 4.0).abs() < 1e-9);
        assert!((s.entropy - 2f64.ln() / 4.0).abs() < 1e-9);
    }

    #[test]
    fn heads_earn_their_pattern_labels_by_their_numbers() {
        // A 4x4 grid of 4-pixel patches, no CLS: 16 tokens.
        let t = 16;
        let matrix = |f: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
            (0..t * t).map(|i| f(i / t, i % t)).collect()
        };
        let stats = |m: &[f32]| head_stats(m, t, 0, (4, 4));
        let own = stats(&matrix(&|q, k| f32::from(u8::from(q == k))));
        assert_eq!(own.near, 1.0);
        assert!((own.shared - 1.0 / 16.0).abs() < 1e-6, "{}", own.shared);
        assert_eq!(own.pattern(), Pattern::Local);
        assert_eq!(own.pattern_reason(), "local (100% near)");
        let uniform = stats(&matrix(&|_, _| 1.0 / 16.0));
        assert!((uniform.entropy - uniform.uniform_entropy).abs() < 1e-6);
        assert_eq!(uniform.pattern(), Pattern::Broad);
        // Every query on keys 0 and 1: the same few keys.
        let same = stats(&matrix(&|_, k| if k < 2 { 0.5 } else { 0.0 }));
        assert!((same.shared - 1.0).abs() < 1e-9);
        assert_eq!(same.pattern(), Pattern::QueryIndependent);
        // Each query on the patch two rows below (8 px, beyond its neighbours).
        let far = stats(&matrix(&|q, k| f32::from(u8::from(k == (q + 8) % 16))));
        assert_eq!(far.near, 0.0);
        assert_eq!(far.pattern(), Pattern::Mixed);
    }

    #[test]
    fn rollout_of_two_layers_by_hand() {
        // Two tokens. Layer 1: [[0.5, 0.5], [0, 1]]; layer 2: [[1, 0], [0.5, 0.5]].
        let l1 = vec![0.5, 0.5, 0.0, 1.0];
        let l2 = vec![1.0, 0.0, 0.5, 0.5];
        // With the identity added and rows renormalised:
        // A1 = [[0.75, 0.25], [0, 1]], A2 = [[1, 0], [0.25, 0.75]].
        // Rollout = A2 * A1 = [[0.75, 0.25], [0.1875, 0.8125]].
        let r = rollout(&[l1, l2], 2);
        let expected = [0.75, 0.25, 0.1875, 0.8125];
        for (a, b) in r.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{r:?}");
        }
        // Rows stay distributions.
        assert!((r[0] + r[1] - 1.0).abs() < 1e-12 && (r[2] + r[3] - 1.0).abs() < 1e-12);
        assert_eq!(rollout(&[], 2), vec![1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn heads_average_elementwise() {
        let a = [1.0f32, 0.0, 0.0, 1.0];
        let b = [0.0f32, 1.0, 1.0, 0.0];
        assert_eq!(head_average(&[&a, &b], 2), vec![0.5; 4]);
    }

    #[test]
    fn scales_map_weights_to_levels() {
        // Two rows over 4 keys: one peaked, one flat.
        let w = [0.7, 0.1, 0.1, 0.1, 0.25, 0.25, 0.25, 0.25];
        let map = Scale::MapMax.levels(&w, (2, 4), 4);
        assert_eq!(map[0], 1.0);
        assert!((map[4] - 0.25 / 0.7).abs() < 1e-12);
        let row = Scale::RowMax.levels(&w, (2, 4), 4);
        assert_eq!((row[0], row[4], row[7]), (1.0, 1.0, 1.0));
        assert!((row[1] - 0.1 / 0.7).abs() < 1e-12);
        // Log: 1 is full, the floor 1/T·10⁻² and below are black, a decade is 1/3.5.
        let log = Scale::Log.levels(&[1.0, 0.0025, 0.0, 0.1, f64::NAN], (1, 5), 4);
        assert!(
            (log[0] - 1.0).abs() < 1e-12 && log[1].abs() < 1e-12,
            "{log:?}"
        );
        assert_eq!(log[2], 0.0);
        let decade = 1.0 / -(Scale::log_floor(4).log10());
        assert!((log[3] - (1.0 - decade)).abs() < 1e-12, "{log:?}");
        assert_eq!(log[4], 0.0);
        assert_eq!(Scale::MapMax.levels(&[0.0; 4], (2, 2), 2), vec![0.0; 4]);
        assert_eq!(Scale::MapMax.next().next().next(), Scale::MapMax);
    }
}
