//! AdamW with its state in plain view (so a checkpoint can hold it), and the learning
//! rate schedule: linear warm-up, then cosine decay to `min_lr`.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::state_error::StateError;
use crate::config::TrainConfig;

/// The gradients of `vars` from a backward pass, detached, in order.
pub fn gradients_of(vars: &[Var], grads: &GradStore) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).map(Tensor::detach))
        .collect()
}

/// Learning rate after `step` completed steps of `total` (warm-up counts from 1).
pub fn learning_rate(cfg: &TrainConfig, step: u64, total: u64) -> f64 {
    let step = step + 1;
    let warmup = cfg.warmup_steps as u64;
    if step <= warmup {
        return cfg.lr * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

pub struct AdamW {
    /// (name, variable, whether weight decay applies).
    params: Vec<(String, Var, bool)>,
    first_moment: Vec<Tensor>,
    second_moment: Vec<Tensor>,
    /// Updates applied so far (for bias correction).
    pub steps: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Decay applies to weight matrices only: not to biases, LayerNorm, the CLS token
    /// or the position embedding.
    pub fn new(named_vars: Vec<(String, Var)>, cfg: &TrainConfig) -> Result<Self> {
        let mut params = Vec::new();
        let mut first_moment = Vec::new();
        let mut second_moment = Vec::new();
        for (name, var) in named_vars {
            let decay = name.ends_with(".weight") && !name.contains("norm") && var.rank() == 2;
            first_moment.push(var.zeros_like()?);
            second_moment.push(var.zeros_like()?);
            params.push((name, var, decay));
        }
        Ok(Self {
            params,
            first_moment,
            second_moment,
            steps: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        })
    }

    /// One update; `grads[i]` belongs to the i-th variable given to [`AdamW::new`]
    /// (`None` = no gradient, left unchanged).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let correction1 = 1.0 - self.beta1.powi(t);
        let correction2 = 1.0 - self.beta2.powi(t);
        for (i, (_, var, decay)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(i).and_then(Option::as_ref) else {
                continue;
            };
            let grad = grad.detach();
            let m = (self.first_moment[i].affine(self.beta1, 0.0)?
                + grad.affine(1.0 - self.beta1, 0.0)?)?;
            let v = (self.second_moment[i].affine(self.beta2, 0.0)?
                + grad.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
            let denom = v
                .affine(1.0 / correction2, 0.0)?
                .sqrt()?
                .affine(1.0, self.eps)?;
            let update = m.affine(1.0 / correction1, 0.0)?.div(&denom)?;
            let theta = var.as_tensor().detach();
            let theta = if *decay {
                theta.affine(1.0 - lr * self.weight_decay, 0.0)?
            } else {
                theta
            };
            var.set(&(theta - update.affine(lr, 0.0)?)?)?;
            self.first_moment[i] = m;
            self.second_moment[i] = v;
        }
        Ok(())
    }

    /// Moments by parameter name, for checkpoints: ("m.<name>", m), ("v.<name>", v).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _, _)) in self.params.iter().enumerate() {
            out.push((format!("m.{name}"), self.first_moment[i].clone()));
            out.push((format!("v.{name}"), self.second_moment[i].clone()));
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state_tensors`]; `get` looks one up by name.
    pub fn load_state(
        &mut self,
        steps: u64,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> std::result::Result<(), StateError> {
        for (i, (name, var, _)) in self.params.iter().enumerate() {
            for (prefix, slot) in [
                ("m", &mut self.first_moment[i]),
                ("v", &mut self.second_moment[i]),
            ] {
                let key = format!("{prefix}.{name}");
                let Some(t) = get(&key) else {
                    return Err(StateError::OptimizerMissing { key });
                };
                if t.dims() != var.dims() {
                    return Err(StateError::OptimizerShape {
                        key,
                        got: t.dims().to_vec(),
                        expected: var.dims().to_vec(),
                    });
                }
                *slot = t;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use candle_core::{DType, Device};

    #[test]
    fn schedule_warms_up_linearly_then_decays_by_cosine() {
        let mut cfg = Config::default().train;
        cfg.lr = 1e-3;
        cfg.min_lr = 1e-5;
        cfg.warmup_steps = 10;
        assert!((learning_rate(&cfg, 0, 110) - 1e-4).abs() < 1e-15);
        assert!((learning_rate(&cfg, 9, 110) - 1e-3).abs() < 1e-15);
        // Half way through the decay: the mean of lr and min_lr.
        assert!((learning_rate(&cfg, 59, 110) - (1e-3 + 1e-5) / 2.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 109, 110) - 1e-5).abs() < 1e-15);
        assert!((learning_rate(&cfg, 500, 110) - 1e-5).abs() < 1e-15);
    }

    #[test]
    fn adamw_first_steps_match_the_formula() {
        let mut cfg = Config::default().train;
        cfg.weight_decay = 0.1;
        let w = Var::from_tensor(&Tensor::new(&[[1.0f64, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f64], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![
                ("fc.weight".into(), w.clone()),
                ("fc.bias".into(), b.clone()),
            ],
            &cfg,
        )
        .unwrap();
        // loss = sum(w * [3, 4]) + 2b: constant gradients [3, 4] and 2.
        let coef = Tensor::new(&[[3.0f64, 4.0]], &Device::Cpu).unwrap();
        let lr = 0.01;
        let mut expected_w = [1.0f64, -2.0];
        let mut expected_b = 0.5f64;
        for _ in 0..2 {
            let loss = ((w.as_tensor() * &coef).unwrap().sum_all().unwrap()
                + b.as_tensor().affine(2.0, 0.0).unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&gradients_of(&[w.clone(), b.clone()], &grads), lr)
                .unwrap();
            // With a constant gradient g, m_hat = g and v_hat = g^2, so the step is g / (|g| + eps).
            for (wv, g) in expected_w.iter_mut().zip([3.0, 4.0]) {
                *wv = *wv * (1.0 - lr * 0.1) - lr * g / (g + cfg.adam_eps);
            }
            expected_b -= lr * 2.0 / (2.0 + cfg.adam_eps);
        }
        let got_w: Vec<f64> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let got_b: Vec<f64> = b.as_tensor().to_vec1().unwrap();
        for (g, e) in got_w.iter().zip(expected_w) {
            assert!((g - e).abs() < 1e-12, "{g} vs {e}");
        }
        assert!((got_b[0] - expected_b).abs() < 1e-12);
        assert_eq!(opt.steps, 2);
        assert_eq!(opt.state_tensors().len(), 4);
        assert_eq!(opt.state_tensors()[0].1.dtype(), DType::F64);
    }
}
