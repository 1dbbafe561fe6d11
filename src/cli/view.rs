//! `vitscope view`: one run's dashboard (following it while it trains), or the runs
//! screen over many; without a terminal, their progress as plain lines.

use color_eyre::eyre::{eyre, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::args::ViewArgs;
use super::train::{run_name, theme_for};
use crate::config::Config;
use crate::events::Event;
use crate::headless::HeadlessPrinter;
use crate::run::RunDir;
use crate::ui::app::{App, Mode};

/// One run's dashboard, or several runs compared.
pub fn view(args: &ViewArgs) -> Result<ExitCode> {
    match args.runs.as_slice() {
        [one] if crate::run::compare::is_run(one) || !one.is_dir() => view_run(one, args),
        paths => view_runs(paths, args),
    }
}

/// The runs screen; Enter opens a run's dashboard and quitting it comes back. Without
/// a terminal, a line per run.
fn view_runs(paths: &[PathBuf], args: &ViewArgs) -> Result<ExitCode> {
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
    let sets = args.colors.around(&args.set);
    let config = Config::load(None, &sets)?;
    let mut view = crate::ui::tabs::runs::RunsView::new(theme_for(&config).0);
    let mut stats = crate::ui::DashboardStats::default();
    loop {
        match crate::ui::tabs::runs::run_screen(&mut comparison, &mut view, &mut stats) {
            Ok(Some(i)) => {
                let dir = comparison.runs[i].dir.clone();
                view_run(&dir, args)?;
            }
            Ok(None) => {
                let (median, worst) = stats.render_median_worst_ms();
                eprintln!(
                    "runs screen: {} runs ({} training records) read in {:.0} ms; {} frames, render median {:.2} ms, worst {:.2} ms",
                    comparison.runs.len(),
                    comparison.runs.iter().map(|r| r.train.len()).sum::<usize>(),
                    open_secs * 1e3,
                    stats.frames,
                    median,
                    worst
                );
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => return Err(eyre!("terminal error: {e}")),
        }
    }
}

/// The dashboard over a run directory, or its progress lines when not on a terminal.
fn view_run(path: &Path, args: &ViewArgs) -> Result<ExitCode> {
    let run = RunDir::open(path)?;
    let sets = args.colors.around(&args.set);
    let config = Config::load_run(&run.file(crate::run::CONFIG_FILE), &sets)?;
    if !std::io::stdout().is_terminal() {
        let mut follower = crate::run::follow::Follower::new(run);
        let mut events = follower.start()?;
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
    crate::run::follow::spawn(run, tx, Duration::from_secs(1))?;
    let (theme, why) = theme_for(&config);
    let mut app = App::new(Mode::View, theme, name, &config);
    app.color_note = why;
    let (_, stats) =
        crate::ui::run(app, rx, None, &config.ui).map_err(|e| eyre!("terminal error: {e}"))?;
    eprintln!("{}", stats.summary());
    Ok(ExitCode::SUCCESS)
}
