//! The LayerNorm tab: what normalisation does to the residual stream, per LayerNorm,
//! and how its output distribution moves as training goes. Fed by the probes.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Borders, Chart, Dataset, GraphType, Paragraph, Widget};

use crate::inspect::probe::{Distribution, Histogram, ProbeMeta, Stats, PERCENTILE_RANKS};
use crate::ui::keys::Action;
use crate::ui::run_state::{Ctx, RunState, Scrub};
use crate::ui::theme::{Series, Theme};
use crate::ui::widgets::chart::{compact, stable_bounds};
use crate::ui::widgets::frame::probe_label;

/// What the LayerNorm tab shows of the selected LayerNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LnSource {
    Output,
    Input,
    Gamma,
    Beta,
}

/// The LayerNorm tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormView {
    /// Index of the LayerNorm (block 0 norm1, block 0 norm2, ..., final).
    pub selected: usize,
    pub source: LnSource,
}

impl LayerNormView {
    /// ↑/↓ pick the norm, ←/→ move over the probes, s cycles what is shown of it.
    pub fn on_action(&mut self, action: Action, run: &mut RunState) {
        let count = run.probe_metas.last().map_or(0, |m| m.layer_norms.len());
        match action {
            Action::Up => self.selected = self.selected.saturating_sub(1),
            Action::Down => self.selected = (self.selected + 1).min(count.saturating_sub(1)),
            Action::Left => run.scrub(Scrub::Back),
            Action::Right => run.scrub(Scrub::Forward),
            Action::ToggleSource => {
                self.source = match self.source {
                    LnSource::Output => LnSource::Input,
                    LnSource::Input => LnSource::Gamma,
                    LnSource::Gamma => LnSource::Beta,
                    LnSource::Beta => LnSource::Output,
                }
            }
            _ => {}
        }
    }
}

impl Default for LayerNormView {
    fn default() -> Self {
        Self {
            selected: 0,
            source: LnSource::Output,
        }
    }
}

pub type Cx<'a> = Ctx<'a, LayerNormView>;

/// Eighth-block characters, from empty to full, for bars.
const EIGHTHS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// `values` resampled to `width` columns (sums when shrinking, repeats when growing).
pub fn resample(values: &[f64], width: usize) -> Vec<f64> {
    if values.is_empty() || width == 0 {
        return vec![0.0; width];
    }
    (0..width)
        .map(|c| {
            let start = c * values.len() / width;
            let end = ((c + 1) * values.len() / width)
                .max(start + 1)
                .min(values.len());
            values[start..end].iter().sum()
        })
        .collect()
}

/// A vertical bar chart of `values` in `height` text rows, top row first, with eighth
/// blocks for the partial top of each bar. Bars scale to the largest value.
pub fn bar_rows(values: &[f64], height: usize) -> Vec<String> {
    let max = values.iter().copied().fold(0.0, f64::max);
    let eighths: Vec<usize> = values
        .iter()
        .map(|&v| {
            if max > 0.0 && v > 0.0 {
                ((v / max * (height * 8) as f64).round() as usize).max(1)
            } else {
                0
            }
        })
        .collect();
    (0..height)
        .map(|row| {
            let floor = (height - 1 - row) * 8;
            eighths
                .iter()
                .map(|&e| EIGHTHS[e.saturating_sub(floor).min(8)])
                .collect()
        })
        .collect()
}

fn source_label(source: LnSource) -> &'static str {
    match source {
        LnSource::Output => "output",
        LnSource::Input => "input",
        LnSource::Gamma => "gamma",
        LnSource::Beta => "beta",
    }
}

fn distribution(meta: &ProbeMeta, ln: usize, source: LnSource) -> Option<&Distribution> {
    let probe = meta.layer_norms.get(ln)?;
    match source {
        LnSource::Input => Some(&probe.input),
        LnSource::Output => Some(&probe.output),
        LnSource::Gamma | LnSource::Beta => None,
    }
}

fn stats_line(theme: &Theme, d: &Distribution) -> Line<'static> {
    let s = d.stats;
    let h = &d.histogram;
    Line::from(vec![
        Span::styled("mean ", theme.dim()),
        Span::raw(format!("{:.3}  ", s.mean)),
        Span::styled("std ", theme.dim()),
        Span::raw(format!("{:.3}  ", s.std)),
        Span::styled("min ", theme.dim()),
        Span::raw(format!("{:.2}  ", s.min)),
        Span::styled("max ", theme.dim()),
        Span::raw(format!("{:.2}  ", s.max)),
        Span::styled("|x|>3 ", theme.dim()),
        Span::raw(format!("{:.2}%  ", d.beyond_3 * 100.0)),
        Span::styled(
            format!("outside ±{}: ", compact(f64::from(h.hi))),
            theme.dim(),
        ),
        Span::raw(format!("{} below, {} above", h.below, h.above)),
    ])
}

fn render_histogram(cx: Cx<'_>, title: &str, d: &Distribution, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(format!(" {title} "), t.title()));
    let inner = block.inner(area);
    block.render(area, buf);
    if inner.height < 3 || inner.width < 10 {
        return;
    }
    let counts: Vec<f64> = d.histogram.counts.iter().map(|&c| f64::from(c)).collect();
    let bars = bar_rows(
        &resample(&counts, inner.width as usize),
        inner.height as usize - 2,
    );
    let mut lines: Vec<Line> = bars
        .into_iter()
        .map(|r| Line::styled(r, t.series(Series::TrainSmooth)))
        .collect();
    let (lo, hi) = (d.histogram.lo, d.histogram.hi);
    let width = inner.width as usize;
    let mid = compact(f64::from((lo + hi) / 2.0));
    let left = compact(f64::from(lo));
    let right = compact(f64::from(hi));
    let gap = width.saturating_sub(left.len() + mid.len() + right.len());
    lines.push(Line::styled(
        format!(
            "{left}{}{mid}{}{right}",
            " ".repeat(gap / 2),
            " ".repeat(gap - gap / 2)
        ),
        t.dim(),
    ));
    lines.push(stats_line(t, d));
    Paragraph::new(lines).render(inner, buf);
}

fn stats_row(t: &Theme, name: &str, s: &Stats) -> Line<'static> {
    Line::from(vec![
        Span::styled(format!("{name:<6}"), t.dim()),
        Span::raw(format!(
            "mean {:>7.3}  std {:>6.3}  min {:>7.3}  max {:>7.3}",
            s.mean, s.std, s.min, s.max
        )),
    ])
}

/// Density of the selected distribution over the recorded probes: x = probe, y = value
/// bins (high values on top), shade = share of the probe's values in that bin.
fn render_heat_strip(cx: Cx<'_>, metas: &[&ProbeMeta], area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let view = cx.view;
    let block = Block::default().borders(Borders::ALL).title(Span::styled(
        format!(
            " {} over training (x: probe, y: value, shade: density) ",
            source_label(view.source)
        ),
        t.title(),
    ));
    let inner = block.inner(area);
    block.render(area, buf);
    if inner.height < 2 || inner.width < 8 {
        return;
    }
    let label_w = 6u16;
    let cols = (inner.width - label_w) as usize;
    let rows = inner.height as usize;
    let shown: Vec<&Histogram> = metas
        .iter()
        .filter_map(|m| distribution(m, view.selected, view.source).map(|d| &d.histogram))
        .collect();
    let Some(first) = shown.first() else {
        Paragraph::new(Line::styled(
            "γ and β have no value histogram: see the summaries",
            t.dim(),
        ))
        .render(inner, buf);
        return;
    };
    // The newest probes that fit, up to four columns each when there are few.
    let start = shown.len().saturating_sub(cols);
    let width = (cols / (shown.len() - start).max(1)).clamp(1, 4);
    for (x, hist) in shown[start..].iter().enumerate() {
        let counts: Vec<f64> = hist.counts.iter().rev().map(|&c| f64::from(c)).collect();
        let per_row = resample(&counts, rows);
        // Relative to the fullest row of the same probe: the shape, whatever the spread.
        let max = per_row.iter().copied().fold(0.0, f64::max).max(1.0);
        for (y, c) in per_row.iter().enumerate() {
            let (symbol, style) = t.heat(c / max);
            for dx in 0..width {
                let cell = &mut buf[(
                    inner.x + label_w + (x * width + dx) as u16,
                    inner.y + y as u16,
                )];
                cell.set_char(symbol).set_style(style);
            }
        }
    }
    let labels = [
        (0, first.hi),
        (rows / 2, (first.lo + first.hi) / 2.0),
        (rows - 1, first.lo),
    ];
    for (row, v) in labels {
        Paragraph::new(Line::styled(compact(f64::from(v)), t.dim()))
            .render(Rect::new(inner.x, inner.y + row as u16, label_w, 1), buf);
    }
}

/// The TensorBoard-style percentile bands of the selected distribution against step.
fn render_bands(cx: Cx<'_>, metas: &[&ProbeMeta], area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let view = cx.view;
    let title = match view.source {
        LnSource::Gamma | LnSource::Beta => format!(
            " {} min / mean / max over training ",
            source_label(view.source)
        ),
        _ => " percentiles over training: min 7 16 31 50 69 84 93 max ".to_string(),
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(title, t.title()));
    let series: Vec<Vec<(f64, f64)>> = match view.source {
        LnSource::Gamma | LnSource::Beta => {
            let pick = |m: &ProbeMeta| {
                let p = &m.layer_norms[view.selected.min(m.layer_norms.len() - 1)];
                if view.source == LnSource::Gamma {
                    p.gamma
                } else {
                    p.beta
                }
            };
            [|s: Stats| s.min, |s: Stats| s.mean, |s: Stats| s.max]
                .iter()
                .map(|f| {
                    metas
                        .iter()
                        .map(|m| (m.step as f64, f64::from(f(pick(m)))))
                        .collect()
                })
                .collect()
        }
        _ => (0..PERCENTILE_RANKS.len())
            .map(|i| {
                metas
                    .iter()
                    .filter_map(|m| {
                        let d = distribution(m, view.selected, view.source)?;
                        Some((m.step as f64, f64::from(*d.percentiles.get(i)?)))
                    })
                    .collect()
            })
            .collect(),
    };
    let all: Vec<(f64, f64)> = series.iter().flatten().copied().collect();
    let (Some(xb), Some(yb)) = (
        crate::ui::widgets::chart::x_bounds([all.as_slice()]),
        crate::ui::widgets::chart::y_bounds([all.as_slice()]),
    ) else {
        Paragraph::new(Line::styled("waiting for probes …", t.dim()))
            .block(block)
            .render(area, buf);
        return;
    };
    let yb = stable_bounds(yb);
    let middle = series.len() / 2;
    let datasets: Vec<Dataset> = series
        .iter()
        .enumerate()
        .map(|(i, points)| {
            let style = if i == middle {
                t.series(Series::Eval)
            } else {
                t.series(Series::TrainSmooth)
            };
            Dataset::default()
                .marker(t.line_marker)
                .graph_type(GraphType::Line)
                .style(style)
                .data(points)
        })
        .collect();
    Chart::new(datasets)
        .block(block)
        .x_axis(
            Axis::default()
                .title(Span::styled("step", t.dim()))
                .bounds(xb)
                .labels([xb[0], xb[1]].map(|v| Span::styled(format!("{v:.0}"), t.dim()))),
        )
        .y_axis(
            Axis::default()
                .bounds(yb)
                .labels([yb[0], yb[1]].map(|v| Span::styled(compact(v), t.dim()))),
        )
        .render(area, buf);
}

/// One row per LayerNorm: a mini-histogram of its output at the shown probe, mean and std.
fn render_overview(cx: Cx<'_>, meta: &ProbeMeta, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(" all LayerNorms (output) ", t.title()));
    let inner = block.inner(area);
    block.render(area, buf);
    let spark_w = (inner.width as usize).saturating_sub(30).clamp(4, 64);
    let lines: Vec<Line> = meta
        .layer_norms
        .iter()
        .enumerate()
        .skip(
            cx.view
                .selected
                .saturating_sub(inner.height.saturating_sub(1) as usize),
        )
        .map(|(i, ln)| {
            let counts: Vec<f64> = ln
                .output
                .histogram
                .counts
                .iter()
                .map(|&c| f64::from(c))
                .collect();
            let spark = bar_rows(&resample(&counts, spark_w), 1)
                .pop()
                .unwrap_or_default();
            let style = if i == cx.view.selected {
                t.selected_tab()
            } else {
                t.text()
            };
            Line::from(vec![
                Span::styled(format!("{:<9}", short_name(&ln.name)), style),
                Span::styled(spark, t.series(Series::TrainSmooth)),
                Span::raw(format!(
                    " μ {:>6.2} σ {:>5.2}",
                    ln.output.stats.mean, ln.output.stats.std
                )),
            ])
        })
        .collect();
    Paragraph::new(lines).render(inner, buf);
}

/// "block 2 norm1 (before attention)" -> "b2 norm1".
pub fn short_name(name: &str) -> String {
    let mut words = name.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("block"), Some(i), Some(n)) => format!("b{i} {n}"),
        (Some(first), _, _) => first.to_string(),
        _ => String::new(),
    }
}

/// What sits at a norm's place, read from its recorded name (the model names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NormPlace {
    Layer,
    Rms,
    /// A variant without norms: the residual stream at the place, input = output.
    Residual,
}

impl NormPlace {
    fn of(name: &str) -> Self {
        if name.contains("no norm") {
            Self::Residual
        } else if name.contains("rmsnorm") {
            Self::Rms
        } else {
            Self::Layer
        }
    }

    fn formula(self) -> &'static str {
        match self {
            Self::Layer => "LayerNorm(x) = γ·(x − μ)/σ + β per token; μ, σ over the channels, γ and β learned",
            Self::Rms => "RMSNorm(x) = γ·x/√(mean(x²) + ε) per token: no centring, no β; γ learned",
            Self::Residual => "this model has no norm here (model.norm = \"none\"): input and output are the residual stream at its place",
        }
    }
}

pub fn render(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let Some(meta) = cx.run.shown_probe() else {
        let text = vec![
            Line::styled("LayerNorm(x) = γ·(x − μ)/σ + β per token, μ and σ over the channels; γ, β learned.", t.title()),
            Line::raw(""),
            Line::styled("Waiting for the first probe (one is taken before training starts) …", t.dim()),
        ];
        Paragraph::new(text)
            .block(Block::default().borders(Borders::ALL))
            .render(area, buf);
        return;
    };
    let view = cx.view;
    let selected = view.selected.min(meta.layer_norms.len().saturating_sub(1));
    let Some(ln) = meta.layer_norms.get(selected) else {
        return;
    };
    let metas = cx.run.probe_history_until_shown();
    let position = cx.run.probe_position();
    let [header, top, bottom] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Percentage(45),
        Constraint::Fill(1),
    ])
    .areas(area);
    let scrub = probe_label(position, "←/→");
    let kind = NormPlace::of(&ln.name);
    Paragraph::new(vec![
        Line::styled(kind.formula(), t.dim()),
        Line::from(vec![
            Span::styled(format!("{} ", ln.name), t.accent()),
            Span::raw(format!(
                "│ step {} (epoch {}) │ {scrub} │ showing {} ",
                meta.step,
                meta.epoch,
                source_label(view.source)
            )),
        ]),
    ])
    .render(header, buf);
    let wide = area.width >= 120;
    if wide {
        let [input, output, side] = Layout::horizontal([
            Constraint::Percentage(36),
            Constraint::Percentage(36),
            Constraint::Fill(1),
        ])
        .areas(top);
        render_histogram(cx, "input (residual stream)", &ln.input, input, buf);
        render_histogram(cx, "output", &ln.output, output, buf);
        let [params, overview] =
            Layout::vertical([Constraint::Length(4), Constraint::Fill(1)]).areas(side);
        let params_lines = match kind {
            NormPlace::Residual => vec![Line::styled("no norm here: nothing learned", t.dim())],
            NormPlace::Rms => vec![
                stats_row(t, "γ", &ln.gamma),
                Line::styled("β      (RMSNorm has none)", t.dim()),
            ],
            NormPlace::Layer => vec![stats_row(t, "γ", &ln.gamma), stats_row(t, "β", &ln.beta)],
        };
        Paragraph::new(params_lines)
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(Span::styled(" learned γ, β ", t.title())),
            )
            .render(params, buf);
        render_overview(cx, meta, overview, buf);
    } else {
        let [input, output] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(top);
        render_histogram(cx, "input", &ln.input, input, buf);
        render_histogram(cx, "output", &ln.output, output, buf);
    }
    let [strip, bands] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
    render_heat_strip(cx, &metas, strip, buf);
    render_bands(cx, &metas, bands, buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_sums_or_repeats() {
        assert_eq!(resample(&[1.0, 2.0, 3.0, 4.0], 2), vec![3.0, 7.0]);
        assert_eq!(resample(&[1.0, 2.0], 4), vec![1.0, 1.0, 2.0, 2.0]);
        assert_eq!(resample(&[], 3), vec![0.0; 3]);
        assert!(resample(&[1.0], 0).is_empty());
        let v: Vec<f64> = (0..64).map(f64::from).collect();
        assert_eq!(resample(&v, 7).iter().sum::<f64>(), v.iter().sum::<f64>());
    }

    #[test]
    fn bars_fill_in_eighths_from_the_bottom() {
        let rows = bar_rows(&[0.0, 1.0, 2.0, 4.0], 2);
        // 4 = two full rows; 2 = one full row; 1 = half a row; 0 = nothing.
        assert_eq!(rows, vec!["   █".to_string(), " ▄██".to_string()]);
        // Anything above zero shows at least one eighth.
        assert_eq!(bar_rows(&[1.0, 1000.0], 1), vec!["▁█".to_string()]);
        assert_eq!(bar_rows(&[0.0, 0.0], 1), vec!["  ".to_string()]);
    }

    #[test]
    fn names_shorten_for_the_overview() {
        assert_eq!(short_name("block 2 norm1 (before attention)"), "b2 norm1");
        assert_eq!(short_name("final norm (before head)"), "final");
    }
}
