//! The runs screen's compare mode: two runs side by side at the latest probe step both
//! have: every norm place's output distribution, every layer's and head's attention
//! map, and both runs' per-layer quantities (gradient norm, update ratio, residual
//! RMS, probe and lens accuracy by depth) in one table.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Widget};

use super::layernorm::{bar_rows, resample, short_name};
use crate::inspect::attention::Scale;
use crate::inspect::layers::{depth_rows, LayerMap, Quantity};
use crate::inspect::probe::ProbeSnapshot;
use crate::run::compare::Comparison;
use crate::run::RunDir;
use crate::ui::theme::Theme;
use crate::ui::widgets::heat_grid::draw_layer_head_grid;

/// Two runs' probes at the same step, for the compare mode.
pub struct Pair {
    pub runs: [usize; 2],
    /// The step shown, and whether both runs have a probe there.
    pub step: u64,
    pub common: bool,
    pub probes: [Option<ProbeSnapshot>; 2],
}

/// Two runs, at the latest probe step both have (or each one's latest when they share
/// none).
pub fn load_pair(c: &Comparison, runs: [usize; 2]) -> Option<Pair> {
    if runs.iter().any(|&i| i >= c.runs.len()) || runs[0] == runs[1] {
        return None;
    }
    let files = runs.map(|i| {
        RunDir::open(&c.runs[i].dir)
            .map(|r| {
                r.probe_files()
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    });
    let common = files[0]
        .iter()
        .rev()
        .find(|s| files[1].contains(s))
        .copied();
    let steps = match common {
        Some(s) => [Some(s), Some(s)],
        None => [files[0].last().copied(), files[1].last().copied()],
    };
    let probes = [0, 1].map(|k| {
        let step = steps[k]?;
        RunDir::open(&c.runs[runs[k]].dir)
            .ok()?
            .read_probe(step)
            .ok()
    });
    Some(Pair {
        runs,
        step: steps[0].or(steps[1]).unwrap_or(0),
        common: common.is_some(),
        probes,
    })
}

/// A histogram's middle half as one row of eighth blocks, `width` wide (the
/// LayerNorm tab's overview draws the whole axis the same way).
fn sparkline(counts: &[u32], width: usize) -> String {
    let (lo, hi) = (counts.len() / 4, counts.len() - counts.len() / 4);
    let middle: Vec<f64> = counts[lo..hi.max(lo)]
        .iter()
        .map(|&c| f64::from(c))
        .collect();
    bar_rows(&resample(&middle, width), 1)
        .pop()
        .unwrap_or_default()
}

fn render_side(labels: &[String], t: &Theme, pair: &Pair, k: usize, area: Rect, buf: &mut Buffer) {
    let run = pair.runs[k];
    let label = labels.get(run).cloned().unwrap_or_default();
    let block = Block::default().borders(Borders::ALL).title(Span::styled(
        format!(" {} {label} ", t.run_marker(run).1),
        t.run_style(run),
    ));
    let inner = block.inner(area);
    block.render(area, buf);
    let Some(probe) = &pair.probes[k] else {
        Paragraph::new(Line::styled("no probe recorded yet", t.dim())).render(inner, buf);
        return;
    };
    let m = &probe.meta;
    let places = m.layer_norms.len() as u16;
    let [ln_area, attn_area] =
        Layout::vertical([Constraint::Length(places + 2), Constraint::Fill(1)]).areas(inner);
    // Name (11) and the two σ (22) first: the sparkline takes what is left.
    let spark_w = (ln_area.width as usize).saturating_sub(33).clamp(4, 48);
    let mut lines = vec![Line::styled(
        format!(
            "step {} (epoch {}), norm outputs (middle half of the axis)",
            m.step, m.epoch
        ),
        t.dim(),
    )];
    for ln in &m.layer_norms {
        lines.push(Line::from(vec![
            Span::styled(format!("{:<10} ", short_name(&ln.name)), t.dim()),
            Span::styled(sparkline(&ln.output.histogram.counts, spark_w), t.gauge()),
            Span::raw(format!(
                "  in σ {:>4.2} out σ {:>4.2}",
                ln.input.stats.std, ln.output.stats.std
            )),
        ]));
    }
    Paragraph::new(lines).render(ln_area, buf);
    if probe.attention.is_empty() || m.images == 0 || attn_area.height < 3 {
        return;
    }
    Paragraph::new(Line::styled(
        "attention, image 0: layers (rows) x heads (columns)",
        t.dim(),
    ))
    .render(attn_area, buf);
    let grid = Rect::new(
        attn_area.x,
        attn_area.y + 1,
        attn_area.width,
        attn_area.height - 1,
    );
    draw_layer_head_grid(t, probe, 0, (Scale::MapMax, None), grid, buf);
}

pub fn render_pair(
    c: &Comparison,
    labels: &[String],
    t: &Theme,
    pair: Option<&Pair>,
    area: Rect,
    buf: &mut Buffer,
) {
    let Some(pair) = pair else {
        Paragraph::new(Line::styled("compare needs two runs", t.dim()))
            .block(Block::default().borders(Borders::ALL))
            .render(area, buf);
        return;
    };
    let [note, sides] = Layout::vertical([Constraint::Length(1), Constraint::Fill(1)]).areas(area);
    let text = if pair.common {
        format!(
            " side by side at step {} (the latest probe both have); c: back to the curves",
            pair.step
        )
    } else {
        " no probe step in common: each run's latest; c: back to the curves".to_string()
    };
    Paragraph::new(Line::styled(text, t.accent())).render(note, buf);
    let depth_rows = c.runs[pair.runs[0]]
        .layers
        .scale
        .last()
        .map_or(0, |s| s.residual_rms.len() as u16 + 1);
    let [sides, by_depth] = Layout::vertical([
        Constraint::Fill(1),
        Constraint::Length(if depth_rows > 0 { depth_rows + 3 } else { 0 }),
    ])
    .areas(sides);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(sides);
    render_side(labels, t, pair, 0, left, buf);
    render_side(labels, t, pair, 1, right, buf);
    if depth_rows > 0 {
        render_depth(c, labels, t, pair, by_depth, buf);
    }
}

/// The two runs' per-layer quantities side by side at the pair's step: gradient norm,
/// update ratio, residual RMS, probe and lens accuracy, each from the run's record of
/// that kind at or before the step.
fn render_depth(
    c: &Comparison,
    labels: &[String],
    t: &Theme,
    pair: &Pair,
    area: Rect,
    buf: &mut Buffer,
) {
    let maps: Vec<Vec<LayerMap>> = pair
        .runs
        .iter()
        .map(|&i| {
            Quantity::ALL
                .iter()
                .map(|q| q.map(&c.runs[i].layers))
                .collect()
        })
        .collect();
    let marks = pair.runs.map(|i| t.run_marker(i).1);
    let rows = depth_rows(maps.iter().flatten());
    let mut header = vec![Span::styled(format!("{:>9} ", "layer"), t.dim())];
    for q in Quantity::ALL {
        let h = q.short();
        for (k, mark) in marks.iter().enumerate() {
            header.push(Span::styled(
                format!("{:>11}", format!("{h} {mark}")),
                t.run_style(pair.runs[k]),
            ));
        }
        header.push(Span::raw("  "));
    }
    let mut lines = vec![Line::from(header)];
    for row in &rows {
        let mut spans = vec![Span::styled(format!("{row:>9} "), t.dim())];
        for q in 0..Quantity::ALL.len() {
            for (k, run_maps) in maps.iter().enumerate() {
                let map = &run_maps[q];
                let value = map.value_at(Some(pair.step), row);
                let text = value.map_or("·".into(), |v| map.quantity.format(v));
                spans.push(Span::styled(
                    format!("{text:>11}"),
                    t.run_style(pair.runs[k]),
                ));
            }
            spans.push(Span::raw("  "));
        }
        lines.push(Line::from(spans));
    }
    let names = pair
        .runs
        .map(|i| labels.get(i).cloned().unwrap_or_default());
    Paragraph::new(lines)
        .block(Block::default().borders(Borders::ALL).title(Span::styled(
            format!(
                " by depth at step {}: {} {} against {} {} ",
                pair.step, marks[0], names[0], marks[1], names[1]
            ),
            t.title(),
        )))
        .render(area, buf);
}
