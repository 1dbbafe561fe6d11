//! The per-layer records a run writes to `metrics.jsonl` beside its training and
//! evaluation records (gradients, scale and what each layer knows) and their history
//! as the Layers tab, the compare view and the export read it. Plain data, here below
//! `crate::events` (which carries them) so that the analyses need not import it.

use serde::{Deserialize, Serialize};

/// Gradients and updates per parameter group, from one real training step
/// (`"kind":"grads"`, every `probe.grad_every_steps`): what the optimizer was given
/// and what it did with it. Groups are a layer's weight and bias together
/// (`crate::train::grad_stats` names them), in model order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradRecord {
    pub step: u64,
    pub epoch: u64,
    /// "patch_embed", "blocks.0.attn.qkv", …, "blocks.0.norm1", …, "norm", "head".
    pub groups: Vec<String>,
    /// ‖g‖₂ of the batch's mean-loss gradient, per group.
    pub grad_norm: Vec<f64>,
    /// ‖w‖₂ before the update, per group.
    pub weight_norm: Vec<f64>,
    /// ‖w_after − w_before‖₂ / ‖w_before‖₂: the optimizer's actual step, weight decay included.
    pub update_ratio: Vec<f64>,
}

/// Scale by depth at a probe (`"kind":"scale"`), over the probe images' tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleRecord {
    pub step: u64,
    pub epoch: u64,
    /// RMS of the residual stream after the embeddings, then after each block.
    pub residual_rms: Vec<f64>,
    /// RMS of each norm's output, in the probes' order (block 0 norm1, norm2, …, final).
    pub norm_rms: Vec<f64>,
}

/// What each layer knows, at an evaluation (`"kind":"knowledge"`): see
/// [`crate::inspect::knowledge`] for the images, pooling and λ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeRecord {
    pub step: u64,
    pub epoch: u64,
    /// Training images the probes were fitted on, test images they were scored on.
    pub train_images: usize,
    pub test_images: usize,
    /// Ridge penalty on standardised features.
    pub lambda: f64,
    /// Per layer (0 = the embeddings, then after each block): test accuracy of a ridge
    /// classifier fitted on that layer's pooled representation.
    pub probe_accuracy: Vec<f64>,
    /// Per layer: test accuracy of the model's own final norm and head applied there.
    pub lens_accuracy: Vec<f64>,
    /// Linear CKA between every pair of layers on the test images, row-major.
    pub cka: Vec<Vec<f64>>,
    /// What it cost, in seconds (features, fits and CKA).
    pub secs: f64,
}

/// A run's per-layer records as far as they have come, each kind in step order
/// (`crate::events` adds taking them from a run's metric records).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerHistory {
    pub grads: Vec<GradRecord>,
    pub scale: Vec<ScaleRecord>,
    pub knowledge: Vec<KnowledgeRecord>,
}

/// Appends `r`; a record at or before the last of its kind (a resumed run redoing
/// steps) replaces what came after it.
fn keep<T: Clone>(list: &mut Vec<T>, r: &T, step: impl Fn(&T) -> u64) {
    list.retain(|x| step(x) < step(r));
    list.push(r.clone());
}

fn at<T>(list: &[T], step: Option<u64>, step_of: impl Fn(&T) -> u64) -> Option<&T> {
    match step {
        Some(step) => list.iter().rev().find(|x| step_of(x) <= step),
        None => list.last(),
    }
}

impl LayerHistory {
    pub fn push_grads(&mut self, r: &GradRecord) {
        keep(&mut self.grads, r, |x| x.step);
    }

    pub fn push_scale(&mut self, r: &ScaleRecord) {
        keep(&mut self.scale, r, |x| x.step);
    }

    pub fn push_knowledge(&mut self, r: &KnowledgeRecord) {
        keep(&mut self.knowledge, r, |x| x.step);
    }

    /// The knowledge record at or before `step` (the latest without one).
    pub fn knowledge_at(&self, step: Option<u64>) -> Option<&KnowledgeRecord> {
        at(&self.knowledge, step, |k| k.step)
    }

    /// The gradient record at or before `step` (the latest without one).
    pub fn grads_at(&self, step: Option<u64>) -> Option<&GradRecord> {
        at(&self.grads, step, |g| g.step)
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty() && self.scale.is_empty() && self.knowledge.is_empty()
    }
}
