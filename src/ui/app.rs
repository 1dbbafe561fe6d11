//! How events and keys change the dashboard's state ([`super::state`]): one handler
//! for the trainer's (or a follower's) events, one for keys through the key table.
//! Drawing lives in `shell.rs` and the tabs, and only reads the state.

use std::collections::VecDeque;

use crossterm::event::KeyEvent;

use super::keys::{action_for, Action, Scope};
use super::tabs::{features, predictions};
use super::theme::Theme;
use crate::config::Config;
use crate::data::LoadProgress;

use crate::events::{split_records, Control, Event, Phase};

pub use super::state::*;

impl App {
    pub fn new(mode: Mode, theme: Theme, run_name: String, config: &Config) -> Self {
        Self {
            mode,
            color_note: String::new(),
            export_request: None,
            notice: None,
            theme,
            run_name,
            dataset: config.data.dataset.name().to_string(),
            pos_embed: config.model.pos_embed,
            tab: Tab::Training,
            phase: Phase::Loading,
            popup: None,
            loading: None,
            info: None,
            train: Vec::new(),
            evals: Vec::new(),
            probe_metas: Vec::new(),
            layernorm: LayerNormView {
                selected: 0,
                source: LnSource::Output,
            },
            attention: AttentionView {
                layer: 0,
                head: 0,
                query: 0,
                rollout: false,
                scale: crate::inspect::attention::Scale::default(),
            },
            features: FeaturesView {
                layer: 0,
                channel_offset: 0,
            },
            patches: PatchesView { patch: 0 },
            predictions_view: PredictionsView {
                selected: 0,
                filter: PredictionFilter::All,
                class: None,
                scrub: None,
            },
            layers_view: LayersView {
                quantity: crate::inspect::layers::Quantity::GradNorm,
                cursor: None,
            },
            layers: crate::events::LayerHistory::default(),
            alert: None,
            probe_image: 0,
            predictions: Vec::new(),
            screen: (80, 24),
            probe_scrub: None,
            full_probes: VecDeque::new(),
            test_pixels: Vec::new(),
            test_labels: Vec::new(),
            last_checkpoint: None,
            log: VecDeque::new(),
            failure: None,
            finished: None,
            training: TrainingView {
                smoothing: config.ui.smoothing,
                log_y: false,
                x_axis: XAxis::Step,
                zoomed: false,
                recent_steps: config.ui.recent_steps,
            },
            process: ProcessStats {
                estimate_bytes: (mode == Mode::Live).then(|| {
                    let threads = candle_core::utils::get_num_threads();
                    crate::train::memory::estimate(
                        config,
                        crate::train::memory::Workload::Dashboard,
                        threads,
                    )
                    .total() as u64
                }),
                ..ProcessStats::default()
            },
            stopping: false,
            quit_requested: false,
            engine_done: false,
        }
    }

    /// True when the event loop should end.
    pub fn should_quit(&self) -> bool {
        self.quit_requested && (self.engine_done || self.mode == Mode::View || !self.stopping)
    }

    pub fn push_log(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    /// Applies an engine event. Returns whether anything visible changed.
    pub fn on_event(&mut self, event: Event) -> bool {
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
                return self.tab.shows_probes();
            }
            Event::Predictions(predictions) => {
                let step = predictions.meta.step;
                self.predictions.retain(|p| p.meta.step < step);
                self.predictions.push(predictions);
                return self.tab == Tab::Predictions;
            }
            Event::Layers(record) => {
                self.layers.push(&record);
                return self.tab == Tab::Layers;
            }
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
        true
    }

    /// Scopes active now, most specific first.
    pub fn scopes(&self) -> Vec<Scope> {
        let mut scopes = Vec::new();
        if self.popup.is_some() {
            scopes.push(Scope::Popup);
        }
        scopes.push(Scope::Global);
        if self.mode == Mode::Live && !self.engine_done {
            scopes.push(Scope::Live);
        }
        scopes.push(Scope::Tab(self.tab));
        scopes
    }

    /// Applies a key. Returns a control message for the trainer, if any.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Control> {
        let action = action_for(key, &self.scopes())?;
        self.notice = None;
        let training_runs = self.mode == Mode::Live && !self.engine_done;
        match action {
            Action::Interrupt => {
                self.quit_requested = true;
                if training_runs && !self.stopping {
                    self.stopping = true;
                    return Some(Control::Stop);
                }
            }
            Action::Quit => {
                if training_runs {
                    self.popup = Some(Popup::ConfirmQuit);
                } else {
                    self.quit_requested = true;
                }
            }
            Action::Confirm => {
                if self.popup == Some(Popup::ConfirmQuit) {
                    self.popup = None;
                    self.quit_requested = true;
                    if training_runs && !self.stopping {
                        self.stopping = true;
                        return Some(Control::Stop);
                    }
                } else {
                    self.popup = None;
                }
            }
            Action::Close => self.popup = None,
            Action::Help => self.popup = Some(Popup::Help),
            Action::ShowLog => self.popup = Some(Popup::Log),
            Action::NextTab | Action::PrevTab | Action::GoToTab(_) => {
                let n = Tab::ALL.len();
                let i = Tab::ALL.iter().position(|t| *t == self.tab).unwrap_or(0);
                let next = match action {
                    Action::NextTab => (i + 1) % n,
                    Action::PrevTab => (i + n - 1) % n,
                    Action::GoToTab(k) if k < n => k,
                    _ => i,
                };
                self.tab = Tab::ALL[next];
            }
            Action::TogglePause => {
                return match self.phase {
                    Phase::Paused => Some(Control::Resume),
                    Phase::Training | Phase::Evaluating => Some(Control::Pause),
                    _ => None,
                };
            }
            Action::SaveNow => return Some(Control::SaveNow),
            Action::Export => {
                self.export_request = self.export_for_view();
                if self.export_request.is_none() {
                    self.notice = Some("nothing to export yet".into());
                }
            }
            Action::NextImage | Action::PrevImage if self.tab.shows_probes() => {
                let images = self.full_probes.back().map_or(1, |p| p.meta.images.max(1));
                self.probe_image = if action == Action::NextImage {
                    (self.probe_image + 1) % images
                } else {
                    (self.probe_image + images - 1) % images
                };
            }
            Action::ScrubBack | Action::ScrubForward | Action::Latest
                if self.tab.shows_probes() =>
            {
                self.scrub(action);
            }
            _ if self.tab == Tab::LayerNorm => self.on_layernorm_action(action),
            _ if self.tab == Tab::Attention => self.on_attention_action(action),
            _ if self.tab == Tab::Features => self.on_features_action(action),
            _ if self.tab == Tab::Patches => self.on_patches_action(action),
            _ if self.tab == Tab::Predictions => self.on_predictions_action(action),
            _ if self.tab == Tab::Layers => self.layers_view.on_action(action, &self.layers),
            Action::Latest
            | Action::ToggleSource
            | Action::ScrubBack
            | Action::ScrubForward
            | Action::NextImage
            | Action::PrevImage
            | Action::QueryUp
            | Action::QueryDown
            | Action::ToggleRollout
            | Action::CycleScale
            | Action::ToggleRun
            | Action::OpenRun
            | Action::ToggleCompare
            | Action::CycleSort
            | Action::ReverseSort
            | Action::Filter
            | Action::ScrollBack
            | Action::ScrollForward
            | Action::PageUp
            | Action::PageDown
            | Action::CycleFilter
            | Action::CycleClass => {}
            Action::ToggleLogScale => self.training.log_y = !self.training.log_y,
            Action::ToggleXAxis => {
                self.training.x_axis = match self.training.x_axis {
                    XAxis::Step => XAxis::Time,
                    XAxis::Time => XAxis::Step,
                }
            }
            Action::ToggleZoom => self.training.zoomed = !self.training.zoomed,
            Action::Left => {
                self.training.zoomed = true;
                self.training.recent_steps = (self.training.recent_steps / 2).max(10);
            }
            Action::Right => {
                self.training.zoomed = true;
                self.training.recent_steps = (self.training.recent_steps * 2).min(1 << 24);
            }
            Action::Up | Action::SmoothMore => {
                self.training.smoothing = (self.training.smoothing + 0.05).min(0.99);
            }
            Action::Down | Action::SmoothLess => {
                self.training.smoothing = (self.training.smoothing - 0.05).max(0.0);
            }
        }
        None
    }

    /// The pictures of what this tab shows, at the shown probe, image, layer and head,
    /// into `<run name>-export` in the current folder.
    pub fn export_for_view(&self) -> Option<ExportRequest> {
        use crate::export::What;
        let run_dir = self.info.as_ref()?.run_dir.clone();
        let step = self.shown_probe().map(|m| m.step);
        let (what, layer) = match self.tab {
            Tab::Training => (What::Curves, 0),
            Tab::LayerNorm => (What::LayerNormGif, self.layernorm.selected),
            Tab::Attention => (What::Attention, self.attention.layer),
            Tab::Features => (What::Features, self.features.layer),
            Tab::Patches => (What::Patches, 0),
            Tab::Predictions => (What::Predictions, 0),
            Tab::Layers if self.layers.is_empty() => return None,
            Tab::Layers => (What::Layers, 0),
        };
        if self.tab.shows_probes() && step.is_none() {
            return None;
        }
        Some(ExportRequest {
            run_dir,
            out: std::path::PathBuf::from(format!("{}-export", self.run_name)),
            what,
            choice: crate::export::Choice {
                step,
                image: self.probe_image,
                layer,
                head: self.attention.head,
            },
        })
    }

    fn scrub(&mut self, action: Action) {
        let n = self.probe_metas.len();
        self.probe_scrub = match action {
            Action::ScrubBack | Action::Left if n > 0 => {
                Some(self.probe_scrub.unwrap_or(n - 1).saturating_sub(1))
            }
            Action::ScrubForward | Action::Right => match self.probe_scrub {
                Some(i) if i + 2 < n => Some(i + 1),
                _ => None,
            },
            Action::Latest => None,
            _ => self.probe_scrub,
        };
    }

    fn on_attention_action(&mut self, action: Action) {
        let (depth, heads, tokens) = self
            .full_probes
            .back()
            .map_or((1, 1, 1), |p| (p.meta.depth, p.meta.heads, p.meta.tokens));
        let view = &mut self.attention;
        match action {
            Action::Up => view.layer = view.layer.saturating_sub(1),
            Action::Down => view.layer = (view.layer + 1).min(depth.saturating_sub(1)),
            Action::Left => view.head = view.head.saturating_sub(1),
            Action::Right => view.head = (view.head + 1).min(heads.saturating_sub(1)),
            Action::QueryUp => view.query = view.query.saturating_sub(1),
            Action::QueryDown => view.query = (view.query + 1).min(tokens.saturating_sub(1)),
            Action::ToggleRollout => view.rollout = !view.rollout,
            Action::CycleScale => view.scale = view.scale.next(),
            _ => {}
        }
    }

    fn on_features_action(&mut self, action: Action) {
        let (depth, dim) = self
            .full_probes
            .back()
            .map_or((0, 1), |p| (p.meta.depth, p.meta.dim));
        let view = &mut self.features;
        let page = features::CHANNEL_PAGE;
        match action {
            Action::Up => view.layer = view.layer.saturating_sub(1),
            Action::Down => view.layer = (view.layer + 1).min(depth),
            Action::ScrollBack => view.channel_offset = view.channel_offset.saturating_sub(page),
            Action::ScrollForward => {
                view.channel_offset = (view.channel_offset + page).min(dim.saturating_sub(1));
            }
            _ => {}
        }
    }

    fn on_patches_action(&mut self, action: Action) {
        let grid = self.full_probes.back().map_or(1, |p| p.meta.grid());
        let (row, col) = (self.patches.patch / grid, self.patches.patch % grid);
        let (row, col) = match action {
            Action::Up => (row.saturating_sub(1), col),
            Action::Down => ((row + 1).min(grid - 1), col),
            Action::Left => (row, col.saturating_sub(1)),
            Action::Right => (row, (col + 1).min(grid - 1)),
            _ => (row, col),
        };
        self.patches.patch = (row.min(grid - 1)) * grid + col.min(grid - 1);
    }

    fn on_predictions_action(&mut self, action: Action) {
        let count = predictions::listed(self).len();
        let (per_row, rows) = predictions::grid_shape(self.screen);
        let per_page = per_row * rows;
        let view = &mut self.predictions_view;
        let last = count.saturating_sub(1);
        match action {
            Action::Left => view.selected = view.selected.saturating_sub(1),
            Action::Right => view.selected = (view.selected + 1).min(last),
            Action::Up => view.selected = view.selected.saturating_sub(per_row),
            Action::Down => view.selected = (view.selected + per_row).min(last),
            Action::PageUp => view.selected = view.selected.saturating_sub(per_page),
            Action::PageDown => view.selected = (view.selected + per_page).min(last),
            Action::CycleFilter => {
                view.filter = match view.filter {
                    PredictionFilter::All => PredictionFilter::Mistakes,
                    PredictionFilter::Mistakes => PredictionFilter::UnsureRight,
                    PredictionFilter::UnsureRight => PredictionFilter::Flipped,
                    PredictionFilter::Flipped => PredictionFilter::All,
                };
                view.selected = 0;
            }
            Action::CycleClass => {
                let classes = self.info.as_ref().map_or(0, |i| i.class_names.len());
                view.class = match view.class {
                    None if classes > 0 => Some(0),
                    Some(k) if k + 1 < classes => Some(k + 1),
                    _ => None,
                };
                view.selected = 0;
            }
            Action::ScrubBack => {
                let n = self.predictions.len();
                if n > 0 {
                    view.scrub = Some(view.scrub.unwrap_or(n - 1).saturating_sub(1));
                }
            }
            Action::ScrubForward => {
                view.scrub = match view.scrub {
                    Some(i) if i + 2 < self.predictions.len() => Some(i + 1),
                    _ => None,
                };
            }
            Action::Latest => view.scrub = None,
            _ => {}
        }
    }

    fn on_layernorm_action(&mut self, action: Action) {
        let count = self.probe_metas.last().map_or(0, |m| m.layer_norms.len());
        let view = &mut self.layernorm;
        match action {
            Action::Up => view.selected = view.selected.saturating_sub(1),
            Action::Down => view.selected = (view.selected + 1).min(count.saturating_sub(1)),
            Action::Left | Action::Right => self.scrub(action),
            Action::ToggleSource => {
                view.source = match view.source {
                    LnSource::Output => LnSource::Input,
                    LnSource::Input => LnSource::Gamma,
                    LnSource::Gamma => LnSource::Beta,
                    LnSource::Beta => LnSource::Output,
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::MetricRecord;
    use crate::ui::theme::ColorMode;
    use crossterm::event::{KeyCode, KeyModifiers};
    use std::sync::Arc;

    fn app(mode: Mode) -> App {
        App::new(
            mode,
            Theme::new(ColorMode::NoColor, crate::config::Markers::Braille),
            "run".into(),
            &Config::default(),
        )
    }

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    #[test]
    fn quitting_while_training_asks_then_stops_and_waits_for_the_trainer() {
        let mut a = app(Mode::Live);
        a.on_event(Event::Phase(Phase::Training));
        assert_eq!(a.on_key(key(KeyCode::Char('q'))), None);
        assert_eq!(a.popup, Some(Popup::ConfirmQuit));
        assert_eq!(a.on_key(key(KeyCode::Esc)), None);
        assert!(!a.should_quit());
        a.on_key(key(KeyCode::Char('q')));
        assert_eq!(a.on_key(key(KeyCode::Char('y'))), Some(Control::Stop));
        assert!(a.stopping && !a.should_quit());
        a.on_event(Event::Finished {
            step: 5,
            reason: "stopped on request".into(),
        });
        a.engine_done = true;
        assert!(a.should_quit());
    }

    #[test]
    fn ctrl_c_stops_without_asking_and_view_mode_quits_at_once() {
        let mut a = app(Mode::Live);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(a.on_key(ctrl_c), Some(Control::Stop));
        assert_eq!(a.on_key(ctrl_c), None);
        let mut v = app(Mode::View);
        assert_eq!(v.on_key(key(KeyCode::Char(' '))), None);
        v.on_key(key(KeyCode::Char('q')));
        assert!(v.should_quit());
    }

    #[test]
    fn space_pauses_and_resumes_by_phase() {
        let mut a = app(Mode::Live);
        a.on_event(Event::Phase(Phase::Training));
        assert_eq!(a.on_key(key(KeyCode::Char(' '))), Some(Control::Pause));
        a.on_event(Event::Phase(Phase::Paused));
        assert_eq!(a.on_key(key(KeyCode::Char(' '))), Some(Control::Resume));
        assert_eq!(a.on_key(key(KeyCode::Char('s'))), Some(Control::SaveNow));
    }

    #[test]
    fn view_settings_change_with_their_keys() {
        let mut a = app(Mode::Live);
        a.on_key(key(KeyCode::Char('y')));
        a.on_key(key(KeyCode::Char('x')));
        a.on_key(key(KeyCode::Char('z')));
        assert!(a.training.log_y && a.training.zoomed);
        assert_eq!(a.training.x_axis, XAxis::Time);
        a.on_key(key(KeyCode::Char('h')));
        assert_eq!(a.training.recent_steps, 100);
        let before = a.training.smoothing;
        a.on_key(key(KeyCode::Up));
        assert!(a.training.smoothing > before);
        a.on_key(key(KeyCode::Tab));
        assert_eq!(a.tab, Tab::LayerNorm);
        a.on_key(key(KeyCode::Char('1')));
        assert_eq!(a.tab, Tab::Training);
    }

    #[test]
    fn a_resumed_run_shows_its_history_then_what_follows() {
        let mut a = app(Mode::Live);
        let train = crate::events::test_train;
        let eval = crate::run::milestones::test_eval(1, 0.4, 5.0);
        a.on_event(Event::History(Arc::new(vec![
            MetricRecord::Train(train(9)),
            MetricRecord::Train(train(10)),
            MetricRecord::Eval(eval),
        ])));
        a.on_event(Event::Train(train(11)));
        let steps: Vec<u64> = a.train.iter().map(|r| r.step).collect();
        assert_eq!(steps, [9, 10, 11]);
        assert_eq!(a.evals.len(), 1);
    }
}
