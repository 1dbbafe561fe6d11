//! The run directory's files and how they are written: whole files to a temporary name
//! and renamed, `metrics.jsonl` and `run.log` by appending whole lines.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use crate::config::{Config, ConfigError};
use crate::events::MetricRecord;
use crate::inspect::predictions::Predictions;
use crate::inspect::probe::ProbeSnapshot;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const LOG_FILE: &str = "run.log";
pub const PROBES_DIR: &str = "probes";
pub const PROBE_IMAGES_FILE: &str = "images.safetensors";
pub const PREDICTIONS_DIR: &str = "predictions";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder, synced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(path, format!("cannot write: {e}"))
    })
}

#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
    /// The folders [`RunDir::create`] made, outermost first (none for an opened run).
    made: Vec<PathBuf>,
}

impl RunDir {
    /// Creates a new run directory: `exact` if given (which must not hold a run yet),
    /// else `<parent>/<UTC timestamp>`; writes the resolved config.
    pub fn create(parent: &Path, exact: Option<&Path>, config: &Config) -> Result<Self, RunError> {
        let path = match exact {
            Some(p) => {
                if p.join(CONFIG_FILE).exists() {
                    return Err(io_error(
                        p,
                        "already holds a run; continue it with --resume, or pick another --run-dir",
                    ));
                }
                p.to_path_buf()
            }
            None => {
                let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string()
                    .replace(':', "-")
                    .trim_end_matches('Z')
                    .to_string();
                let mut candidate = parent.join(&stamp);
                let mut n = 2;
                while candidate.exists() {
                    candidate = parent.join(format!("{stamp}-{n}"));
                    n += 1;
                }
                candidate
            }
        };
        let probes = path.join(PROBES_DIR);
        let made: Vec<PathBuf> = {
            let mut missing: Vec<PathBuf> = probes
                .ancestors()
                .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
                .map(Path::to_path_buf)
                .collect();
            missing.reverse();
            missing
        };
        std::fs::create_dir_all(&probes)
            .map_err(|e| io_error(&path, format!("cannot create: {e}")))?;
        let run = Self { path, made };
        if let Err(e) = run.write_config(config) {
            run.discard_unstarted();
            return Err(e);
        }
        Ok(run)
    }

    /// Opens an existing run directory (one with a `config.toml`).
    pub fn open(path: &Path) -> Result<Self, RunError> {
        if !path.join(CONFIG_FILE).is_file() {
            return Err(io_error(
                path,
                format!("not a vitscope run directory (no {CONFIG_FILE})"),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            made: Vec::new(),
        })
    }

    /// Removes what [`RunDir::create`] made when the run never trained (no metrics, no
    /// checkpoint): a start that failed, say on missing data, leaves nothing behind.
    /// Files it did not write and folders that hold anything else stay. Returns whether
    /// the run directory is gone. Does nothing for an opened run.
    pub fn discard_unstarted(&self) -> bool {
        let trained = [METRICS_FILE, CHECKPOINT_FILE]
            .iter()
            .any(|f| std::fs::metadata(self.file(f)).is_ok_and(|m| m.len() > 0));
        if self.made.is_empty() || trained {
            return false;
        }
        for file in [CONFIG_FILE, LOG_FILE, METRICS_FILE] {
            let _ = std::fs::remove_file(self.file(file));
        }
        // Innermost first; a folder that is not empty is kept.
        for dir in self.made.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        !self.path.exists()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.file(CHECKPOINT_FILE)
    }

    pub fn write_config(&self, config: &Config) -> Result<(), RunError> {
        let text = format!(
            "# The resolved configuration of this run (defaults, --config file and --set).\n{}",
            config.to_toml()
        );
        write_atomic(&self.file(CONFIG_FILE), text.as_bytes())
    }

    pub fn read_config(&self) -> Result<Config, RunError> {
        Ok(Config::load_run(&self.file(CONFIG_FILE), &[])?)
    }

    /// Opens a file for appending whole lines.
    pub fn appender(&self, name: &str) -> Result<LineAppender, RunError> {
        let path = self.file(name);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_error(&path, format!("cannot open for appending: {e}")))?;
        Ok(LineAppender { path, file })
    }

    /// What the last line of run.log that holds `label` says after it (a line is a
    /// timestamp, a space, then the message).
    pub fn last_logged(&self, label: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.file(LOG_FILE)).ok()?;
        text.lines()
            .rev()
            .find_map(|l| l.split_once(' ')?.1.strip_prefix(label))
            .map(str::to_string)
    }

    /// The metric records so far; a torn or unreadable line is skipped.
    pub fn read_metrics(&self) -> Vec<MetricRecord> {
        std::fs::read_to_string(self.file(METRICS_FILE))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Keeps only the records up to `step` (used when resuming from a checkpoint at `step`),
    /// and the probe files likewise.
    pub fn truncate_after(&self, step: u64) -> Result<(), RunError> {
        let kept: String = std::fs::read_to_string(self.file(METRICS_FILE))
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<MetricRecord>(l).is_ok_and(|r| r.step() <= step))
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&self.file(METRICS_FILE), kept.as_bytes())?;
        let stale = self
            .step_files(PROBES_DIR)
            .into_iter()
            .chain(self.step_files(PREDICTIONS_DIR));
        for (file_step, path) in stale {
            if file_step > step {
                std::fs::remove_file(&path)
                    .map_err(|e| io_error(&path, format!("cannot remove: {e}")))?;
            }
        }
        Ok(())
    }

    fn step_path(&self, dir: &str, step: u64) -> PathBuf {
        self.path
            .join(dir)
            .join(format!("step-{step:08}.safetensors"))
    }

    fn probe_path(&self, step: u64) -> PathBuf {
        self.step_path(PROBES_DIR, step)
    }

    pub fn write_probe(&self, snapshot: &ProbeSnapshot) -> Result<PathBuf, RunError> {
        let path = self.probe_path(snapshot.meta.step);
        write_atomic(&path, &snapshot.to_bytes())?;
        Ok(path)
    }

    /// Probe files by step, in order.
    pub fn probe_files(&self) -> Vec<(u64, PathBuf)> {
        self.step_files(PROBES_DIR)
    }

    /// Prediction files by step, in order.
    pub fn prediction_files(&self) -> Vec<(u64, PathBuf)> {
        self.step_files(PREDICTIONS_DIR)
    }

    pub fn write_predictions(&self, predictions: &Predictions) -> Result<PathBuf, RunError> {
        let path = self.step_path(PREDICTIONS_DIR, predictions.meta.step);
        std::fs::create_dir_all(self.path.join(PREDICTIONS_DIR))
            .map_err(|e| io_error(&path, format!("cannot create its folder: {e}")))?;
        write_atomic(&path, &predictions.to_bytes())?;
        Ok(path)
    }

    pub fn read_predictions(&self, step: u64) -> Result<Predictions, RunError> {
        let path = self.step_path(PREDICTIONS_DIR, step);
        let bytes =
            std::fs::read(&path).map_err(|e| io_error(&path, format!("cannot read: {e}")))?;
        Predictions::from_bytes(&bytes).map_err(|e| io_error(&path, e))
    }

    /// `step-NNNNNNNN.safetensors` files of a folder by step, in order.
    fn step_files(&self, dir: &str) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(self.path.join(dir))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step = name
                    .strip_prefix("step-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()?;
                Some((step, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    pub fn read_probe(&self, step: u64) -> Result<ProbeSnapshot, RunError> {
        let path = self.probe_path(step);
        let bytes =
            std::fs::read(&path).map_err(|e| io_error(&path, format!("cannot read: {e}")))?;
        ProbeSnapshot::from_bytes(&bytes).map_err(|e| io_error(&path, e))
    }

    /// Stores the first test images (raw bytes, labels and test-set indices) once per run.
    pub fn write_test_images(&self, pixels: &[u8], labels: &[u8]) -> Result<(), RunError> {
        let n = labels.len();
        let indices: Vec<u8> = (0..n as u64).flat_map(u64::to_le_bytes).collect();
        let views = vec![
            (
                "pixels",
                TensorView::new(Dtype::U8, vec![n, 3, 32, 32], pixels),
            ),
            ("labels", TensorView::new(Dtype::U8, vec![n], labels)),
            (
                "test_indices",
                TensorView::new(Dtype::U64, vec![n], &indices),
            ),
        ];
        let views: Vec<(&str, TensorView)> = views
            .into_iter()
            .map(|(k, v)| (k, v.expect("shapes match")))
            .collect();
        let bytes =
            safetensors::serialize(views, Some(HashMap::new())).expect("probe images serialise");
        write_atomic(&self.path.join(PROBES_DIR).join(PROBE_IMAGES_FILE), &bytes)
    }
}

impl RunDir {
    /// The first test images (raw bytes) and labels, if recorded.
    pub fn read_test_images(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        let bytes = std::fs::read(self.path.join(PROBES_DIR).join(PROBE_IMAGES_FILE)).ok()?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes).ok()?;
        let pixels = tensors.tensor("pixels").ok()?.data().to_vec();
        let labels = tensors.tensor("labels").ok()?.data().to_vec();
        Some((pixels, labels))
    }
}

/// Appends whole lines, one `write` call each, so a reader never sees half a line
/// unless the process dies inside that call.
pub struct LineAppender {
    path: PathBuf,
    file: File,
}

impl LineAppender {
    pub fn append(&mut self, line: &str) -> Result<(), RunError> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.file
            .write_all(&bytes)
            .map_err(|e| io_error(&self.path, format!("cannot append: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EvalRecord;

    fn train(step: u64) -> MetricRecord {
        MetricRecord::Train(crate::events::test_train(step))
    }

    #[test]
    fn metrics_lines_carry_the_documented_keys() {
        let line = serde_json::to_string(&train(3)).unwrap();
        for key in [
            "\"kind\":\"train\"",
            "\"step\":3",
            "\"epoch\":1",
            "\"loss\":",
            "\"lr\":",
            "\"images_per_sec\":",
        ] {
            assert!(line.contains(key), "{line} lacks {key}");
        }
        let eval = MetricRecord::Eval(EvalRecord {
            step: 4,
            epoch: 1,
            loss: 1.0,
            accuracy: 0.5,
            per_class_accuracy: vec![0.5; 10],
            confusion: vec![vec![0; 10]; 10],
            images_per_sec: 1.0,
            wall_secs: 1.0,
            best_accuracy: 0.5,
            best_epoch: 1,
        });
        let line = serde_json::to_string(&eval).unwrap();
        assert!(
            line.starts_with(
                "{\"kind\":\"eval\",\"step\":4,\"epoch\":1,\"loss\":1.0,\"accuracy\":0.5"
            ),
            "{line}"
        );
    }

    #[test]
    fn appended_lines_read_back_and_a_torn_line_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path(), None, &Config::default()).unwrap();
        assert!(run.path().starts_with(tmp.path()));
        let mut out = run.appender(METRICS_FILE).unwrap();
        for step in 1..=5 {
            out.append(&serde_json::to_string(&train(step)).unwrap())
                .unwrap();
        }
        // A process killed in the middle of a write leaves a partial line.
        let mut raw = std::fs::OpenOptions::new()
            .append(true)
            .open(run.file(METRICS_FILE))
            .unwrap();
        raw.write_all(b"{\"kind\":\"train\",\"st").unwrap();
        assert_eq!(run.read_metrics().len(), 5);

        run.truncate_after(3).unwrap();
        let steps: Vec<u64> = run.read_metrics().iter().map(MetricRecord::step).collect();
        assert_eq!(steps, vec![1, 2, 3]);
        assert_eq!(
            RunDir::open(run.path()).unwrap().read_config().unwrap(),
            Config::default()
        );
    }

    #[test]
    fn a_second_run_never_reuses_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let a = RunDir::create(tmp.path(), None, &Config::default()).unwrap();
        let b = RunDir::create(tmp.path(), None, &Config::default()).unwrap();
        assert_ne!(a.path(), b.path());
        let err = RunDir::create(tmp.path(), Some(a.path()), &Config::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("already holds a run; continue it with --resume"),
            "{err}"
        );
        let err = RunDir::open(tmp.path()).unwrap_err();
        assert!(
            err.to_string().contains("not a vitscope run directory"),
            "{err}"
        );
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        let err = write_atomic(&tmp.path().join("missing").join("y"), b"z").unwrap_err();
        assert!(err.to_string().contains("cannot write"), "{err}");
    }

    #[test]
    fn a_run_that_never_trained_is_removed_with_the_folders_it_made() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::default();
        // Timestamped under a parent that did not exist: both go.
        let parent = tmp.path().join("a/runs");
        let run = RunDir::create(&parent, None, &config).unwrap();
        std::fs::write(run.file(LOG_FILE), "started\n").unwrap();
        assert!(run.discard_unstarted());
        assert!(!tmp.path().join("a").exists());
        // An existing folder given with --run-dir stays, with the user's own files.
        let mine = tmp.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("notes.txt"), "mine").unwrap();
        let run = RunDir::create(tmp.path(), Some(&mine), &config).unwrap();
        run.discard_unstarted();
        let left: Vec<_> = std::fs::read_dir(&mine)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
        // A run with metrics stays whole; an opened run is never removed.
        let trained = RunDir::create(tmp.path(), Some(&tmp.path().join("t")), &config).unwrap();
        std::fs::write(trained.file(METRICS_FILE), "{}\n").unwrap();
        assert!(!trained.discard_unstarted());
        assert!(trained.file(CONFIG_FILE).exists());
        std::fs::remove_file(trained.file(METRICS_FILE)).unwrap();
        assert!(!RunDir::open(trained.path()).unwrap().discard_unstarted());
        assert!(trained.file(CONFIG_FILE).exists());
    }
}
