//! Checkpoints: one safetensors file holding the weights (`model.<name>`), the AdamW
//! moments (`optim.m.<name>`, `optim.v.<name>`), the weights' moving average if there
//! is one (`ema.<name>`) and, as JSON metadata, the step, seed
//! and timing state that make a resume continue exactly. Written atomically.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::ModelState;
use crate::run::{write_atomic, RunError};
use crate::train::ema::Ema;
use crate::train::optim::AdamW;

pub const FORMAT: &str = "vitscope-checkpoint-1";

/// Where training stands, besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed. Data order and augmentation are functions of
    /// (seed, epoch) and (seed, step), so this is all the data-order state there is.
    pub step: u64,
    pub seed: u64,
    /// Time spent so far (steps, evaluations, probes, checkpoints), pauses excluded,
    /// in seconds: the clock `train.budget` is held to.
    pub wall_secs: f64,
    pub best_accuracy: f64,
    /// 1-based epoch of the best evaluation (0 = none yet).
    pub best_epoch: u64,
}

fn bad(path: &Path, reason: impl Into<String>) -> RunError {
    RunError::Io {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub fn save(
    path: &Path,
    model: &ModelState,
    optimizer: &AdamW,
    ema: Option<&Ema>,
    state: &TrainState,
) -> Result<(), RunError> {
    let mut tensors: Vec<(String, Tensor)> = model
        .named_vars()
        .into_iter()
        .map(|(name, var)| (format!("model.{name}"), var.as_tensor().detach()))
        .collect();
    tensors.extend(
        optimizer
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (format!("optim.{k}"), t)),
    );
    tensors.extend(ema.map(Ema::tensors).unwrap_or_default());
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        (
            "state".to_string(),
            serde_json::to_string(state).expect("state serialises"),
        ),
        ("optimizer_steps".to_string(), optimizer.steps.to_string()),
    ]);
    let bytes = safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| bad(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}

/// The model tensors a checkpoint lacks and those it has beyond the model's, named in
/// one line (the first three of each), or None when the names are equal.
fn names_differ(expected: &BTreeSet<String>, stored: &BTreeSet<String>) -> Option<String> {
    let list = |names: Vec<&String>| {
        let shown: Vec<String> = names.iter().take(3).map(|n| format!("`{n}`")).collect();
        match names.len() {
            n if n > 3 => format!("{} and {} more", shown.join(", "), n - 3),
            _ => shown.join(", "),
        }
    };
    let missing: Vec<&String> = expected.difference(stored).collect();
    let extra: Vec<&String> = stored.difference(expected).collect();
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("it lacks {}", list(missing)));
    }
    if !extra.is_empty() {
        parts.push(format!("it holds {} that the model has not", list(extra)));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Loads a checkpoint into `model`, `optimizer` and `ema`, which must have the same shapes.
pub fn load(
    path: &Path,
    model: &ModelState,
    optimizer: &mut AdamW,
    ema: Option<&Ema>,
) -> Result<TrainState, RunError> {
    let bytes =
        std::fs::read(path).map_err(|e| bad(path, format!("cannot read checkpoint: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        bad(
            path,
            format!("not a checkpoint (damaged or not safetensors): {e}"),
        )
    })?;
    let info = header.metadata().clone().unwrap_or_default();
    if info.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(path, format!("not a {FORMAT} file")));
    }
    let state: TrainState = serde_json::from_str(info.get("state").map_or("", String::as_str))
        .map_err(|e| bad(path, format!("bad checkpoint state: {e}")))?;
    let optimizer_steps: u64 = info
        .get("optimizer_steps")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(path, "checkpoint lacks optimizer_steps"))?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| bad(path, format!("cannot read tensors: {e}")))?;
    let expected: BTreeSet<String> = model
        .named_vars()
        .into_iter()
        .map(|(name, _)| format!("model.{name}"))
        .collect();
    let stored: BTreeSet<String> = tensors
        .keys()
        .filter(|k| k.starts_with("model."))
        .cloned()
        .collect();
    if let Some(differ) = names_differ(&expected, &stored) {
        return Err(bad(
            path,
            format!("{differ}: the checkpoint is for another model config"),
        ));
    }
    for (name, var) in model.named_vars() {
        let key = format!("model.{name}");
        let t = tensors.remove(&key).ok_or_else(|| {
            bad(
                path,
                format!("`{key}` is missing: the checkpoint is for another model config"),
            )
        })?;
        if t.dims() != var.dims() {
            return Err(bad(
                path,
                format!(
                    "`{key}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(
            &t.to_dtype(var.dtype())
                .map_err(|e| bad(path, e.to_string()))?,
        )
        .map_err(|e| bad(path, e.to_string()))?;
    }
    optimizer
        .load_state(optimizer_steps, |k| tensors.remove(&format!("optim.{k}")))
        .map_err(|e| bad(path, e.to_string()))?;
    if let Some(ema) = ema {
        ema.load(|k| tensors.remove(k))
            .map_err(|e| bad(path, e.to_string()))?;
    }
    Ok(state)
}
