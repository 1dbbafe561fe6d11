//! A wall-clock budget for a run (`train.budget`): the trainer measures its own speed
//! over the first steps, then fixes how many steps fit, so that training and every
//! evaluation end within the budget. The count and the learning-rate schedule's
//! horizon are written into the run's config, so a resumed run keeps them.

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
}
