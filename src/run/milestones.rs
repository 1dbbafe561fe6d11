//! Time to accuracy: when a run's test accuracy first reached each 10-point level,
//! read from its evaluation records (`wall_secs` counts training and evaluations).

use crate::events::EvalRecord;

/// The first evaluation at or above a level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Milestone {
    /// Percent: 10, 20, ... 90.
    pub level: u32,
    pub wall_secs: f64,
    pub epoch: u64,
    pub step: u64,
}

/// Each 10-point level some evaluation reached, with the first evaluation that did.
pub fn reached(evals: &[EvalRecord]) -> Vec<Milestone> {
    let mut out: Vec<Milestone> = Vec::new();
    for e in evals {
        let level = (e.accuracy * 100.0 + 1e-9).floor() as u32 / 10 * 10;
        let next = out.last().map_or(10, |m| m.level + 10);
        for l in (next..=level.min(90)).step_by(10) {
            out.push(Milestone {
                level: l,
                wall_secs: e.wall_secs,
                epoch: e.epoch,
                step: e.step,
            });
        }
    }
    out
}

/// The best evaluation (the first of equals): accuracy, time and epoch.
pub fn best(evals: &[EvalRecord]) -> Option<&EvalRecord> {
    evals
        .iter()
        .fold(None, |best: Option<&EvalRecord>, e| match best {
            Some(b) if b.accuracy >= e.accuracy => Some(b),
            _ => Some(e),
        })
}

/// Hours, minutes and seconds the way the summaries print them: 31m12s, 1h02m.
pub fn clock(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// "50% 4m10s · 60% 9m02s · 70% 21m40s" (or "-" before any level).
pub fn summary(evals: &[EvalRecord]) -> String {
    let parts: Vec<String> = reached(evals)
        .iter()
        .filter(|m| m.level >= 30)
        .map(|m| format!("{}% {}", m.level, clock(m.wall_secs)))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" · ")
    }
}

/// An evaluation record with only what the time-to-accuracy code reads (step = 10 per epoch).
#[cfg(test)]
pub(crate) fn test_eval(epoch: u64, accuracy: f64, wall_secs: f64) -> EvalRecord {
    EvalRecord {
        step: epoch * 10,
        epoch,
        loss: 1.0,
        accuracy,
        per_class_accuracy: vec![],
        confusion: vec![],
        images_per_sec: 1.0,
        wall_secs,
        best_accuracy: accuracy,
        best_epoch: epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_eval as eval;

    #[test]
    fn levels_come_from_the_first_evaluation_that_reached_them() {
        let evals = [
            eval(1, 0.35, 60.0),
            eval(2, 0.52, 130.0), // passes 40 and 50 at once
            eval(3, 0.49, 200.0), // a dip changes nothing
            eval(4, 0.60, 270.0), // exactly 60%
            eval(5, 0.58, 340.0),
        ];
        let got: Vec<(u32, f64, u64)> = reached(&evals)
            .iter()
            .map(|m| (m.level, m.wall_secs, m.epoch))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, 60.0, 1),
                (20, 60.0, 1),
                (30, 60.0, 1),
                (40, 130.0, 2),
                (50, 130.0, 2),
                (60, 270.0, 4),
            ]
        );
        assert_eq!(
            summary(&evals),
            "30% 1m00s · 40% 2m10s · 50% 2m10s · 60% 4m30s"
        );
        assert_eq!(best(&evals).map(|e| e.epoch), Some(4));
        assert_eq!(summary(&evals[..0]), "-");
        assert!(best(&[]).is_none());
    }

    #[test]
    fn clock_reads_naturally() {
        assert_eq!(clock(42.4), "42s");
        assert_eq!(clock(1872.0), "31m12s");
        assert_eq!(clock(3725.0), "1h02m");
        assert_eq!(clock(f64::NAN), "?");
    }
}
