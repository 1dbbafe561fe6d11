//! The command line: `vitscope [train] ...`, `view`, `sweep`, `export` and `bench`.
//! The flags' definitions are `args.rs`; each command's body has its own file; here
//! only the entry point that parses, dispatches and turns an error into one line.

mod args;
pub mod bench;
mod export;
mod sweep;
mod train;
mod view;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

pub use args::{
    BenchArgs, Cli, ColorArgs, Command, ConfigArgs, ExportArgs, SweepArgs, TrainArgs, ViewArgs,
};

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
            train::train_headless(args)
        } else {
            train::train_dashboard(args)
        }
    };
    let result = match &cli.command {
        Some(Command::Bench(args)) => bench::command(args),
        Some(Command::View(args)) => view::view(args),
        Some(Command::Export(args)) => export::export(args),
        Some(Command::Sweep(args)) => sweep::sweep(args),
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
