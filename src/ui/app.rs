//! How events and keys change the dashboard's state ([`super::state`]): one handler
//! for the trainer's (or a follower's) events, one for keys through the key table.
//! Drawing lives in `shell.rs` and the tabs, and only reads the state.

use crossterm::event::KeyEvent;

use super::keys::{action_for, Action, Scope};
use super::theme::Theme;
use crate::config::Config;
use crate::events::{Control, Event, Phase};

pub use super::state::*;

impl App {
    pub fn new(mode: Mode, theme: Theme, run_name: String, config: &Config) -> Self {
        let mut run = RunState::new(run_name, config);
        run.process.estimate_bytes = (mode == Mode::Live).then(|| {
            let threads = candle_core::utils::get_num_threads();
            crate::train::memory::estimate(
                config,
                crate::train::memory::Workload::Dashboard,
                threads,
            )
            .total() as u64
        });
        Self {
            mode,
            color_note: String::new(),
            export_request: None,
            notice: None,
            theme,
            tab: Tab::Training,
            popup: None,
            screen: (80, 24),
            run,
            training: TrainingView::new(&config.ui),
            layernorm: LayerNormView::default(),
            attention: AttentionView::default(),
            features: FeaturesView::default(),
            patches: PatchesView::default(),
            predictions: PredictionsView::default(),
            layers: LayersView::default(),
            stopping: false,
            quit_requested: false,
            engine_done: false,
        }
    }

    /// True when the event loop should end.
    pub fn should_quit(&self) -> bool {
        self.quit_requested && (self.engine_done || self.mode == Mode::View || !self.stopping)
    }

    /// Applies an engine event. Returns whether anything visible changed.
    pub fn on_event(&mut self, event: Event) -> bool {
        let visible = match &event {
            Event::Probe(_) => self.tab.shows_probes(),
            Event::Predictions(_) => self.tab == Tab::Predictions,
            Event::Layers(_) => self.tab == Tab::Layers,
            _ => true,
        };
        self.run.apply(event);
        visible
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
                return match self.run.phase {
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
            // The probe tabs share the probe image and the shown probe.
            Action::NextImage | Action::PrevImage if self.tab.shows_probes() => {
                self.run.step_image(action == Action::NextImage);
            }
            Action::ScrubBack if self.tab.shows_probes() => self.run.scrub(Scrub::Back),
            Action::ScrubForward if self.tab.shows_probes() => self.run.scrub(Scrub::Forward),
            Action::Latest if self.tab.shows_probes() => self.run.scrub(Scrub::Latest),
            _ => match self.tab {
                Tab::Training => self.training.on_action(action),
                Tab::LayerNorm => self.layernorm.on_action(action, &mut self.run),
                Tab::Attention => self.attention.on_action(action, &self.run),
                Tab::Features => self.features.on_action(action, &self.run),
                Tab::Patches => self.patches.on_action(action, &self.run),
                Tab::Predictions => self.predictions.on_action(action, &self.run, self.screen),
                Tab::Layers => self.layers.on_action(action, &self.run.layers),
            },
        }
        None
    }

    /// The pictures of what this tab shows, at the shown probe, image, layer and head,
    /// into `<run name>-export` in the current folder.
    pub fn export_for_view(&self) -> Option<ExportRequest> {
        use crate::export::What;
        let run_dir = self.run.info.as_ref()?.run_dir.clone();
        let step = self.run.shown_probe().map(|m| m.step);
        let (what, layer) = match self.tab {
            Tab::Training => (What::Curves, 0),
            Tab::LayerNorm => (What::LayerNormGif, self.layernorm.selected),
            Tab::Attention => (What::Attention, self.attention.layer),
            Tab::Features => (What::Features, self.features.layer),
            Tab::Patches => (What::Patches, 0),
            Tab::Predictions => (What::Predictions, 0),
            Tab::Layers if self.run.layers.is_empty() => return None,
            Tab::Layers => (What::Layers, 0),
        };
        if self.tab.shows_probes() && step.is_none() {
            return None;
        }
        Some(ExportRequest {
            run_dir,
            out: std::path::PathBuf::from(format!("{}-export", self.run.run_name)),
            what,
            choice: crate::export::Choice {
                step,
                image: self.run.probe_image,
                layer,
                head: self.attention.head,
            },
        })
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
        let steps: Vec<u64> = a.run.train.iter().map(|r| r.step).collect();
        assert_eq!(steps, [9, 10, 11]);
        assert_eq!(a.run.evals.len(), 1);
    }
}
