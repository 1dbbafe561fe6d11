//! Colours and markers in one place, for three kinds of terminal: truecolor, 256
//! colours, and no colour at all (where markers and text attributes carry meaning).

use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorMode {
    TrueColor,
    Ansi256,
    NoColor,
}

impl ColorMode {
    /// Resolves `ui.color` ("auto", "truecolor", "256", "none") against the environment:
    /// NO_COLOR (any non-empty value) turns colour off; COLORTERM=truecolor|24bit turns
    /// truecolor on.
    pub fn detect(setting: &str, no_color: Option<&str>, colorterm: Option<&str>) -> Self {
        match setting {
            "truecolor" => Self::TrueColor,
            "256" => Self::Ansi256,
            "none" => Self::NoColor,
            _ if no_color.is_some_and(|v| !v.is_empty()) => Self::NoColor,
            _ if colorterm.is_some_and(|v| v == "truecolor" || v == "24bit") => Self::TrueColor,
            _ => Self::Ansi256,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::TrueColor => "truecolor",
            Self::Ansi256 => "256 colours",
            Self::NoColor => "no colour",
        }
    }
}

/// Shading from empty to full: heatmaps stay readable with no colour at all.
pub const HEAT_RAMP: [char; 5] = [' ', '░', '▒', '▓', '█'];

/// Roles of the series drawn in charts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    /// Raw per-step training values.
    TrainRaw,
    /// The smoothed training curve.
    TrainSmooth,
    /// Evaluation on the test set.
    Eval,
    /// A single curve (learning rate, throughput).
    Single,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Theme {
    pub mode: ColorMode,
    /// The marker of lines: braille, half blocks or dots.
    pub line_marker: Marker,
}

impl Theme {
    pub fn new(mode: ColorMode, markers: &str) -> Self {
        let line_marker = match markers {
            "block" => Marker::HalfBlock,
            "dot" => Marker::Dot,
            _ => Marker::Braille,
        };
        Self { mode, line_marker }
    }

    fn pick(&self, rgb: (u8, u8, u8), indexed: u8) -> Option<Color> {
        match self.mode {
            ColorMode::TrueColor => Some(Color::Rgb(rgb.0, rgb.1, rgb.2)),
            ColorMode::Ansi256 => Some(Color::Indexed(indexed)),
            ColorMode::NoColor => None,
        }
    }

    fn fg(&self, rgb: (u8, u8, u8), indexed: u8) -> Style {
        self.pick(rgb, indexed)
            .map_or_else(Style::default, |c| Style::default().fg(c))
    }

    pub fn text(&self) -> Style {
        Style::default()
    }

    pub fn dim(&self) -> Style {
        match self.mode {
            ColorMode::NoColor => Style::default().add_modifier(Modifier::DIM),
            _ => self.fg((130, 130, 140), 245),
        }
    }

    pub fn title(&self) -> Style {
        self.fg((120, 190, 255), 117).add_modifier(Modifier::BOLD)
    }

    pub fn accent(&self) -> Style {
        self.fg((255, 200, 80), 221).add_modifier(Modifier::BOLD)
    }

    pub fn good(&self) -> Style {
        self.fg((110, 220, 120), 114)
    }

    pub fn bad(&self) -> Style {
        self.fg((255, 95, 95), 203).add_modifier(Modifier::BOLD)
    }

    pub fn selected_tab(&self) -> Style {
        match self.mode {
            ColorMode::NoColor => {
                Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD)
            }
            _ => self.accent().add_modifier(Modifier::REVERSED),
        }
    }

    pub fn key(&self) -> Style {
        match self.mode {
            ColorMode::NoColor => Style::default().add_modifier(Modifier::BOLD),
            _ => self.fg((255, 200, 80), 221),
        }
    }

    pub fn gauge(&self) -> Style {
        match self.mode {
            ColorMode::NoColor => Style::default(),
            _ => self.fg((90, 160, 255), 75),
        }
    }

    pub fn series(&self, series: Series) -> Style {
        match series {
            Series::TrainRaw => self.fg((90, 100, 130), 60),
            Series::TrainSmooth => self.fg((100, 180, 255), 75),
            Series::Eval => self.fg((255, 170, 60), 214).add_modifier(Modifier::BOLD),
            Series::Single => self.fg((150, 220, 150), 114),
        }
    }

    /// Markers per series: with no colour they are what tells the series apart.
    pub fn marker(&self, series: Series) -> Marker {
        match (self.mode, series) {
            (ColorMode::NoColor, Series::TrainRaw) => Marker::Dot,
            (_, Series::Eval) => Marker::Block,
            _ => self.line_marker,
        }
    }

    /// A heatmap cell for `level` in [0, 1]: a shading character that reads without
    /// colour, coloured along a dark-blue to yellow ramp where colour is available.
    pub fn heat(&self, level: f64) -> (char, Style) {
        let level = if level.is_finite() {
            level.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let symbol = HEAT_RAMP[(level * (HEAT_RAMP.len() - 1) as f64).round() as usize];
        (
            symbol,
            self.heat_color(level)
                .map_or_else(Style::default, |c| Style::default().fg(c)),
        )
    }

    /// The colour of `level` in [0, 1] on a viridis-like ramp; `None` without colour.
    pub fn heat_color(&self, level: f64) -> Option<Color> {
        let level = if level.is_finite() {
            level.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let stops: [(f64, (u8, u8, u8), u8); 5] = [
            (0.0, (40, 20, 70), 53),
            (0.25, (50, 80, 140), 61),
            (0.5, (30, 150, 140), 36),
            (0.75, (120, 200, 80), 113),
            (1.0, (250, 230, 40), 226),
        ];
        let stop = stops
            .iter()
            .rev()
            .find(|s| level >= s.0)
            .unwrap_or(&stops[0]);
        self.pick(stop.1, stop.2)
    }

    /// The colour of `value` in [-1, 1] on a blue (-1), near-black (0), red (+1) scale:
    /// the sign reads at a glance and zero recedes. `None` without colour.
    pub fn signed_color(&self, value: f64) -> Option<Color> {
        let v = if value.is_finite() {
            value.clamp(-1.0, 1.0)
        } else {
            0.0
        };
        match self.mode {
            ColorMode::NoColor => None,
            ColorMode::TrueColor => {
                let (lo, hi) = ((60.0, 130.0, 255.0), (255.0, 80.0, 60.0));
                let base = 30.0;
                let to = if v < 0.0 { lo } else { hi };
                let a = v.abs();
                let mix = |c: f64| (base + (c - base) * a).round() as u8;
                Some(Color::Rgb(mix(to.0), mix(to.1), mix(to.2)))
            }
            ColorMode::Ansi256 => {
                // Five steps each way from a dark grey.
                const BLUES: [u8; 5] = [236, 17, 19, 27, 33];
                const REDS: [u8; 5] = [236, 52, 88, 160, 196];
                let step = (v.abs() * 4.0).round() as usize;
                Some(Color::Indexed(if v < 0.0 {
                    BLUES[step]
                } else {
                    REDS[step]
                }))
            }
        }
    }

    /// The character that stands for a series in legends.
    pub fn legend_symbol(&self, series: Series) -> &'static str {
        match self.marker(series) {
            Marker::Dot => "•",
            Marker::Block => "█",
            Marker::HalfBlock => "▀",
            _ => "⠒",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_mode_follows_the_environment_unless_set() {
        assert_eq!(
            ColorMode::detect("auto", None, Some("truecolor")),
            ColorMode::TrueColor
        );
        assert_eq!(
            ColorMode::detect("auto", None, Some("24bit")),
            ColorMode::TrueColor
        );
        assert_eq!(ColorMode::detect("auto", None, None), ColorMode::Ansi256);
        assert_eq!(
            ColorMode::detect("auto", Some("1"), Some("truecolor")),
            ColorMode::NoColor
        );
        assert_eq!(
            ColorMode::detect("auto", Some(""), None),
            ColorMode::Ansi256
        );
        assert_eq!(
            ColorMode::detect("none", None, Some("truecolor")),
            ColorMode::NoColor
        );
        assert_eq!(
            ColorMode::detect("truecolor", Some("1"), None),
            ColorMode::TrueColor
        );
    }

    #[test]
    fn heat_shades_rise_with_the_level_and_clamp() {
        let t = Theme::new(ColorMode::NoColor, "braille");
        assert_eq!(t.heat(0.0).0, ' ');
        assert_eq!(t.heat(0.3).0, '░');
        assert_eq!(t.heat(0.5).0, '▒');
        assert_eq!(t.heat(0.8).0, '▓');
        assert_eq!(t.heat(1.0).0, '█');
        assert_eq!(t.heat(7.0).0, '█');
        assert_eq!(t.heat(f64::NAN).0, ' ');
        assert_eq!(t.heat(1.0).1.fg, None);
        let c = Theme::new(ColorMode::Ansi256, "braille");
        assert_eq!(c.heat(0.0).1.fg, Some(Color::Indexed(53)));
        assert_eq!(c.heat(1.0).1.fg, Some(Color::Indexed(226)));
        assert_eq!(c.signed_color(-1.0), Some(Color::Indexed(33)));
        assert_eq!(c.signed_color(0.0), Some(Color::Indexed(236)));
        assert_eq!(c.signed_color(3.0), Some(Color::Indexed(196)));
        let tc = Theme::new(ColorMode::TrueColor, "braille");
        assert_eq!(tc.signed_color(1.0), Some(Color::Rgb(255, 80, 60)));
        assert_eq!(tc.signed_color(0.0), Some(Color::Rgb(30, 30, 30)));
        assert_eq!(t.signed_color(0.5), None);
    }

    #[test]
    fn no_colour_mode_uses_no_colours_and_distinct_markers() {
        let t = Theme::new(ColorMode::NoColor, "braille");
        for s in [
            Series::TrainRaw,
            Series::TrainSmooth,
            Series::Eval,
            Series::Single,
        ] {
            assert_eq!(t.series(s).fg, None);
        }
        let symbols = [
            t.legend_symbol(Series::TrainRaw),
            t.legend_symbol(Series::TrainSmooth),
            t.legend_symbol(Series::Eval),
        ];
        assert_ne!(symbols[0], symbols[1]);
        assert_ne!(symbols[1], symbols[2]);
        assert_eq!(
            Theme::new(ColorMode::Ansi256, "block").marker(Series::TrainSmooth),
            Marker::HalfBlock
        );
        assert_eq!(
            Theme::new(ColorMode::Ansi256, "x").series(Series::Eval).fg,
            Some(Color::Indexed(214))
        );
    }
}
