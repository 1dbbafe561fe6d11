//! `vitscope train`: resolve the configuration and the run directory, then train with
//! the dashboard on screen or headless (plain lines, signals stop after a checkpoint).

use color_eyre::eyre::{bail, eyre, Result};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::args::TrainArgs;
use crate::config::Config;
use crate::events::{Control, Event};
use crate::headless::HeadlessPrinter;
use crate::run::RunDir;
use crate::train::memory::Workload;
use crate::ui::app::{App, Mode};
use crate::ui::theme::{ColorMode, Theme};

impl TrainArgs {
    /// Resolves the configuration and the run directory (created, or opened to resume),
    /// refusing a configuration that will not fit in memory before anything is written.
    pub fn prepare_run(&self, workload: Workload) -> Result<(Config, RunDir, bool)> {
        let sets = self.flag_sets();
        if let Some(path) = &self.resume {
            if self.config.config.is_some() {
                bail!("--config cannot be combined with --resume: the run keeps its own config.toml; change settings with --set");
            }
            let run = RunDir::open(path)?;
            let file = run.file(crate::run::CONFIG_FILE);
            let config = Config::load_run(&file, &sets)?;
            let trained = Config::load_run(&file, &[])?;
            if let Some((key, was, now)) = trained.model_change(&config) {
                return Err(eyre!(
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
        let config = Config::load(self.config.config.as_deref(), &sets)?;
        crate::sys::set_threads(config.train.threads)?;
        fits_in_memory(&config, workload)?;
        let run = RunDir::create(Path::new(&config.run.dir), self.run_dir.as_deref(), &config)?;
        Ok((config, run, false))
    }
}

/// The memory estimate of `config`, refused when more than the machine has available.
pub(super) fn fits_in_memory(
    config: &Config,
    workload: Workload,
) -> Result<crate::train::memory::Estimate> {
    let threads = candle_core::utils::get_num_threads();
    Ok(crate::train::memory::check(
        config,
        workload,
        threads,
        crate::train::memory::available_bytes(),
    )?)
}

/// Runs training with plain-text progress; Ctrl-C stops cleanly with a checkpoint.
pub fn train_headless(args: &TrainArgs) -> Result<ExitCode> {
    let (config, run, resume) = args.prepare_run(Workload::Headless)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eyre!("cannot start the event loop: {e}"))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(1024);
    let (handle, control) = crate::train::spawn(
        config.clone(),
        run.clone(),
        resume,
        Box::new(tx),
        crate::train::Halt::Stop,
    );
    let stdout = std::io::stdout();
    let is_terminal = stdout.is_terminal();
    let mut printer = HeadlessPrinter::new(
        stdout.lock(),
        Duration::from_secs_f64(config.run.print_every_secs),
        is_terminal,
    );
    runtime.block_on(async {
        let mut stopping = false;
        let mut signals = crate::sys::StopSignals::listen();
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
                () = signals.recv(), if !stopping => {
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
        .map_err(|_| eyre!("the trainer thread panicked"))?;
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
    outcome?;
    Ok(ExitCode::SUCCESS)
}

/// The theme, and why it has its colour mode.
pub(super) fn theme_for(config: &Config) -> (Theme, String) {
    let (mode, why) = ColorMode::detect(config.ui.color, |name| std::env::var(name).ok());
    (Theme::new(mode, config.ui.markers), why)
}

pub(super) fn run_name(run: &RunDir) -> String {
    run.path().file_name().map_or_else(
        || run.path().display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Trains with the dashboard on screen; the trainer runs on its own thread.
pub fn train_dashboard(args: &TrainArgs) -> Result<ExitCode> {
    let (config, run, resume) = args.prepare_run(Workload::Dashboard)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(1024);
    let (handle, control) = crate::train::spawn(
        config.clone(),
        run.clone(),
        resume,
        Box::new(tx),
        crate::train::Halt::Pause,
    );
    let (theme, why) = theme_for(&config);
    let mut app = App::new(Mode::Live, theme, run_name(&run), &config);
    app.color_note = why;
    let shown = crate::ui::run(app, rx, Some(control.clone()), &config.ui);
    // However the dashboard ended, the trainer stops cleanly (checkpoint) before we exit.
    let _ = control.send(Control::Stop);
    let outcome = handle
        .join()
        .map_err(|_| eyre!("the trainer thread panicked"))?;
    let discarded = !resume && run.discard_unstarted();
    let (_, stats) = shown.map_err(|e| eyre!("terminal error: {e}"))?;
    eprintln!("{}", stats.summary());
    if !discarded {
        println!("run directory: {}", run.path().display());
    }
    outcome?;
    Ok(ExitCode::SUCCESS)
}
