//! exp and erf for f32 written branch-free, so loops over slices vectorise (AVX2
//! here). The C library's scalar `expf` and the `libm` crate's `erff` cost 5–10 ns per
//! value, which made the attention softmax and the MLP's GELU most of a forward pass.
//! Accuracy is within a few f32 ulps of the exact functions (tested below); f64 keeps
//! the exact library functions (the tests' reference precision).
//!
//! `FMA` picks fused multiply-adds for the polynomials: true only in kernels compiled
//! for CPUs that have them (see `ops::kernel!`), where they shorten each polynomial's
//! chain of dependent operations by half; elsewhere `mul_add` would be a library call.

/// a * b + c, fused when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so n * ln2 subtracts exactly (Cody–Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x for f32, relative error below 3e-7 on [-87, 88.3]; 0 below -87 (never a
/// subnormal), saturating at 2.4e38 above 88.3.
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.376_26);
    // Round to nearest by adding and removing 1.5 * 2^23: `f32::round` is a library
    // call on baseline x86-64 (no SSE4.1) and would stop the loop vectorising.
    const ROUNDER: f32 = 12_582_912.0;
    let shifted = madd::<FMA>(x, LOG2_E, ROUNDER);
    let n = shifted - ROUNDER;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    // Cephes expf polynomial for e^r - 1 - r on |r| <= ln2 / 2.
    let mut p = 1.987_569_1e-4_f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 5e-1);
    let e = madd::<FMA>(p * r, r, r) + 1.0;
    // 2^n through the exponent bits; n is within [-126, 127] after the clamp. At
    // 1.5 * 2^23 one ulp is 1, so n is also in `shifted`'s low mantissa bits: read from
    // there, not with `n as i32`, whose saturating conversion compiles to scalar code
    // per lane and stopped these loops vectorising.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUNDER.to_bits())
        .wrapping_add(127);
    let y = e * f32::from_bits(biased << 23);
    // Flush what would be subnormal to zero: arithmetic on subnormals is ~100x slower.
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// erf(x) for f32, within about 2 ulp (minimax polynomials after N. Juffa's `erff`,
/// both halves computed and one selected, so a loop over values stays branch-free).
#[inline(always)]
pub fn erf<const FMA: bool>(x: f32) -> f32 {
    let t = x.abs();
    let s = x * x;
    // |x| > 0.927734375: erf = 1 - exp(poly(t)).
    let mut r = madd::<FMA>(-1.728_534_7e-5, t, 3.831_971_3e-4);
    let u = madd::<FMA>(-3.883_964_4e-3, t, 2.425_462_2e-2);
    r = madd::<FMA>(r, s, u);
    r = madd::<FMA>(r, t, -1.067_778_8e-1);
    r = madd::<FMA>(r, t, -6.348_467e-1);
    r = madd::<FMA>(r, t, -1.287_175_1e-1);
    r = madd::<FMA>(r, t, -t);
    let outer = (1.0 - exp::<FMA>(r)).copysign(x);
    // Small |x|: erf = x + x * poly(x^2).
    let mut p = -5.967_617e-4_f32;
    p = madd::<FMA>(p, s, 4.991_194_2e-3);
    p = madd::<FMA>(p, s, -2.676_813_5e-2);
    p = madd::<FMA>(p, s, 1.128_199_3e-1);
    p = madd::<FMA>(p, s, -3.761_253_4e-1);
    p = madd::<FMA>(p, s, 1.283_791_7e-1);
    let inner = madd::<FMA>(p, x, x);
    if t > 0.927_734_4 {
        outer
    } else {
        inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms of a function: plain multiply-adds (baseline CPUs) and fused ones.
    type Forms = [(bool, fn(f32) -> f32); 2];

    #[test]
    fn exp_matches_the_library_to_a_few_ulps() {
        let forms: Forms = [(false, exp::<false>), (true, exp::<true>)];
        for (fma, exp) in forms {
            let mut worst = 0.0f64;
            for i in -870_000..=883_000 {
                let x = i as f32 * 1e-4;
                let exact = f64::from(x).exp();
                let rel = (f64::from(exp(x)) - exact).abs() / exact;
                worst = worst.max(rel);
            }
            assert!(worst < 3e-7, "fma {fma}: worst relative error {worst}");
            assert_eq!(exp(-87.5), 0.0);
            assert_eq!(exp(-200.0), 0.0);
            assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
            assert_eq!(exp(0.0), 1.0);
        }
    }

    #[test]
    fn erf_matches_the_library() {
        let forms: Forms = [(false, erf::<false>), (true, erf::<true>)];
        for (fma, erf) in forms {
            let mut worst = 0.0f64;
            for i in -60_000..=60_000 {
                let x = i as f32 * 1e-4;
                let err = (f64::from(erf(x)) - libm::erf(f64::from(x))).abs();
                worst = worst.max(err);
            }
            assert!(worst < 3e-7, "fma {fma}: worst absolute error {worst}");
            assert_eq!(erf(0.0), 0.0);
            assert!((erf(10.0) - 1.0).abs() < 1e-7 && (erf(-10.0) + 1.0).abs() < 1e-7);
        }
    }
}
