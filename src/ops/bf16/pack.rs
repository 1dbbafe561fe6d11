//! Packing the factors of a bf16 product into the layouts the instructions read: the
//! left one as rows of bf16 pairs, the right one in pairs of rows (the "VNNI" layout),
//! both padded with zeros to whole tiles and starting at a cache line; 32 values at a
//! time with AVX-512 BF16's rounding instruction, and a factor read transposed 16 x 16
//! pairs at a time, transposed in registers. Every path rounds as [`to_bf16`] does
//! (tested against it).

use super::layout::padded;

/// f32 to bf16 bits, rounded to nearest, ties to even (a NaN stays a NaN).
#[inline(always)]
pub(super) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// Two values as one 32-bit pair: `lo` first in memory.
#[inline(always)]
pub(super) fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// Packed pairs whose first one starts a cache line (64 bytes): every row a tile
/// loads or stores (64 bytes) then lies in one line, not across two. Measured on AMX
/// at the model's shapes: the products 1.3-1.8x faster than from buffers 16 bytes off.
#[derive(Default)]
pub(super) struct Pairs {
    pub(super) buf: Vec<u32>,
    start: usize,
    len: usize,
}

/// Pairs per cache line: the most an aligned start can be past the buffer's start.
pub(super) const LINE_PAIRS: usize = 16;

impl Pairs {
    /// A buffer of pairs kept before (its values, length and capacity).
    pub(super) fn from_vec(buf: Vec<u32>) -> Self {
        Self {
            buf,
            start: 0,
            len: 0,
        }
    }

    /// `len` pairs starting at a cache line, holding whatever they held (the packing
    /// writes every one): the buffer only grows, and then zero-fills the growth alone.
    pub(super) fn resize(&mut self, len: usize) -> &mut [u32] {
        if self.buf.len() < len + LINE_PAIRS {
            self.buf.resize(len + LINE_PAIRS, 0);
        }
        // u32s to the next multiple of 64 bytes (a Vec<u32> starts at a multiple of 4).
        self.start = (self.buf.as_ptr() as usize).wrapping_neg() % 64 / 4;
        self.len = len;
        &mut self.buf[self.start..self.start + len]
    }

    pub(super) fn as_slice(&self) -> &[u32] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Zeros that stand in for the row past the end of a matrix with an odd number of rows.
static ZEROS: [f32; 4096] = [0.0; 4096];

/// `dst[..padded_len]` = the `len` values at `src` as bf16, then zeros.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")
)]
#[inline]
unsafe fn round_row(dst: *mut u16, src: *const f32, len: usize, padded_len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // 32 values at a time: two vectors rounded into one.
        for c in (0..padded_len).step_by(32) {
            let (a, b) = (lanes_from(c, len), lanes_from(c + 16, len));
            let a = _mm512_maskz_loadu_ps(a, src.add(c));
            let b = _mm512_maskz_loadu_ps(b, src.add(c + 16));
            _mm512_storeu_si512(dst.add(c).cast(), bf16_32(a, b));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for c in 0..padded_len {
        *dst.add(c) = if c < len { to_bf16(*src.add(c)) } else { 0 };
    }
}

/// `dst[..padded_len]` = pairs of the `len` values at `lo` and at `hi`, then zeros.
/// With `HALVES`, the same values rounded also go to `halves` as two rows of
/// `padded_len` bf16, `lo`'s then `hi`'s: a left factor's rows packed in the same pass
/// (a const, so that the packing of a right factor alone carries no test for it).
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")
)]
#[inline]
unsafe fn pair_rows<const HALVES: bool>(
    dst: *mut u32,
    (lo, hi): (*const f32, *const f32),
    (len, padded_len): (usize, usize),
    halves: *mut u16,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        for c in (0..padded_len).step_by(16) {
            let mask = lanes_from(c, len);
            let l = _mm512_maskz_loadu_ps(mask, lo.add(c));
            let h = _mm512_maskz_loadu_ps(mask, hi.add(c));
            let both = bf16_32(l, h);
            let pairs = interleave(both);
            _mm512_mask_storeu_epi32(dst.add(c).cast(), lanes_from(c, padded_len), pairs);
            if HALVES {
                store_row_halves(halves, padded_len, (0, c), both);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for c in 0..padded_len {
        let (l, h) = match c < len {
            true => (*lo.add(c), *hi.add(c)),
            false => (0.0, 0.0),
        };
        *dst.add(c) = pair(l, h);
        if HALVES {
            *halves.add(c) = to_bf16(l);
            *halves.add(padded_len + c) = to_bf16(h);
        }
    }
}

/// The k rows of n values at `src` (rows `rs` apart) in pairs of rows into `out`
/// ([`pack_rhs`]'s layout), and with `HALVES` each row rounded into a left factor's
/// rows of padded(n) bf16 at `halves` too; only the pairs of rows past k are zeroed,
/// not the whole buffer first.
///
/// # Safety
/// As [`pack_rhs`]; n is at most 4,096, and with `HALVES`, `halves` covers
/// 2 · k.div_ceil(2) rows.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")
)]
unsafe fn pack_row_pairs<const HALVES: bool>(
    out: &mut [u32],
    (k, n): (usize, usize),
    (src, rs): (*const f32, usize),
    halves: *mut u16,
) {
    let np = padded(n);
    let pairs = k.div_ceil(2);
    for p in 0..pairs {
        let lo = src.add(2 * p * rs);
        let hi = match 2 * p + 1 < k {
            true => src.add((2 * p + 1) * rs),
            false => ZEROS.as_ptr(),
        };
        let rows = halves.wrapping_add(2 * p * np);
        pair_rows::<HALVES>(out.as_mut_ptr().add(p * np), (lo, hi), (n, np), rows);
    }
    out[pairs * np..].fill(0);
}

/// Zeros the padding of a packed factor whose lines fill each of its first `rows`
/// rows (of `row_len` pairs) up to `used` pairs: the rest of those rows, and every row
/// after them.
fn zero_padding(out: &mut [u32], row_len: usize, (rows, used): (usize, usize)) {
    for row in out[..rows * row_len].chunks_exact_mut(row_len) {
        row[used..].fill(0);
    }
    out[rows * row_len..].fill(0);
}

/// The transposed left factor's pairs: `out[i * row_pairs + p]` = the pair of
/// src[2p·cs + i] and src[(2p + 1)·cs + i] for i < m and p < k.div_ceil(2) (a gradient g
/// read as gᵀ: rows 2p and 2p + 1 of g make column p of pairs), [`transposed_blocks`]
/// of lines rounded along memory. With `HALVES`, src's own rows go rounded to
/// `halves` too (a pointer and a row length in bf16), up to column m rounded up to 16:
/// g's left factor packed in the same pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
unsafe fn pack_lhs_transposed<const HALVES: bool>(
    out: &mut [u32],
    row_pairs: usize,
    (m, k): (usize, usize),
    src: *const f32,
    cs: usize,
    halves: (*mut u16, usize),
) {
    use std::arch::x86_64::*;
    // Column p of pairs from row i0: rows 2p and 2p + 1 of src, 16 values from i0.
    let line = |p: usize, i0: usize| {
        let mask = lanes_from(i0, m);
        let lo = _mm512_maskz_loadu_ps(mask, src.add(2 * p * cs + i0));
        let hi = match 2 * p + 1 < k {
            true => _mm512_maskz_loadu_ps(mask, src.add((2 * p + 1) * cs + i0)),
            false => _mm512_setzero_ps(),
        };
        let both = bf16_32(lo, hi);
        if HALVES {
            store_row_halves(halves.0, halves.1, (2 * p, i0), both);
        }
        interleave(both)
    };
    transposed_blocks(out, row_pairs, (m, k.div_ceil(2)), line);
}

/// The transposed right factor's pairs (k even): `out[p * np + j]` = the pair of
/// src[j·cs + 2p] and src[j·cs + 2p + 1] for j < n and p < k / 2 (a weight read as Wᵀ,
/// keys as Kᵀ: neighbours in a column of the factor), [`transposed_blocks`] of lines
/// of 32 neighbours.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
unsafe fn pack_rhs_transposed(
    out: &mut [u32],
    np: usize,
    (k, n): (usize, usize),
    src: *const f32,
    cs: usize,
) {
    use std::arch::x86_64::*;
    // Column j of pairs from pair p0: 32 values of src's column j from 2 * p0.
    let line = |j: usize, p0: usize| {
        let (first, second) = (lanes_from(2 * p0, k), lanes_from(2 * p0 + 16, k));
        let col = src.add(j * cs + 2 * p0);
        let a = _mm512_maskz_loadu_ps(first, col);
        let b = _mm512_maskz_loadu_ps(second, col.wrapping_add(16));
        bf16_32(a, b)
    };
    transposed_blocks(out, np, (k / 2, n), line);
}

/// `out` (rows of `stride` pairs) gets `rows` x `cols` pairs, 16 x 16 at a time:
/// `line(c, r0)` makes column c's 16 pairs of rows r0.. (lane i: row r0 + i), 16 such
/// lines are transposed in registers, and each row is stored whole (the zero lanes of
/// a partial block are the padding's zeros). What both transposed packings share.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
unsafe fn transposed_blocks(
    out: &mut [u32],
    stride: usize,
    (rows, cols): (usize, usize),
    mut line: impl FnMut(usize, usize) -> std::arch::x86_64::__m512i,
) {
    use std::arch::x86_64::*;
    debug_assert!(stride.is_multiple_of(16) && out.len() >= rows * stride);
    for c0 in (0..cols).step_by(16) {
        for r0 in (0..rows).step_by(16) {
            let mut block = [_mm512_setzero_si512(); 16];
            for (dc, l) in block.iter_mut().enumerate().take(cols - c0) {
                *l = line(c0 + dc, r0);
            }
            transpose16(&mut block);
            for (dr, row) in block.iter().enumerate().take(rows - r0) {
                let dst = out.as_mut_ptr().add((r0 + dr) * stride + c0);
                _mm512_storeu_si512(dst.cast(), *row);
            }
        }
    }
}

/// Transposes 16 x 16 32-bit values in registers: within 128-bit lanes by unpacking
/// and shuffling, then the lanes across registers (pure moves: every bit kept).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(rows: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    let r: [__m512; 16] = std::array::from_fn(|i| _mm512_castsi512_ps(rows[i]));
    // t[2q], t[2q + 1]: rows 2q and 2q + 1 interleaved (columns 4L, 4L+1 | 4L+2, 4L+3).
    let mut t = [_mm512_setzero_ps(); 16];
    for q in 0..8 {
        t[2 * q] = _mm512_unpacklo_ps(r[2 * q], r[2 * q + 1]);
        t[2 * q + 1] = _mm512_unpackhi_ps(r[2 * q], r[2 * q + 1]);
    }
    // u[4g + c], lane L: rows 4g..4g+4 of column 4L + c.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (a, b) = (4 * g, 4 * g + 2);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(t[a], t[b]);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xee>(t[a], t[b]);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[a + 1], t[b + 1]);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xee>(t[a + 1], t[b + 1]);
    }
    // v[c], c < 8: rows 0-3 of columns c and c + 8, then rows 4-7 of the same two;
    // v[8 + c]: rows 8-11 and 12-15 likewise.
    let mut v = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        v[c] = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        v[c + 4] = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
        v[8 + c] = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        v[12 + c] = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
    }
    // Column c is lanes 0 and 2 of v[c] then of v[8 + c]; column c + 8 lanes 1 and 3.
    for c in 0..8 {
        rows[c] = _mm512_castps_si512(_mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]));
        rows[c + 8] = _mm512_castps_si512(_mm512_shuffle_f32x4::<0xdd>(v[c], v[8 + c]));
    }
}

/// The mask of the lanes c.. c + 16 that lie below `len`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes_from(c: usize, len: usize) -> std::arch::x86_64::__mmask16 {
    let n = len.saturating_sub(c).min(16);
    ((1u32 << n) - 1) as u16
}

/// [`to_bf16`] of 32 values, `lo`'s 16 then `hi`'s, as 32 bf16 in that order.
/// VCVTNE2PS2BF16 rounds 32 in one instruction, to nearest even and NaNs quieted as
/// `to_bf16` does, but takes subnormal inputs (below 2^-126) as zero: a pair of vectors
/// holding one, rare in training, is rounded lane by lane instead, so every path keeps
/// the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
#[inline]
unsafe fn bf16_32(
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    const SUBNORMAL: i32 = 0x20;
    let subnormal =
        _mm512_fpclass_ps_mask::<SUBNORMAL>(lo) | _mm512_fpclass_ps_mask::<SUBNORMAL>(hi);
    if subnormal == 0 {
        return std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    }
    let (lo, hi) = (
        _mm512_cvtepi32_epi16(bf16_lanes(lo)),
        _mm512_cvtepi32_epi16(bf16_lanes(hi)),
    );
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

/// 32 bf16 (16 then 16) as 16 pairs: the first half's value i low, the second's high.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn interleave(halves: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // Word 2i takes word i, word 2i + 1 word 16 + i.
    let order = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    _mm512_permutexvar_epi16(order, halves)
}

/// [`to_bf16`] of 16 values at once, each in the low half of a 32-bit lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn bf16_lanes(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(x);
    let high = _mm512_srli_epi32(bits, 16);
    let odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
    let biased = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
    let rounded = _mm512_srli_epi32(biased, 16);
    let nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
    _mm512_mask_blend_epi32(nan, rounded, quiet)
}

/// Packs the left factor (m x k) as rows of bf16 pairs: `out` gets padded(m) rows of
/// padded(k) / 2 pairs, zero where the matrix ends.
///
/// # Safety
/// Only where the CPU has AVX-512 BF16 (every CPU with a bf16 instruction the kernels
/// use: AMX comes with it), whose rounding these loops run; `src` covers the matrix.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")
)]
pub(super) unsafe fn pack_lhs(
    out: &mut Pairs,
    (m, k): (usize, usize),
    src: *const f32,
    (rs, cs): (usize, usize),
) {
    let row_pairs = padded(k) / 2;
    let out = out.resize(padded(m) * row_pairs);
    if cs == 1 {
        // Rows contiguous (activations): a pair is two neighbours in a row. Every
        // value of the m rows is written, padding included; only the rows past m are
        // zeroed, not the whole buffer first.
        for i in 0..m {
            let dst = out.as_mut_ptr().add(i * row_pairs).cast::<u16>();
            round_row(dst, src.add(i * rs), k, 2 * row_pairs);
        }
        out[m * row_pairs..].fill(0);
        return;
    }
    if rs == 1 {
        // Columns contiguous (a transposed gradient): columns 2p and 2p + 1 make a line
        // of pairs along the rows, written down column p of pairs. Each of the m rows'
        // pairs is written, so only the padding is zeroed (none at whole tiles).
        let pairs = k.div_ceil(2);
        zero_padding(out, row_pairs, (m, pairs));
        #[cfg(target_arch = "x86_64")]
        pack_lhs_transposed::<false>(out, row_pairs, (m, k), src, cs, (std::ptr::null_mut(), 0));
        #[cfg(not(target_arch = "x86_64"))]
        for i in 0..m {
            for p in 0..pairs {
                let hi = if 2 * p + 1 < k {
                    *src.add((2 * p + 1) * cs + i)
                } else {
                    0.0
                };
                out[i * row_pairs + p] = pair(*src.add(2 * p * cs + i), hi);
            }
        }
        return;
    }
    out.fill(0);
    {
        let at = |i: usize, j: usize| {
            if j < k {
                *src.add(i * rs + j * cs)
            } else {
                0.0
            }
        };
        for i in 0..m {
            for p in 0..k.div_ceil(2) {
                out[i * row_pairs + p] = pair(at(i, 2 * p), at(i, 2 * p + 1));
            }
        }
    }
}

/// Stores the two halves of [`bf16_32`]'s result as 16 bf16 of row `r` and 16 of row
/// `r + 1` of a left factor packed as rows (`row_len` bf16 a row), from column `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
#[inline]
unsafe fn store_row_halves(
    rows: *mut u16,
    row_len: usize,
    (r, c): (usize, usize),
    both: std::arch::x86_64::__m512i,
) {
    use std::arch::x86_64::*;
    let dst = rows.add(r * row_len + c);
    _mm256_storeu_si256(dst.cast(), _mm512_castsi512_si256(both));
    _mm256_storeu_si256(
        dst.add(row_len).cast(),
        _mm512_extracti64x4_epi64::<1>(both),
    );
}

/// A matrix x (m x k, rows contiguous, `rs` apart) packed for both products that
/// read it, in one pass: as the left factor of x · B into `lhs` ([`pack_lhs`]'s
/// layout, m x k) and as the right factor of A · x into `rhs` ([`pack_rhs`]'s, k x n
/// for n = the columns, k = the rows). Each pair of rows is loaded and rounded once;
/// the rounded pair interleaved is a line of `rhs`, its halves are two rows of `lhs`.
/// A layer's input: the forward product reads it as the left factor, its weight
/// gradient as the right one. The same bits as the two packings apart (tested).
///
/// # Safety
/// As [`pack_lhs`]; x's rows hold at most 4,096 values.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")
)]
pub(super) unsafe fn pack_rows_both_ways(
    (lhs, rhs): (&mut Pairs, &mut Pairs),
    (m, k): (usize, usize),
    src: *const f32,
    rs: usize,
) {
    assert!(
        k <= ZEROS.len(),
        "pack_rows_both_ways: rows of at most 4,096 values"
    );
    let row_pairs = padded(k) / 2;
    let (lhs, rhs) = (
        lhs.resize(padded(m) * row_pairs),
        rhs.resize(padded(m) / 2 * padded(k)),
    );
    // lhs's rows are padded(k) bf16 long, as rhs's lines: each pair of rows' halves.
    let rows = lhs.as_mut_ptr().cast::<u16>();
    pack_row_pairs::<true>(rhs, (m, k), (src, rs), rows);
    lhs[2 * m.div_ceil(2) * row_pairs..].fill(0);
}

/// A gradient g (m x k, rows contiguous, `rs` apart) packed as the left factor of
/// both its products, in one pass: g itself into `rows` ([`pack_lhs`]'s layout, m x
/// k: the input gradient g · W) and gᵀ into `transposed` (k x m: the weight gradient
/// gᵀ · x). Each pair of g's rows is loaded and rounded 16 columns at a time, once:
/// interleaved it is a line of gᵀ's pairs ([`transposed_blocks`]), its halves are
/// pieces of two of g's rows. The same bits as the two packings apart (tested).
///
/// # Safety
/// As [`pack_lhs`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
pub(super) unsafe fn pack_lhs_both_ways(
    (rows, transposed): (&mut Pairs, &mut Pairs),
    (m, k): (usize, usize),
    src: *const f32,
    rs: usize,
) {
    let (row_pairs, t_row_pairs) = (padded(k) / 2, padded(m) / 2);
    let pairs = m.div_ceil(2);
    // The lines write g's rows up to column k rounded up to 16, and gᵀ's rows up to
    // its pairs: the rest is padding.
    let rows = rows.resize(padded(m) * row_pairs);
    zero_padding(rows, row_pairs, (2 * pairs, k.next_multiple_of(16) / 2));
    let transposed = transposed.resize(padded(k) * t_row_pairs);
    zero_padding(transposed, t_row_pairs, (k, pairs));
    let halves = (rows.as_mut_ptr().cast::<u16>(), 2 * row_pairs);
    pack_lhs_transposed::<true>(transposed, t_row_pairs, (k, m), src, rs, halves);
}

/// Packs the right factor (k x n) in pairs of rows: `out` gets padded(k) / 2 rows of
/// padded(n) pairs, pair (p, j) holding elements (2p, j) and (2p + 1, j).
///
/// # Safety
/// As [`pack_lhs`].
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")
)]
pub(super) unsafe fn pack_rhs(
    out: &mut Pairs,
    (k, n): (usize, usize),
    src: *const f32,
    (rs, cs): (usize, usize),
) {
    let np = padded(n);
    let out = out.resize(padded(k) / 2 * np);
    if cs == 1 && n <= ZEROS.len() {
        // Rows contiguous: two rows at a time, along them, padding included.
        pack_row_pairs::<false>(out, (k, n), (src, rs), std::ptr::null_mut());
        return;
    }
    if rs == 1 && k % 2 == 0 {
        // Columns contiguous (a weight read as Wᵀ, keys read as Kᵀ): a pair is two
        // neighbours in a column, so column j is a line of pairs, written down column j
        // of pairs. Each pair of the n columns is written: only the padding is zeroed.
        zero_padding(out, np, (k / 2, n));
        #[cfg(target_arch = "x86_64")]
        pack_rhs_transposed(out, np, (k, n), src, cs);
        #[cfg(not(target_arch = "x86_64"))]
        for p in 0..k / 2 {
            for j in 0..n {
                let at = |i: usize| *src.add(j * cs + i);
                out[p * np + j] = pair(at(2 * p), at(2 * p + 1));
            }
        }
        return;
    }
    out.fill(0);
    {
        let at = |i: usize, j: usize| {
            if i < k {
                *src.add(i * rs + j * cs)
            } else {
                0.0
            }
        };
        for j in 0..n {
            for p in 0..k.div_ceil(2) {
                out[p * np + j] = pair(at(2 * p, j), at(2 * p + 1, j));
            }
        }
    }
}
