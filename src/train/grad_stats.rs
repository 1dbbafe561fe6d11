//! Gradients and updates per parameter group, measured on the real training step: the
//! norms of the gradients the optimizer is given (every step, cheaply, so that a
//! non-finite or spiking gradient is caught before it is applied) and, every
//! `probe.grad_every_steps`, the weights' norms and the step's actual update
//! ‖w_after − w_before‖/‖w_before‖ as a [`GradRecord`]. A group is one layer's weight
//! and bias together, named as the variables are without the last part.

use std::collections::VecDeque;

use candle_core::{CpuStorage, Result, Storage, Tensor, Var};

use crate::events::GradRecord;
pub use crate::inspect::layers::{group_of, Depth};

/// A gradient norm this many times the median of the recent ones is a spike.
pub const SPIKE_FACTOR: f64 = 10.0;
/// Steps whose gradient norms make the "recent median".
pub const SPIKE_WINDOW: usize = 100;
/// Steps the median needs before a spike can be called, and between two spike alerts.
const SPIKE_SETTLE: usize = 20;

/// A block's layers in the order the data meets them.
const BLOCK_ORDER: [&str; 7] = [
    "norm1",
    "attn.qkv",
    "attn.scale",
    "attn.proj",
    "norm2",
    "mlp.fc1",
    "mlp.fc2",
];

fn model_order(group: &str) -> (Depth, usize, String) {
    let depth = Depth::of(group);
    let within = match depth {
        Depth::Block(_) => {
            let part = group.splitn(3, '.').nth(2).unwrap_or("");
            BLOCK_ORDER
                .iter()
                .position(|p| *p == part)
                .unwrap_or(BLOCK_ORDER.len())
        }
        Depth::Embedding => ["patch_norm", "patch_embed", "cls_token", "pos_embed"]
            .iter()
            .position(|p| *p == group)
            .unwrap_or(4),
        Depth::Head => usize::from(group == "head"),
    };
    (depth, within, group.to_string())
}

/// The parameter groups of a model's variables (given in the optimizer's order).
#[derive(Debug, Clone)]
pub struct GradGroups {
    /// Group names in model order.
    pub names: Vec<String>,
    /// The group of each variable.
    member_of: Vec<usize>,
}

/// The weights before an update, to measure what the update did.
pub struct Before(Vec<Vec<f64>>);

impl GradGroups {
    pub fn new(var_names: &[String]) -> Self {
        let mut names: Vec<String> = var_names.iter().map(|n| group_of(n).to_string()).collect();
        names.sort_by_key(|g| model_order(g));
        names.dedup();
        let member_of = var_names
            .iter()
            .map(|n| {
                let g = group_of(n);
                names
                    .iter()
                    .position(|x| x == g)
                    .expect("every group is listed")
            })
            .collect();
        Self { names, member_of }
    }

    /// Σ x² per group of the gradients (variables without one add nothing).
    pub fn sum_squares(&self, grads: &[Option<Tensor>]) -> Result<Vec<f64>> {
        let mut sums = vec![0.0; self.names.len()];
        for (g, &group) in grads.iter().zip(&self.member_of) {
            if let Some(g) = g {
                sums[group] += tensor_squares(g, None)?;
            }
        }
        Ok(sums)
    }

    /// The first group, in model order, whose gradient is not finite.
    pub fn first_non_finite(&self, sums: &[f64]) -> Option<&str> {
        sums.iter()
            .position(|s| !s.is_finite())
            .map(|i| self.names[i].as_str())
    }

    /// What went non-finite in a step, if anything: the loss, or the first group's
    /// gradient (in model order).
    pub fn non_finite(&self, loss: f64, sums: &[f64]) -> Option<String> {
        match (loss.is_finite(), self.first_non_finite(sums)) {
            (true, None) => None,
            (true, Some(group)) => Some(format!(
                "the gradient of {group} became non-finite (loss {loss:.4})"
            )),
            (false, Some(group)) => Some(format!(
                "the loss became {loss} (the first non-finite gradient: {group})"
            )),
            (false, None) => Some(format!("the loss became {loss}")),
        }
    }

    /// The alert of a spike at `step` against the recent `median`, naming the group
    /// with the largest gradient.
    pub fn spike(&self, (step, median): (u64, f64), sums: &[f64]) -> String {
        let norm = sums.iter().sum::<f64>().sqrt();
        let (top, top_sum) = (sums.iter().enumerate())
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap_or((0, &0.0));
        format!(
            "gradient norm {norm:.3} at step {step} is {:.0}x the median of the last {SPIKE_WINDOW} steps ({median:.3}); largest in {} ({:.3})",
            norm / median,
            self.names.get(top).map_or("?", String::as_str),
            top_sum.sqrt()
        )
    }

    /// A copy of the weights, taken just before the optimizer's step.
    pub fn before(vars: &[Var]) -> Result<Before> {
        let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect();
        vars.iter()
            .map(|v| with_values(v.as_tensor(), widen, <[f64]>::to_vec))
            .collect::<Result<Vec<_>>>()
            .map(Before)
    }

    /// The record of a step: `grad_sums` from [`GradGroups::sum_squares`], the weights
    /// `before` the update and `vars` after it.
    pub fn record(
        &self,
        (step, epoch): (u64, u64),
        grad_sums: &[f64],
        before: &Before,
        vars: &[Var],
    ) -> Result<GradRecord> {
        let n = self.names.len();
        let (mut weight, mut delta) = (vec![0.0; n], vec![0.0; n]);
        for ((var, old), &group) in vars.iter().zip(&before.0).zip(&self.member_of) {
            weight[group] += sum_squares(old, None);
            delta[group] += tensor_squares(var.as_tensor(), Some(old))?;
        }
        Ok(GradRecord {
            step,
            epoch,
            groups: self.names.clone(),
            grad_norm: grad_sums.iter().map(|s| s.sqrt()).collect(),
            weight_norm: weight.iter().map(|s| s.sqrt()).collect(),
            update_ratio: delta
                .iter()
                .zip(&weight)
                .map(|(d, w)| match *w > 0.0 {
                    true => (d / w).sqrt(),
                    false => 0.0,
                })
                .collect(),
        })
    }
}

/// Σ (xᵢ − yᵢ)² in f64 (y = 0 when absent), over eight running sums so that it
/// vectorises; the order is fixed, so the result is too.
fn sum_squares<T: Copy + Into<f64>>(x: &[T], y: Option<&[f64]>) -> f64 {
    let mut lanes = [0.0f64; 8];
    let value = |i: usize| x[i].into() - y.map_or(0.0, |y| y[i]);
    let whole = x.len() / 8 * 8;
    for start in (0..whole).step_by(8) {
        for (k, lane) in lanes.iter_mut().enumerate() {
            let d = value(start + k);
            *lane += d * d;
        }
    }
    for (k, i) in (whole..x.len()).enumerate() {
        let d = value(i);
        lanes[k] += d * d;
    }
    lanes.iter().sum()
}

/// Σ (x − y)² of a CPU tensor's values (f32 widened exactly) against `y`, or Σ x².
fn tensor_squares(t: &Tensor, y: Option<&[f64]>) -> Result<f64> {
    with_values(t, |v| sum_squares(v, y), |v| sum_squares(v, y))
}

/// `f32` or `f64` of a contiguous CPU tensor's values, by its type.
fn with_values<R>(
    t: &Tensor,
    f32: impl FnOnce(&[f32]) -> R,
    f64: impl FnOnce(&[f64]) -> R,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("gradient statistics: expects a contiguous tensor")
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f32(&v[start..end])),
        Storage::Cpu(CpuStorage::F64(v)) => Ok(f64(&v[start..end])),
        _ => candle_core::bail!("gradient statistics: expects f32 or f64 on the CPU"),
    }
}

/// Watches the whole model's gradient norm for spikes against its recent median.
#[derive(Debug, Default)]
pub struct SpikeWatch {
    recent: VecDeque<f64>,
    /// Steps since the last alert (spikes in a burst make one alert).
    quiet: usize,
}

impl SpikeWatch {
    /// Takes this step's whole-model gradient norm; returns the recent median when the
    /// norm is a spike that deserves an alert.
    pub fn check(&mut self, norm: f64) -> Option<f64> {
        let median = (self.recent.len() >= SPIKE_SETTLE).then(|| {
            let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            sorted[sorted.len() / 2]
        });
        self.quiet += 1;
        let spike = median.filter(|m| norm > SPIKE_FACTOR * m && self.quiet > SPIKE_SETTLE);
        if spike.is_some() {
            self.quiet = 0;
        }
        self.recent.push_back(norm);
        if self.recent.len() > SPIKE_WINDOW {
            self.recent.pop_front();
        }
        spike
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::tests::values;
    use crate::model::ModelState;
    use crate::train::optim::AdamW;
    use candle_core::DType;

    #[test]
    fn groups_follow_the_model_and_rows_follow_depth() {
        let mut mc = Config::default().model;
        mc.depth = 2;
        mc.pool = crate::config::Pool::Cls;
        let state = ModelState::new(&mc, 1, DType::F32).unwrap();
        let names: Vec<String> = state.named_vars().into_iter().map(|(n, _)| n).collect();
        let groups = GradGroups::new(&names);
        assert_eq!(
            groups.names,
            [
                "patch_embed",
                "cls_token",
                "blocks.0.norm1",
                "blocks.0.attn.qkv",
                "blocks.0.attn.proj",
                "blocks.0.norm2",
                "blocks.0.mlp.fc1",
                "blocks.0.mlp.fc2",
                "blocks.1.norm1",
                "blocks.1.attn.qkv",
                "blocks.1.attn.proj",
                "blocks.1.norm2",
                "blocks.1.mlp.fc1",
                "blocks.1.mlp.fc2",
                "norm",
                "head"
            ]
        );
        assert_eq!(Depth::of("blocks.11.mlp.fc1"), Depth::Block(11));
        assert_eq!(group_of("blocks.1.norm2.bias"), "blocks.1.norm2");
        assert_eq!(Depth::of("pos_embed"), Depth::Embedding);
        assert_eq!(Depth::of("norm"), Depth::Head);
    }

    #[test]
    fn the_record_holds_the_norms_of_the_applied_gradients_and_the_actual_update() {
        let cfg = crate::model::tests::tiny_config();
        let state = ModelState::new(&cfg, 4, DType::F64).unwrap();
        let named = state.named_vars();
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let groups = GradGroups::new(&names);
        // Gradients of a real loss.
        let images = crate::model::tests::random_images(3, 5, DType::F64);
        let logits = state.model.forward(&images).unwrap();
        let loss = crate::model::smoothed_cross_entropy(&logits, &[1, 4, 7], 0.1).unwrap();
        let store = loss.backward().unwrap();
        let grads = crate::train::optim::gradients_of(&vars, &store);
        let sums = groups.sum_squares(&grads).unwrap();
        let before = GradGroups::before(&vars).unwrap();
        let kept: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
        let mut optimizer = AdamW::new(named.clone(), &Config::default().train).unwrap();
        optimizer.step(&grads, 1e-3).unwrap();
        let record = groups.record((1, 1), &sums, &before, &vars).unwrap();
        assert_eq!(record.groups, groups.names);
        for (gi, group) in groups.names.iter().enumerate() {
            // By candle, in f64, over the group's variables.
            let members: Vec<usize> = (0..names.len())
                .filter(|&i| group_of(&names[i]) == group)
                .collect();
            let norm = |ts: &dyn Fn(usize) -> Tensor| -> f64 {
                members
                    .iter()
                    .map(|&i| {
                        ts(i)
                            .sqr()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap()
                    })
                    .sum::<f64>()
                    .sqrt()
            };
            let grad = norm(&|i| grads[i].clone().unwrap());
            let weight = norm(&|i| kept[i].clone());
            let delta = norm(&|i| (vars[i].as_tensor() - &kept[i]).unwrap());
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-300);
            assert!(
                close(record.grad_norm[gi], grad),
                "{group}: {} vs {grad}",
                record.grad_norm[gi]
            );
            assert!(close(record.weight_norm[gi], weight), "{group}");
            assert!(
                close(record.update_ratio[gi], delta / weight),
                "{group}: {} vs {}",
                record.update_ratio[gi],
                delta / weight
            );
            assert!(record.update_ratio[gi] > 0.0, "{group} moved");
        }
        // The parameters did change, by about lr per element (Adam's first step).
        assert!(values(vars[0].as_tensor()) != values(&kept[0]));
        let mut bad = grads.clone();
        let i = names
            .iter()
            .position(|n| n == "blocks.1.mlp.fc2.weight")
            .unwrap();
        bad[i] = Some((bad[i].clone().unwrap() * f64::NAN).unwrap());
        let j = names.iter().position(|n| n == "head.weight").unwrap();
        bad[j] = Some((bad[j].clone().unwrap() * f64::INFINITY).unwrap());
        let sums = groups.sum_squares(&bad).unwrap();
        assert_eq!(groups.first_non_finite(&sums), Some("blocks.1.mlp.fc2"));
        let what = groups.non_finite(2.5, &sums).unwrap();
        assert_eq!(
            what,
            "the gradient of blocks.1.mlp.fc2 became non-finite (loss 2.5000)"
        );
        assert!(groups
            .non_finite(f64::NAN, &sums)
            .unwrap()
            .starts_with("the loss became NaN"));
        let fine = groups.sum_squares(&grads).unwrap();
        assert_eq!(groups.non_finite(2.5, &fine), None);
        let spike = groups.spike((9, 0.01), &fine);
        assert!(
            spike.contains("at step 9 is") && spike.contains("largest in"),
            "{spike}"
        );
    }

    #[test]
    fn a_spike_is_a_norm_far_above_the_recent_median_once_per_burst() {
        let mut watch = SpikeWatch::default();
        for i in 0..SPIKE_SETTLE {
            assert_eq!(watch.check(1.0 + 0.01 * i as f64), None, "settling");
        }
        assert_eq!(watch.check(5.0), None, "5x is not a spike");
        let median = watch.check(50.0).expect("50x is");
        assert!((median - 1.1).abs() < 0.02, "{median}");
        assert_eq!(watch.check(60.0), None, "the same burst");
        for _ in 0..SPIKE_SETTLE {
            watch.check(1.0);
        }
        assert!(watch.check(100.0).is_some(), "a new burst");
    }
}
