//! What an export is asked for ([`What`], [`Choice`]), what it reads (a run
//! directory's files as a [`Source`]) and what comes out ([`Picture`], [`Written`]):
//! the types every picture's renderer shares, apart from the map that dispatches to
//! them.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::config::ConfigError;
use crate::events::{split_records, EvalRecord, LayerHistory, TrainRecord};
use crate::inspect::probe::ProbeSnapshot;
use crate::run::{RunDir, RunError};

/// Why an export failed; each message is the one line the user sees.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A picture, step, image, layer or head the run does not have.
    #[error("{0}")]
    Request(String),
    /// The run lacks the records a picture is drawn from.
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The PNG or GIF encoder failed.
    #[error("{0}")]
    Encode(String),
    #[error("{path}: cannot create: {reason}")]
    Create { path: PathBuf, reason: String },
}

/// What can be exported; none named means all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    LayerNormGif,
    Attention,
    Features,
    Patches,
    Predictions,
    Curves,
    Layers,
}

impl What {
    pub const ALL: [What; 7] = [
        What::LayerNormGif,
        What::Attention,
        What::Features,
        What::Patches,
        What::Predictions,
        What::Curves,
        What::Layers,
    ];

    /// Every name, in [`What::ALL`]'s order (the command line's choices).
    pub const NAMES: [&'static str; 7] = [
        "layernorm-gif",
        "attention",
        "features",
        "patches",
        "predictions",
        "curves",
        "layers",
    ];

    pub fn name(self) -> &'static str {
        // The variants are declared in NAMES's order.
        Self::NAMES[self as usize]
    }

    pub fn parse(name: &str) -> Result<Self, ExportError> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|w| w.name()).collect();
                ExportError::Request(format!(
                    "unknown export `{name}`: expected {}",
                    names.join(", ")
                ))
            })
    }
}

/// Which step, image, layer and head to show.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// The probe step (default: the latest probe).
    pub step: Option<u64>,
    /// The probe image.
    pub image: usize,
    /// The LayerNorm (for the GIF) or block (for attention).
    pub layer: usize,
    pub head: usize,
}

/// One picture, ready to write.
pub struct Picture {
    pub file: String,
    pub caption: String,
    pub bytes: Vec<u8>,
    pub width: usize,
    pub height: usize,
    /// Frames of an animation (1 for a still), and its length in hundredths of a second.
    pub frames: usize,
    pub duration_cs: u64,
}

impl Picture {
    /// "720x420 GIF, 71 frames, 12.5 s" or "680x590 PNG".
    pub fn describe(&self) -> String {
        if self.frames > 1 {
            format!(
                "{}x{} GIF, {} frames, {:.1} s",
                self.width,
                self.height,
                self.frames,
                self.duration_cs as f64 / 100.0
            )
        } else {
            format!("{}x{} PNG", self.width, self.height)
        }
    }
}

/// A file written: where, how many bytes, and what it is.
pub struct Written {
    pub path: PathBuf,
    pub bytes: usize,
    pub what: String,
}

/// What the pictures are drawn from: a run directory's files, read once.
pub struct Source {
    pub config: Config,
    pub train: Vec<TrainRecord>,
    pub evals: Vec<EvalRecord>,
    /// The per-layer records (gradients, scale, knowledge).
    pub layers: LayerHistory,
    pub probe_files: Vec<(u64, PathBuf)>,
    pub run: RunDir,
    pub class_names: Vec<String>,
    /// The first test images (3 x 32 x 32 bytes each) and their labels.
    pub test_pixels: Vec<u8>,
    pub test_labels: Vec<u8>,
}

impl Source {
    pub fn open(path: &Path) -> Result<Self, ExportError> {
        let run = RunDir::open(path)?;
        let config = Config::load_run(&run.file(crate::run::CONFIG_FILE), &[])?;
        let records = run.read_metrics();
        let layers = LayerHistory::from_records(&records);
        let (train, evals) = split_records(records);
        let info = crate::run::follow::run_info(&run, &config, 0);
        let (test_pixels, test_labels) = run.read_test_images().unwrap_or_default();
        Ok(Self {
            config,
            train,
            evals,
            layers,
            probe_files: run.probe_files(),
            run,
            class_names: info.class_names,
            test_pixels,
            test_labels,
        })
    }

    /// The probe at `step`, or the latest.
    pub fn probe(&self, step: Option<u64>) -> Result<ProbeSnapshot, ExportError> {
        let step = match step {
            Some(s) => {
                if !self.probe_files.iter().any(|(p, _)| *p == s) {
                    let near = self
                        .probe_files
                        .iter()
                        .map(|(p, _)| *p)
                        .min_by_key(|p| p.abs_diff(s));
                    return Err(ExportError::Request(format!(
                        "--step {s}: no probe at that step{}",
                        near.map_or(String::new(), |n| format!(" (nearest: {n})"))
                    )));
                }
                s
            }
            None => self.probe_files.last().map(|(s, _)| *s).ok_or_else(|| {
                ExportError::Missing(format!(
                    "{}: the run has no probes yet",
                    self.run.path().display()
                ))
            })?,
        };
        Ok(self.run.read_probe(step)?)
    }

    /// The raw bytes of test image `i`, if recorded.
    pub fn test_image(&self, i: usize) -> Option<&[u8]> {
        let n = crate::data::IMAGE_BYTES;
        self.test_pixels.get(i * n..(i + 1) * n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_picture_kind_has_its_own_name_and_parses_back() {
        for (i, w) in What::ALL.into_iter().enumerate() {
            assert_eq!(w.name(), What::NAMES[i]);
            assert_eq!(What::parse(w.name()).unwrap(), w);
        }
        assert!(What::parse("movies")
            .unwrap_err()
            .to_string()
            .contains("layers"));
    }
}
