//! The dashboard's state: which tab, popup and mode; the run as far as it has been
//! received ([`RunState`], which the tabs read through a [`Ctx`]); and each tab's
//! view settings, whose types live with their tabs. Above the tabs and below
//! `app.rs` (where events and keys change it) and `shell.rs` (which draws it).

pub use super::run_state::{Ctx, ProcessStats, RunState, Scrub, LOG_LINES};
pub use super::tab::Tab;
pub use super::tabs::attention::AttentionView;
pub use super::tabs::features::FeaturesView;
pub use super::tabs::layernorm::{LayerNormView, LnSource};
pub use super::tabs::layers::LayersView;
pub use super::tabs::patches::PatchesView;
pub use super::tabs::predictions::{PredictionFilter, PredictionsView};
pub use super::tabs::training::{TrainingView, XAxis};
use super::theme::Theme;

/// Pictures to render for the user, as `vitscope export` would.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub run_dir: std::path::PathBuf,
    pub out: std::path::PathBuf,
    pub what: crate::export::What,
    pub choice: crate::export::Choice,
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
    pub tab: Tab,
    pub popup: Option<Popup>,
    /// Terminal size (columns, rows) at the last draw: the Predictions grid's shape
    /// depends on it.
    pub screen: (u16, u16),
    /// The run as far as it has come, and the probe selection the probe tabs share.
    pub run: RunState,
    /// Each tab's own view settings.
    pub training: TrainingView,
    pub layernorm: LayerNormView,
    pub attention: AttentionView,
    pub features: FeaturesView,
    pub patches: PatchesView,
    pub predictions: PredictionsView,
    pub layers: LayersView,
    /// A stop was sent; the app quits when the trainer has finished.
    pub stopping: bool,
    pub quit_requested: bool,
    /// The trainer (or follower) has ended: no more events will come.
    pub engine_done: bool,
}

impl App {
    /// What tab `view` draws from.
    pub fn ctx<'a, V>(&'a self, view: &'a V) -> Ctx<'a, V> {
        Ctx {
            run: &self.run,
            theme: &self.theme,
            screen: self.screen,
            view,
        }
    }
}
