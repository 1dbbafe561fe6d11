//! The run directory: everything a run leaves on disk, readable by a later viewer.
//!
//! ```text
//! runs/<timestamp>/
//!   config.toml              the resolved configuration
//!   metrics.jsonl            one JSON object per training step or evaluation
//!   checkpoint.safetensors   weights, optimizer moments, step/seed/timing state
//!   run.log                  messages
//!   probes/images.safetensors  the first test images (probe images first) and labels
//!   probes/step-00000250.safetensors ...  one file per probe
//!   predictions/step-00000390.safetensors ...  each evaluation's predictions on them
//! ```
//!
//! Whole files are written to a temporary name and renamed. `metrics.jsonl` and
//! `run.log` grow by appending whole lines with one write each; a reader skips a torn
//! last line, and a resume rewrites the log (atomically) up to its checkpoint.

//! Here only the map: the directory itself is `dir.rs`; reading one back as events,
//! `follow.rs`; several side by side, `compare.rs`; many from one grid, `sweep.rs`.

pub mod compare;
mod dir;
pub mod follow;
pub mod milestones;
pub mod sweep;

pub use dir::{
    write_atomic, LineAppender, RunDir, RunError, CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE,
    METRICS_FILE, PREDICTIONS_DIR, PROBES_DIR, PROBE_IMAGES_FILE,
};
