//! The plain data that flows from the trainer to whoever watches it (the headless
//! printer, the run directory, a dashboard), and the controls that flow back.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::data::LoadProgress;
pub use crate::inspect::layer_records::{GradRecord, KnowledgeRecord, LayerHistory, ScaleRecord};
use crate::inspect::predictions::Predictions;
use crate::inspect::probe::ProbeSnapshot;

/// One training step, as written to `metrics.jsonl` (`"kind":"train"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Optimizer steps completed, counting from 1.
    pub step: u64,
    /// Epoch in progress, counting from 1.
    pub epoch: u64,
    /// Mean loss of the batch (cross-entropy with label smoothing).
    pub loss: f64,
    /// Share of the batch predicted right, in [0, 1].
    pub accuracy: f64,
    /// Learning rate used for this step.
    pub lr: f64,
    pub images_per_sec: f64,
    /// Wall time of the step, data wait included, in milliseconds.
    pub step_ms: f64,
    /// Training time so far across resumes, pauses excluded, in seconds.
    pub wall_secs: f64,
}

/// A training record for tests: step `step` of epoch 1, its wall time `step` seconds.
#[cfg(test)]
pub(crate) fn test_train(step: u64) -> TrainRecord {
    TrainRecord {
        step,
        epoch: 1,
        loss: 2.0,
        accuracy: 0.1,
        lr: 1e-3,
        images_per_sec: 100.0,
        step_ms: 10.0,
        wall_secs: step as f64,
    }
}

/// An evaluation on the whole test split (`"kind":"eval"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    pub images_per_sec: f64,
    pub wall_secs: f64,
    /// Best test accuracy of the run so far (this evaluation included) and its epoch.
    pub best_accuracy: f64,
    pub best_epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricRecord {
    Train(TrainRecord),
    Eval(EvalRecord),
    Grads(GradRecord),
    Scale(ScaleRecord),
    Knowledge(KnowledgeRecord),
}

/// Records in file order, split into the training and the evaluation records (the
/// per-layer records are left out: [`LayerHistory::from_records`] takes those).
pub fn split_records(
    records: impl IntoIterator<Item = MetricRecord>,
) -> (Vec<TrainRecord>, Vec<EvalRecord>) {
    let (mut train, mut evals) = (Vec::new(), Vec::new());
    for record in records {
        match record {
            MetricRecord::Train(r) => train.push(r),
            MetricRecord::Eval(r) => evals.push(r),
            _ => {}
        }
    }
    (train, evals)
}

impl LayerHistory {
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a MetricRecord>) -> Self {
        let mut history = Self::default();
        for record in records {
            history.push(record);
        }
        history
    }

    /// Keeps a per-layer record; the others are not its business.
    pub fn push(&mut self, record: &MetricRecord) {
        match record {
            MetricRecord::Grads(r) => self.push_grads(r),
            MetricRecord::Scale(r) => self.push_scale(r),
            MetricRecord::Knowledge(r) => self.push_knowledge(r),
            MetricRecord::Train(_) | MetricRecord::Eval(_) => {}
        }
    }
}

impl MetricRecord {
    pub fn step(&self) -> u64 {
        match self {
            Self::Train(r) => r.step,
            Self::Eval(r) => r.step,
            Self::Grads(r) => r.step,
            Self::Scale(r) => r.step,
            Self::Knowledge(r) => r.step,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Training,
    Paused,
    Evaluating,
    Finished,
    Failed,
    /// Seen from `vitscope view`: the run has written nothing for a while and did not
    /// say it ended (killed, or its machine is gone).
    Stalled,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Self::Loading => "loading",
            Self::Training => "training",
            Self::Paused => "paused",
            Self::Evaluating => "evaluating",
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Stalled => "no new data for a minute",
        }
    }
}

/// What the run is, once the data is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub run_dir: PathBuf,
    pub dataset: String,
    pub data_source: String,
    pub class_names: Vec<String>,
    pub train_images: usize,
    pub test_images: usize,
    pub steps_per_epoch: u64,
    pub epochs: u64,
    /// The step the run stops at (epochs x steps per epoch, or train.max_steps);
    /// a budgeted run moves it once it has measured its speed ([`Event::Sized`]).
    pub final_step: u64,
    /// `train.budget` in seconds, if the run has one.
    pub budget_secs: Option<f64>,
    /// Steps already done when this process started (non-zero after a resume).
    pub start_step: u64,
    /// Training time already spent before this process started, in seconds.
    pub start_wall_secs: f64,
    pub parameters: usize,
    pub device: String,
    /// The weights evaluations, probes and predictions use ("raw weights", "EMA weights (0.999)").
    pub weights: String,
    /// The first test images, raw (images x 3 x 32 x 32 bytes), and their labels: the
    /// probe images are the first of them; the Predictions tab pages through them all.
    pub test_pixels: Vec<u8>,
    pub test_labels: Vec<u8>,
}

#[derive(Debug, Clone)]
pub enum Event {
    Phase(Phase),
    Loading(LoadProgress),
    Started(RunInfo),
    /// A resumed run's records from before its checkpoint, once after [`Event::Started`]:
    /// the curves, evaluations and time to accuracy cover the whole run, not this process.
    History(Arc<Vec<MetricRecord>>),
    Train(TrainRecord),
    Eval(EvalRecord),
    Probe(Arc<ProbeSnapshot>),
    /// A per-layer record ([`MetricRecord::Grads`], `Scale` or `Knowledge`), as written.
    Layers(MetricRecord),
    /// Something in training went wrong as it happened (a non-finite or spiking
    /// gradient); the run's log has the same line.
    Alert(Alert),
    /// An evaluation's predictions on the first test images (after its [`Event::Eval`]).
    Predictions(Arc<Predictions>),
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    Log(String),
    /// A budgeted run measured its speed and fixed its length.
    Sized(Sizing),
    /// The run ended normally; `reason` says why (all epochs done, max steps, stopped).
    Finished {
        step: u64,
        reason: String,
    },
    /// The run ended with an error.
    Failed(String),
}

/// How run.log marks an alert's line ("<time> alert: …"), and a fatal one after it.
pub const ALERT_PREFIX: &str = "alert: ";
pub const HALTED: &str = "halted: ";

/// What an alert is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub step: u64,
    /// A non-finite loss or gradient: the step was not applied and training halts.
    pub fatal: bool,
    pub message: String,
}

/// Control messages the trainer checks between batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    SaveNow,
    Stop,
}

/// Receives the trainer's events, in order, on the trainer's thread.
pub trait Sink: Send {
    fn send(&mut self, event: Event);
}

/// Sends events over a channel; a consumer that went away is ignored.
impl Sink for std::sync::mpsc::SyncSender<Event> {
    fn send(&mut self, event: Event) {
        let _ = std::sync::mpsc::SyncSender::send(self, event);
    }
}

impl Sink for tokio::sync::mpsc::Sender<Event> {
    fn send(&mut self, event: Event) {
        let _ = self.blocking_send(event);
    }
}

/// Collects events in memory (tests, benchmarks).
impl Sink for Vec<Event> {
    fn send(&mut self, event: Event) {
        self.push(event);
    }
}

/// What a budgeted run's measurement decided ([`crate::train::budget::size`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizing {
    /// The run ends after this many optimizer steps (also the schedule's horizon).
    pub final_step: u64,
    /// Epochs begun by then (the last one may be partial).
    pub epochs: u64,
    pub secs_per_step: f64,
    /// One evaluation of the whole test set.
    pub eval_secs: f64,
    /// Training and evaluations as planned, from the run's first step.
    pub planned_secs: f64,
}

/// Which weights evaluations, probes and predictions show, and what differs from
/// plain AdamW and plain evaluation (Muon, flip test-time augmentation), in words:
/// the status line shows it whenever it is not just "raw weights".
pub fn weights_label(train: &crate::config::TrainConfig) -> String {
    let mut label = if train.ema_decay > 0.0 {
        format!("EMA weights ({})", train.ema_decay)
    } else {
        "raw weights".into()
    };
    if train.optimizer == crate::config::Optimizer::Muon {
        label.push_str(", Muon on the blocks' matrices");
    }
    if train.eval_flip {
        label.push_str(", evaluated with flip");
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weights_label_names_what_differs_from_plain_training() {
        let mut t = crate::config::Config::default().train;
        (t.optimizer, t.eval_flip, t.ema_decay) = (crate::config::Optimizer::AdamW, false, 0.0);
        assert_eq!(weights_label(&t), "raw weights");
        t.ema_decay = 0.999;
        t.optimizer = crate::config::Optimizer::Muon;
        t.eval_flip = true;
        assert_eq!(
            weights_label(&t),
            "EMA weights (0.999), Muon on the blocks' matrices, evaluated with flip"
        );
    }
}
