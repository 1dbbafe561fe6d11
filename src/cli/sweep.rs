//! `vitscope sweep`: every combination of the `--set KEY=A,B` axes trained headless in
//! turn, each checked before anything trains, finished ones skipped on a rerun.

use color_eyre::eyre::{bail, eyre, Result};
use std::path::Path;
use std::process::ExitCode;

use super::args::{SweepArgs, TrainArgs};
use super::train::train_headless;
use crate::config::Config;

/// Trains the sweep's combinations in turn; stops (to be continued) when one is stopped.
pub fn sweep(args: &SweepArgs) -> Result<ExitCode> {
    let base = &args.train;
    if base.resume.is_some() {
        bail!("--resume does not apply to a sweep: run the same sweep again to continue it");
    }
    let (axes, fixed) = crate::run::sweep::axes(&base.config.set).map_err(|e| eyre!(e))?;
    if axes.is_empty() {
        bail!("nothing to sweep: give at least one --set KEY=A,B,…");
    }
    let folder = match &base.run_dir {
        Some(dir) => dir.clone(),
        None => {
            let config = Config::load(base.config.config.as_deref(), &base.flag_sets_with(&fixed))?;
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
                .map_err(|e| eyre!("{name}: {e}"))?;
            Ok((name, run))
        })
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(&folder)
        .map_err(|e| eyre!("{}: cannot create: {e}", folder.display()))?;
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
