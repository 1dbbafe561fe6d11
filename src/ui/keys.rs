//! The one key table: it drives key handling, the footer and the help popup.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::tab::Tab;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    NextTab,
    PrevTab,
    GoToTab(usize),
    TogglePause,
    SaveNow,
    Export,
    Help,
    ShowLog,
    Quit,
    Interrupt,
    Close,
    Confirm,
    ToggleLogScale,
    ToggleXAxis,
    ToggleZoom,
    Left,
    Right,
    Up,
    Down,
    SmoothMore,
    SmoothLess,
    Latest,
    ToggleSource,
    ScrubBack,
    ScrubForward,
    NextImage,
    PrevImage,
    QueryUp,
    QueryDown,
    ToggleRollout,
    CycleScale,
    ScrollBack,
    ScrollForward,
    PageUp,
    PageDown,
    CycleFilter,
    CycleClass,
    ToggleRun,
    OpenRun,
    ToggleCompare,
    CycleSort,
    ReverseSort,
    Filter,
}

/// Where a binding applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everywhere (unless a popup takes the key).
    Global,
    /// Only while training runs in this process (not in `vitscope view`).
    Live,
    /// One tab.
    Tab(Tab),
    /// Inside a popup.
    Popup,
    /// The runs compared by `vitscope view` of several runs.
    Runs,
}

#[derive(Debug, Clone, Copy)]
pub struct Binding {
    pub keys: &'static [KeyCode],
    pub ctrl: bool,
    /// How the keys are written in the footer and help.
    pub label: &'static str,
    pub action: Action,
    pub scope: Scope,
    pub description: &'static str,
    /// The footer's word for it; empty = not in the footer (the help lists everything).
    pub hint: &'static str,
}

const fn bind(
    keys: &'static [KeyCode],
    label: &'static str,
    action: Action,
    scope: Scope,
    description: &'static str,
    hint: &'static str,
) -> Binding {
    Binding {
        keys,
        ctrl: false,
        label,
        action,
        scope,
        description,
        hint,
    }
}

pub const KEYS: &[Binding] = &[
    bind(
        &[KeyCode::Tab],
        "Tab",
        Action::NextTab,
        Scope::Global,
        "next tab",
        "",
    ),
    bind(
        &[KeyCode::BackTab],
        "S-Tab",
        Action::PrevTab,
        Scope::Global,
        "previous tab",
        "",
    ),
    bind(
        &[
            KeyCode::Char('1'),
            KeyCode::Char('2'),
            KeyCode::Char('3'),
            KeyCode::Char('4'),
            KeyCode::Char('5'),
            KeyCode::Char('6'),
            KeyCode::Char('7'),
            KeyCode::Char('8'),
            KeyCode::Char('9'),
        ],
        "1-9",
        Action::GoToTab(0),
        Scope::Global,
        "go to tab",
        "",
    ),
    bind(
        &[KeyCode::Char(' ')],
        "space",
        Action::TogglePause,
        Scope::Live,
        "pause / resume training",
        "pause",
    ),
    bind(
        &[KeyCode::Char('s')],
        "s",
        Action::SaveNow,
        Scope::Live,
        "save a checkpoint now",
        "save",
    ),
    bind(
        &[KeyCode::Char('e')],
        "e",
        Action::Export,
        Scope::Global,
        "export this view as PNG/GIF into <run>-export/",
        "export",
    ),
    bind(
        &[KeyCode::Char('y')],
        "y",
        Action::ToggleLogScale,
        Scope::Tab(Tab::Training),
        "log / linear y axis",
        "log-y",
    ),
    bind(
        &[KeyCode::Char('x')],
        "x",
        Action::ToggleXAxis,
        Scope::Tab(Tab::Training),
        "x axis: step / training time",
        "x-axis",
    ),
    bind(
        &[KeyCode::Char('z')],
        "z",
        Action::ToggleZoom,
        Scope::Tab(Tab::Training),
        "zoom: recent window / whole run",
        "zoom",
    ),
    bind(
        &[KeyCode::Left, KeyCode::Char('h')],
        "←/h",
        Action::Left,
        Scope::Tab(Tab::Training),
        "shorter recent window",
        "",
    ),
    bind(
        &[KeyCode::Right, KeyCode::Char('l')],
        "→/l",
        Action::Right,
        Scope::Tab(Tab::Training),
        "longer recent window",
        "",
    ),
    bind(
        &[KeyCode::Up, KeyCode::Char('k')],
        "↑/k",
        Action::Up,
        Scope::Tab(Tab::Training),
        "more smoothing",
        "",
    ),
    bind(
        &[KeyCode::Down, KeyCode::Char('j')],
        "↓/j",
        Action::Down,
        Scope::Tab(Tab::Training),
        "less smoothing",
        "",
    ),
    bind(
        &[KeyCode::Char(']')],
        "]",
        Action::SmoothMore,
        Scope::Tab(Tab::Training),
        "more smoothing",
        "",
    ),
    bind(
        &[KeyCode::Char('[')],
        "[",
        Action::SmoothLess,
        Scope::Tab(Tab::Training),
        "less smoothing",
        "",
    ),
    bind(
        &[KeyCode::Up, KeyCode::Char('k')],
        "↑/k",
        Action::Up,
        Scope::Tab(Tab::LayerNorm),
        "previous LayerNorm",
        "layer",
    ),
    bind(
        &[KeyCode::Down, KeyCode::Char('j')],
        "↓/j",
        Action::Down,
        Scope::Tab(Tab::LayerNorm),
        "next LayerNorm",
        "",
    ),
    bind(
        &[KeyCode::Left, KeyCode::Char('h')],
        "←/h",
        Action::Left,
        Scope::Tab(Tab::LayerNorm),
        "earlier probe (scrub back)",
        "scrub",
    ),
    bind(
        &[KeyCode::Right, KeyCode::Char('l')],
        "→/l",
        Action::Right,
        Scope::Tab(Tab::LayerNorm),
        "later probe (scrub forward)",
        "",
    ),
    bind(
        &[KeyCode::End, KeyCode::Char('G')],
        "End/G",
        Action::Latest,
        Scope::Tab(Tab::LayerNorm),
        "latest probe",
        "",
    ),
    bind(
        &[KeyCode::Char('t')],
        "t",
        Action::ToggleSource,
        Scope::Tab(Tab::LayerNorm),
        "show output / input / γ / β",
        "source",
    ),
    bind(
        &[KeyCode::Up, KeyCode::Char('k')],
        "↑/k",
        Action::Up,
        Scope::Tab(Tab::Attention),
        "previous layer",
        "layer",
    ),
    bind(
        &[KeyCode::Down, KeyCode::Char('j')],
        "↓/j",
        Action::Down,
        Scope::Tab(Tab::Attention),
        "next layer",
        "",
    ),
    bind(
        &[KeyCode::Left, KeyCode::Char('h')],
        "←/h",
        Action::Left,
        Scope::Tab(Tab::Attention),
        "previous head",
        "head",
    ),
    bind(
        &[KeyCode::Right, KeyCode::Char('l')],
        "→/l",
        Action::Right,
        Scope::Tab(Tab::Attention),
        "next head",
        "",
    ),
    bind(
        &[KeyCode::Char('n')],
        "n",
        Action::NextImage,
        Scope::Tab(Tab::Attention),
        "next probe image",
        "image",
    ),
    bind(
        &[KeyCode::Char('p')],
        "p",
        Action::PrevImage,
        Scope::Tab(Tab::Attention),
        "previous probe image",
        "",
    ),
    bind(
        &[KeyCode::Char('[')],
        "[",
        Action::QueryUp,
        Scope::Tab(Tab::Attention),
        "query cursor up (previous token)",
        "",
    ),
    bind(
        &[KeyCode::Char(']')],
        "]",
        Action::QueryDown,
        Scope::Tab(Tab::Attention),
        "query cursor down (next token)",
        "query",
    ),
    bind(
        &[KeyCode::Char('r')],
        "r",
        Action::ToggleRollout,
        Scope::Tab(Tab::Attention),
        "raw weights / attention rollout",
        "rollout",
    ),
    bind(
        &[KeyCode::Char('v')],
        "v",
        Action::CycleScale,
        Scope::Tab(Tab::Attention),
        "shade scale: map max / row max / log",
        "scale",
    ),
    bind(
        &[KeyCode::Char(',')],
        ",",
        Action::ScrubBack,
        Scope::Tab(Tab::Attention),
        "earlier probe (scrub back)",
        "scrub",
    ),
    bind(
        &[KeyCode::Char('.')],
        ".",
        Action::ScrubForward,
        Scope::Tab(Tab::Attention),
        "later probe (scrub forward)",
        "",
    ),
    bind(
        &[KeyCode::End, KeyCode::Char('G')],
        "End/G",
        Action::Latest,
        Scope::Tab(Tab::Attention),
        "latest probe",
        "",
    ),
    bind(
        &[KeyCode::Up, KeyCode::Char('k')],
        "↑/k",
        Action::Up,
        Scope::Tab(Tab::Features),
        "previous layer",
        "layer",
    ),
    bind(
        &[KeyCode::Down, KeyCode::Char('j')],
        "↓/j",
        Action::Down,
        Scope::Tab(Tab::Features),
        "next layer",
        "",
    ),
    bind(
        &[KeyCode::Char('[')],
        "[",
        Action::ScrollBack,
        Scope::Tab(Tab::Features),
        "earlier channels",
        "",
    ),
    bind(
        &[KeyCode::Char(']')],
        "]",
        Action::ScrollForward,
        Scope::Tab(Tab::Features),
        "later channels",
        "channels",
    ),
    bind(
        &[KeyCode::Char('n')],
        "n",
        Action::NextImage,
        Scope::Tab(Tab::Features),
        "next probe image",
        "image",
    ),
    bind(
        &[KeyCode::Char('p')],
        "p",
        Action::PrevImage,
        Scope::Tab(Tab::Features),
        "previous probe image",
        "",
    ),
    bind(
        &[KeyCode::Char(','), KeyCode::Left, KeyCode::Char('h')],
        ",/←",
        Action::ScrubBack,
        Scope::Tab(Tab::Features),
        "earlier probe (scrub back)",
        "scrub",
    ),
    bind(
        &[KeyCode::Char('.'), KeyCode::Right, KeyCode::Char('l')],
        "./→",
        Action::ScrubForward,
        Scope::Tab(Tab::Features),
        "later probe (scrub forward)",
        "",
    ),
    bind(
        &[KeyCode::End, KeyCode::Char('G')],
        "End/G",
        Action::Latest,
        Scope::Tab(Tab::Features),
        "latest probe",
        "",
    ),
    bind(
        &[KeyCode::Up, KeyCode::Char('k')],
        "↑/k",
        Action::Up,
        Scope::Tab(Tab::Patches),
        "patch above",
        "",
    ),
    bind(
        &[KeyCode::Down, KeyCode::Char('j')],
        "↓/j",
        Action::Down,
        Scope::Tab(Tab::Patches),
        "patch below",
        "",
    ),
    bind(
        &[KeyCode::Left, KeyCode::Char('h')],
        "←/h",
        Action::Left,
        Scope::Tab(Tab::Patches),
        "patch to the left",
        "",
    ),
    bind(
        &[KeyCode::Right, KeyCode::Char('l')],
        "arrows",
        Action::Right,
        Scope::Tab(Tab::Patches),
        "patch to the right",
        "patch",
    ),
    bind(
        &[KeyCode::Char('n')],
        "n",
        Action::NextImage,
        Scope::Tab(Tab::Patches),
        "next probe image",
        "image",
    ),
    bind(
        &[KeyCode::Char('p')],
        "p",
        Action::PrevImage,
        Scope::Tab(Tab::Patches),
        "previous probe image",
        "",
    ),
    bind(
        &[KeyCode::Char(',')],
        ",",
        Action::ScrubBack,
        Scope::Tab(Tab::Patches),
        "earlier probe (scrub back)",
        "scrub",
    ),
    bind(
        &[KeyCode::Char('.')],
        ".",
        Action::ScrubForward,
        Scope::Tab(Tab::Patches),
        "later probe (scrub forward)",
        "",
    ),
    bind(
        &[KeyCode::End, KeyCode::Char('G')],
        "End/G",
        Action::Latest,
        Scope::Tab(Tab::Patches),
        "latest probe",
        "",
    ),
    bind(
        &[KeyCode::Left, KeyCode::Char('h')],
        "←/h",
        Action::Left,
        Scope::Tab(Tab::Predictions),
        "previous image",
        "",
    ),
    bind(
        &[KeyCode::Right, KeyCode::Char('l')],
        "→/l",
        Action::Right,
        Scope::Tab(Tab::Predictions),
        "next image",
        "",
    ),
    bind(
        &[KeyCode::Up, KeyCode::Char('k')],
        "↑/k",
        Action::Up,
        Scope::Tab(Tab::Predictions),
        "row above",
        "",
    ),
    bind(
        &[KeyCode::Down, KeyCode::Char('j')],
        "arrows",
        Action::Down,
        Scope::Tab(Tab::Predictions),
        "row below",
        "select",
    ),
    bind(
        &[KeyCode::PageUp],
        "PgUp",
        Action::PageUp,
        Scope::Tab(Tab::Predictions),
        "previous page",
        "",
    ),
    bind(
        &[KeyCode::PageDown],
        "PgDn",
        Action::PageDown,
        Scope::Tab(Tab::Predictions),
        "next page",
        "page",
    ),
    bind(
        &[KeyCode::Char('f')],
        "f",
        Action::CycleFilter,
        Scope::Tab(Tab::Predictions),
        "filter: all / mistakes / least confident right / flipped",
        "filter",
    ),
    bind(
        &[KeyCode::Char('c')],
        "c",
        Action::CycleClass,
        Scope::Tab(Tab::Predictions),
        "only one true class (cycles; all at the end)",
        "class",
    ),
    bind(
        &[KeyCode::Char(',')],
        ",",
        Action::ScrubBack,
        Scope::Tab(Tab::Predictions),
        "earlier evaluation",
        "eval",
    ),
    bind(
        &[KeyCode::Char('.')],
        ".",
        Action::ScrubForward,
        Scope::Tab(Tab::Predictions),
        "later evaluation",
        "",
    ),
    bind(
        &[KeyCode::End, KeyCode::Char('G')],
        "End/G",
        Action::Latest,
        Scope::Tab(Tab::Predictions),
        "latest evaluation",
        "",
    ),
    bind(
        &[KeyCode::Char('L')],
        "L",
        Action::ShowLog,
        Scope::Global,
        "log messages",
        "log",
    ),
    bind(
        &[KeyCode::Char('?')],
        "?",
        Action::Help,
        Scope::Global,
        "help",
        "help",
    ),
    bind(
        &[KeyCode::Char('q')],
        "q",
        Action::Quit,
        Scope::Global,
        "quit (asks first while training)",
        "quit",
    ),
    Binding {
        keys: &[KeyCode::Char('c')],
        ctrl: true,
        label: "C-c",
        action: Action::Interrupt,
        scope: Scope::Global,
        description: "stop training (checkpoint) and quit, without asking",
        hint: "",
    },
    bind(
        &[KeyCode::Esc],
        "Esc",
        Action::Close,
        Scope::Popup,
        "close the popup / answer no",
        "",
    ),
    bind(
        &[KeyCode::Char('y'), KeyCode::Enter],
        "y/Enter",
        Action::Confirm,
        Scope::Popup,
        "answer yes",
        "",
    ),
    bind(
        &[KeyCode::Up, KeyCode::Char('k')],
        "↑/k",
        Action::Up,
        Scope::Runs,
        "previous run",
        "",
    ),
    bind(
        &[KeyCode::Down, KeyCode::Char('j')],
        "↓/j",
        Action::Down,
        Scope::Runs,
        "next run",
        "select",
    ),
    bind(
        &[KeyCode::Char(' ')],
        "space",
        Action::ToggleRun,
        Scope::Runs,
        "hide / show the selected run's curves",
        "hide/show",
    ),
    bind(
        &[KeyCode::Char('x')],
        "x",
        Action::ToggleXAxis,
        Scope::Runs,
        "x axis: step / epoch / training time",
        "x-axis",
    ),
    bind(
        &[KeyCode::Char('c')],
        "c",
        Action::ToggleCompare,
        Scope::Runs,
        "compare: the selected run and the next side by side (norms, attention) at one step",
        "compare",
    ),
    bind(
        &[KeyCode::Char('o')],
        "o",
        Action::CycleSort,
        Scope::Runs,
        "sort the table by the next column (run, state, step, best, time to best)",
        "sort",
    ),
    bind(
        &[KeyCode::Char('O')],
        "O",
        Action::ReverseSort,
        Scope::Runs,
        "reverse the order",
        "",
    ),
    bind(
        &[KeyCode::Char('/')],
        "/",
        Action::Filter,
        Scope::Runs,
        "filter the runs: key=value terms (norm=none) or part of a folder name; Enter applies",
        "filter",
    ),
    bind(
        &[KeyCode::Enter],
        "Enter",
        Action::OpenRun,
        Scope::Runs,
        "open the selected run's dashboard (q comes back)",
        "open",
    ),
    bind(
        &[KeyCode::Char('q'), KeyCode::Esc],
        "q",
        Action::Quit,
        Scope::Runs,
        "quit",
        "quit",
    ),
    bind(
        &[KeyCode::Up, KeyCode::Char('k')],
        "↑/k",
        Action::Up,
        Scope::Tab(Tab::Layers),
        "previous quantity (gradient norm, update ratio, residual RMS, probe, lens)",
        "quantity",
    ),
    bind(
        &[KeyCode::Down, KeyCode::Char('j')],
        "↓/j",
        Action::Down,
        Scope::Tab(Tab::Layers),
        "next quantity",
        "",
    ),
    bind(
        &[KeyCode::Left, KeyCode::Char('h'), KeyCode::Char(',')],
        "←/h",
        Action::Left,
        Scope::Tab(Tab::Layers),
        "earlier record (move the cursor)",
        "scrub",
    ),
    bind(
        &[KeyCode::Right, KeyCode::Char('l'), KeyCode::Char('.')],
        "→/l",
        Action::Right,
        Scope::Tab(Tab::Layers),
        "later record",
        "",
    ),
    bind(
        &[KeyCode::End, KeyCode::Char('G')],
        "End/G",
        Action::Latest,
        Scope::Tab(Tab::Layers),
        "latest record",
        "",
    ),
];

/// The action for a key, given which scopes are active (popup scope first).
pub fn action_for(key: KeyEvent, scopes: &[Scope]) -> Option<Action> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    for scope in scopes {
        for b in KEYS.iter().filter(|b| b.scope == *scope && b.ctrl == ctrl) {
            if let Some(i) = b.keys.iter().position(|k| *k == key.code) {
                return Some(match b.action {
                    Action::GoToTab(_) => Action::GoToTab(i),
                    other => other,
                });
            }
        }
    }
    None
}

/// (label, description) pairs for the footer, in table order.
pub fn footer(scopes: &[Scope]) -> Vec<(&'static str, &'static str)> {
    KEYS.iter()
        .filter(|b| !b.hint.is_empty() && scopes.contains(&b.scope))
        .map(|b| (b.label, b.hint))
        .collect()
}

/// Columns one footer entry takes: " key what ".
pub fn footer_width(entry: (&str, &str)) -> usize {
    entry.0.chars().count() + entry.1.chars().count() + 3
}

/// The footer's entries that fit in `width` columns: help and quit always (they
/// lead to everything else), then the others in table order as far as they go.
pub fn footer_fitting(scopes: &[Scope], width: usize) -> Vec<(&'static str, &'static str)> {
    let all = footer(scopes);
    let essential = |e: &(&str, &str)| e.1 == "help" || e.1 == "quit";
    let mut room = width.saturating_sub(
        all.iter()
            .filter(|e| essential(e))
            .map(|e| footer_width(*e))
            .sum(),
    );
    all.iter()
        .copied()
        .filter(|e| {
            if essential(e) {
                return true;
            }
            let fits = footer_width(*e) <= room;
            room = if fits { room - footer_width(*e) } else { 0 };
            fits
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn keys_map_to_actions_by_scope() {
        let live = [Scope::Global, Scope::Live, Scope::Tab(Tab::Training)];
        assert_eq!(
            action_for(key(KeyCode::Char(' ')), &live),
            Some(Action::TogglePause)
        );
        assert_eq!(
            action_for(
                key(KeyCode::Char(' ')),
                &[Scope::Global, Scope::Tab(Tab::Training)]
            ),
            None
        );
        assert_eq!(
            action_for(key(KeyCode::Char('3')), &live),
            Some(Action::GoToTab(2))
        );
        assert_eq!(
            action_for(key(KeyCode::Char('h')), &live),
            Some(Action::Left)
        );
        assert_eq!(
            action_for(key(KeyCode::Char('y')), &live),
            Some(Action::ToggleLogScale)
        );
        // In a popup, y answers yes before it toggles anything.
        assert_eq!(
            action_for(key(KeyCode::Char('y')), &[Scope::Popup, Scope::Global]),
            Some(Action::Confirm)
        );
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(
            action_for(ctrl_c, &[Scope::Popup, Scope::Global]),
            Some(Action::Interrupt)
        );
        assert_eq!(action_for(key(KeyCode::Char('c')), &live), None);
    }

    #[test]
    fn no_key_is_bound_twice_in_one_scope() {
        for (i, a) in KEYS.iter().enumerate() {
            for b in &KEYS[i + 1..] {
                if a.scope == b.scope && a.ctrl == b.ctrl {
                    assert!(
                        a.keys.iter().all(|k| !b.keys.contains(k)),
                        "{} and {} share a key",
                        a.label,
                        b.label
                    );
                }
            }
        }
    }

    #[test]
    fn footer_follows_the_table() {
        let f = footer(&[Scope::Global, Scope::Live, Scope::Tab(Tab::Training)]);
        assert_eq!(f.first(), Some(&("space", "pause")));
        assert!(f.contains(&("q", "quit")));
        assert!(!footer(&[Scope::Global]).iter().any(|(k, _)| *k == "space"));
    }

    #[test]
    fn a_narrow_footer_keeps_help_and_quit() {
        let scopes = [Scope::Global, Scope::Live, Scope::Tab(Tab::Attention)];
        let all = footer(&scopes);
        let narrow = footer_fitting(&scopes, 60);
        assert!(narrow.len() < all.len());
        assert!(narrow.iter().map(|e| footer_width(*e)).sum::<usize>() <= 60);
        assert_eq!(&narrow[narrow.len() - 2..], &[("?", "help"), ("q", "quit")]);
        assert_eq!(narrow[0], all[0]);
        assert_eq!(footer_fitting(&scopes, 500), all);
    }
}
