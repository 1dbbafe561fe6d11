//! The command line: `vitscope [train] ...` and `vitscope bench`.

pub mod bench;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::events::{Control, Event};
use crate::headless::HeadlessPrinter;
use crate::run::RunDir;
use crate::train::memory::Workload;
use crate::ui::app::{App, Mode};
use crate::ui::theme::{ColorMode, Theme};

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
    #[arg(value_name = "WHAT", value_parser = ["layernorm-gif", "attention", "features", "patches", "predictions", "curves"])]
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
    /// No colours: charts stay readable through their markers.
    #[arg(long)]
    pub no_color: bool,
    /// Colours: auto (from NO_COLOR, COLORTERM, TERM), truecolor, 256 or none (ui.color).
    #[arg(long, value_name = "MODE", value_parser = ["auto", "truecolor", "256", "none"])]
    pub color: Option<String>,
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
    #[arg(long, value_parser = ["cifar10", "synthetic"])]
    pub dataset: Option<String>,
    /// Print progress lines instead of opening the dashboard (also when stdout is not a terminal).
    #[arg(long)]
    pub headless: bool,
    /// No colours in the dashboard: charts stay readable through their markers (also NO_COLOR).
    #[arg(long)]
    pub no_color: bool,
    /// Colours: auto (from NO_COLOR, COLORTERM, TERM), truecolor, 256 or none (ui.color).
    #[arg(long, value_name = "MODE", value_parser = ["auto", "truecolor", "256", "none"])]
    pub color: Option<String>,
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
        if let Some(mode) = &self.color {
            sets.push(format!("ui.color=\"{mode}\""));
        }
        if self.no_color {
            sets.push("ui.color=\"none\"".into());
        }
        sets.extend(self.config.set.iter().cloned());
        sets
    }

    /// The flags' settings with `sets` in place of `--set`.
    fn flag_sets_with(&self, sets: &[String]) -> Vec<String> {
        let mut args = self.clone();
        args.config.set = sets.to_vec();
        args.flag_sets()
    }

    /// Resolves the configuration and the run directory (created, or opened to resume),
    /// refusing a configuration that will not fit in memory before anything is written.
    pub fn prepare_run(&self, workload: Workload) -> Result<(Config, RunDir, bool), String> {
        let sets = self.flag_sets();
        if let Some(path) = &self.resume {
            if self.config.config.is_some() {
                return Err("--config cannot be combined with --resume: the run keeps its own config.toml; change settings with --set".into());
            }
            let run = RunDir::open(path).map_err(|e| e.to_string())?;
            let file = run.file(crate::run::CONFIG_FILE);
            let config = Config::load_run(&file, &sets).map_err(|e| e.to_string())?;
            let trained = Config::load_run(&file, &[]).map_err(|e| e.to_string())?;
            if let Some((key, was, now)) = trained.model_change(&config) {
                return Err(format!(
                    "{key} = {now} cannot apply to {}: it trained with {key} = {was}, and \
                     the model's keys cannot change on resume (only model.matmul can)",
                    path.display()
                ));
            }
            crate::sys::set_threads(config.train.threads)?;
            fits_in_memory(&config, workload)?;
            // The trainer writes the config once the checkpoint has loaded into it: a
            // refused resume leaves the run as it was.
            return Ok((config, run, true));
        }
        let config =
            Config::load(self.config.config.as_deref(), &sets).map_err(|e| e.to_string())?;
        crate::sys::set_threads(config.train.threads)?;
        fits_in_memory(&config, workload)?;
        let run = RunDir::create(Path::new(&config.run.dir), self.run_dir.as_deref(), &config)
            .map_err(|e| e.to_string())?;
        Ok((config, run, false))
    }
}

/// The memory estimate of `config`, refused when more than the machine has available.
fn fits_in_memory(
    config: &Config,
    workload: Workload,
) -> Result<crate::train::memory::Estimate, String> {
    let threads = candle_core::utils::get_num_threads();
    crate::train::memory::check(
        config,
        workload,
        threads,
        crate::train::memory::available_bytes(),
    )
}

/// Runs training with plain-text progress; Ctrl-C stops cleanly with a checkpoint.
pub fn train_headless(args: &TrainArgs) -> Result<ExitCode, String> {
    let (config, run, resume) = args.prepare_run(Workload::Headless)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the event loop: {e}"))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(1024);
    let (handle, control) = crate::train::spawn(config.clone(), run.clone(), resume, Box::new(tx));
    let stdout = std::io::stdout();
    let is_terminal = stdout.is_terminal();
    let mut printer = HeadlessPrinter::new(
        stdout.lock(),
        Duration::from_secs_f64(config.run.print_every_secs),
        is_terminal,
    );
    runtime.block_on(async {
        let mut stopping = false;
        #[cfg(unix)]
        let (mut terminate, mut hangup) = {
            use tokio::signal::unix::{signal, SignalKind};
            (signal(SignalKind::terminate()).ok(), signal(SignalKind::hangup()).ok())
        };
        loop {
            #[cfg(unix)]
            let other_signal = async {
                tokio::select! {
                    Some(()) = async { terminate.as_mut()?.recv().await } => {},
                    Some(()) = async { hangup.as_mut()?.recv().await } => {},
                    else => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let other_signal = std::future::pending::<()>();
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
                () = other_signal, if !stopping => {
                    stopping = true;
                    printer.handle(&Event::Log("terminated: stopping after this step and writing a checkpoint".into()));
                    let _ = control.send(Control::Stop);
                }
            }
        }
    });
    drop(printer);
    let outcome = handle
        .join()
        .map_err(|_| "the trainer thread panicked".to_string())?;
    if !resume {
        run.discard_unstarted();
    }
    if let (Ok(_), Some(peak)) = (&outcome, crate::sys::peak_rss_bytes()) {
        let threads = candle_core::utils::get_num_threads();
        let estimate = crate::train::memory::estimate(&config, Workload::Headless, threads).total();
        println!(
            "peak memory (RSS): {:.0} MB (estimated before training: {:.0} MB)",
            peak as f64 / 1e6,
            estimate / 1e6
        );
    }
    outcome
        .map(|_| ExitCode::SUCCESS)
        .map_err(|e| e.to_string())
}

/// The theme, and why it has its colour mode.
fn theme_for(config: &Config) -> (Theme, String) {
    let (mode, why) = ColorMode::detect(&config.ui.color, |name| std::env::var(name).ok());
    (Theme::new(mode, &config.ui.markers), why)
}

fn run_name(run: &RunDir) -> String {
    run.path().file_name().map_or_else(
        || run.path().display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Trains with the dashboard on screen; the trainer runs on its own thread.
pub fn train_dashboard(args: &TrainArgs) -> Result<ExitCode, String> {
    let (config, run, resume) = args.prepare_run(Workload::Dashboard)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(1024);
    let (handle, control) = crate::train::spawn(config.clone(), run.clone(), resume, Box::new(tx));
    let (theme, why) = theme_for(&config);
    let mut app = App::new(Mode::Live, theme, run_name(&run), &config);
    app.color_note = why;
    let shown = crate::ui::run(app, rx, Some(control.clone()), &config.ui);
    // However the dashboard ended, the trainer stops cleanly (checkpoint) before we exit.
    let _ = control.send(Control::Stop);
    let outcome = handle
        .join()
        .map_err(|_| "the trainer thread panicked".to_string())?;
    let discarded = !resume && run.discard_unstarted();
    let (_, stats) = shown.map_err(|e| format!("terminal error: {e}"))?;
    eprintln!("{}", stats.summary());
    if !discarded {
        println!("run directory: {}", run.path().display());
    }
    outcome
        .map(|_| ExitCode::SUCCESS)
        .map_err(|e| e.to_string())
}

/// One run's dashboard, or several runs compared.
pub fn view(args: &ViewArgs) -> Result<ExitCode, String> {
    match args.runs.as_slice() {
        [one] if crate::run::compare::is_run(one) || !one.is_dir() => view_run(one, args),
        paths => view_runs(paths, args),
    }
}

/// The runs screen; Enter opens a run's dashboard and quitting it comes back. Without
/// a terminal, a line per run.
fn view_runs(paths: &[PathBuf], args: &ViewArgs) -> Result<ExitCode, String> {
    let opened = std::time::Instant::now();
    let mut comparison = crate::run::compare::Comparison::open(paths)?;
    let open_secs = opened.elapsed().as_secs_f64();
    if !std::io::stdout().is_terminal() {
        for (run, label) in comparison.runs.iter().zip(comparison.labels()) {
            let best = run.best().map_or("-".to_string(), |e| {
                format!("best {:.2}% (epoch {})", e.accuracy * 100.0, e.epoch)
            });
            println!(
                "{label}  {}  step {}  {best}  {}",
                run.state.label(),
                run.last_step(),
                run.dir.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut sets = args.set.clone();
    if let Some(mode) = &args.color {
        sets.insert(0, format!("ui.color=\"{mode}\""));
    }
    if args.no_color {
        sets.push("ui.color=\"none\"".into());
    }
    let config = Config::load(None, &sets).map_err(|e| e.to_string())?;
    let mut view = crate::ui::tabs::runs::RunsView::new(theme_for(&config).0);
    let mut stats = crate::ui::DashboardStats::default();
    loop {
        match crate::ui::tabs::runs::run_screen(&mut comparison, &mut view, &mut stats) {
            Ok(Some(i)) => {
                let dir = comparison.runs[i].dir.clone();
                view_run(&dir, args)?;
            }
            Ok(None) => {
                let mut sorted = stats.render_ms.clone();
                sorted.sort_by(f64::total_cmp);
                eprintln!(
                    "runs screen: {} runs ({} training records) read in {:.0} ms; {} frames, render median {:.2} ms, worst {:.2} ms",
                    comparison.runs.len(),
                    comparison.runs.iter().map(|r| r.train.len()).sum::<usize>(),
                    open_secs * 1e3,
                    stats.frames,
                    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
                    sorted.last().copied().unwrap_or(0.0)
                );
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => return Err(format!("terminal error: {e}")),
        }
    }
}

/// The dashboard over a run directory, or its progress lines when not on a terminal.
fn view_run(path: &Path, args: &ViewArgs) -> Result<ExitCode, String> {
    let run = RunDir::open(path).map_err(|e| e.to_string())?;
    let mut sets = args.set.clone();
    if let Some(mode) = &args.color {
        sets.insert(0, format!("ui.color=\"{mode}\""));
    }
    if args.no_color {
        sets.push("ui.color=\"none\"".into());
    }
    let config =
        Config::load_run(&run.file(crate::run::CONFIG_FILE), &sets).map_err(|e| e.to_string())?;
    if !std::io::stdout().is_terminal() {
        let mut follower = crate::run::follow::Follower::new(run);
        let mut events = follower.start().map_err(|e| e.to_string())?;
        events.extend(follower.poll());
        // About a hundred training lines however long the run, plus the last one.
        let last_step = events.iter().rev().find_map(|e| match e {
            Event::Train(r) => Some(r.step),
            _ => None,
        });
        let every = last_step.map_or(1, |s| (s / 100).max(1));
        let mut printer = HeadlessPrinter::new(std::io::stdout().lock(), Duration::ZERO, false);
        for event in &events {
            if let Event::Train(r) = event {
                if r.step % every != 0 && Some(r.step) != last_step {
                    continue;
                }
            }
            printer.handle(event);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(1024);
    let name = run_name(&run);
    crate::run::follow::spawn(run, tx, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    let (theme, why) = theme_for(&config);
    let mut app = App::new(Mode::View, theme, name, &config);
    app.color_note = why;
    let (_, stats) =
        crate::ui::run(app, rx, None, &config.ui).map_err(|e| format!("terminal error: {e}"))?;
    eprintln!("{}", stats.summary());
    Ok(ExitCode::SUCCESS)
}

/// Trains the sweep's combinations in turn; stops (to be continued) when one is stopped.
pub fn sweep(args: &SweepArgs) -> Result<ExitCode, String> {
    let base = &args.train;
    if base.resume.is_some() {
        return Err(
            "--resume does not apply to a sweep: run the same sweep again to continue it".into(),
        );
    }
    let (axes, fixed) = crate::run::sweep::axes(&base.config.set)?;
    if axes.is_empty() {
        return Err("nothing to sweep: give at least one --set KEY=A,B,…".into());
    }
    let folder = match &base.run_dir {
        Some(dir) => dir.clone(),
        None => {
            let config = Config::load(base.config.config.as_deref(), &base.flag_sets_with(&fixed))
                .map_err(|e| e.to_string())?;
            Path::new(&config.run.dir).join("sweep")
        }
    };
    let combos = crate::run::sweep::combinations(&axes);
    // Every combination's configuration is checked before anything trains.
    let runs: Vec<(String, TrainArgs)> = combos
        .iter()
        .map(|combo| {
            let mut sets = fixed.clone();
            sets.extend(combo.iter().map(|(k, v)| format!("{k}={v}")));
            let name = crate::run::sweep::run_name(combo);
            let mut run = base.clone();
            run.config.set = sets;
            run.headless = true;
            run.run_dir = Some(folder.join(&name));
            Config::load(run.config.config.as_deref(), &run.flag_sets())
                .map_err(|e| format!("{name}: {e}"))?;
            Ok((name, run))
        })
        .collect::<Result<_, String>>()?;
    std::fs::create_dir_all(&folder)
        .map_err(|e| format!("{}: cannot create: {e}", folder.display()))?;
    for (i, (name, mut run)) in runs.into_iter().enumerate() {
        let dir = folder.join(&name);
        let head = format!("sweep {}/{}: {name}", i + 1, combos.len());
        if crate::run::sweep::is_finished(&dir) {
            println!("{head}: finished before, skipped");
            continue;
        }
        if dir.join(crate::run::CONFIG_FILE).exists() {
            println!("{head}: resuming {}", dir.display());
            run.resume = Some(dir.clone());
            run.run_dir = None;
            run.config.config = None;
        } else {
            println!("{head}: {}", dir.display());
        }
        train_headless(&run)?;
        if !crate::run::sweep::is_finished(&dir) {
            println!("sweep stopped during {name}; run the same command again to continue");
            return Ok(ExitCode::SUCCESS);
        }
    }
    println!(
        "sweep done: {} runs in {f} (`vitscope view {f}` compares them)",
        combos.len(),
        f = folder.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the pictures and lists them with their sizes.
pub fn export(args: &ExportArgs) -> Result<ExitCode, String> {
    let whats = args
        .what
        .iter()
        .map(|w| crate::export::What::parse(w))
        .collect::<Result<Vec<_>, _>>()?;
    let out = args.out.clone().unwrap_or_else(|| {
        let name = args
            .run_dir
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy().into_owned());
        PathBuf::from(format!("{name}-export"))
    });
    let choice = crate::export::Choice {
        step: args.step,
        image: args.image,
        layer: args.layer,
        head: args.head,
    };
    let t = std::time::Instant::now();
    let written = crate::export::export(&args.run_dir, &out, &whats, &choice)?;
    let total: usize = written.iter().map(|w| w.bytes).sum();
    for w in &written {
        println!("{:>9} bytes  {}  ({})", w.bytes, w.path.display(), w.what);
    }
    println!(
        "{} files, {:.2} MB, in {:.2} s",
        written.len(),
        total as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn bench(args: &BenchArgs) -> Result<ExitCode, String> {
    let mut sets = args.config.set.clone();
    if let Some(n) = args.threads {
        sets.insert(0, format!("train.threads={n}"));
    }
    let config = Config::load(args.config.config.as_deref(), &sets).map_err(|e| e.to_string())?;
    crate::sys::set_threads(config.train.threads)?;
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let estimate = fits_in_memory(&config, Workload::Bench)?;
    let report = crate::cli::bench::run(&config, args.warmup, args.steps, estimate.total())
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

/// Help and version as clap prints them; a usage error as its first line and a pointer
/// to --help (clap adds the whole usage to some), with clap's exit status 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.use_stderr() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("error");
    eprintln!("{first}");
    eprintln!("For more information, try '--help'.");
    ExitCode::from(2)
}

/// The binary's entry point: parse, run, and turn any error into one line on stderr.
pub fn main() -> ExitCode {
    crate::sys::tune_allocator();
    // Panics still restore the terminal and print a readable report.
    let _ = color_eyre::install();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    if let Err(message) = crate::ops::cpu::cap_from_env() {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    let train = |args: &TrainArgs| {
        if args.headless || !std::io::stdout().is_terminal() {
            train_headless(args)
        } else {
            train_dashboard(args)
        }
    };
    let result = match &cli.command {
        Some(Command::Bench(args)) => bench(args),
        Some(Command::View(args)) => view(args),
        Some(Command::Export(args)) => export(args),
        Some(Command::Sweep(args)) => sweep(args),
        Some(Command::Train(args)) => train(args),
        None => train(&cli.train),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
