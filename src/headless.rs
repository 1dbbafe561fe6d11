//! Plain-text progress for runs without a dashboard: a line every few seconds and a
//! summary per evaluation. Never writes escape codes; a download progress bar redraws
//! in place with a carriage return only when the output is a terminal.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::data::LoadProgress;
use crate::events::{EvalRecord, Event, MetricRecord, RunInfo, TrainRecord};
use crate::run::milestones::{self, clock};

pub struct HeadlessPrinter<W: Write> {
    out: W,
    every: Duration,
    is_terminal: bool,
    info: Option<RunInfo>,
    last_print: Option<Instant>,
    /// Images and seconds since the last printed line, for a steady images/s.
    window_images: f64,
    window_secs: f64,
    last_download_decile: Option<u64>,
    progress_line_open: bool,
    /// The run's evaluations (a resumed run's earlier ones too), for the time-to-accuracy lines.
    evals: Vec<EvalRecord>,
}

impl<W: Write> HeadlessPrinter<W> {
    pub fn new(out: W, every: Duration, is_terminal: bool) -> Self {
        Self {
            out,
            every,
            is_terminal,
            info: None,
            last_print: None,
            window_images: 0.0,
            window_secs: 0.0,
            last_download_decile: None,
            progress_line_open: false,
            evals: Vec::new(),
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    fn line(&mut self, text: &str) {
        if self.progress_line_open {
            let _ = writeln!(self.out);
            self.progress_line_open = false;
        }
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    fn train_line(&mut self, r: &TrainRecord) -> String {
        let rate = if self.window_secs > 0.0 {
            self.window_images / self.window_secs
        } else {
            r.images_per_sec
        };
        let (final_step, epochs, batch_rate) = self.info.as_ref().map_or((0, 0, 0.0), |i| {
            (
                i.final_step,
                i.epochs,
                i.train_images as f64 / i.steps_per_epoch.max(1) as f64,
            )
        });
        // Steps left at the current pace (images/s over the last interval).
        let secs_per_step = if rate > 0.0 {
            batch_rate.max(1.0) / rate
        } else {
            f64::NAN
        };
        let eta = final_step.saturating_sub(r.step) as f64 * secs_per_step;
        format!(
            "step {:>6}/{final_step}  epoch {}/{epochs}  loss {:.4}  acc {:5.1}%  lr {:.2e}  {:.0} img/s  ETA {}",
            r.step,
            r.epoch,
            r.loss,
            r.accuracy * 100.0,
            r.lr,
            rate,
            clock(eta)
        )
    }

    fn download(&mut self, done: u64, total: u64) {
        let mb = |b: u64| b as f64 / 1e6;
        let pct = (done * 100).checked_div(total).unwrap_or(0);
        let text = format!(
            "downloading CIFAR-10: {pct:3}%  {:.1}/{:.1} MB",
            mb(done),
            mb(total)
        );
        if self.is_terminal {
            let filled = (pct / 5) as usize;
            let _ = write!(
                self.out,
                "\r[{}{}] {text}",
                "#".repeat(filled),
                ".".repeat(20 - filled.min(20))
            );
            let _ = self.out.flush();
            self.progress_line_open = true;
        } else {
            let decile = pct / 10;
            if self.last_download_decile != Some(decile) {
                self.last_download_decile = Some(decile);
                self.line(&text);
            }
        }
    }

    pub fn handle(&mut self, event: &Event) {
        match event {
            Event::Loading(LoadProgress::Downloading { done, total }) => {
                self.download(*done, *total)
            }
            Event::Loading(LoadProgress::Unpacking) => self.line("unpacking CIFAR-10 ..."),
            Event::Loading(LoadProgress::Reading { file }) => self.line(&format!("reading {file}")),
            Event::Loading(LoadProgress::Message(m)) | Event::Log(m) => self.line(m),
            Event::Started(info) => {
                let epochs = format!(
                    "{} steps of {} images",
                    info.steps_per_epoch,
                    info.train_images / info.steps_per_epoch.max(1) as usize
                );
                let length = match info.budget_secs {
                    Some(b) => format!("a {} budget of epochs of {epochs}", clock(b)),
                    None => format!("{} epochs x {epochs}", info.epochs),
                };
                self.line(&format!(
                    "{}: {length}, {} parameters, {}",
                    info.dataset, info.parameters, info.device
                ));
                self.info = Some(info.clone());
            }
            Event::Train(r) => {
                self.window_images += r.images_per_sec * r.step_ms / 1e3;
                self.window_secs += r.step_ms / 1e3;
                let due = self.last_print.is_none_or(|t| t.elapsed() >= self.every)
                    || self.info.as_ref().is_some_and(|i| r.step == i.final_step);
                if due {
                    let text = self.train_line(r);
                    self.line(&text);
                    self.last_print = Some(Instant::now());
                    self.window_images = 0.0;
                    self.window_secs = 0.0;
                }
            }
            Event::Eval(e) => {
                let weights = match self.info.as_ref() {
                    Some(i) if i.weights != "raw weights" => format!("  ({})", i.weights),
                    _ => String::new(),
                };
                self.line(&format!(
                    "eval  epoch {} (step {}): loss {:.4}  accuracy {:.2}%  best {:.2}% (epoch {})  {:.0} img/s  at {}{weights}",
                    e.epoch,
                    e.step,
                    e.loss,
                    e.accuracy * 100.0,
                    e.best_accuracy * 100.0,
                    e.best_epoch,
                    e.images_per_sec,
                    clock(e.wall_secs)
                ));
                let before = milestones::reached(&self.evals).len();
                self.evals.push(e.clone());
                let levels: Vec<String> = milestones::reached(&self.evals)
                    .into_iter()
                    .skip(before)
                    .filter(|m| m.level >= 30)
                    .map(|m| format!("{}%", m.level))
                    .collect();
                if !levels.is_empty() {
                    self.line(&format!(
                        "reached {} test accuracy at {} (epoch {}, step {})",
                        levels.join(", "),
                        clock(e.wall_secs),
                        e.epoch,
                        e.step
                    ));
                }
            }
            Event::History(records) => {
                self.evals.extend(records.iter().filter_map(|r| match r {
                    MetricRecord::Eval(e) => Some(e.clone()),
                    _ => None,
                }));
                if let Some(best) = milestones::best(&self.evals) {
                    let text = format!(
                        "before the checkpoint: {} evaluation{}, best {:.2}% (epoch {}); time to accuracy: {}",
                        self.evals.len(),
                        if self.evals.len() == 1 { "" } else { "s" },
                        best.accuracy * 100.0,
                        best.epoch,
                        milestones::summary(&self.evals)
                    );
                    self.line(&text);
                }
            }
            Event::Sized(s) => {
                if let Some(info) = self.info.as_mut() {
                    info.final_step = s.final_step;
                    info.epochs = s.epochs;
                }
            }
            Event::Checkpoint { step, path } => {
                self.line(&format!("checkpoint at step {step}: {}", path.display()));
            }
            Event::Finished { step, reason } => {
                let dir = self
                    .info
                    .as_ref()
                    .map(|i| i.run_dir.display().to_string())
                    .unwrap_or_default();
                self.line(&format!(
                    "finished at step {step} ({reason}); run directory: {dir}"
                ));
                if let Some(best) = milestones::best(&self.evals) {
                    self.line(&format!(
                        "best test accuracy {:.2}% at {} (epoch {}, step {}); time to accuracy: {}",
                        best.accuracy * 100.0,
                        clock(best.wall_secs),
                        best.epoch,
                        best.step,
                        milestones::summary(&self.evals)
                    ));
                }
            }
            Event::Alert(a) => self.line(&format!("alert: {}", a.message)),
            Event::Layers(MetricRecord::Knowledge(k)) => {
                let percent = |v: &[f64]| {
                    v.iter()
                        .map(|a| format!("{:.0}", a * 100.0))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                self.line(&format!(
                    "layers (embeddings, then blocks 0..): linear probe {} %  logit lens {} %  ({:.1} s)",
                    percent(&k.probe_accuracy),
                    percent(&k.lens_accuracy),
                    k.secs
                ));
            }
            Event::Layers(_) => {}
            // Errors go to stderr, from the caller that joins the trainer.
            Event::Failed(_) => {}
            Event::Phase(_) | Event::Probe(_) | Event::Predictions(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> TrainRecord {
        TrainRecord {
            step,
            epoch: 1,
            loss: 2.3125,
            accuracy: 0.125,
            lr: 5e-4,
            images_per_sec: 256.0,
            step_ms: 500.0,
            wall_secs: 1.0,
        }
    }

    fn info() -> RunInfo {
        RunInfo {
            run_dir: "runs/x".into(),
            dataset: "synthetic".into(),
            data_source: "s".into(),
            class_names: vec![],
            train_images: 1280,
            test_images: 100,
            steps_per_epoch: 10,
            epochs: 2,
            final_step: 20,
            budget_secs: None,
            start_step: 0,
            start_wall_secs: 0.0,
            parameters: 1234,
            device: "cpu".into(),
            weights: "raw weights".into(),
            test_pixels: vec![],
            test_labels: vec![],
        }
    }

    #[test]
    fn prints_throttled_plain_lines_with_eta() {
        let mut p = HeadlessPrinter::new(Vec::new(), Duration::from_secs(3600), false);
        p.handle(&Event::Started(info()));
        for step in 1..=5 {
            p.handle(&Event::Train(record(step)));
        }
        p.handle(&Event::Train(record(20)));
        let text = String::from_utf8(p.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        // 128 images per step at 256 img/s: 0.5 s per step, 19 steps left.
        assert_eq!(
            lines[1],
            "step      1/20  epoch 1/2  loss 2.3125  acc  12.5%  lr 5.00e-4  256 img/s  ETA 10s"
        );
        assert!(lines[2].starts_with("step     20/20"));
        assert!(!text.contains('\u{1b}'));
    }

    #[test]
    fn download_progress_is_lines_when_not_a_terminal() {
        let mut p = HeadlessPrinter::new(Vec::new(), Duration::from_secs(1), false);
        for done in (0..=100).map(|i| i * 1_000_000) {
            p.handle(&Event::Loading(LoadProgress::Downloading {
                done,
                total: 100_000_000,
            }));
        }
        let text = String::from_utf8(p.into_inner()).unwrap();
        assert_eq!(text.lines().count(), 11);
        assert!(!text.contains('\r') && !text.contains('\u{1b}'));
        let mut p = HeadlessPrinter::new(Vec::new(), Duration::from_secs(1), true);
        p.handle(&Event::Loading(LoadProgress::Downloading {
            done: 50,
            total: 100,
        }));
        p.handle(&Event::Log("done".into()));
        let text = String::from_utf8(p.into_inner()).unwrap();
        assert_eq!(
            text,
            "\r[##########..........] downloading CIFAR-10:  50%  0.0/0.0 MB\ndone\n"
        );
    }

    #[test]
    fn evaluations_print_levels_reached_and_the_end_gives_the_best() {
        let mut p = HeadlessPrinter::new(Vec::new(), Duration::from_secs(3600), false);
        p.handle(&Event::Started(info()));
        for (epoch, accuracy, secs) in [(1, 0.25, 100.0), (2, 0.41, 200.0), (3, 0.38, 300.0)] {
            p.handle(&Event::Eval(crate::run::milestones::test_eval(
                epoch, accuracy, secs,
            )));
        }
        p.handle(&Event::Finished {
            step: 30,
            reason: "done".into(),
        });
        let text = String::from_utf8(p.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[3], "reached 30%, 40% test accuracy at 3m20s (epoch 2, step 20)",
            "{text}"
        );
        assert_eq!(
            lines.last().copied(),
            Some("best test accuracy 41.00% at 3m20s (epoch 2, step 20); time to accuracy: 30% 3m20s · 40% 3m20s")
        );
    }

    #[test]
    fn a_resumed_run_counts_the_evaluations_before_its_checkpoint() {
        let mut p = HeadlessPrinter::new(Vec::new(), Duration::from_secs(3600), false);
        p.handle(&Event::Started(info()));
        let earlier = [(1, 0.35, 100.0), (2, 0.52, 200.0)]
            .map(|(e, a, s)| MetricRecord::Eval(crate::run::milestones::test_eval(e, a, s)));
        p.handle(&Event::History(std::sync::Arc::new(earlier.to_vec())));
        p.handle(&Event::Eval(crate::run::milestones::test_eval(
            3, 0.48, 300.0,
        )));
        p.handle(&Event::Finished {
            step: 30,
            reason: "done".into(),
        });
        let text = String::from_utf8(p.into_inner()).unwrap();
        assert!(
            text.contains("before the checkpoint: 2 evaluations, best 52.00% (epoch 2)"),
            "{text}"
        );
        // 48% after the resume is no new level: 30% and 40% were reached before it.
        assert!(!text.contains("reached"), "{text}");
        assert!(
            text.ends_with("best test accuracy 52.00% at 3m20s (epoch 2, step 20); time to accuracy: 30% 1m40s · 40% 3m20s · 50% 3m20s\n"),
            "{text}"
        );
    }
}
