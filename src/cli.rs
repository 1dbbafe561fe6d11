//! The command line: `vitscope [train] ...` and `vitscope bench`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::events::{Control, Event};
use crate::headless::HeadlessPrinter;
use crate::run::RunDir;

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
    #[arg(long, value_parser = ["cifar10", "synthetic"])]
    pub dataset: Option<String>,
    /// Print progress lines instead of opening the dashboard.
    #[arg(long)]
    pub headless: bool,
    /// Directory for this run (default: <run.dir>/<timestamp>).
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Number of epochs (train.epochs).
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,
    /// Stop after N steps in total (train.max_steps).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<usize>,
    /// Seed for initialisation, data order and augmentation (train.seed).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
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
}

/// A TOML string literal for `--set` values built from paths.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl TrainArgs {
    /// The named flags as `--set` entries, placed before the user's own `--set`s.
    fn flag_sets(&self) -> Vec<String> {
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
        }
        if let Some(n) = self.max_steps {
            sets.push(format!("train.max_steps={n}"));
        }
        if let Some(n) = self.seed {
            sets.push(format!("train.seed={n}"));
        }
        sets.extend(self.config.set.iter().cloned());
        sets
    }

    /// Resolves the configuration and the run directory (created, or opened to resume).
    pub fn prepare_run(&self) -> Result<(Config, RunDir, bool), String> {
        let sets = self.flag_sets();
        if let Some(path) = &self.resume {
            if self.config.config.is_some() {
                return Err("--config cannot be combined with --resume: the run keeps its own config.toml; change settings with --set".into());
            }
            let run = RunDir::open(path).map_err(|e| e.to_string())?;
            let config = Config::load(Some(&run.file(crate::run::CONFIG_FILE)), &sets)
                .map_err(|e| e.to_string())?;
            run.write_config(&config).map_err(|e| e.to_string())?;
            return Ok((config, run, true));
        }
        let config =
            Config::load(self.config.config.as_deref(), &sets).map_err(|e| e.to_string())?;
        let run = RunDir::create(Path::new(&config.run.dir), self.run_dir.as_deref(), &config)
            .map_err(|e| e.to_string())?;
        Ok((config, run, false))
    }
}

/// Runs training with plain-text progress; Ctrl-C stops cleanly with a checkpoint.
pub fn train_headless(args: &TrainArgs) -> Result<ExitCode, String> {
    let (config, run, resume) = args.prepare_run()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the event loop: {e}"))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(1024);
    let (handle, control) = crate::train::spawn(config.clone(), run, resume, Box::new(tx));
    let stdout = std::io::stdout();
    let is_terminal = stdout.is_terminal();
    let mut printer = HeadlessPrinter::new(
        stdout.lock(),
        Duration::from_secs_f64(config.run.print_every_secs),
        is_terminal,
    );
    runtime.block_on(async {
        let mut stopping = false;
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => printer.handle(&event),
                    None => break,
                },
                _ = tokio::signal::ctrl_c(), if !stopping => {
                    stopping = true;
                    printer.handle(&Event::Log("interrupted: stopping after this step and writing a checkpoint".into()));
                    let _ = control.send(Control::Stop);
                }
            }
        }
    });
    drop(printer);
    let outcome = handle
        .join()
        .map_err(|_| "the trainer thread panicked".to_string())?;
    if let Some(peak) = crate::sys::peak_rss_bytes() {
        println!("peak memory (RSS): {:.0} MB", peak as f64 / 1e6);
    }
    outcome
        .map(|_| ExitCode::SUCCESS)
        .map_err(|e| e.to_string())
}

pub fn bench(args: &BenchArgs) -> Result<ExitCode, String> {
    let config =
        Config::load(args.config.config.as_deref(), &args.config.set).map_err(|e| e.to_string())?;
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let report = crate::bench::run(&config, args.warmup, args.steps)
        .map_err(|e| format!("benchmark failed: {e}"))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        println!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// The binary's entry point: parse, run, and turn any error into one line on stderr.
pub fn main() -> ExitCode {
    crate::sys::tune_allocator();
    // Panics still restore the terminal and print a readable report.
    let _ = color_eyre::install();
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Bench(args)) => bench(args),
        Some(Command::Train(args)) => train_headless(args),
        None => train_headless(&cli.train),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
