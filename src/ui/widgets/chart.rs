//! Chart helpers: smoothing, downsampling and axis bounds that survive empty series,
//! single points, NaN and huge ranges.

/// At most about `max_points` points: per bucket of x, the minimum and maximum y in x
/// order, so spikes survive. Non-finite points are dropped.
pub fn downsample(points: &[(f64, f64)], max_points: usize) -> Vec<(f64, f64)> {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    // Two points per bucket, and one more for the last point.
    let buckets = (max_points.saturating_sub(1) / 2).max(1);
    if finite.len() <= max_points.max(2) {
        return finite;
    }
    let per = finite.len().div_ceil(buckets);
    let mut out = Vec::with_capacity(buckets * 2);
    for chunk in finite.chunks(per) {
        let (mut lo, mut hi) = (chunk[0], chunk[0]);
        for &p in chunk {
            if p.1 < lo.1 {
                lo = p;
            }
            if p.1 > hi.1 {
                hi = p;
            }
        }
        if lo.0 <= hi.0 {
            out.push(lo);
            if hi != lo {
                out.push(hi);
            }
        } else {
            out.push(hi);
            out.push(lo);
        }
    }
    // The last point sets where the curve ends: keep it.
    if let (Some(&last), Some(&end)) = (finite.last(), out.last()) {
        if last.0 > end.0 {
            out.push(last);
        }
    }
    out
}

/// The range of y over all series (finite values only), padded by 5%; a flat or single
/// value gets a small range around it; `None` when there is nothing to show.
pub fn y_bounds<'a>(series: impl IntoIterator<Item = &'a [(f64, f64)]>) -> Option<[f64; 2]> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in series {
        for &(_, y) in s {
            if y.is_finite() {
                lo = lo.min(y);
                hi = hi.max(y);
            }
        }
    }
    if !lo.is_finite() {
        return None;
    }
    let span = hi - lo;
    if span <= f64::EPSILON * hi.abs().max(1.0) {
        let pad = (hi.abs() * 0.1).max(1e-3);
        return Some([lo - pad, hi + pad]);
    }
    Some([lo - span * 0.05, hi + span * 0.05])
}

/// The range of x over all series; a single x gets a unit range.
pub fn x_bounds<'a>(series: impl IntoIterator<Item = &'a [(f64, f64)]>) -> Option<[f64; 2]> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in series {
        for &(x, _) in s {
            if x.is_finite() {
                lo = lo.min(x);
                hi = hi.max(x);
            }
        }
    }
    if !lo.is_finite() {
        return None;
    }
    if hi - lo < 1e-9 {
        return Some([lo - 0.5, hi + 0.5]);
    }
    Some([lo, hi])
}

/// A round step (1, 2 or 5 times a power of ten) that cuts `span` into about `parts`.
pub fn nice_step(span: f64, parts: f64) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / parts.max(1.0);
    let magnitude = 10f64.powf(raw.log10().floor());
    let m = raw / magnitude;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// Bounds widened outwards to multiples of a round step, so that small changes in the
/// data leave the axes where they are (and a redraw changes only the new points).
pub fn stable_bounds([lo, hi]: [f64; 2]) -> [f64; 2] {
    let step = nice_step(hi - lo, 8.0);
    let (a, b) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    if a.is_finite() && b.is_finite() && b > a {
        [a, b]
    } else {
        [lo, hi]
    }
}

/// log10 for a log-scale axis; values <= 0 have no place on it and become NaN.
pub fn log10_or_nan(y: f64) -> f64 {
    if y > 0.0 {
        y.log10()
    } else {
        f64::NAN
    }
}

/// A compact number for axis labels: 3 significant digits, SI-ish for large values.
pub fn compact(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_keeps_extremes_and_order() {
        assert!(downsample(&[], 10).is_empty());
        assert_eq!(downsample(&[(1.0, 2.0)], 10), vec![(1.0, 2.0)]);
        let points: Vec<(f64, f64)> = (0..1000)
            .map(|i| (i as f64, if i == 500 { 100.0 } else { (i % 7) as f64 }))
            .collect();
        let d = downsample(&points, 100);
        assert!(d.len() <= 100);
        assert!(d.contains(&(500.0, 100.0)));
        assert!(d.windows(2).all(|w| w[0].0 <= w[1].0));
        let with_nan = [(0.0, f64::NAN), (1.0, 1.0)];
        assert_eq!(downsample(&with_nan, 10), vec![(1.0, 1.0)]);
    }

    #[test]
    fn bounds_handle_empty_single_nan_and_huge_ranges() {
        assert_eq!(y_bounds([&[][..]]), None);
        assert_eq!(y_bounds([&[(0.0, f64::NAN)][..]]), None);
        let [lo, hi] = y_bounds([&[(0.0, 2.0)][..]]).unwrap();
        assert!(lo < 2.0 && hi > 2.0);
        let [lo, hi] = y_bounds([&[(0.0, 0.0)][..]]).unwrap();
        assert!(lo < 0.0 && hi > 0.0);
        let [lo, hi] = y_bounds([&[(0.0, -1e300), (1.0, 1e300)][..]]).unwrap();
        assert!(lo.is_finite() && hi.is_finite() && lo < hi);
        assert_eq!(x_bounds([&[(3.0, 1.0)][..]]), Some([2.5, 3.5]));
        assert_eq!(
            x_bounds([&[(1.0, 1.0)][..], &[(5.0, 0.0)][..]]),
            Some([1.0, 5.0])
        );
    }

    #[test]
    fn stable_bounds_round_outwards_and_hold_still() {
        assert_eq!(nice_step(100.0, 10.0), 10.0);
        assert_eq!(nice_step(0.7, 8.0), 0.1);
        assert_eq!(nice_step(3000.0, 8.0), 500.0);
        assert_eq!(nice_step(f64::NAN, 8.0), 1.0);
        let a = stable_bounds([1.234, 2.311]);
        assert!(a[0] <= 1.234 && a[1] >= 2.311);
        // A slightly different range gives the same axes.
        assert_eq!(stable_bounds([1.236, 2.305]), a);
        assert_eq!(stable_bounds([5.0, 5.0]), [5.0, 5.0]);
    }

    #[test]
    fn numbers_print_compactly() {
        assert_eq!(compact(2.31259), "2.31");
        assert_eq!(compact(0.4567), "0.457");
        assert_eq!(compact(0.00012), "1.2e-4");
        assert_eq!(compact(12_345.0), "12k");
        assert_eq!(compact(60.0), "60.0");
        assert_eq!(compact(f64::NAN), "-");
        assert!(log10_or_nan(0.0).is_nan());
        assert!((log10_or_nan(100.0) - 2.0).abs() < 1e-12);
    }
}
