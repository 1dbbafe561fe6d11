//! An exponential moving average of the weights (`train.ema_decay`): after each
//! optimizer step, ema = d·ema + (1 − d)·θ, with d warmed up as min(decay, (1+t)/(10+t))
//! (timm's ModelEmaV3) so that early evaluations are not dominated by the initial
//! weights. When it is on, evaluations, probes and predictions use the averaged weights.

use candle_core::{DType, Result, Tensor};

use super::state_error::StateError;
use crate::config::ModelConfig;
use crate::model::ModelState;

pub struct Ema {
    pub decay: f64,
    /// The averaged weights, as a model of their own.
    pub state: ModelState,
}

impl Ema {
    /// Starts as a copy of `model`'s current weights.
    pub fn new(cfg: &ModelConfig, decay: f64, model: &ModelState) -> Result<Self> {
        let state = ModelState::new(cfg, 0, DType::F32)?;
        for ((_, ema), (_, var)) in state.named_vars().iter().zip(model.named_vars()) {
            ema.set(&var.as_tensor().detach().copy()?)?;
        }
        Ok(Self { decay, state })
    }

    /// The decay used after `step` optimizer steps (1-based).
    pub fn decay_at(&self, step: u64) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// Moves the average towards `model`'s weights after optimizer step `step`.
    pub fn update(&self, model: &ModelState, step: u64) -> Result<()> {
        let d = self.decay_at(step);
        for ((_, ema), (_, var)) in self.state.named_vars().iter().zip(model.named_vars()) {
            // In place, as candle's `ema·d + var·(1 − d)` would compute it.
            crate::ops::update::moving_average(ema.as_tensor(), var.as_tensor(), d)?;
        }
        Ok(())
    }

    /// The averaged weights by name, for checkpoints ("ema.<name>").
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.state
            .named_vars()
            .into_iter()
            .map(|(name, var)| (format!("ema.{name}"), var.as_tensor().detach()))
            .collect()
    }

    /// Restores what [`Ema::tensors`] saved; `get` looks one up by its key.
    pub fn load(
        &self,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> std::result::Result<(), StateError> {
        for (name, var) in self.state.named_vars() {
            let key = format!("ema.{name}");
            let Some(t) = get(&key) else {
                return Err(StateError::EmaMissing { key });
            };
            if t.dims() != var.dims() {
                return Err(StateError::EmaShape {
                    key,
                    got: t.dims().to_vec(),
                    expected: var.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn values(state: &ModelState) -> Vec<f32> {
        state
            .named_vars()
            .iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn the_average_follows_its_formula_and_round_trips() {
        let mut cfg = Config::default().model;
        (cfg.dim, cfg.heads, cfg.depth, cfg.mlp_dim, cfg.patch_size) = (8, 2, 1, 8, 16);
        let model = ModelState::new(&cfg, 1, DType::F32).unwrap();
        let ema = Ema::new(&cfg, 0.9, &model).unwrap();
        let start = values(&ema.state);
        assert_eq!(start, values(&model));
        // Move the model to other weights and average once at step 100 (d = 0.9).
        let other = ModelState::new(&cfg, 2, DType::F32).unwrap();
        for ((_, a), (_, b)) in model.named_vars().iter().zip(other.named_vars()) {
            a.set(b.as_tensor()).unwrap();
        }
        assert_eq!(ema.decay_at(100), 0.9);
        assert!((ema.decay_at(0) - 0.1).abs() < 1e-12, "warmed up from 1/10");
        ema.update(&model, 100).unwrap();
        let moved = values(&model);
        for ((e, s), m) in values(&ema.state).iter().zip(&start).zip(&moved) {
            assert!((e - (0.9 * s + 0.1 * m)).abs() < 1e-6);
        }
        // Saved and loaded into a fresh average, it is the same.
        let saved: std::collections::HashMap<String, Tensor> = ema.tensors().into_iter().collect();
        let fresh = Ema::new(&cfg, 0.9, &other).unwrap();
        fresh.load(|k| saved.get(k).cloned()).unwrap();
        assert_eq!(values(&fresh.state), values(&ema.state));
        let err = fresh.load(|_| None).unwrap_err().to_string();
        assert!(err.contains("ema."), "{err}");
    }
}
