//! `vitscope export`: real-resolution pictures of what the tabs show, rendered from a
//! run directory's files (never from the terminal): PNG for stills, an animated GIF
//! for the LayerNorm distributions over training, and an index.html with captions.
//! Nothing is written into the run directory unless `--out` points there.

pub mod canvas;
pub mod layernorm;
pub mod pictures;
mod request;

pub use request::{Choice, ExportError, Picture, Source, What, Written};

use std::path::Path;

/// The pictures of `what`.
pub fn render(source: &Source, what: What, choice: &Choice) -> Result<Vec<Picture>, ExportError> {
    match what {
        What::LayerNormGif => layernorm::gif(source, choice).map(|p| vec![p]),
        What::Attention => pictures::attention(source, choice),
        What::Features => pictures::features(source, choice),
        What::Patches => pictures::patches(source, choice),
        What::Predictions => pictures::predictions(source),
        What::Curves => pictures::curves(source).map(|p| vec![p]),
        What::Layers => pictures::layers(source, choice.step),
    }
}

/// Renders `whats` (all when empty) from the run at `run_dir` into `out` (created);
/// with all of them, also an index.html. Returns the files written.
pub fn export(
    run_dir: &Path,
    out: &Path,
    whats: &[What],
    choice: &Choice,
) -> Result<Vec<Written>, ExportError> {
    let source = Source::open(run_dir)?;
    let all = whats.is_empty();
    let whats: Vec<What> = if all {
        What::ALL.to_vec()
    } else {
        whats.to_vec()
    };
    let mut pictures = Vec::new();
    for what in whats {
        // Runs recorded before the per-layer records existed still export the rest.
        if all && what == What::Layers && source.layers.is_empty() {
            continue;
        }
        pictures.extend(render(&source, what, choice)?);
    }
    std::fs::create_dir_all(out).map_err(|e| ExportError::Create {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut written = Vec::new();
    for p in &pictures {
        let path = out.join(&p.file);
        crate::run::write_atomic(&path, &p.bytes)?;
        written.push(Written {
            path,
            bytes: p.bytes.len(),
            what: p.describe(),
        });
    }
    if all {
        let html = index_html(&source, &pictures);
        let path = out.join("index.html");
        crate::run::write_atomic(&path, html.as_bytes())?;
        written.push(Written {
            path,
            bytes: html.len(),
            what: "HTML".into(),
        });
    }
    Ok(written)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn index_html(source: &Source, pictures: &[Picture]) -> String {
    let name = source
        .run
        .path()
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let best = source
        .evals
        .iter()
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy))
        .map_or(String::new(), |e| {
            format!(
                " · best test accuracy {:.2}% (epoch {})",
                e.accuracy * 100.0,
                e.epoch
            )
        });
    let m = &source.config.model;
    let mut html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>vitscope · {n}</title>\n\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}figure{{margin:2em 0}}\
         img{{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}}figcaption{{color:#444}}</style>\n\
         </head><body>\n<h1>vitscope · {n}</h1>\n<p>ViT patch {p}, dim {d}, depth {l}, {h} heads, MLP {mlp} on {ds}{best}.</p>\n",
        n = escape(&name),
        p = m.patch_size,
        d = m.dim,
        l = m.depth,
        h = m.heads,
        mlp = m.mlp_dim,
        ds = source.config.data.dataset.name(),
    );
    for p in pictures {
        html.push_str(&format!(
            "<figure><img src=\"{}\" width=\"{}\" alt=\"{}\"><figcaption>{} <small>({}, {})</small></figcaption></figure>\n",
            escape(&p.file),
            p.width,
            escape(&p.caption),
            escape(&p.caption),
            escape(&p.file),
            p.describe()
        ));
    }
    html.push_str("</body></html>\n");
    html
}
