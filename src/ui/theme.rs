//! Colours and markers in one place, for three kinds of terminal: truecolor, 256
//! colours, and no colour at all (where markers and text attributes carry meaning).

use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use std::sync::OnceLock;

use crate::config::{ColorSetting, Markers};
use crate::palette::{heat_rgb, palette_steps, signed_rgb, signed_steps, step_of, PALETTE_STEPS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorMode {
    TrueColor,
    Ansi256,
    NoColor,
}

/// TERM values whose terminals take 24-bit colour: the `*-direct` terminfo entries
/// and terminals that always do. TERM is what SSH forwards (COLORTERM is not, unless
/// both ends are configured to), so over SSH it is often the only sign.
const TRUECOLOR_TERMS: [&str; 7] = [
    "xterm-kitty",
    "alacritty",
    "foot",
    "foot-extra",
    "wezterm",
    "xterm-ghostty",
    "contour",
];

/// TERM_PROGRAM values of local terminals with 24-bit colour.
const TRUECOLOR_PROGRAMS: [&str; 4] = ["iTerm.app", "WezTerm", "vscode", "ghostty"];

impl ColorMode {
    /// Resolves `ui.color` ("auto", "truecolor", "256", "none") against the environment
    /// (`var` reads a variable), with a note on why, for the help screen: NO_COLOR (any
    /// non-empty value) turns colour off; COLORTERM=truecolor|24bit, a TERM of a
    /// direct-colour terminal, or TERM_PROGRAM of one turn truecolor on.
    pub fn detect(setting: ColorSetting, var: impl Fn(&str) -> Option<String>) -> (Self, String) {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        match setting {
            ColorSetting::TrueColor => {
                return (Self::TrueColor, "set by ui.color / --color".into())
            }
            ColorSetting::Ansi256 => return (Self::Ansi256, "set by ui.color / --color".into()),
            ColorSetting::None => return (Self::NoColor, "set by ui.color / --color".into()),
            ColorSetting::Auto => {}
        }
        if var("NO_COLOR").is_some() {
            return (Self::NoColor, "NO_COLOR is set".into());
        }
        if let Some(v) = var("COLORTERM").filter(|v| v == "truecolor" || v == "24bit") {
            return (Self::TrueColor, format!("COLORTERM={v}"));
        }
        let term = var("TERM");
        if let Some(t) = term
            .as_ref()
            .filter(|t| t.ends_with("-direct") || TRUECOLOR_TERMS.contains(&t.as_str()))
        {
            return (Self::TrueColor, format!("TERM={t}"));
        }
        if let Some(p) = var("TERM_PROGRAM").filter(|p| TRUECOLOR_PROGRAMS.contains(&p.as_str())) {
            return (Self::TrueColor, format!("TERM_PROGRAM={p}"));
        }
        let seen = match term {
            Some(t) => format!("TERM={t}"),
            None => "TERM unset".into(),
        };
        (
            Self::Ansi256,
            format!("no sign of truecolor: COLORTERM unset, {seen}"),
        )
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
    pub fn new(mode: ColorMode, markers: Markers) -> Self {
        let line_marker = match markers {
            Markers::Block => Marker::HalfBlock,
            Markers::Dot => Marker::Dot,
            Markers::Braille => Marker::Braille,
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
    /// colour, coloured along the heat ramp where colour is available.
    pub fn heat(&self, level: f64) -> (char, Style) {
        let level = unit(level);
        let symbol = HEAT_RAMP[(level * (HEAT_RAMP.len() - 1) as f64).round() as usize];
        (
            symbol,
            self.heat_color(level)
                .map_or_else(Style::default, |c| Style::default().fg(c)),
        )
    }

    /// The colour of `level` in [0, 1] on viridis (dark purple to yellow, perceptually
    /// uniform): interpolated in truecolor, in
    /// [`PALETTE_STEPS`] fixed colours of a 256-colour terminal otherwise; `None` without colour.
    pub fn heat_color(&self, level: f64) -> Option<Color> {
        let level = unit(level);
        match self.mode {
            ColorMode::NoColor => None,
            ColorMode::TrueColor => Some(rgb(heat_rgb(level))),
            ColorMode::Ansi256 => {
                static STEPS: OnceLock<Vec<u8>> = OnceLock::new();
                let steps = STEPS.get_or_init(|| palette_steps(heat_rgb, PALETTE_STEPS));
                Some(Color::Indexed(step_of(level, steps)))
            }
        }
    }

    /// The colour of `value` in [-1, 1] on a blue (-1), dark grey (0), red (+1) scale:
    /// the sign reads at a glance and zero recedes. Interpolated in truecolor, in
    /// steps of fixed colours in 256 colours; `None` without colour.
    pub fn signed_color(&self, value: f64) -> Option<Color> {
        let v = if value.is_finite() {
            value.clamp(-1.0, 1.0)
        } else {
            0.0
        };
        match self.mode {
            ColorMode::NoColor => None,
            ColorMode::TrueColor => Some(rgb(signed_rgb((v + 1.0) / 2.0))),
            ColorMode::Ansi256 => {
                static STEPS: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
                let (negative, positive) = STEPS.get_or_init(signed_steps);
                // The middle step is the same dark grey on both sides.
                let index = if v < 0.0 {
                    step_of(-v, negative)
                } else {
                    step_of(v, positive)
                };
                Some(Color::Indexed(index))
            }
        }
    }

    /// The style of run `i` of several compared: ten distinct colours, then again.
    pub fn run_style(&self, i: usize) -> Style {
        const RUNS: [((u8, u8, u8), u8); 10] = [
            ((100, 180, 255), 75),
            ((255, 170, 60), 214),
            ((110, 220, 120), 114),
            ((240, 100, 120), 204),
            ((190, 140, 255), 141),
            ((90, 220, 220), 80),
            ((240, 230, 90), 227),
            ((255, 130, 200), 212),
            ((170, 170, 170), 250),
            ((200, 120, 60), 173),
        ];
        let (rgb, indexed) = RUNS[i % RUNS.len()];
        self.fg(rgb, indexed)
    }

    /// The marker of run `i`, and the symbol the legend shows for it: the line marker
    /// with colour; without, a different marker per run (five, then again).
    pub fn run_marker(&self, i: usize) -> (Marker, &'static str) {
        const MARKERS: [(Marker, &str); 5] = [
            (Marker::Braille, "⠒"),
            (Marker::Dot, "•"),
            (Marker::Block, "█"),
            (Marker::HalfBlock, "▀"),
            (Marker::Bar, "▄"),
        ];
        match self.mode {
            ColorMode::NoColor => MARKERS[i % MARKERS.len()],
            _ => (self.line_marker, "━"),
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

/// `level` clamped to [0, 1]; NaN is 0.
fn unit(level: f64) -> f64 {
    if level.is_finite() {
        level.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn rgb((r, g, b): (u8, u8, u8)) -> Color {
    Color::Rgb(r, g, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::palette::{oklab, xterm_rgb};

    fn detect(setting: &str, vars: &[(&str, &str)]) -> (ColorMode, String) {
        ColorMode::detect(setting.parse().unwrap(), |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_string())
        })
    }

    fn mode(setting: &str, vars: &[(&str, &str)]) -> ColorMode {
        detect(setting, vars).0
    }

    #[test]
    fn colour_mode_follows_the_environment_unless_set() {
        assert_eq!(
            mode("auto", &[("COLORTERM", "truecolor")]),
            ColorMode::TrueColor
        );
        assert_eq!(
            mode("auto", &[("COLORTERM", "24bit")]),
            ColorMode::TrueColor
        );
        assert_eq!(mode("auto", &[]), ColorMode::Ansi256);
        assert_eq!(
            mode("auto", &[("NO_COLOR", "1"), ("COLORTERM", "truecolor")]),
            ColorMode::NoColor
        );
        assert_eq!(mode("auto", &[("NO_COLOR", "")]), ColorMode::Ansi256);
        assert_eq!(
            mode("none", &[("COLORTERM", "truecolor")]),
            ColorMode::NoColor
        );
        assert_eq!(
            mode("truecolor", &[("NO_COLOR", "1")]),
            ColorMode::TrueColor
        );
        assert_eq!(
            mode("256", &[("COLORTERM", "truecolor")]),
            ColorMode::Ansi256
        );
        // What SSH forwards: TERM alone.
        for term in ["xterm-direct", "xterm-kitty", "alacritty", "wezterm"] {
            assert_eq!(
                detect("auto", &[("TERM", term)]),
                (ColorMode::TrueColor, format!("TERM={term}"))
            );
        }
        for term in ["xterm-256color", "tmux-256color", "screen", "linux"] {
            assert_eq!(mode("auto", &[("TERM", term)]), ColorMode::Ansi256);
        }
        assert_eq!(
            mode("auto", &[("TERM_PROGRAM", "iTerm.app")]),
            ColorMode::TrueColor
        );
        assert_eq!(
            mode("auto", &[("TERM_PROGRAM", "Apple_Terminal")]),
            ColorMode::Ansi256
        );
        assert_eq!(
            detect("auto", &[("TERM", "xterm-256color")]).1,
            "no sign of truecolor: COLORTERM unset, TERM=xterm-256color"
        );
    }

    #[test]
    fn heat_shades_rise_with_the_level_and_clamp() {
        let t = Theme::new(ColorMode::NoColor, crate::config::Markers::Braille);
        assert_eq!(t.heat(0.0).0, ' ');
        assert_eq!(t.heat(0.3).0, '░');
        assert_eq!(t.heat(0.5).0, '▒');
        assert_eq!(t.heat(0.8).0, '▓');
        assert_eq!(t.heat(1.0).0, '█');
        assert_eq!(t.heat(7.0).0, '█');
        assert_eq!(t.heat(f64::NAN).0, ' ');
        assert_eq!(t.heat(1.0).1.fg, None);
        assert_eq!(t.signed_color(0.5), None);
    }

    fn distinct(colours: impl Iterator<Item = Option<Color>>) -> usize {
        colours.collect::<std::collections::HashSet<_>>().len()
    }

    fn lightness(c: Option<Color>) -> f64 {
        match c {
            Some(Color::Rgb(r, g, b)) => oklab((r, g, b))[0],
            Some(Color::Indexed(i)) => oklab(xterm_rgb(i))[0],
            other => panic!("not a colour: {other:?}"),
        }
    }

    #[test]
    fn the_heat_ramp_is_continuous_in_truecolor_and_has_many_steps_in_256() {
        let levels = || (0..=1000).map(|i| f64::from(i) / 1000.0);
        let tc = Theme::new(ColorMode::TrueColor, crate::config::Markers::Braille);
        // Viridis' ends; every level its own colour, brighter as the level rises.
        assert_eq!(tc.heat_color(0.0), Some(Color::Rgb(68, 1, 84)));
        assert_eq!(tc.heat_color(1.0), Some(Color::Rgb(253, 231, 37)));
        assert_eq!(tc.heat_color(f64::NAN), tc.heat_color(0.0));
        assert!(distinct(levels().map(|l| tc.heat_color(l))) > 250);
        let c = Theme::new(ColorMode::Ansi256, crate::config::Markers::Braille);
        let steps = distinct(levels().map(|l| c.heat_color(l)));
        assert!(steps >= 16, "{steps} steps in 256 colours");
        for ramp in [&tc, &c] {
            let l: Vec<f64> = levels()
                .step_by(50)
                .map(|x| lightness(ramp.heat_color(x)))
                .collect();
            assert!(l.windows(2).all(|w| w[1] >= w[0] - 0.01), "{l:?}");
        }
        // 256 colours never use the 16 themed ones.
        assert!(levels().all(|l| matches!(c.heat_color(l), Some(Color::Indexed(i)) if i >= 16)));
    }

    #[test]
    fn the_signed_scale_is_dark_at_zero_and_blue_or_red_by_sign() {
        let values = || (-1000..=1000).map(|i| f64::from(i) / 1000.0);
        let tc = Theme::new(ColorMode::TrueColor, crate::config::Markers::Braille);
        assert_eq!(tc.signed_color(0.0), Some(Color::Rgb(30, 30, 30)));
        let Some(Color::Rgb(r, _, b)) = tc.signed_color(-1.0) else {
            panic!()
        };
        assert!(b > 200 && r < 100);
        let Some(Color::Rgb(r, _, b)) = tc.signed_color(3.0) else {
            panic!()
        };
        assert!(r > 200 && b < 100);
        assert!(distinct(values().map(|v| tc.signed_color(v))) > 250);
        // Lightness grows with |value| both ways.
        for sign in [-1.0, 1.0] {
            let l: Vec<f64> = (0..=10)
                .map(|i| lightness(tc.signed_color(sign * f64::from(i) / 10.0)))
                .collect();
            assert!(l.windows(2).all(|w| w[1] > w[0]), "{l:?}");
        }
        let c = Theme::new(ColorMode::Ansi256, crate::config::Markers::Braille);
        let steps = distinct(values().map(|v| c.signed_color(v)));
        assert!(steps >= 16, "{steps} steps in 256 colours");
    }

    #[test]
    fn no_colour_mode_uses_no_colours_and_distinct_markers() {
        let t = Theme::new(ColorMode::NoColor, crate::config::Markers::Braille);
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
            Theme::new(ColorMode::Ansi256, crate::config::Markers::Block)
                .marker(Series::TrainSmooth),
            Marker::HalfBlock
        );
        assert_eq!(
            Theme::new(ColorMode::Ansi256, Markers::Dot)
                .series(Series::Eval)
                .fg,
            Some(Color::Indexed(214))
        );
    }
}
