//! The run as far as the dashboard has received it (records, probes, predictions, test
//! images, messages) and the probe selection the probe tabs share: the one read-only
//! type every tab draws from ([`Ctx`]), changed only by [`RunState::apply`] and the
//! probe keys. Below the tabs and the shell, so neither reaches into the other.

use std::collections::VecDeque;
use std::sync::Arc;

use super::theme::Theme;
use crate::data::LoadProgress;
use crate::events::{
    split_records, Alert, EvalRecord, Event, LayerHistory, Phase, RunInfo, TrainRecord,
};
use crate::inspect::predictions::Predictions;
use crate::inspect::probe::{ProbeMeta, ProbeSnapshot};

pub const LOG_LINES: usize = 500;
/// Full probes kept in memory for scrubbing attention (about 2 MB each by default).
pub const FULL_PROBES_KEPT: usize = crate::train::memory::DASHBOARD_PROBES;

/// Process CPU and memory, refreshed by the event loop once a second.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessStats {
    pub cpu_percent: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    /// What [`crate::train::memory::estimate`] expected this process to need, in bytes.
    pub estimate_bytes: Option<u64>,
}

/// Where the probe keys move the shown probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scrub {
    Back,
    Forward,
    Latest,
}

/// What a tab draws from: the run (read-only), the colours, the terminal's size at the
/// last draw (the Predictions grid's shape depends on it) and the tab's own view.
pub struct Ctx<'a, V> {
    pub run: &'a RunState,
    pub theme: &'a Theme,
    pub screen: (u16, u16),
    pub view: &'a V,
}

// By hand: a derive would ask V to be Copy, where only a reference to it is held.
impl<V> Clone for Ctx<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for Ctx<'_, V> {}

#[derive(Debug, Clone)]
pub struct RunState {
    pub run_name: String,
    pub dataset: String,
    /// The position embedding the model has (`model.pos_embed`): the Patches tab says
    /// whether what it shows was learned or fixed.
    pub pos_embed: crate::config::PosEmbed,
    /// What a token is made of (`model.patch_tokens`): the Patches tab shows the shifted
    /// copies when there are some.
    pub patch_tokens: crate::config::PatchTokens,
    pub phase: Phase,
    pub loading: Option<LoadProgress>,
    pub info: Option<RunInfo>,
    pub train: Vec<TrainRecord>,
    pub evals: Vec<EvalRecord>,
    /// The small part of every probe (LayerNorm statistics), by step.
    pub probe_metas: Vec<ProbeMeta>,
    /// Gradient, scale and knowledge records by depth, as far as they have come.
    pub layers: LayerHistory,
    /// The latest alert (a spiking or non-finite gradient), for the status line.
    pub alert: Option<Alert>,
    /// Every evaluation's predictions on the first test images, by step.
    pub predictions: Vec<Arc<Predictions>>,
    /// The most recent probes in full, for the tabs that draw attention and hidden
    /// states (older ones keep only their statistics, to bound memory).
    pub full_probes: VecDeque<Arc<ProbeSnapshot>>,
    /// The first test images (raw bytes) and their labels; the probe images come first.
    pub test_pixels: Vec<u8>,
    pub test_labels: Vec<u8>,
    pub last_checkpoint: Option<u64>,
    pub log: VecDeque<String>,
    pub failure: Option<String>,
    pub finished: Option<String>,
    pub process: ProcessStats,
    /// The probe image the probe tabs show.
    pub probe_image: usize,
    /// The probe the probe tabs show, as an index into `probe_metas`; `None` follows
    /// the latest.
    pub probe_scrub: Option<usize>,
}

impl RunState {
    pub fn new(run_name: String, config: &crate::config::Config) -> Self {
        Self {
            run_name,
            dataset: config.data.dataset.name().to_string(),
            pos_embed: config.model.pos_embed,
            patch_tokens: config.model.patch_tokens,
            phase: Phase::Loading,
            loading: None,
            info: None,
            train: Vec::new(),
            evals: Vec::new(),
            probe_metas: Vec::new(),
            layers: LayerHistory::default(),
            alert: None,
            predictions: Vec::new(),
            full_probes: VecDeque::new(),
            test_pixels: Vec::new(),
            test_labels: Vec::new(),
            last_checkpoint: None,
            log: VecDeque::new(),
            failure: None,
            finished: None,
            process: ProcessStats::default(),
            probe_image: 0,
            probe_scrub: None,
        }
    }

    pub fn push_log(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    /// Takes in an engine event.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Phase(phase) => self.phase = phase,
            Event::Loading(progress) => {
                if let LoadProgress::Message(m) = &progress {
                    self.push_log(m.clone());
                }
                self.loading = Some(progress);
            }
            Event::Started(info) => {
                self.test_pixels.clone_from(&info.test_pixels);
                self.test_labels.clone_from(&info.test_labels);
                self.info = Some(info);
                self.loading = None;
            }
            Event::History(records) => {
                for record in records.iter() {
                    self.layers.push(record);
                }
                let (train, evals) = split_records(records.iter().cloned());
                self.train.extend(train);
                self.evals.extend(evals);
            }
            Event::Train(record) => {
                // A follower may replay a run: keep the history ordered by step.
                if self.train.last().is_some_and(|r| r.step >= record.step) {
                    self.train.retain(|r| r.step < record.step);
                }
                self.train.push(record);
            }
            Event::Eval(record) => {
                self.evals.retain(|e| e.step != record.step);
                self.evals.push(record);
            }
            Event::Probe(snapshot) => {
                let step = snapshot.meta.step;
                // A resumed run probes again from its checkpoint: later ones are stale.
                self.probe_metas.retain(|m| m.step < step);
                self.probe_metas.push(snapshot.meta.clone());
                self.full_probes.retain(|p| p.meta.step < step);
                if self.full_probes.len() == FULL_PROBES_KEPT {
                    self.full_probes.pop_front();
                }
                self.full_probes.push_back(snapshot);
            }
            Event::Predictions(predictions) => {
                let step = predictions.meta.step;
                self.predictions.retain(|p| p.meta.step < step);
                self.predictions.push(predictions);
            }
            Event::Layers(record) => self.layers.push(&record),
            Event::Alert(alert) => {
                let halted = if alert.fatal { "halted: " } else { "" };
                self.push_log(format!("alert: {halted}{}", alert.message));
                self.alert = Some(alert);
            }
            Event::Checkpoint { step, .. } => self.last_checkpoint = Some(step),
            Event::Log(line) => self.push_log(line),
            Event::Sized(sizing) => {
                if let Some(info) = self.info.as_mut() {
                    info.final_step = sizing.final_step;
                    info.epochs = sizing.epochs;
                }
            }
            Event::Finished { step, reason } => {
                self.finished = Some(format!("finished at step {step}: {reason}"));
                self.phase = Phase::Finished;
            }
            Event::Failed(message) => {
                self.push_log(format!("error: {message}"));
                self.failure = Some(message);
                self.phase = Phase::Failed;
            }
        }
    }

    /// Moves the shown probe back, forward, or to the latest (which it then follows).
    pub fn scrub(&mut self, to: Scrub) {
        let n = self.probe_metas.len();
        self.probe_scrub = match to {
            Scrub::Back if n > 0 => Some(self.probe_scrub.unwrap_or(n - 1).saturating_sub(1)),
            Scrub::Back => self.probe_scrub,
            Scrub::Forward => match self.probe_scrub {
                Some(i) if i + 2 < n => Some(i + 1),
                _ => None,
            },
            Scrub::Latest => None,
        };
    }

    /// Shows the next (or previous) probe image, wrapping around.
    pub fn step_image(&mut self, forward: bool) {
        let images = self.full_probes.back().map_or(1, |p| p.meta.images.max(1));
        self.probe_image = if forward {
            (self.probe_image + 1) % images
        } else {
            (self.probe_image + images - 1) % images
        };
    }

    /// The probe the probe tabs show: the scrubbed one, or the latest.
    pub fn shown_probe(&self) -> Option<&ProbeMeta> {
        match self.probe_scrub {
            Some(i) => self
                .probe_metas
                .get(i.min(self.probe_metas.len().saturating_sub(1))),
            None => self.probe_metas.last(),
        }
    }
    /// (index of the shown probe, number of probes).
    pub fn probe_position(&self) -> Option<(usize, usize)> {
        let n = self.probe_metas.len();
        (n > 0).then(|| (self.probe_scrub.unwrap_or(n - 1).min(n - 1), n))
    }
    /// The shown probe in full, if it is still in memory.
    pub fn shown_full_probe(&self) -> Option<&Arc<ProbeSnapshot>> {
        let step = self.shown_probe()?.step;
        self.full_probes.iter().find(|p| p.meta.step == step)
    }
    /// The latest probe in full: what the probe tabs' keys bound their moves by.
    pub fn latest_full_probe(&self) -> Option<&Arc<ProbeSnapshot>> {
        self.full_probes.back()
    }
    /// The recorded probes up to the shown one, for "over training" views.
    pub fn probe_history_until_shown(&self) -> Vec<&ProbeMeta> {
        let end = self.probe_position().map_or(0, |(i, _)| i + 1);
        self.probe_metas[..end].iter().collect()
    }
    /// The raw bytes (3 x 32 x 32) of test image `i`, if the run recorded it.
    pub fn test_image(&self, i: usize) -> Option<&[u8]> {
        self.test_pixels
            .get(i * crate::data::IMAGE_BYTES..(i + 1) * crate::data::IMAGE_BYTES)
    }
    /// Class names of the data set (empty before the run starts).
    pub fn class_names(&self) -> &[String] {
        self.info.as_ref().map_or(&[], |i| &i.class_names)
    }
    /// Best evaluation so far.
    pub fn best_eval(&self) -> Option<&EvalRecord> {
        self.evals
            .iter()
            .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
    }
}
