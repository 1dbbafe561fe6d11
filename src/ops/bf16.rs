//! Matrix products with bf16 inputs and f32 sums (`model.matmul = "bf16"`): both
//! factors are rounded to bfloat16 (8 significant bits, f32's exponent range), their
//! products summed in f32: the mixed precision GPUs train transformers in. On a CPU with
//! AMX (Intel since Sapphire Rapids) one TDPBF16PS multiplies a 16 x 32 block by a
//! 32 x 16 block, 16 times the multiply-adds of an AVX-512 FMA; elsewhere the same
//! rounded factors go through the f32 product, so the option means the same numbers
//! up to the order of the sums everywhere.
//!
//! Operands are packed before the tiles read them: the left one as rows of bf16, the
//! right one in pairs of rows (the "VNNI" layout the instruction reads), each padded
//! with zeros to whole tiles. A weight matrix that many products read is packed once
//! ([`PackedRhs`]).

use std::cell::RefCell;

/// f32 to bf16 bits, rounded to nearest, ties to even (a NaN stays a NaN).
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bf16, as an f32.
#[inline(always)]
pub fn round(x: f32) -> f32 {
    f32::from_bits((to_bf16(x) as u32) << 16)
}

/// Two values as one 32-bit pair: `lo` first in memory.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// Whether the products run on AMX tiles: the CPU has AMX-BF16 and the kernel lets this
/// process use the tile registers (Linux hands them out on request only). Checked once.
pub fn amx_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(amx::detect)
}

/// The packed factors span whole tiles: 32 rows or columns (two tiles) and 32 values of
/// the inner dimension.
const BLOCK: usize = 32;

/// A right-hand factor (k x n), packed once for every product that reads it.
pub struct PackedRhs {
    k: usize,
    n: usize,
    data: Packed,
}

enum Packed {
    /// For the tiles: k/2 rows (padded to 16) of n pairs (padded to 32).
    Pairs(Vec<u32>),
    /// Without AMX: the rounded values, k x n row-major.
    Rounded(Vec<f32>),
}

impl PackedRhs {
    /// Packs the k x n matrix at `src`, element (i, j) at `src[i * rs + j * cs]`.
    ///
    /// # Safety
    /// `src` must cover the matrix its strides describe.
    pub unsafe fn new((k, n): (usize, usize), src: *const f32, strides: (usize, usize)) -> Self {
        let data = if amx_available() {
            let mut pairs = Vec::new();
            pack_rhs(&mut pairs, (k, n), src, strides);
            Packed::Pairs(pairs)
        } else {
            let mut rounded = Vec::with_capacity(k * n);
            for i in 0..k {
                for j in 0..n {
                    rounded.push(round(*src.add(i * strides.0 + j * strides.1)));
                }
            }
            Packed::Rounded(rounded)
        };
        Self { k, n, data }
    }
}

/// Scratch space of one thread: packed left factors, packed right factors read once,
/// and an output that does not fit the tiles directly.
#[derive(Default)]
struct Scratch {
    lhs: Vec<u32>,
    rhs: Vec<u32>,
    out: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The right-hand factor of a product: packed already, or a matrix (pointer, row and
/// column strides) packed for this product alone.
pub enum Rhs<'a> {
    Packed(&'a PackedRhs),
    Matrix(*const f32, (usize, usize)),
}

/// `dst (m x n) (+)= round(lhs) (m x k) · round(rhs) (k x n)` with f32 sums, on the
/// calling thread; strides in elements (rows, columns), as [`super::products::product`].
///
/// # Safety
/// As [`super::products::product`]; a packed `rhs` must be k x n.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (usize, usize),
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: Rhs,
    accumulate: bool,
) {
    if let Rhs::Packed(p) = &rhs {
        assert_eq!((p.k, p.n), (k, n), "bf16 product: packed factor's shape");
    }
    if m == 0 || n == 0 {
        return;
    }
    SCRATCH.with_borrow_mut(|s| {
        let Scratch {
            lhs: a,
            rhs: b,
            out,
        } = s;
        let pairs = match rhs {
            Rhs::Packed(PackedRhs {
                data: Packed::Rounded(r),
                ..
            }) => {
                rounded_product(
                    (m, n, k),
                    dst,
                    dst_strides,
                    (lhs, lhs_strides),
                    r,
                    accumulate,
                );
                return;
            }
            Rhs::Matrix(src, strides) if !amx_available() => {
                let r = PackedRhs::new((k, n), src, strides);
                let Packed::Rounded(r) = &r.data else {
                    unreachable!("packed without AMX")
                };
                rounded_product(
                    (m, n, k),
                    dst,
                    dst_strides,
                    (lhs, lhs_strides),
                    r,
                    accumulate,
                );
                return;
            }
            Rhs::Packed(PackedRhs {
                data: Packed::Pairs(p),
                ..
            }) => p.as_slice(),
            Rhs::Matrix(src, strides) => {
                pack_rhs(b, (k, n), src, strides);
                b.as_slice()
            }
        };
        pack_lhs(a, (m, k), lhs, lhs_strides);
        amx::multiply((m, n, k), dst, dst_strides, a, pairs, out, accumulate);
    })
}

/// The product of rounded factors through the f32 kernel (no AMX).
unsafe fn rounded_product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (usize, usize),
    (lhs, (rs, cs)): (*const f32, (usize, usize)),
    rhs: &[f32],
    accumulate: bool,
) {
    let mut a = Vec::with_capacity(m * k);
    for i in 0..m {
        for j in 0..k {
            a.push(round(*lhs.add(i * rs + j * cs)));
        }
    }
    super::products::product(
        (m, n, k),
        dst,
        dst_strides,
        a.as_ptr(),
        (k, 1),
        rhs.as_ptr(),
        (n, 1),
        (accumulate, gemm::Parallelism::None),
    );
}

/// Padded sizes of the packed factors: rows of the left one, columns of the right one,
/// and the inner dimension.
fn padded(len: usize) -> usize {
    len.next_multiple_of(BLOCK).max(BLOCK)
}

/// Zeros that stand in for the row past the end of a matrix with an odd number of rows.
static ZEROS: [f32; 4096] = [0.0; 4096];

/// `len` values from `src`, or zeros when `src` is past the end (`None`).
unsafe fn row_or_zeros<'a>(src: Option<*const f32>, len: usize) -> &'a [f32] {
    match src {
        Some(src) => std::slice::from_raw_parts(src, len),
        None => &ZEROS[..len],
    }
}

/// Writes `lines` lines of `len` pairs across `out`: `fill(l, c0, part)` fills `part`
/// with pairs c0.. of line l (made along memory), and pair (l, c) goes to
/// `out[c * stride + l]`. 16 x 16 pairs at a time, so that reads and writes both run
/// along memory: the packing of a factor read transposed.
#[inline(always)]
fn pairs_across(
    out: &mut [u32],
    stride: usize,
    (lines, len): (usize, usize),
    fill: impl Fn(usize, usize, &mut [u32]),
) {
    let mut block = [[0u32; 16]; 16];
    for l0 in (0..lines).step_by(16) {
        let bl = 16.min(lines - l0);
        for c0 in (0..len).step_by(16) {
            let bc = 16.min(len - c0);
            for (dl, line) in block.iter_mut().enumerate().take(bl) {
                fill(l0 + dl, c0, &mut line[..bc]);
            }
            for dc in 0..bc {
                let dst = &mut out[(c0 + dc) * stride + l0..][..bl];
                for (dl, d) in dst.iter_mut().enumerate() {
                    *d = block[dl][dc];
                }
            }
        }
    }
}

/// Packs the left factor (m x k) as rows of bf16 pairs: `out` gets padded(m) rows of
/// padded(k) / 2 pairs, zero where the matrix ends. Only on the AMX path (AVX-512 is
/// there, and lets these loops run 16 values at a time).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn pack_lhs(
    out: &mut Vec<u32>,
    (m, k): (usize, usize),
    src: *const f32,
    (rs, cs): (usize, usize),
) {
    let row_pairs = padded(k) / 2;
    out.clear();
    out.resize(padded(m) * row_pairs, 0);
    if cs == 1 {
        // Rows contiguous (activations): a pair is two neighbours in a row.
        for i in 0..m {
            let row = std::slice::from_raw_parts(src.add(i * rs), k);
            let dst = out.as_mut_ptr().add(i * row_pairs).cast::<u16>();
            for (d, &x) in std::slice::from_raw_parts_mut(dst, k).iter_mut().zip(row) {
                *d = to_bf16(x);
            }
        }
    } else if rs == 1 {
        // Columns contiguous (a transposed gradient): columns 2p and 2p + 1 make a line
        // of pairs along the rows, written down column p of pairs.
        pairs_across(out, row_pairs, (k.div_ceil(2), m), |p, i0, line| {
            let lo = row_or_zeros(Some(src.add(2 * p * cs + i0)), line.len());
            let hi = (2 * p + 1 < k).then(|| src.add((2 * p + 1) * cs + i0));
            let hi = row_or_zeros(hi, line.len());
            for ((d, &lo), &hi) in line.iter_mut().zip(lo).zip(hi) {
                *d = pair(lo, hi);
            }
        });
    } else {
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

/// Packs the right factor (k x n) in pairs of rows: `out` gets padded(k) / 2 rows of
/// padded(n) pairs, pair (p, j) holding elements (2p, j) and (2p + 1, j).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn pack_rhs(
    out: &mut Vec<u32>,
    (k, n): (usize, usize),
    src: *const f32,
    (rs, cs): (usize, usize),
) {
    let np = padded(n);
    out.clear();
    out.resize(padded(k) / 2 * np, 0);
    if cs == 1 && n <= ZEROS.len() {
        // Rows contiguous: two rows at a time, along them.
        for p in 0..k.div_ceil(2) {
            let lo = row_or_zeros(Some(src.add(2 * p * rs)), n);
            let hi = row_or_zeros((2 * p + 1 < k).then(|| src.add((2 * p + 1) * rs)), n);
            for ((d, &lo), &hi) in out[p * np..p * np + n].iter_mut().zip(lo).zip(hi) {
                *d = pair(lo, hi);
            }
        }
    } else if rs == 1 && k % 2 == 0 {
        // Columns contiguous (a weight read as Wᵀ, keys read as Kᵀ): a pair is two
        // neighbours in a column, so column j is a line of pairs, written down column j
        // of pairs.
        pairs_across(out, np, (n, k / 2), |j, p0, line| {
            let col = std::slice::from_raw_parts(src.add(j * cs + 2 * p0), 2 * line.len());
            for (d, two) in line.iter_mut().zip(col.chunks_exact(2)) {
                *d = pair(two[0], two[1]);
            }
        });
    } else {
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

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use super::{padded, BLOCK};
    use std::arch::asm;

    pub fn detect() -> bool {
        if !std::arch::is_x86_feature_detected!("avx512f")
            || !std::arch::is_x86_feature_detected!("avx512bw")
        {
            return false;
        }
        // CPUID leaf 7 exists on every CPU with AVX-512.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        const AMX_BF16: u32 = 1 << 22;
        const AMX_TILE: u32 = 1 << 24;
        if leaf.edx & (AMX_BF16 | AMX_TILE) != AMX_BF16 | AMX_TILE {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for a permission; it changes nothing else.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// Palette 1 with all eight tiles at their largest: 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const FULL_TILES: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        TileConfig(c)
    };

    macro_rules! tile {
        (load $t:literal, $ptr:expr, $stride:expr) => {
            asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}]"), p = in(reg) $ptr,
                 s = in(reg) $stride, options(nostack, preserves_flags))
        };
        (store $t:literal, $ptr:expr, $stride:expr) => {
            asm!(concat!("tilestored [{p} + {s}], tmm", $t), p = in(reg) $ptr,
                 s = in(reg) $stride, options(nostack, preserves_flags))
        };
        (zero $t:literal) => {
            asm!(concat!("tilezero tmm", $t), options(nostack, preserves_flags, nomem))
        };
        (dot $c:literal, $a:literal, $b:literal) => {
            asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
                 options(nostack, preserves_flags, nomem))
        };
    }

    /// One 32 x 32 block of the output: C (f32, rows `c_stride` bytes apart) (+)= A · B
    /// over `kp` (a multiple of 32), A 32 rows of pairs `a_stride` bytes apart, B kp / 2
    /// rows of 32 pairs `b_stride` bytes apart. Tiles 0-3 hold C, 4-5 A, 6-7 B.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        c: *mut f32,
        c_stride: usize,
        load: bool,
        a: *const u32,
        a_stride: usize,
        b: *const u32,
        b_stride: usize,
        kp: usize,
    ) {
        let (c1, c2) = (c.byte_add(64), c.byte_add(16 * c_stride));
        let c3 = c2.byte_add(64);
        if load {
            tile!(load "0", c, c_stride);
            tile!(load "1", c1, c_stride);
            tile!(load "2", c2, c_stride);
            tile!(load "3", c3, c_stride);
        } else {
            tile!(zero "0");
            tile!(zero "1");
            tile!(zero "2");
            tile!(zero "3");
        }
        let a2 = a.byte_add(16 * a_stride);
        for kb in 0..kp / BLOCK {
            let (ak, ak2) = (a.add(kb * 16), a2.add(kb * 16));
            let bk = b.byte_add(kb * 16 * b_stride);
            tile!(load "4", ak, a_stride);
            tile!(load "6", bk, b_stride);
            tile!(load "5", ak2, a_stride);
            tile!(load "7", bk.add(16), b_stride);
            tile!(dot "0", "4", "6");
            tile!(dot "1", "4", "7");
            tile!(dot "2", "5", "6");
            tile!(dot "3", "5", "7");
        }
        tile!(store "0", c, c_stride);
        tile!(store "1", c1, c_stride);
        tile!(store "2", c2, c_stride);
        tile!(store "3", c3, c_stride);
    }

    /// dst (+)= A · B from the packed factors. The tiles write straight into `dst` when
    /// its rows are contiguous and the shape is whole blocks; else into `out`, then added.
    pub unsafe fn multiply(
        (m, n, k): (usize, usize, usize),
        dst: *mut f32,
        (dst_rs, dst_cs): (usize, usize),
        a: &[u32],
        b: &[u32],
        out: &mut Vec<f32>,
        accumulate: bool,
    ) {
        let (mp, np, kp) = (padded(m), padded(n), padded(k));
        debug_assert!(a.len() >= mp * kp / 2 && b.len() >= kp / 2 * np);
        let direct = dst_cs == 1 && m % BLOCK == 0 && n % BLOCK == 0;
        let (c, c_rs, load) = if direct {
            (dst, dst_rs, accumulate)
        } else {
            out.clear();
            out.resize(mp * np, 0.0);
            (out.as_mut_ptr(), np, false)
        };
        asm!("ldtilecfg [{}]", in(reg) FULL_TILES.0.as_ptr(), options(nostack, preserves_flags));
        for i in (0..mp).step_by(BLOCK) {
            for j in (0..np).step_by(BLOCK) {
                let (a, b) = (a.as_ptr().add(i * kp / 2), b.as_ptr().add(j));
                block(
                    c.add(i * c_rs + j),
                    c_rs * 4,
                    load,
                    a,
                    kp * 2,
                    b,
                    np * 4,
                    kp,
                );
            }
        }
        asm!("tilerelease", options(nostack, preserves_flags, nomem));
        if !direct {
            for i in 0..m {
                for j in 0..n {
                    let (v, d) = (out[i * np + j], dst.add(i * dst_rs + j * dst_cs));
                    *d = if accumulate { *d + v } else { v };
                }
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod amx {
    pub fn detect() -> bool {
        false
    }

    pub unsafe fn multiply(
        _: (usize, usize, usize),
        _: *mut f32,
        _: (usize, usize),
        _: &[u32],
        _: &[u32],
        _: &mut Vec<f32>,
        _: bool,
    ) {
        unreachable!("AMX products only run where amx_available()")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between 1 and the next bf16 (1 + 2^-7): ties go to even.
        assert_eq!(round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2.0 * 2f32.powi(-7));
        assert_eq!(
            round(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(round(-3.0), -3.0);
        assert_eq!(round(f32::MAX), f32::INFINITY);
        assert!(round(f32::NAN).is_nan());
    }

    /// A small deterministic generator of values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Every layout the linear layers use, and shapes that are not whole tiles: the
    /// product equals the exact product of the rounded factors to f32's rounding of the
    /// sums, and differs from the unrounded product by what bf16 rounding explains.
    #[test]
    fn products_match_the_exact_product_of_rounded_factors() {
        // (m, n, k, lhs transposed, rhs transposed, destination transposed, accumulate)
        let cases = [
            (256, 288, 96, false, true, false, true),
            (256, 96, 288, false, false, false, false),
            (288, 96, 256, true, false, false, true),
            (5, 7, 3, false, false, false, false),
            (33, 47, 70, true, true, true, true),
            (64, 64, 32, false, true, false, false),
        ];
        for (case, &(m, n, k, lt, rt, dt, acc)) in cases.iter().enumerate() {
            let (a, b) = (
                values(m * k, 1 + case as u64),
                values(k * n, 100 + case as u64),
            );
            let c0 = values(m * n, 200);
            let ls = if lt { (1, m) } else { (k, 1) };
            let rs = if rt { (1, k) } else { (n, 1) };
            let ds = if dt { (1, m) } else { (n, 1) };
            let run = |packed: bool| {
                let mut c = c0.clone();
                let p = unsafe { PackedRhs::new((k, n), b.as_ptr(), rs) };
                let rhs = match packed {
                    true => Rhs::Packed(&p),
                    false => Rhs::Matrix(b.as_ptr(), rs),
                };
                // SAFETY: every matrix is allocated at the size its strides describe.
                unsafe { product((m, n, k), c.as_mut_ptr(), ds, a.as_ptr(), ls, rhs, acc) };
                c
            };
            let (c, c_packed) = (run(false), run(true));
            assert_eq!(c, c_packed, "case {case}: packed once or per product");
            let (mut worst_rounded, mut worst_exact) = (0f64, 0f64);
            for i in 0..m {
                for j in 0..n {
                    let (mut rounded, mut exact) = (0f64, 0f64);
                    for l in 0..k {
                        let (x, y) = (a[i * ls.0 + l * ls.1], b[l * rs.0 + j * rs.1]);
                        rounded += round(x) as f64 * round(y) as f64;
                        exact += x as f64 * y as f64;
                    }
                    let d = i * ds.0 + j * ds.1;
                    let got = c[d] as f64 - if acc { c0[d] as f64 } else { 0.0 };
                    worst_rounded = worst_rounded.max((got - rounded).abs());
                    worst_exact = worst_exact.max((got - exact).abs());
                }
            }
            // f32 sums of k terms of size <= 1: within k ulps of 1 (k * 1.2e-7).
            assert!(
                worst_rounded <= k as f64 * 1.2e-7,
                "case {case}: {worst_rounded:e}"
            );
            // bf16 rounds each factor by up to 2^-9 relatively: far more than f32 sums,
            // so a product that skipped the rounding would fail the bound above.
            assert!(
                worst_exact > 1e-4,
                "case {case}: the factors were not rounded"
            );
            assert!(
                worst_exact < k as f64 * 2f64.powi(-8),
                "case {case}: {worst_exact:e}"
            );
        }
    }

    #[test]
    fn the_fallback_without_amx_gives_the_tiles_products_to_f32_rounding() {
        let (m, n, k) = (64, 96, 96);
        let (a, b) = (values(m * k, 7), values(k * n, 8));
        let mut tiles = vec![0f32; m * n];
        let mut fallback = vec![0f32; m * n];
        let rounded_b: Vec<f32> = b.iter().map(|&x| round(x)).collect();
        // SAFETY: the matrices are allocated at their shapes.
        unsafe {
            product(
                (m, n, k),
                tiles.as_mut_ptr(),
                (n, 1),
                a.as_ptr(),
                (k, 1),
                Rhs::Matrix(b.as_ptr(), (n, 1)),
                false,
            );
            rounded_product(
                (m, n, k),
                fallback.as_mut_ptr(),
                (n, 1),
                (a.as_ptr(), (k, 1)),
                &rounded_b,
                false,
            );
        }
        for (x, y) in tiles.iter().zip(&fallback) {
            assert!((x - y).abs() <= 1e-5, "{x} against {y}");
        }
    }
}
