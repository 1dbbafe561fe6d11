//! A wall-clock budget for a run (`train.budget`): the trainer measures its own speed
//! over the first steps, then fixes how many steps fit, so that training and every
//! evaluation end within the budget. The count and the learning-rate schedule's
//! horizon are written into the run's config, so a resumed run keeps them. A shared
//! machine that slows down later first costs evaluations (skipped), then, when even
//! those would not bring the run home, steps: the run is re-planned to end sooner; one
//! far ahead of its plan is re-planned to end later ([`replan`]). Each re-plan is
//! recorded in the run's config as well.

/// Steps skipped before measuring (allocator, caches and the data thread settle).
pub const SETTLE_STEPS: u64 = 10;
/// Steps measured (inside the default 200 warm-up steps, whose learning rate does not
/// depend on the horizon yet to be fixed).
pub const MEASURE_STEPS: u64 = 90;
/// Share of the budget planned for: probes, checkpoints and a shared machine's noise
/// take the rest. This project's machine changes speed under a run: one hour measured
/// 0.30 s a step, then averaged 0.32; another measured 0.088 s and ran at 0.11 from its
/// second minute on. With the evaluations a late run skips, 10% absorbs most of that.
pub const PLANNED_SHARE: f64 = 0.9;
/// Evaluations skipped in a row at most, so that a run far behind its plan still shows a
/// test-accuracy curve (every fifth epoch at worst).
pub const MAX_SKIPPED_IN_ROW: u32 = 4;

pub use crate::events::Sizing;

/// Seconds from the start of the run to the end of step `n`, with an evaluation at each
/// epoch's end and one after a last partial epoch; `elapsed` was spent by step `at`.
fn planned_secs(n: u64, at: u64, elapsed: f64, per_step: f64, eval: f64, spe: u64) -> f64 {
    let evals = n.div_ceil(spe).saturating_sub(at / spe);
    elapsed + (n - at) as f64 * per_step + evals as f64 * eval
}

/// The most steps whose training and evaluations fit in `budget` seconds (at least `at`,
/// the steps already done): a binary search over the plan, which grows with the steps.
/// Two epochs or more are rounded down to whole epochs, so that every evaluation sees a
/// whole epoch and a slightly slower or faster machine mostly plans the same run.
pub fn size(
    budget: f64,
    at: u64,
    elapsed: f64,
    secs_per_step: f64,
    eval_secs: f64,
    steps_per_epoch: u64,
) -> Sizing {
    let spe = steps_per_epoch.max(1);
    let per_step = secs_per_step.max(1e-9);
    let target = budget * PLANNED_SHARE;
    let plan = |n| planned_secs(n, at, elapsed, per_step, eval_secs, spe);
    let (mut lo, mut hi) = (at, at + (target / per_step).ceil().min(1e15) as u64 + 1);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if plan(mid) <= target {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo >= 2 * spe {
        lo = (lo / spe * spe).max(at);
    }
    Sizing {
        final_step: lo,
        epochs: lo.div_ceil(spe),
        secs_per_step,
        eval_secs,
        planned_secs: plan(lo),
    }
}

/// Whether an evaluation before the last one is due: `elapsed` seconds spent, this
/// evaluation, `steps_left` more steps at the pace measured so far and the last
/// evaluation must all end within the budget, unless `skipped` evaluations in a row were
/// skipped already. A run the machine slowed down after it was sized skips evaluations
/// rather than overrun; training itself is never changed, so its losses do not depend
/// on the machine.
pub fn evaluation_due(
    budget: f64,
    elapsed: f64,
    steps_left: u64,
    secs_per_step: f64,
    eval_secs: f64,
    skipped: u32,
) -> bool {
    skipped >= MAX_SKIPPED_IN_ROW
        || elapsed + 2.0 * eval_secs + steps_left as f64 * secs_per_step <= budget
}

/// A run is re-planned to end sooner when, at its latest pace and doing only the
/// evaluations it cannot skip, it would use more than this share of the budget ...
pub const SHORTEN_ABOVE_SHARE: f64 = 0.97;
/// ... and then aims at this share, so that one slow spell does not re-plan every epoch.
pub const SHORTEN_TO_SHARE: f64 = 0.93;
/// A run is re-planned to end later when, at its latest pace and with all its
/// evaluations, it would use less than this share (it then plans PLANNED_SHARE, as the
/// sizing does). The sizing's steps 11-100 are often slower than the rest: allocator,
/// caches and the data thread are still settling.
pub const EXTEND_BELOW_SHARE: f64 = 0.85;

/// Seconds at which a run that spent `elapsed` by step `at` (an epoch's end) ends at
/// step `n`, at `pace` a step, doing only the evaluations it cannot skip: the last one,
/// and one after every MAX_SKIPPED_IN_ROW skipped.
fn least_secs(n: u64, at: u64, elapsed: f64, pace: f64, eval: f64, spe: u64) -> f64 {
    let epochs = n.div_ceil(spe).saturating_sub(at / spe);
    let evals = match epochs {
        0 => 0,
        e => 1 + (e - 1) / (MAX_SKIPPED_IN_ROW as u64 + 1),
    };
    elapsed + (n - at) as f64 * pace + evals as f64 * eval
}

/// Where a budgeted run at an epoch's end (`at`, `elapsed` seconds spent, `pace` seconds
/// a step lately) should end instead of `final_step`, or None while its plan holds:
/// - far behind (past SHORTEN_ABOVE_SHARE even with the evaluations it may skip
///   skipped): the latest epoch end that fits SHORTEN_TO_SHARE that way (`at` itself
///   when none does, so the run ends with its last evaluation now);
/// - far ahead (inside EXTEND_BELOW_SHARE with every evaluation), when `may_extend`
///   (no max_steps of the user's binds): the length a sizing would give now, if that is
///   an epoch longer at least.
pub fn replan(
    budget: f64,
    (at, elapsed): (u64, f64),
    (pace, eval_secs): (f64, f64),
    steps_per_epoch: u64,
    final_step: u64,
    may_extend: bool,
) -> Option<Sizing> {
    let spe = steps_per_epoch.max(1);
    if at >= final_step {
        return None;
    }
    let least = |n| least_secs(n, at, elapsed, pace, eval_secs, spe);
    if least(final_step) > budget * SHORTEN_ABOVE_SHARE {
        let mut n = at + (final_step - at - 1) / spe * spe;
        while n > at && least(n) > budget * SHORTEN_TO_SHARE {
            n -= spe;
        }
        return Some(Sizing {
            final_step: n,
            epochs: n.div_ceil(spe),
            secs_per_step: pace,
            eval_secs,
            planned_secs: least(n),
        });
    }
    let all = planned_secs(final_step, at, elapsed, pace, eval_secs, spe);
    if may_extend && all < budget * EXTEND_BELOW_SHARE {
        let longer = size(budget, at, elapsed, pace, eval_secs, spe);
        if longer.final_step >= final_step + spe {
            return Some(longer);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_is_skipped_only_when_it_would_overrun() {
        // 3000 s spent, 2000 steps at 0.25 s left (500 s), evaluations of 10 s: 3520 s.
        assert!(evaluation_due(3600.0, 3000.0, 2000, 0.25, 10.0, 0));
        assert!(evaluation_due(3520.0, 3000.0, 2000, 0.25, 10.0, 0));
        assert!(!evaluation_due(3519.0, 3000.0, 2000, 0.25, 10.0, 0));
        // Slower steps than planned: the same point no longer fits.
        assert!(!evaluation_due(3600.0, 3000.0, 2000, 0.3, 10.0, 3));
        // ... but after four skipped in a row the curve gets its point anyway.
        assert!(evaluation_due(3600.0, 3000.0, 2000, 0.3, 10.0, 4));
    }

    #[test]
    fn steps_and_evaluations_fill_the_budget() {
        // 0.2 s a step, 5 s an evaluation, 100 steps an epoch: an epoch costs 25 s.
        let s = size(1000.0, 40, 7.0, 0.2, 5.0, 100);
        assert!(s.planned_secs <= 1000.0 * PLANNED_SHARE);
        let over = planned_secs(s.final_step + 100, 40, 7.0, 0.2, 5.0, 100);
        assert!(
            over > 1000.0 * PLANNED_SHARE,
            "one more epoch would still fit"
        );
        // 7 + 0.2 (N - 40) + 5 ceil(N / 100) <= 900 s: N = 3600, 36 epochs.
        assert_eq!((s.final_step, s.epochs), (3600, 36));
    }

    #[test]
    fn evaluations_already_done_are_not_counted_again() {
        let fresh = size(600.0, 250, 50.0, 0.1, 10.0, 100);
        // Two evaluations (20 s) are inside `elapsed` already.
        assert_eq!(
            planned_secs(fresh.final_step, 250, 50.0, 0.1, 10.0, 100),
            50.0 + (fresh.final_step - 250) as f64 * 0.1
                + (fresh.final_step.div_ceil(100) - 2) as f64 * 10.0
        );
    }

    #[test]
    fn less_than_two_epochs_are_not_rounded() {
        let s = size(80.0, 40, 1.0, 0.5, 2.0, 100);
        assert!((150..200).contains(&s.final_step), "{s:?}");
        assert_eq!(s.epochs, 2);
    }

    #[test]
    fn a_budget_already_spent_ends_at_once() {
        let s = size(60.0, 40, 100.0, 0.5, 5.0, 100);
        assert_eq!(s.final_step, 40);
    }

    #[test]
    fn a_run_behind_its_plan_is_replanned_to_the_latest_epoch_that_fits() {
        // An hour of 45,000 steps of 100 an epoch with 5 s evaluations, at step 20,000
        // after 1,800 s: at 0.05 s a step it ends at 3,300 s with the 50 evaluations
        // the skips leave at least, 4,300 s with all 250: its plan holds (evaluations
        // will be skipped).
        assert_eq!(
            replan(3600.0, (20_000, 1800.0), (0.05, 5.0), 100, 45_000, true),
            None
        );
        // At 0.09 s a step the 25,000 steps left take 2,250 s: 4,300 s with the 50
        // forced evaluations, past 97% of the hour. The latest epoch end inside 93%
        // (3,348 s): 1,800 + 0.09 (n - 20,000) + 5 (1 + (epochs - 1) / 5) gives 35,400
        // (3,341 s; one epoch more is 3,350 s).
        let s = replan(3600.0, (20_000, 1800.0), (0.09, 5.0), 100, 45_000, true).unwrap();
        let n = s.final_step;
        assert_eq!((n, s.epochs, s.planned_secs), (35_400, 354, 3341.0));
        assert!(least_secs(n, 20_000, 1800.0, 0.09, 5.0, 100) <= 3600.0 * SHORTEN_TO_SHARE);
        assert!(least_secs(n + 100, 20_000, 1800.0, 0.09, 5.0, 100) > 3600.0 * SHORTEN_TO_SHARE);
        // A run already out of time ends at this epoch's end, with its evaluation.
        let now = replan(3600.0, (20_000, 3590.0), (0.09, 5.0), 100, 45_000, true).unwrap();
        assert_eq!(now.final_step, 20_000);
        // The run's own last step is never moved later.
        assert_eq!(
            replan(3600.0, (45_000, 3700.0), (0.09, 5.0), 100, 45_000, true),
            None
        );
    }

    #[test]
    fn a_run_well_ahead_of_its_plan_is_replanned_to_fill_the_budget() {
        // 1 s evaluations: at 0.04 s a step the 25,000 steps left and their 250
        // evaluations end at 3,050 s, inside 85% of the hour (3,060 s). A sizing now
        // fits 1,800 + 0.04 d + d / 100 <= 3,240 s: 28,800 steps more, whole epochs.
        let s = replan(3600.0, (20_000, 1800.0), (0.04, 1.0), 100, 45_000, true).unwrap();
        assert_eq!((s.final_step, s.epochs), (48_800, 488));
        assert!(s.planned_secs <= 3600.0 * PLANNED_SHARE);
        // Not when a max_steps of the user's is what ends the run ...
        assert_eq!(
            replan(3600.0, (20_000, 1800.0), (0.04, 1.0), 100, 45_000, false),
            None
        );
        // ... nor at 0.05 s a step (3,300 s, above 85%).
        assert_eq!(
            replan(3600.0, (20_000, 1800.0), (0.05, 1.0), 100, 45_000, true),
            None
        );
    }
}
