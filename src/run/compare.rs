//! Several runs read side by side for `vitscope view RUN… | FOLDER`: their curves, what
//! differs between their configurations, and their state, followed as they grow (new
//! runs under a folder appear as they start). Reads only the metrics and the log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::dir::RunError;
use super::dir::{RunDir, CONFIG_FILE, LOG_FILE, METRICS_FILE};
use crate::config::{Config, ConfigError};
use crate::events::{EvalRecord, LayerHistory, MetricRecord};
use crate::run::follow::read_new_lines;

/// Why runs cannot be compared; each message is one line naming the path.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The run's settings did not turn into a table.
    #[error("{0}")]
    Settings(String),
    #[error("{}: {source}", dir.display())]
    In {
        dir: PathBuf,
        source: Box<CompareError>,
    },
    #[error("{}: neither a vitscope run directory (no {CONFIG_FILE}) nor a folder of runs", .0.display())]
    NotRuns(PathBuf),
    #[error("{0}: no runs here yet (a run is a folder with a {CONFIG_FILE})")]
    NoRuns(String),
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Live,
    Finished,
    /// Stopped on request before its end.
    Stopped,
    Failed,
    /// No new record for a while and not ended (killed, or its machine went away).
    Stale,
}

impl RunState {
    pub fn label(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Finished => "finished",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Stale => "stale",
        }
    }
}

/// One training record, as the comparison plots it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub step: u64,
    pub epoch: u64,
    pub wall_secs: f64,
    pub loss: f64,
}

/// One run's curves and settings.
#[derive(Debug)]
pub struct RunSeries {
    pub dir: PathBuf,
    /// Every setting of its config.toml, flattened (`model.norm` → `"pre"`).
    pub settings: BTreeMap<String, String>,
    pub train: Vec<Point>,
    pub evals: Vec<EvalRecord>,
    /// Gradients, scale and knowledge by depth.
    pub layers: LayerHistory,
    pub state: RunState,
    metrics_offset: u64,
    log_offset: u64,
    last_growth: Instant,
}

/// After this long without a record, a run that did not end is stale.
pub const STALE_AFTER: Duration = crate::run::follow::STALL_AFTER;

impl RunSeries {
    fn open(dir: &Path) -> Result<Self, CompareError> {
        let run = RunDir::open(dir)?;
        let config = Config::load_run(&run.file(CONFIG_FILE), &[])?;
        let table =
            toml::Table::try_from(&config).map_err(|e| CompareError::Settings(e.to_string()))?;
        let mut settings = BTreeMap::new();
        for (section, values) in &table {
            if let Some(values) = values.as_table() {
                for (key, value) in values {
                    settings.insert(format!("{section}.{key}"), value.to_string());
                }
            }
        }
        let mut series = Self {
            dir: dir.to_path_buf(),
            settings,
            train: Vec::new(),
            evals: Vec::new(),
            layers: LayerHistory::default(),
            state: RunState::Live,
            metrics_offset: 0,
            log_offset: 0,
            last_growth: Instant::now(),
        };
        series.poll();
        // Judged by the files' age at opening, not by when this view started.
        let age = std::fs::metadata(dir.join(METRICS_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        series.last_growth = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        series.update_stale();
        Ok(series)
    }

    /// Reads what was appended since the last poll; whether anything was.
    pub fn poll(&mut self) -> bool {
        let mut grew = false;
        for line in read_new_lines(&self.dir.join(METRICS_FILE), &mut self.metrics_offset) {
            match serde_json::from_str::<MetricRecord>(&line) {
                Ok(MetricRecord::Train(r)) => {
                    // A resume rewrites the file from its checkpoint: drop what follows.
                    self.train.retain(|p| p.step < r.step);
                    self.train.push(Point {
                        step: r.step,
                        epoch: r.epoch,
                        wall_secs: r.wall_secs,
                        loss: r.loss,
                    });
                    grew = true;
                }
                Ok(MetricRecord::Eval(e)) => {
                    self.evals.retain(|x| x.step < e.step);
                    self.evals.push(e);
                    grew = true;
                }
                Ok(layers) => {
                    self.layers.push(&layers);
                    grew = true;
                }
                Err(_) => {}
            }
        }
        for line in read_new_lines(&self.dir.join(LOG_FILE), &mut self.log_offset) {
            if line.contains("finished at step") {
                self.state = if line.contains("stopped on request") {
                    RunState::Stopped
                } else {
                    RunState::Finished
                };
            } else if line.contains(" error: ") {
                self.state = RunState::Failed;
            } else if line.contains("resumed from") {
                self.state = RunState::Live;
            }
            grew = true;
        }
        if grew {
            self.last_growth = Instant::now();
            if self.state == RunState::Stale {
                self.state = RunState::Live;
            }
        }
        self.update_stale();
        grew
    }

    fn update_stale(&mut self) {
        if self.state == RunState::Live && self.last_growth.elapsed() > STALE_AFTER {
            self.state = RunState::Stale;
        }
    }

    pub fn last_step(&self) -> u64 {
        self.train.last().map_or(0, |p| p.step)
    }

    /// The best evaluation: accuracy, epoch and training time to it.
    pub fn best(&self) -> Option<&EvalRecord> {
        self.evals
            .iter()
            .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
    }

    pub fn name(&self) -> String {
        self.dir.file_name().map_or_else(
            || self.dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

/// The runs being compared, and the folders watched for new ones.
#[derive(Debug, Default)]
pub struct Comparison {
    pub runs: Vec<RunSeries>,
    folders: Vec<PathBuf>,
}

/// Whether `dir` holds a run.
pub fn is_run(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// The runs directly inside `folder`, by name.
fn runs_in(folder: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(folder)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_run(p))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

impl Comparison {
    /// The runs named, and those inside any folder named (watched for more).
    pub fn open(paths: &[PathBuf]) -> Result<Self, CompareError> {
        let mut c = Self::default();
        for path in paths {
            if is_run(path) {
                c.add(path)?;
            } else if path.is_dir() {
                for dir in runs_in(path) {
                    c.add(&dir)?;
                }
                c.folders.push(path.clone());
            } else {
                return Err(CompareError::NotRuns(path.clone()));
            }
        }
        if c.runs.is_empty() {
            return Err(CompareError::NoRuns(
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        Ok(c)
    }

    fn add(&mut self, dir: &Path) -> Result<(), CompareError> {
        if self.runs.iter().any(|r| r.dir == dir) {
            return Ok(());
        }
        let series = RunSeries::open(dir).map_err(|e| CompareError::In {
            dir: dir.to_path_buf(),
            source: Box::new(e),
        })?;
        self.runs.push(series);
        Ok(())
    }

    /// New records of every run, and new runs in the watched folders; whether anything
    /// changed.
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        for run in &mut self.runs {
            let before = run.state;
            changed |= run.poll() || run.state != before;
        }
        for folder in self.folders.clone() {
            for dir in runs_in(&folder) {
                if !self.runs.iter().any(|r| r.dir == dir) && self.add(&dir).is_ok() {
                    changed = true;
                }
            }
        }
        changed
    }

    /// The settings whose values differ between the runs (seed and folder aside).
    pub fn differing(&self) -> Vec<String> {
        let Some(first) = self.runs.first() else {
            return Vec::new();
        };
        first
            .settings
            .keys()
            .filter(|k| *k != "run.dir")
            .filter(|k| {
                self.runs
                    .iter()
                    .any(|r| r.settings.get(*k) != first.settings.get(*k))
            })
            .cloned()
            .collect()
    }

    /// Whether run `i` passes `filter`: space-separated terms, each `key=value` (a
    /// setting named `key`, or ending in `.key`, whose value is `value`; quotes of
    /// strings ignored) or a word its folder name contains. An empty filter passes all.
    pub fn matches(&self, i: usize, filter: &str) -> bool {
        let Some(run) = self.runs.get(i) else {
            return false;
        };
        filter
            .split_whitespace()
            .all(|term| match term.split_once('=') {
                Some((key, value)) => run.settings.iter().any(|(k, v)| {
                    (k == key || k.ends_with(&format!(".{key}"))) && v.trim_matches('"') == value
                }),
                None => run.name().contains(term),
            })
    }

    /// Each run's label: what differs in its configuration (`norm=none`), or its folder
    /// name when nothing does (or two runs would read the same).
    pub fn labels(&self) -> Vec<String> {
        let keys = self.differing();
        let labels: Vec<String> = self
            .runs
            .iter()
            .map(|r| {
                keys.iter()
                    .map(|k| {
                        let short = k.rsplit('.').next().unwrap_or(k);
                        let v = r.settings.get(k).map_or("-", String::as_str);
                        format!("{short}={}", v.trim_matches('"'))
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let unique = labels
            .iter()
            .all(|l| !l.is_empty() && labels.iter().filter(|m| *m == l).count() == 1);
        if unique {
            labels
        } else {
            self.runs.iter().map(RunSeries::name).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder with a config (one setting changed) and a few metric lines.
    fn fake_run(dir: &Path, set: &str, steps: u64, log: &str) {
        let config = Config::from_sources(None, &[set.to_string()]).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), config.to_toml()).unwrap();
        let mut lines = String::new();
        for step in 1..=steps {
            lines.push_str(&format!(
                "{{\"kind\":\"train\",\"step\":{step},\"epoch\":1,\"loss\":{},\"accuracy\":0.5,\"lr\":0.001,\"images_per_sec\":100.0,\"step_ms\":10.0,\"wall_secs\":{}.0}}\n",
                2.0 / step as f64,
                step
            ));
        }
        std::fs::write(dir.join(METRICS_FILE), lines).unwrap();
        std::fs::write(dir.join(LOG_FILE), log).unwrap();
    }

    #[test]
    fn runs_are_labelled_by_what_differs_and_new_ones_appear() {
        let tmp = tempfile::tempdir().unwrap();
        fake_run(
            &tmp.path().join("a"),
            "model.norm=pre",
            5,
            "t finished at step 5: all 1 epochs done\n",
        );
        fake_run(
            &tmp.path().join("b"),
            "model.norm=none",
            3,
            "t error: loss is NaN\n",
        );
        std::fs::create_dir(tmp.path().join("not-a-run")).unwrap();
        let mut c = Comparison::open(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(c.runs.len(), 2);
        assert_eq!(c.differing(), vec!["model.norm".to_string()]);
        assert_eq!(c.labels(), vec!["norm=pre", "norm=none"]);
        assert_eq!(
            (c.runs[0].state, c.runs[1].state),
            (RunState::Finished, RunState::Failed)
        );
        assert_eq!(c.runs[0].last_step(), 5);
        assert!(!c.poll());
        fake_run(&tmp.path().join("c"), "model.norm=post", 2, "");
        assert!(c.poll());
        assert_eq!(c.labels(), vec!["norm=pre", "norm=none", "norm=post"]);
        assert_eq!(c.runs[2].state, RunState::Live);
        // Same settings: the folder names tell them apart.
        let same = tempfile::tempdir().unwrap();
        fake_run(&same.path().join("x"), "train.seed=1", 2, "");
        fake_run(&same.path().join("y"), "train.seed=1", 2, "");
        assert_eq!(
            Comparison::open(&[same.path().to_path_buf()])
                .unwrap()
                .labels(),
            vec!["x", "y"]
        );
        assert!(Comparison::open(&[tmp.path().join("not-a-run")]).is_err());
        assert!(Comparison::open(&[tmp.path().join("missing")]).is_err());
        // Filters by a setting's value (short or full name) and by folder name.
        let pass = |f: &str| (0..3).filter(|&i| c.matches(i, f)).collect::<Vec<_>>();
        assert_eq!(pass("norm=none"), [1]);
        assert_eq!(pass("model.norm=post"), [2]);
        assert_eq!(pass("norm=none dim=96"), [1]);
        assert_eq!(pass("norm=none dim=48"), Vec::<usize>::new());
        assert_eq!(pass("a"), [0]);
        assert_eq!(pass(""), [0, 1, 2]);
    }
}
