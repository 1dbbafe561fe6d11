//! The command line's shape: clap's definitions of every command and flag, and how
//! the named flags become `--set` entries (one overlay path for flags and `--set`).

use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand};

use crate::config::{ColorSetting, DatasetKind};

#[derive(Debug, Parser)]
#[command(
    name = "vitscope",
    version,
    about = "A terminal lab for watching a Vision Transformer learn CIFAR-10",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `vitscope` alone trains: these are `vitscope train`'s options.
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a ViT (the default command).
    Train(TrainArgs),
    /// Measure training and evaluation speed of the configured model on this machine.
    Bench(BenchArgs),
    /// Open the dashboard over a run directory: follows a run that is being written,
    /// replays a finished or killed one. Never writes into it.
    View(ViewArgs),
    /// Render what the tabs show as PNG pictures and an animated GIF of the LayerNorm
    /// distributions, from a run directory's files.
    Export(ExportArgs),
    /// Train every combination of comma-separated --set values (e.g. --set
    /// model.norm=pre,post,none), headless, one after another, each into
    /// FOLDER/<settings>; finished runs are skipped and stopped ones resumed.
    Sweep(SweepArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Training options as for `train`; --run-dir is the sweep's folder (default
    /// <run.dir>/sweep), and --set KEY=A,B,… makes an axis.
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The run directory.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// What to export (all of them, with an index.html, when none is named).
    #[arg(value_name = "WHAT", value_parser = PossibleValuesParser::new(crate::export::What::NAMES))]
    pub what: Vec<String>,
    /// Folder to write into (default: <run name>-export in the current folder).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The probe step to show (default: the latest).
    #[arg(long, value_name = "N")]
    pub step: Option<u64>,
    /// The probe image.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub image: usize,
    /// The LayerNorm of the GIF (0 = block 0's first), the block of the attention
    /// pictures, the hidden state of the features (0 = embeddings).
    #[arg(long, value_name = "L", default_value_t = 0)]
    pub layer: usize,
    /// The attention head.
    #[arg(long, value_name = "H", default_value_t = 0)]
    pub head: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ViewArgs {
    /// A run directory (runs/<timestamp>); several, or a folder of runs (a sweep's),
    /// to compare them (runs that start there later appear too).
    #[arg(value_name = "RUN_DIR", required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    #[command(flatten)]
    pub colors: ColorArgs,
    /// Override a display setting, e.g. --set ui.markers=block (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// A TOML file with the settings to change (see config/default.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override any setting, e.g. --set model.depth=4 (repeatable; wins over everything).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Folder holding cifar-10-batches-bin/ (data.dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Which data set to train on (data.dataset).
    #[arg(long, value_parser = PossibleValuesParser::new(DatasetKind::NAMES))]
    pub dataset: Option<String>,
    /// Print progress lines instead of opening the dashboard (also when stdout is not a terminal).
    #[arg(long)]
    pub headless: bool,
    #[command(flatten)]
    pub colors: ColorArgs,
    /// Directory for this run (default: <run.dir>/<timestamp>).
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Number of epochs (train.epochs); without --budget, it also turns the time budget off.
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,
    /// Wall-clock budget for training and evaluations, e.g. 60m or 1h30m (train.budget;
    /// "" = none): the run measures its speed over the first steps and fits in it.
    #[arg(long, value_name = "DURATION")]
    pub budget: Option<String>,
    /// Stop after N steps in total (train.max_steps).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<usize>,
    /// Seed for initialisation, data order and augmentation (train.seed).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// CPU threads for the tensor work (train.threads; 0 = one per physical core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub warmup: usize,
    /// Timed training steps.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub steps: usize,
    /// CPU threads for the tensor work (train.threads; 0 = one per physical core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// A TOML string literal for `--set` values built from paths.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl TrainArgs {
    /// The named flags as `--set` entries, placed before the user's own `--set`s.
    pub(super) fn flag_sets(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(dir) = &self.data_dir {
            sets.push(format!(
                "data.dir={}",
                toml_string(&dir.display().to_string())
            ));
        }
        if let Some(d) = &self.dataset {
            sets.push(format!("data.dataset={}", toml_string(d)));
        }
        if let Some(n) = self.epochs {
            sets.push(format!("train.epochs={n}"));
            if self.budget.is_none() {
                sets.push("train.budget=\"\"".into());
            }
        }
        if let Some(b) = &self.budget {
            sets.push(format!("train.budget={}", toml_string(b)));
        }
        if let Some(n) = self.max_steps {
            sets.push(format!("train.max_steps={n}"));
        }
        if let Some(n) = self.seed {
            sets.push(format!("train.seed={n}"));
        }
        if let Some(n) = self.threads {
            sets.push(format!("train.threads={n}"));
        }
        sets.extend(self.colors.around(&self.config.set));
        sets
    }

    /// The flags' settings with `sets` in place of `--set`.
    pub(super) fn flag_sets_with(&self, sets: &[String]) -> Vec<String> {
        let mut args = self.clone();
        args.config.set = sets.to_vec();
        args.flag_sets()
    }
}

/// `--color` and `--no-color`, the same on every command that draws.
#[derive(Debug, Clone, Default, Args)]
pub struct ColorArgs {
    /// No colours in the dashboard: charts stay readable through their markers (also NO_COLOR).
    #[arg(long)]
    pub no_color: bool,
    /// Colours: auto (from NO_COLOR, COLORTERM, TERM), truecolor, 256 or none (ui.color).
    #[arg(long, value_name = "MODE", value_parser = PossibleValuesParser::new(ColorSetting::NAMES))]
    pub color: Option<String>,
}

impl ColorArgs {
    /// The user's `--set`s with `--color MODE` before them and `--no-color` after, so
    /// that a `--set ui.color=...` overrides `--color` and `--no-color` overrides both.
    pub(super) fn around(&self, sets: &[String]) -> Vec<String> {
        let mut all = Vec::with_capacity(sets.len() + 2);
        if let Some(mode) = &self.color {
            all.push(format!("ui.color={}", toml_string(mode)));
        }
        all.extend(sets.iter().cloned());
        if self.no_color {
            all.push("ui.color=\"none\"".into());
        }
        all
    }
}
