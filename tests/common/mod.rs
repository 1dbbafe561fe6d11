//! Helpers shared by the integration tests: a tiny model on the synthetic data.

#![allow(dead_code)]

use vitscope::config::Config;

/// A small, fast configuration on the synthetic data set.
pub fn tiny_sets() -> Vec<String> {
    [
        "data.dataset=synthetic",
        "data.synthetic_train_size=640",
        "data.synthetic_test_size=200",
        "model.patch_size=8",
        "model.dim=32",
        "model.depth=2",
        "model.heads=2",
        "model.mlp_dim=64",
        "train.batch_size=32",
        "train.warmup_steps=20",
        "train.budget=\"\"",
        "train.eval_batch_size=100",
        "probe.every_steps=10",
        "probe.images=2",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

pub fn tiny_config(extra: &[&str]) -> Config {
    let mut sets = tiny_sets();
    sets.extend(extra.iter().map(|s| (*s).to_string()));
    Config::from_sources(None, &sets).unwrap()
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The dashboard drawn at `w` x `h`, as text.
pub fn screen(app: &vitscope::ui::app::App, w: u16, h: u16) -> String {
    let mut terminal = ratatui::Terminal::new(ratatui::backend::TestBackend::new(w, h)).unwrap();
    terminal.draw(|f| f.render_widget(app, f.area())).unwrap();
    text_of(terminal.backend().buffer())
}

/// A buffer's symbols, a line per row.
pub fn text_of(buf: &ratatui::buffer::Buffer) -> String {
    let mut out = String::new();
    for y in 0..buf.area.height {
        for x in 0..buf.area.width {
            out.push_str(buf[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}
