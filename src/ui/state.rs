//! The dashboard's state: which tab, popup and mode, each tab's view settings, and
//! the run as far as it has been received (records, probes, predictions, test
//! images), with the read-only questions the tabs ask of it (the shown probe, a test
//! image). Kept below the tabs, which only read it, and below `app.rs`, where events
//! and keys change it, so that drawing and handling never import each other.

use std::collections::VecDeque;
use std::sync::Arc;

pub use super::tab::Tab;
use super::theme::Theme;
use crate::data::LoadProgress;
use crate::events::{Alert, EvalRecord, LayerHistory, Phase, RunInfo, TrainRecord};
use crate::inspect::layers::Quantity;
use crate::inspect::predictions::Predictions;
use crate::inspect::probe::{ProbeMeta, ProbeSnapshot};

/// The tabs that exist. New tabs add a variant here and a view; the shell stays.
/// What the LayerNorm tab shows of the selected LayerNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LnSource {
    Output,
    Input,
    Gamma,
    Beta,
}

/// Pictures to render for the user, as `vitscope export` would.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub run_dir: std::path::PathBuf,
    pub out: std::path::PathBuf,
    pub what: crate::export::What,
    pub choice: crate::export::Choice,
}

/// The LayerNorm tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormView {
    /// Index of the LayerNorm (block 0 norm1, block 0 norm2, ..., final).
    pub selected: usize,
    pub source: LnSource,
}

/// The Attention tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionView {
    pub layer: usize,
    pub head: usize,
    /// The query token whose row is inspected (0 = CLS, or the first patch without one).
    pub query: usize,
    /// Show attention rollout instead of the selected head's raw weights.
    pub rollout: bool,
    /// How weights become shades, in the matrix, the thumbnails and the overlays.
    pub scale: crate::inspect::attention::Scale,
}

/// The Features tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FeaturesView {
    /// Hidden state after this many blocks (0 = the embeddings).
    pub layer: usize,
    /// First channel shown when the heat map is narrower than the model.
    pub channel_offset: usize,
}

/// The Layers tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LayersView {
    /// The map in front (at 80×24 the only one).
    pub quantity: Quantity,
    /// The record the table and the CKA matrix show, as a step; `None` follows the latest.
    pub cursor: Option<u64>,
}

impl LayersView {
    /// ↑/↓ pick the quantity, ←/→ move the cursor over its records, End follows the latest.
    pub fn on_action(&mut self, action: crate::ui::keys::Action, history: &LayerHistory) {
        use crate::ui::keys::Action;
        let steps = self.quantity.map(history).steps;
        let at = |cursor: Option<u64>| match cursor {
            Some(step) => steps.iter().rposition(|&s| s <= step).unwrap_or(0),
            None => steps.len().saturating_sub(1),
        };
        match action {
            Action::Up => self.quantity = self.quantity.previous(),
            Action::Down => self.quantity = self.quantity.next(),
            Action::Left if !steps.is_empty() => {
                self.cursor = Some(steps[at(self.cursor).saturating_sub(1)]);
            }
            Action::Right if !steps.is_empty() => {
                let i = at(self.cursor) + 1;
                self.cursor = (i + 1 < steps.len()).then(|| steps[i]);
            }
            Action::Latest => self.cursor = None,
            _ => {}
        }
    }
}

/// The Patches tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchesView {
    /// The selected patch, row-major (token = patch + 1).
    pub patch: usize,
}

/// Which test images the Predictions tab lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionFilter {
    All,
    Mistakes,
    /// Right, least confident first.
    UnsureRight,
    /// Right or wrong changed since the previous evaluation.
    Flipped,
}

impl PredictionFilter {
    pub fn label(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Mistakes => "mistakes",
            Self::UnsureRight => "right, least confident first",
            Self::Flipped => "flipped since the previous evaluation",
        }
    }
}

/// The Predictions tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionsView {
    /// Position of the selected image in the filtered list.
    pub selected: usize,
    pub filter: PredictionFilter,
    /// Only images of this true class.
    pub class: Option<usize>,
    /// The evaluation shown, as an index into `App::predictions`; `None` follows the latest.
    pub scrub: Option<usize>,
}

/// Whether the dashboard drives training in this process or watches a run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    View,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Popup {
    Help,
    Log,
    ConfirmQuit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Step,
    Time,
}

/// The Training tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingView {
    pub smoothing: f64,
    pub log_y: bool,
    pub x_axis: XAxis,
    /// Show only the last `recent_steps` steps.
    pub zoomed: bool,
    pub recent_steps: usize,
}

/// Process CPU and memory, refreshed by the event loop once a second.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessStats {
    pub cpu_percent: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    /// What [`crate::train::memory::estimate`] expected this process to need, in bytes.
    pub estimate_bytes: Option<u64>,
}

pub const LOG_LINES: usize = 500;
/// Full probes kept in memory for scrubbing attention (about 2 MB each by default).
pub const FULL_PROBES_KEPT: usize = crate::train::memory::DASHBOARD_PROBES;

#[derive(Debug, Clone)]
pub struct App {
    pub mode: Mode,
    pub theme: Theme,
    /// Why the theme has its colour mode (the help screen says it).
    pub color_note: String,
    /// An export the `e` key asked for, for the event loop to run off this thread.
    pub export_request: Option<ExportRequest>,
    /// A one-off message for the status line (where an export went), until the next key.
    pub notice: Option<String>,
    pub run_name: String,
    pub dataset: String,
    /// The position embedding the model has (`model.pos_embed`): the Patches tab says
    /// whether what it shows was learned or fixed.
    pub pos_embed: crate::config::PosEmbed,
    pub tab: Tab,
    pub phase: Phase,
    pub popup: Option<Popup>,
    pub loading: Option<LoadProgress>,
    pub info: Option<RunInfo>,
    pub train: Vec<TrainRecord>,
    pub evals: Vec<EvalRecord>,
    /// The small part of every probe (LayerNorm statistics), by step.
    pub probe_metas: Vec<ProbeMeta>,
    pub layernorm: LayerNormView,
    pub attention: AttentionView,
    pub features: FeaturesView,
    pub patches: PatchesView,
    pub predictions_view: PredictionsView,
    pub layers_view: LayersView,
    /// Gradient, scale and knowledge records by depth, as far as they have come.
    pub layers: LayerHistory,
    /// The latest alert (a spiking or non-finite gradient), for the status line.
    pub alert: Option<Alert>,
    /// The probe image the probe tabs show.
    pub probe_image: usize,
    /// Every evaluation's predictions on the first test images, by step.
    pub predictions: Vec<Arc<Predictions>>,
    /// Terminal size (columns, rows) at the last draw: the Predictions grid's shape
    /// depends on it.
    pub screen: (u16, u16),
    /// The probe the probe tabs show, as an index into `probe_metas`; `None` follows
    /// the latest.
    pub probe_scrub: Option<usize>,
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
    pub training: TrainingView,
    pub process: ProcessStats,
    /// A stop was sent; the app quits when the trainer has finished.
    pub stopping: bool,
    pub quit_requested: bool,
    /// The trainer (or follower) has ended: no more events will come.
    pub engine_done: bool,
}

impl App {
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
    /// The evaluation the Predictions tab shows and the one before it.
    pub fn shown_predictions(&self) -> (Option<&Arc<Predictions>>, Option<&Arc<Predictions>>) {
        let n = self.predictions.len();
        if n == 0 {
            return (None, None);
        }
        let i = self.predictions_view.scrub.unwrap_or(n - 1).min(n - 1);
        (
            self.predictions.get(i),
            i.checked_sub(1).and_then(|j| self.predictions.get(j)),
        )
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
