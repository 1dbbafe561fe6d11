//! What a configuration will need in memory, estimated from its sizes before anything
//! is allocated, so that a model too large for the machine is refused in one line
//! instead of growing until the kernel kills it (and starves everything else meanwhile).
//!
//! Sizes are multiplied in f64: a product of absurd sizes becomes a huge number or
//! infinity, never a wrapped one, and is refused like any other too-large estimate.

use super::step::micro_batch_len;
use crate::config::{
    AttentionKind, Config, DatasetKind, NormKind, PatchTokens, Placement, PosEmbed,
};
use crate::data::{IMAGE_BYTES, NUM_CLASSES};
use crate::ops::TILE_IMAGES;

/// Bytes of an f32.
const F32: f64 = 4.0;
/// The binary, its libraries, thread stacks and allocator slack, measured with the
/// smallest model (`vitscope bench --set model.dim=8 …`: 11 MB).
const BASE_BYTES: f64 = 12e6;
/// CIFAR-10's images: 50,000 for training and 10,000 for testing.
const CIFAR_IMAGES: f64 = 60_000.0;
/// Batches alive at once on the data side: two queued, one being built, one in use.
const BATCHES_IN_FLIGHT: f64 = 4.0;
/// Full probes the dashboard keeps (newest first): the bound its memory is sized by.
pub const DASHBOARD_PROBES: usize = 32;

/// What runs in the process, which decides what it holds besides the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Training, printing lines.
    Headless,
    /// Training with the dashboard, which keeps the newest full probes.
    Dashboard,
    /// `vitscope bench`: two batches of synthetic images, one probe.
    Bench,
}

/// Estimated bytes by part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Parameters of the model (count).
    pub parameters: f64,
    /// Parameters, AdamW's two moments, summed and per-micro-batch gradients, EMA.
    pub model_bytes: f64,
    /// Activations kept for backward, and backward's scratch, for the micro-batches
    /// running at once.
    pub activation_bytes: f64,
    /// Evaluation batches on every lane.
    pub eval_bytes: f64,
    /// The data set in memory and the batches in flight.
    pub data_bytes: f64,
    /// Probes being recorded and kept.
    pub probe_bytes: f64,
    pub base_bytes: f64,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.model_bytes
            + self.activation_bytes
            + self.eval_bytes
            + self.data_bytes
            + self.probe_bytes
            + self.base_bytes
    }

    /// The largest part, with the keys that size it.
    fn largest(&self) -> (&'static str, f64, &'static [&'static str]) {
        let parts: [(&str, f64, &[&str]); 5] = [
            (
                "parameters, gradients and AdamW moments",
                self.model_bytes,
                &["model.dim", "model.depth", "model.mlp_dim"],
            ),
            (
                "activations of the micro-batches",
                self.activation_bytes,
                &[
                    "train.micro_batch_size",
                    "model.dim",
                    "model.depth",
                    "model.mlp_dim",
                    "model.heads",
                    "model.patch_size",
                ],
            ),
            (
                "evaluation batches",
                self.eval_bytes,
                &["train.eval_batch_size", "model.dim", "model.mlp_dim"],
            ),
            (
                "data and batches",
                self.data_bytes,
                &[
                    "train.batch_size",
                    "data.synthetic_train_size",
                    "data.synthetic_test_size",
                ],
            ),
            (
                "probes",
                self.probe_bytes,
                &[
                    "probe.images",
                    "probe.predictions",
                    "probe.histogram_bins",
                    "model.depth",
                ],
            ),
        ];
        parts
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or(("", 0.0, &[]))
    }
}

/// A byte count for people: "365 MB", "44.9 GB".
pub fn human(bytes: f64) -> String {
    match bytes {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b => format!("{:.0} MB", b / 1e6),
    }
}

/// The estimate of `config` running as `workload` on `threads` tensor threads.
pub fn estimate(config: &Config, workload: Workload, threads: usize) -> Estimate {
    let (m, t) = (&config.model, &config.train);
    let f = |n: usize| n as f64;
    let (d, mlp, heads, depth) = (f(m.dim), f(m.mlp_dim), f(m.heads), f(m.depth));
    let tokens = f(m.tokens());
    let patch_values = f(m.token_values());
    // Shifted patch tokens' LayerNorm over those values.
    let patch_norm = if m.patch_tokens == PatchTokens::Shifted {
        2.0 * patch_values
    } else {
        0.0
    };
    let classes = f(NUM_CLASSES);

    // Parameters, as `ModelState` creates them.
    // A norm: gamma, and beta for LayerNorm; blocks have two unless norm = "none".
    let norm = if m.norm_kind == NormKind::RmsNorm {
        d
    } else {
        2.0 * d
    };
    let block_norms = if m.norm == Placement::None {
        0.0
    } else {
        2.0 * norm
    };
    // Locality self-attention's scales, one per head.
    let scales = if m.attention == AttentionKind::Locality {
        heads
    } else {
        0.0
    };
    let block = block_norms
        + (3.0 * d * d + 3.0 * d)
        + scales
        + (d * d + d)
        + (mlp * d + mlp)
        + (d * mlp + d);
    let position = if m.pos_embed == PosEmbed::Learned {
        tokens * d
    } else {
        0.0
    };
    let cls = if m.has_cls() { d } else { 0.0 };
    let parameters = patch_norm
        + (patch_values * d + d)
        + cls
        + position
        + depth * block
        + norm
        + (d * classes + classes);
    let micro = micro_batch_len(t.batch_size, t.micro_batch_size);
    let micro_batches = t.batch_size.div_ceil(micro);
    let lanes = f(threads.clamp(1, micro_batches.max(1)));
    // Each micro-batch's gradients wait to be summed, up to 8 per lane at a time;
    // the sum; each lane's backward pass; initialisation's f64 values.
    let gradient_copies = f(micro_batches.min(8 * threads.max(1))) + 1.0 + lanes + 2.0;
    let ema = if t.ema_decay > 0.0 { 1.0 } else { 0.0 };
    let model_bytes = parameters * F32 * (1.0 + 2.0 + gradient_copies + ema);

    // Per image and block, what the fused block keeps for backward: LN1 out (D), q|k|v
    // (3D, below), heads' output, x + attention, LN2 out and the block's output (D each;
    // the layers' inputs LN1 out, heads' output and LN2 out, below), the
    // MLP's hidden layer before and after GELU (2M) per token, and the attention weights.
    // With bf16 products, also the four linear layers' inputs packed as bf16 pairs for
    // the weight gradients (3D + M halves of f32 values), counted whole: the pool of
    // packed factors keeps freed ones, and a bound must hold (measured: the default's
    // quick demo 443 MB peak against 457 MB estimated). And the attention's factors of
    // its backward products per head, packed the same way: Q, K, Vᵀ (tokens x d_k),
    // each padded to whole blocks of 32.
    let whole = |n: f64| (n / 32.0).ceil().max(1.0) * 32.0;
    let (pt, head) = (whole(tokens), whole(d / heads.max(1.0)));
    let packed = match m.bf16() {
        true => 3.0 * d + mlp + heads * 3.0 * pt * head / 2.0 / tokens,
        false => 0.0,
    };
    // q|k|v (3D) is kept only where the attention's backward pass reads it: not in a
    // fused block whose factors are packed (bf16 on a bf16 instruction) where no
    // learned scale needs Q Kᵀ again.
    let native = m.bf16() && crate::ops::Bf16Kernel::current().is_native();
    let qkv = match m.is_fused() && native && m.attention != AttentionKind::Locality {
        true => 0.0,
        false => 3.0 * d,
    };
    // LN1 out, the heads' output and LN2 out are kept as f32 values only where no packed
    // copy stands in for them (a fused block with bf16 products keeps one tile's).
    let inputs = match m.is_fused() && m.bf16() {
        true => 0.0,
        false => 3.0 * d,
    };
    // The two norms' moments: a mean and a scale per token each.
    let per_block =
        tokens * (2.0 * d + inputs + qkv + 2.0 * mlp + packed + 4.0) + heads * tokens * tokens;
    // One block's backward scratch, and a tile's buffers, counted as a block that kept
    // everything.
    let scratch = per_block + tokens * (3.0 * d - inputs);
    // The blocks, one block's worth of backward scratch, and the embedding's tensors.
    // Shifted patch tokens: the copies, their patches and the norm's output (each the
    // patches' count times a token's values).
    let shifted = if m.patch_tokens == PatchTokens::Shifted {
        3.0 * f(m.patches()) * patch_values
    } else {
        0.0
    };
    let per_image = depth * per_block + scratch + f(IMAGE_BYTES) * 2.0 + 3.0 * tokens * d + shifted;
    let activation_bytes = lanes * f(micro) * per_image * F32;

    // Evaluation runs a batch per lane, keeping only a tile's activations.
    let eval_lanes = f(threads.max(1));
    let eval_per_lane = f(t.eval_batch_size) * (f(IMAGE_BYTES) + 2.0 * tokens * d + classes)
        + f(TILE_IMAGES) * scratch;
    let eval_bytes = eval_lanes * eval_per_lane * F32;

    let stored_images = match (workload, config.data.dataset) {
        (Workload::Bench, _) => f(t.batch_size) * 2.0 + 1.0,
        (_, DatasetKind::Cifar10) => CIFAR_IMAGES,
        (_, DatasetKind::Synthetic) => {
            f(config.data.synthetic_train_size) + f(config.data.synthetic_test_size)
        }
    };
    let data_bytes = stored_images * f(IMAGE_BYTES + 1)
        + BATCHES_IN_FLIGHT * f(t.batch_size) * f(IMAGE_BYTES) * F32;

    // A full probe: attention and hidden states of the probe images, the position
    // embedding and patch filters; recording one holds its captures too.
    let probe_images = f(config.probe.images);
    let snapshot = probe_images * (depth * heads * tokens * tokens + (depth + 1.0) * tokens * d)
        + tokens * d
        + d * patch_values;
    let capture =
        probe_images * depth * (heads * tokens * tokens + 6.0 * tokens * d + 2.0 * tokens * mlp);
    let predictions = f(config.probe.predictions) * (classes + f(IMAGE_BYTES) / F32);
    // Each probe's histograms: input and output of every LayerNorm, 8-byte counts.
    let histograms = 2.0 * f(m.layer_norms()) * f(config.probe.histogram_bins) * 2.0;
    let kept = if workload == Workload::Dashboard {
        DASHBOARD_PROBES as f64
    } else {
        1.0
    };
    let probe_bytes = (snapshot * (kept + 1.0) + capture + predictions + histograms * kept) * F32;

    Estimate {
        parameters,
        model_bytes,
        activation_bytes,
        eval_bytes,
        data_bytes,
        probe_bytes,
        base_bytes: BASE_BYTES,
    }
}

/// Memory the kernel says can be had without swapping (MemAvailable), in bytes; `None`
/// where /proc/meminfo is not there.
pub fn available_bytes() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line["MemAvailable:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}

/// Why a configuration is refused before anything is written: it would not fit.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("the sizes overflow: {part} would take more than 10^18 bytes ({values})")]
    Overflow { part: String, values: String },
    #[error("this configuration needs about {needed}, more than the {available} of memory available: {part} take {takes} ({values})")]
    TooBig {
        needed: String,
        available: String,
        part: String,
        takes: String,
        values: String,
    },
}

/// The estimate, or a one-line refusal naming the keys when it exceeds `available`
/// bytes (when known) or the sizes overflow.
pub fn check(
    config: &Config,
    workload: Workload,
    threads: usize,
    available: Option<f64>,
) -> Result<Estimate, MemoryError> {
    let e = estimate(config, workload, threads);
    let total = e.total();
    let overflow = !total.is_finite() || total >= 1e18;
    let too_big = available.is_some_and(|a| total > a);
    if !(overflow || too_big) {
        return Ok(e);
    }
    let (part, bytes, keys) = e.largest();
    let values = keys
        .iter()
        .filter_map(|k| config_value(config, k).map(|v| format!("{k} = {v}")))
        .collect::<Vec<_>>()
        .join(", ");
    if overflow {
        return Err(MemoryError::Overflow {
            part: part.to_string(),
            values,
        });
    }
    Err(MemoryError::TooBig {
        needed: human(total),
        available: human(available.unwrap_or(0.0)),
        part: part.to_string(),
        takes: human(bytes),
        values,
    })
}

/// The value of a size key, for messages.
fn config_value(config: &Config, key: &str) -> Option<usize> {
    let (m, t, d, p) = (&config.model, &config.train, &config.data, &config.probe);
    Some(match key {
        "model.dim" => m.dim,
        "model.depth" => m.depth,
        "model.mlp_dim" => m.mlp_dim,
        "model.heads" => m.heads,
        "model.patch_size" => m.patch_size,
        "train.micro_batch_size" => t.micro_batch_size,
        "train.batch_size" => t.batch_size,
        "train.eval_batch_size" => t.eval_batch_size,
        "data.synthetic_train_size" if d.dataset == DatasetKind::Synthetic => {
            d.synthetic_train_size
        }
        "data.synthetic_test_size" if d.dataset == DatasetKind::Synthetic => d.synthetic_test_size,
        "probe.images" => p.images,
        "probe.predictions" => p.predictions,
        "probe.histogram_bins" => p.histogram_bins,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_TOML;
    use crate::model::ModelState;
    use candle_core::DType;

    #[test]
    fn the_estimate_counts_every_variants_parameters() {
        for cfg in crate::model::tests::variants() {
            let state = ModelState::new(&cfg, 5, candle_core::DType::F64).unwrap();
            let config = Config {
                model: cfg.clone(),
                ..Config::default()
            };
            assert_eq!(
                state.parameter_count() as f64,
                estimate(&config, Workload::Headless, 1).parameters,
                "{}",
                crate::model::tests::variant_name(&cfg)
            );
        }
    }

    fn config(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| (*s).to_string()).collect();
        Config::from_sources(None, &sets).unwrap()
    }

    #[test]
    fn the_parameter_count_is_the_models() {
        for sets in [
            &[][..],
            &[
                "model.dim=32",
                "model.depth=2",
                "model.heads=2",
                "model.mlp_dim=64",
                "model.patch_size=8",
            ][..],
            &[
                "model.patch_size=2",
                "model.dim=12",
                "model.heads=3",
                "model.mlp_dim=5",
            ][..],
        ] {
            let c = config(sets);
            let state = ModelState::new(&c.model, 1, DType::F32).unwrap();
            let e = estimate(&c, Workload::Headless, 2);
            assert_eq!(e.parameters as usize, state.parameter_count(), "{sets:?}");
        }
    }

    #[test]
    fn activations_grow_with_the_micro_batch_and_lanes_and_probes_with_the_dashboard() {
        let base = estimate(&config(&[]), Workload::Headless, 2);
        let half = estimate(
            &config(&["train.micro_batch_size=16"]),
            Workload::Headless,
            2,
        );
        assert!((base.activation_bytes / half.activation_bytes - 2.0).abs() < 1e-9);
        let one_lane = estimate(&config(&[]), Workload::Headless, 1);
        assert!((base.activation_bytes / one_lane.activation_bytes - 2.0).abs() < 1e-9);
        let dash = estimate(&config(&[]), Workload::Dashboard, 2);
        assert!(dash.probe_bytes > 4.0 * base.probe_bytes);
        // The default model: a few hundred MB, most of it CIFAR-10 and activations.
        let total = base.total() / 1e6;
        assert!((250.0..600.0).contains(&total), "{total} MB");
        assert!(
            (180e6..200e6).contains(&base.data_bytes),
            "{}",
            base.data_bytes
        );
    }

    #[test]
    fn too_large_or_overflowing_sizes_are_refused_naming_the_keys() {
        let available = Some(24e9);
        assert!(check(&config(&[]), Workload::Dashboard, 2, available).is_ok());
        assert!(check(&config(&[]), Workload::Dashboard, 2, None).is_ok());
        let deep = check(
            &config(&["model.depth=100000"]),
            Workload::Headless,
            2,
            available,
        )
        .unwrap_err()
        .to_string();
        assert!(
            deep.starts_with("this configuration needs about "),
            "{deep}"
        );
        assert!(
            deep.contains("more than the 24.0 GB of memory available"),
            "{deep}"
        );
        assert!(deep.contains("model.depth = 100000"), "{deep}");
        assert_eq!(deep.lines().count(), 1);
        let wide = check(
            &config(&["model.dim=999999996", "model.heads=1"]),
            Workload::Headless,
            2,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(wide.starts_with("the sizes overflow: parameters"), "{wide}");
        assert!(wide.contains("model.dim = 999999996"), "{wide}");
        let evals = check(
            &config(&["train.eval_batch_size=100000000"]),
            Workload::Headless,
            2,
            available,
        )
        .unwrap_err()
        .to_string();
        assert!(
            evals.contains("evaluation batches take")
                && evals.contains("train.eval_batch_size = 100000000"),
            "{evals}"
        );
        let data = check(
            &config(&[
                "data.dataset=synthetic",
                "data.synthetic_train_size=100000000",
            ]),
            Workload::Headless,
            2,
            available,
        )
        .unwrap_err()
        .to_string();
        assert!(
            data.contains("data.synthetic_train_size = 100000000"),
            "{data}"
        );
    }

    /// Every key of the defaults, each set alone to extreme values of its type (and of
    /// other types), then all size keys at once: loading gives a config or a one-line
    /// error naming the key, and the memory check an estimate or a one-line refusal.
    /// Nothing panics.
    #[test]
    fn every_key_takes_extreme_values_without_panicking() {
        let defaults: toml::Table = DEFAULT_TOML.parse().unwrap();
        let mut keys = Vec::new();
        for (section, table) in &defaults {
            for (key, value) in table.as_table().unwrap() {
                keys.push((format!("{section}.{key}"), value.clone()));
            }
        }
        let integers = [
            "0",
            "1",
            "-1",
            "9223372036854775807",
            "-9223372036854775808",
            "4294967296",
            "9007199254740993",
        ];
        let floats = [
            "0.0",
            "-0.0",
            "nan",
            "inf",
            "-inf",
            "1e308",
            "-1e308",
            "5e-324",
            "0.999999999999",
            "1.0",
        ];
        let long = format!("\"{}\"", "x".repeat(10_000));
        let strings = [
            "\"\"",
            "\"x\"",
            "\"\\u0000\"",
            "\"1000000000h\"",
            "\"60m\"",
            long.as_str(),
        ];
        let other = ["true", "[1, 2]", "{ a = 1 }", "1979-05-27"];
        let mut checked = 0;
        for (key, default) in &keys {
            let values: Vec<&str> = match default {
                toml::Value::Integer(_) => integers
                    .iter()
                    .chain(&floats)
                    .chain(&other)
                    .copied()
                    .collect(),
                toml::Value::Float(_) => floats
                    .iter()
                    .chain(&integers)
                    .chain(&other)
                    .copied()
                    .collect(),
                toml::Value::String(_) => strings
                    .iter()
                    .chain(&integers)
                    .chain(&other)
                    .copied()
                    .collect(),
                _ => integers
                    .iter()
                    .chain(&strings)
                    .chain(&other)
                    .copied()
                    .collect(),
            };
            for value in values {
                let set = format!("{key}={value}");
                match Config::from_sources(None, std::slice::from_ref(&set)) {
                    Ok(c) => {
                        for workload in [Workload::Headless, Workload::Dashboard, Workload::Bench] {
                            if let Err(e) = check(&c, workload, 2, Some(24e9)) {
                                let e = e.to_string();
                                assert_eq!(e.lines().count(), 1, "{set}: {e}");
                            }
                        }
                        let _ = c.train.final_step(390);
                        let _ = c.train.schedule_steps(390);
                        let _ = c.train.budget_secs();
                    }
                    Err(e) => {
                        let e = e.to_string();
                        assert_eq!(e.lines().count(), 1, "{set}: {e}");
                        assert!(e.contains(key.as_str()) || e.contains(&set), "{set}: {e}");
                    }
                }
                checked += 1;
            }
        }
        assert!(checked > 500, "{checked}");
        // All sizes at once, huge: refused (overflow), never wrapped into a small number.
        let sizes: Vec<String> = [
            "model.dim",
            "model.mlp_dim",
            "model.depth",
            "model.heads",
            "train.batch_size",
            "train.micro_batch_size",
            "train.eval_batch_size",
            "probe.images",
            "probe.predictions",
        ]
        .iter()
        .map(|k| format!("{k}=9223372036854775807"))
        .chain(["model.pos_embed=\"learned\"".to_string()]) // sincos needs dim % 4 = 0
        .collect();
        let c = Config::from_sources(None, &sizes).unwrap();
        let e = check(&c, Workload::Dashboard, 2, Some(24e9))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("the sizes overflow"), "{e}");
    }
}
