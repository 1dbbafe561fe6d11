//! Reads a run directory as events, for `vitscope view`: replays what is there and
//! follows what a running `vitscope train` appends. Never writes into the directory.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use super::dir::{RunDir, RunError, LOG_FILE, METRICS_FILE};
use crate::config::{Config, DatasetKind};
use crate::data::batch::BatchPlan;
use crate::data::{synthetic, CIFAR10_CLASSES};
use crate::events::{Event, MetricRecord, Phase, RunInfo, ALERT_PREFIX, HALTED};

/// How a run directory is read incrementally.
pub struct Follower {
    run: RunDir,
    metrics_offset: u64,
    log_offset: u64,
    probes_sent: Vec<u64>,
    predictions_sent: Vec<u64>,
    ended: bool,
    stalled: bool,
}

/// A run that wrote nothing for this long, without saying it ended, is shown as stalled.
pub const STALL_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The run's shape, from its config (the data set's sizes are known per kind).
pub fn run_info(run: &RunDir, config: &Config, start_step: u64) -> RunInfo {
    let (train_images, test_images, class_names, source) = match config.data.dataset {
        DatasetKind::Cifar10 => (
            50_000,
            10_000,
            CIFAR10_CLASSES.iter().map(|s| (*s).to_string()).collect(),
            "CIFAR-10".to_string(),
        ),
        DatasetKind::Synthetic => (
            config.data.synthetic_train_size,
            config.data.synthetic_test_size,
            synthetic::CLASS_NAMES
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
            format!("synthetic shapes, seed {}", config.train.seed),
        ),
    };
    let plan = BatchPlan::from_config(config, train_images);
    let steps_per_epoch = plan.steps_per_epoch().max(1);
    let epochs = config.train.epochs as u64;
    let final_step = config.train.final_step(steps_per_epoch);
    RunInfo {
        run_dir: run.path().to_path_buf(),
        dataset: config.data.dataset.name().to_string(),
        data_source: source,
        class_names,
        train_images,
        test_images,
        steps_per_epoch,
        epochs,
        final_step,
        budget_secs: config.train.budget_secs().ok().flatten(),
        weights: crate::events::weights_label(&config.train),
        start_step,
        start_wall_secs: 0.0,
        parameters: 0,
        device: "recorded run".to_string(),
        test_pixels: Vec::new(),
        test_labels: Vec::new(),
    }
}

/// Reads complete lines appended to `path` since `offset`; advances `offset` past them.
pub(crate) fn read_new_lines(path: &PathBuf, offset: &mut u64) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *offset {
        // Rewritten (a resume truncated it): read it again from the start.
        *offset = 0;
    }
    if file.seek(SeekFrom::Start(*offset)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    // Only whole lines: a line being written now is read next time.
    let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
        return Vec::new();
    };
    *offset += end as u64 + 1;
    String::from_utf8_lossy(&bytes[..end])
        .lines()
        .map(String::from)
        .collect()
}

impl Follower {
    pub fn new(run: RunDir) -> Self {
        Self {
            run,
            metrics_offset: 0,
            log_offset: 0,
            probes_sent: Vec::new(),
            predictions_sent: Vec::new(),
            ended: false,
            stalled: false,
        }
    }

    /// The first events: the run's shape.
    pub fn start(&mut self) -> Result<Vec<Event>, RunError> {
        let config = self.run.read_config()?;
        let mut info = run_info(&self.run, &config, 0);
        if let Some((pixels, labels)) = self.run.read_test_images() {
            info.test_pixels = pixels;
            info.test_labels = labels;
        }
        Ok(vec![Event::Started(info), Event::Phase(Phase::Training)])
    }

    /// Events for whatever was appended since the last poll.
    pub fn poll(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let lines = read_new_lines(&self.run.file(METRICS_FILE), &mut self.metrics_offset);
        let quiet_for = std::fs::metadata(self.run.file(METRICS_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if !lines.is_empty() && self.stalled {
            self.stalled = false;
            events.push(Event::Phase(Phase::Training));
        }
        for line in lines {
            match serde_json::from_str::<MetricRecord>(&line) {
                Ok(MetricRecord::Train(r)) => events.push(Event::Train(r)),
                Ok(MetricRecord::Eval(e)) => events.push(Event::Eval(e)),
                Ok(layers) => events.push(Event::Layers(layers)),
                Err(_) => {}
            }
        }
        for line in read_new_lines(&self.run.file(LOG_FILE), &mut self.log_offset) {
            // Lines are "<timestamp> <message>".
            let message = line
                .split_once(' ')
                .map_or(line.as_str(), |(_, m)| m)
                .to_string();
            if let Some(rest) = message.strip_prefix("finished at step ") {
                let (step, reason) = rest.split_once(": ").unwrap_or((rest, ""));
                events.push(Event::Finished {
                    step: step.parse().unwrap_or(0),
                    reason: reason.to_string(),
                });
                self.ended = true;
            } else if let Some(error) = message.strip_prefix("error: ") {
                self.stalled = false;
                events.push(Event::Failed(error.to_string()));
                self.ended = true;
            } else if let Some(alert) = message.strip_prefix(ALERT_PREFIX) {
                let (fatal, text) = match alert.strip_prefix(HALTED) {
                    Some(text) => (true, text),
                    None => (false, alert),
                };
                events.push(Event::Alert(crate::events::Alert {
                    step: 0,
                    fatal,
                    message: text.to_string(),
                }));
            } else if message.starts_with("resumed from") {
                self.ended = false;
                self.stalled = false;
                events.push(Event::Phase(Phase::Training));
            }
            events.push(Event::Log(message));
        }
        if !self.ended && !self.stalled && quiet_for > STALL_AFTER {
            self.stalled = true;
            events.push(Event::Phase(Phase::Stalled));
        }
        for (step, _) in self.run.probe_files() {
            if !self.probes_sent.contains(&step) {
                if let Ok(snapshot) = self.run.read_probe(step) {
                    events.push(Event::Probe(std::sync::Arc::new(snapshot)));
                    self.probes_sent.push(step);
                }
            }
        }
        for (step, _) in self.run.prediction_files() {
            if !self.predictions_sent.contains(&step) {
                if let Ok(predictions) = self.run.read_predictions(step) {
                    events.push(Event::Predictions(std::sync::Arc::new(predictions)));
                    self.predictions_sent.push(step);
                }
            }
        }
        events
    }
}

/// Follows `run` on a thread of its own, polling every `interval`, until the receiver
/// goes away.
pub fn spawn(
    run: RunDir,
    tx: tokio::sync::mpsc::Sender<Event>,
    interval: Duration,
) -> Result<(), RunError> {
    let mut follower = Follower::new(run);
    let first = follower.start()?;
    std::thread::Builder::new()
        .name("vitscope-follow".into())
        .spawn(move || {
            for event in first {
                if tx.blocking_send(event).is_err() {
                    return;
                }
            }
            loop {
                for event in follower.poll() {
                    if tx.blocking_send(event).is_err() {
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
                std::thread::sleep(interval);
            }
        })
        .expect("spawn the follower thread");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn has_phase(events: &[Event], phase: Phase) -> bool {
        events
            .iter()
            .any(|e| matches!(e, Event::Phase(p) if *p == phase))
    }

    #[test]
    fn a_quiet_run_that_never_ended_is_stalled_and_a_finished_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path(), None, &crate::config::Config::default()).unwrap();
        let line = r#"{"kind":"train","step":1,"epoch":1,"loss":2.0,"accuracy":0.1,"lr":0.001,"images_per_sec":1.0,"step_ms":1.0,"wall_secs":1.0}"#;
        std::fs::write(run.file(METRICS_FILE), format!("{line}\n")).unwrap();
        // The metrics file last written long ago.
        let make_quiet = || {
            std::fs::File::options()
                .append(true)
                .open(run.file(METRICS_FILE))
                .unwrap()
                .set_modified(std::time::SystemTime::now() - STALL_AFTER * 2)
                .unwrap();
        };
        make_quiet();
        let mut follower = Follower::new(run.clone());
        assert!(matches!(follower.start().unwrap()[0], Event::Started(_)));
        let events = follower.poll();
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Train(r) if r.step == 1)));
        assert!(has_phase(&events, Phase::Stalled));
        assert!(follower.poll().is_empty(), "said once");
        // New data: training again.
        let mut f = std::fs::File::options()
            .append(true)
            .open(run.file(METRICS_FILE))
            .unwrap();
        f.write_all(format!("{}\n", line.replace("\"step\":1", "\"step\":2")).as_bytes())
            .unwrap();
        assert!(has_phase(&follower.poll(), Phase::Training));
        // A run that said it finished is never stalled.
        std::fs::write(
            run.file(LOG_FILE),
            "2026-01-01T00:00:00Z finished at step 2: all 1 epochs done\n",
        )
        .unwrap();
        make_quiet();
        let mut viewer = Follower::new(run);
        viewer.start().unwrap();
        let events = viewer.poll();
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Finished { step: 2, .. })));
        assert!(!has_phase(&events, Phase::Stalled));
    }

    #[test]
    fn layer_records_and_alerts_are_replayed_as_the_trainer_sent_them() {
        use crate::events::{GradRecord, MetricRecord};
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path(), None, &crate::config::Config::default()).unwrap();
        let grads = MetricRecord::Grads(GradRecord {
            step: 50,
            epoch: 1,
            groups: vec!["head".into()],
            grad_norm: vec![0.5],
            weight_norm: vec![2.0],
            update_ratio: vec![1e-3],
        });
        let line = serde_json::to_string(&grads).unwrap();
        std::fs::write(run.file(METRICS_FILE), format!("{line}\n")).unwrap();
        std::fs::write(
            run.file(LOG_FILE),
            format!(
                "t {ALERT_PREFIX}gradient norm 9.0 at step 60 is 18x the median\n\
                 t {ALERT_PREFIX}{HALTED}the loss became NaN at step 61: not applied\n"
            ),
        )
        .unwrap();
        let mut follower = Follower::new(run);
        follower.start().unwrap();
        let events = follower.poll();
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Layers(r) if *r == grads)));
        let alerts: Vec<(bool, String)> = events
            .iter()
            .filter_map(|e| match e {
                Event::Alert(a) => Some((a.fatal, a.message.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            alerts,
            [
                (
                    false,
                    "gradient norm 9.0 at step 60 is 18x the median".to_string()
                ),
                (
                    true,
                    "the loss became NaN at step 61: not applied".to_string()
                )
            ]
        );
    }

    #[test]
    fn predictions_and_test_images_are_replayed_once_and_dropped_past_a_resume() {
        use crate::inspect::predictions::{Predictions, PredictionsMeta};
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path(), None, &crate::config::Config::default()).unwrap();
        run.write_test_images(&vec![7u8; 2 * crate::data::IMAGE_BYTES], &[3, 4])
            .unwrap();
        for step in [390, 780] {
            run.write_predictions(&Predictions {
                meta: PredictionsMeta {
                    step,
                    epoch: step / 390,
                    images: 2,
                    classes: 10,
                },
                probabilities: vec![0.1; 20],
            })
            .unwrap();
        }
        let mut follower = Follower::new(run.clone());
        let Event::Started(info) = &follower.start().unwrap()[0] else {
            panic!("no Started event")
        };
        assert_eq!(info.test_labels, vec![3, 4]);
        assert_eq!(info.test_pixels.len(), 2 * crate::data::IMAGE_BYTES);
        let steps: Vec<u64> = follower
            .poll()
            .iter()
            .filter_map(|e| match e {
                Event::Predictions(p) => Some(p.meta.step),
                _ => None,
            })
            .collect();
        assert_eq!(steps, vec![390, 780]);
        assert!(!follower
            .poll()
            .iter()
            .any(|e| matches!(e, Event::Predictions(_))));
        run.truncate_after(500).unwrap();
        assert_eq!(
            run.prediction_files()
                .iter()
                .map(|f| f.0)
                .collect::<Vec<_>>(),
            vec![390]
        );
    }

    #[test]
    fn reads_only_whole_new_lines_and_rereads_a_rewritten_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.jsonl");
        let mut offset = 0;
        std::fs::write(&path, "a\nb\nhalf").unwrap();
        assert_eq!(read_new_lines(&path, &mut offset), vec!["a", "b"]);
        assert!(read_new_lines(&path, &mut offset).is_empty());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b" line\nc\n").unwrap();
        assert_eq!(read_new_lines(&path, &mut offset), vec!["half line", "c"]);
        std::fs::write(&path, "x\n").unwrap();
        assert_eq!(read_new_lines(&path, &mut offset), vec!["x"]);
        assert!(read_new_lines(&tmp.path().join("missing"), &mut 0).is_empty());
    }
}
