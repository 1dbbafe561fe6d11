//! The product on VDPBF16PS (AVX-512 BF16, e.g. AMD Zen 4 and 5, Intel Cooper Lake):
//! one instruction multiplies 16 pairs of bf16 by 16 pairs and adds each pair's two
//! products into one of 16 f32 sums, reading the right factor's pairs of rows exactly
//! as the tiles do. Register blocking: 8 rows x 32 columns of sums (16 of the 32
//! vector registers), one broadcast pair of a row against two loaded vectors of pairs.

use super::layout::padded;
use super::Start;
use std::arch::x86_64::*;

/// Rows of the output per register block (divides the packed rows' padding, 32).
const ROWS: usize = 8;
/// Columns per register block: two vectors of 16 sums.
const COLS: usize = 32;

/// dst (+)= A · B from the packed factors (A padded(m) rows of padded(k) / 2
/// pairs, B padded(k) / 2 rows of padded(n) pairs). Each sum starts at zero and
/// runs over the inner dimension in order, so a value does not depend on the shape
/// around it; what it starts from (dst's old value, or a bias row read in place of
/// rows filled with it, which must hold n values) is added at the end.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn multiply(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    a: &[u32],
    b: &[u32],
    start: Start,
) {
    let (row_pairs, np) = (padded(k) / 2, padded(n));
    // The padding of the inner dimension is zeros: no need to multiply it.
    let pairs = k.div_ceil(2);
    debug_assert!(a.len() >= padded(m) * row_pairs && b.len() >= row_pairs * np);
    for j0 in (0..n).step_by(COLS) {
        let cols = (n - j0).min(COLS);
        let masks = [lane_mask(cols.min(16)), lane_mask(cols.saturating_sub(16))];
        for i0 in (0..m).step_by(ROWS) {
            let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
            let a0 = a.as_ptr().add(i0 * row_pairs);
            let mut bp = b.as_ptr().add(j0);
            for p in 0..pairs {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16).cast()));
                for (r, row) in sums.iter_mut().enumerate() {
                    let x = *a0.add(r * row_pairs + p) as i32;
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(x));
                    row[0] = _mm512_dpbf16_ps(row[0], x, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], x, b1);
                }
                bp = bp.add(np);
            }
            for (r, row) in sums.iter().enumerate().take(m - i0) {
                let d = dst.add((i0 + r) * dst_rs + j0 * dst_cs);
                if dst_cs == 1 {
                    for (h, (&v, &mask)) in row.iter().zip(&masks).enumerate() {
                        let d = d.add(16 * h);
                        let v = match start {
                            Start::Zero => v,
                            Start::Dst => _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), v),
                            Start::Row(bias) => {
                                let bias = _mm512_maskz_loadu_ps(mask, bias.add(j0 + 16 * h));
                                _mm512_add_ps(bias, v)
                            }
                        };
                        _mm512_mask_storeu_ps(d, mask, v);
                    }
                } else {
                    let mut values = [0f32; COLS];
                    _mm512_storeu_ps(values.as_mut_ptr(), row[0]);
                    _mm512_storeu_ps(values.as_mut_ptr().add(16), row[1]);
                    for (c, &v) in values[..cols].iter().enumerate() {
                        let d = d.add(c * dst_cs);
                        *d = match start {
                            Start::Zero => v,
                            Start::Dst => *d + v,
                            Start::Row(bias) => *bias.add(j0 + c) + v,
                        };
                    }
                }
            }
        }
    }
}

/// A mask of the first `lanes` of 16.
#[inline(always)]
fn lane_mask(lanes: usize) -> __mmask16 {
    ((1u32 << lanes) - 1) as __mmask16
}
