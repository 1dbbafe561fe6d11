//! The `[train]` section: the schema of the optimizer, schedule, budget and loop
//! settings, their ranges, and the re-plans a budgeted run records.

use serde::{Deserialize, Serialize};

use super::choice::Optimizer;
use super::error::{check, non_negative, positive, ConfigError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub max_steps: usize,
    pub budget: String,
    pub schedule_steps: usize,
    /// Written by a budgeted run whose pace drifted far from its plan (see [`Replan`]).
    #[serde(default)]
    pub replans: Vec<Replan>,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub optimizer: Optimizer,
    pub muon_lr: f64,
    pub muon_momentum: f64,
    pub label_smoothing: f64,
    pub ema_decay: f64,
    pub drop_path: f64,
    pub seed: u64,
    pub checkpoint_every_steps: usize,
    pub eval_batch_size: usize,
    pub eval_flip: bool,
    pub threads: usize,
}

/// A budgeted run's re-plan: after step `at` the rest of the learning-rate schedule
/// is compressed or stretched to end at `final_step`, and the run ends there (at once
/// when equal).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Replan {
    pub at: usize,
    pub final_step: usize,
}

impl TrainConfig {
    /// The `[train]` keys' ranges.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let t = self;
        check(t.epochs > 0, "train.epochs", t.epochs, "must be at least 1")?;
        let mut after = 0;
        for r in &t.replans {
            check(
                r.at >= after && r.at <= r.final_step,
                "train.replans",
                format!("{{ at = {}, final_step = {} }}", r.at, r.final_step),
                "each re-plan must come after the one before it and not end before its own step",
            )?;
            after = r.at + 1;
        }
        check(
            t.batch_size > 0,
            "train.batch_size",
            t.batch_size,
            "must be at least 1",
        )?;
        if let Err(reason) = t.budget_secs() {
            return Err(ConfigError::Invalid {
                key: "train.budget".into(),
                value: format!("{:?}", t.budget),
                reason,
            });
        }
        positive("train.lr", t.lr)?;
        non_negative("train.min_lr", t.min_lr)?;
        check(
            t.min_lr <= t.lr,
            "train.min_lr",
            t.min_lr,
            "must not exceed train.lr",
        )?;
        non_negative("train.weight_decay", t.weight_decay)?;
        for (key, beta) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            check((0.0..1.0).contains(&beta), key, beta, "must be in [0, 1)")?;
        }
        positive("train.adam_eps", t.adam_eps)?;
        positive("train.muon_lr", t.muon_lr)?;
        check(
            (0.0..1.0).contains(&t.muon_momentum),
            "train.muon_momentum",
            t.muon_momentum,
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&t.label_smoothing),
            "train.label_smoothing",
            t.label_smoothing,
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&t.ema_decay),
            "train.ema_decay",
            t.ema_decay,
            "must be in [0, 1) (0 = off)",
        )?;
        check(
            (0.0..1.0).contains(&t.drop_path),
            "train.drop_path",
            t.drop_path,
            "must be in [0, 1) (0 = off)",
        )?;
        check(
            t.eval_batch_size > 0,
            "train.eval_batch_size",
            t.eval_batch_size,
            "must be at least 1",
        )?;
        Ok(())
    }

    /// The time budget in seconds (None when `budget` is empty).
    pub fn budget_secs(&self) -> Result<Option<f64>, String> {
        let text = self.budget.trim();
        if text.is_empty() {
            return Ok(None);
        }
        match humantime::parse_duration(text) {
            Ok(d) if d.as_secs_f64() >= 1.0 && d.as_secs() <= 366 * 86_400 => {
                Ok(Some(d.as_secs_f64()))
            }
            Ok(_) => Err("must be between 1s and a year".into()),
            Err(e) => Err(format!("expected a duration such as 60m or 1h30m ({e})")),
        }
    }

    /// The optimizer step the run ends at: all epochs, or `max_steps` if that is sooner.
    pub fn final_step(&self, steps_per_epoch: u64) -> u64 {
        let all = (self.epochs as u64).saturating_mul(steps_per_epoch);
        match self.max_steps {
            0 => all,
            m => all.min(m as u64),
        }
    }

    /// Where a budgeted run's own plan ends: its latest re-plan's end, else the sizing's
    /// (`schedule_steps`).
    pub fn planned_end(&self) -> usize {
        self.replans
            .last()
            .map_or(self.schedule_steps, |r| r.final_step)
    }

    /// The learning-rate schedule's horizon: `schedule_steps` when set (a budgeted run
    /// fixes it), else all epochs.
    pub fn schedule_steps(&self, steps_per_epoch: u64) -> u64 {
        match self.schedule_steps {
            0 => (self.epochs as u64).saturating_mul(steps_per_epoch),
            s => s as u64,
        }
    }
}

/// `train.replans`, the one list among the keys, checked before deserialising so that
/// its error names it.
pub(super) fn check_replans(table: &toml::Table) -> Result<(), ConfigError> {
    let Some(list) = table.get("train").and_then(|t| t.get("replans")) else {
        return Ok(());
    };
    let step = |t: &toml::Table, k: &str| {
        t.get(k)
            .and_then(toml::Value::as_integer)
            .is_some_and(|i| i >= 0)
    };
    let entry = |e: &toml::Value| {
        e.as_table()
            .is_some_and(|t| t.len() == 2 && step(t, "at") && step(t, "final_step"))
    };
    match list.as_array() {
        Some(entries) if entries.iter().all(entry) => Ok(()),
        _ => Err(ConfigError::Invalid {
            key: "train.replans".into(),
            value: list.to_string(),
            reason:
                "expected a list of { at = STEP, final_step = STEP }, as a budgeted run writes it"
                    .into(),
        }),
    }
}
