//! `vitscope export`: a run's pictures written as files, listed with their sizes.

use color_eyre::eyre::Result;
use std::path::PathBuf;
use std::process::ExitCode;

use super::args::ExportArgs;

/// Writes the pictures and lists them with their sizes.
pub fn export(args: &ExportArgs) -> Result<ExitCode> {
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
