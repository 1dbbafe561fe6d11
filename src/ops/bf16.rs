//! Matrix products with bf16 inputs and f32 sums (`model.matmul = "bf16"`): both
//! factors are rounded to bfloat16 (8 significant bits, f32's exponent range), their
//! products summed in f32: the mixed precision GPUs train transformers in. On a CPU with
//! AMX (Intel since Sapphire Rapids) one TDPBF16PS multiplies a 16 x 32 block by a
//! 32 x 16 block, 16 times the multiply-adds of an AVX-512 FMA; elsewhere the same
//! rounded factors go through the f32 product, so the option means the same numbers
//! up to the order of the sums everywhere.
//!
//! Operands are packed before the tiles read them (`bf16/pack.rs`): the left one as
//! rows of bf16, the right one in pairs of rows (the "VNNI" layout the instruction
//! reads), each padded with zeros to whole tiles and starting at a cache line. A
//! matrix that many products read is packed once ([`PackedRhs`]): a weight, or a
//! layer's input kept for its weight gradient. A matrix that two products read is
//! packed for both in one pass ([`pack_input`], [`pack_gradient`]): each pair of rows
//! is loaded and rounded once.

use std::cell::RefCell;

use super::cpu::Level;

/// `x` rounded to the nearest bf16, as an f32.
#[inline(always)]
pub fn round(x: f32) -> f32 {
    f32::from_bits((to_bf16(x) as u32) << 16)
}

/// [`amx::peak_loop`]: TDPBF16PS on tiles loaded once, `iterations` x 4 times.
///
/// # Safety
/// Only where the CPU has AMX and the tiles were granted ([`super::cpu::Level::Amx`]).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn amx_peak_loop(iterations: u64) -> f32 {
    amx::peak_loop(iterations)
}

/// Which instructions multiply the bf16 factors. Every kernel computes the exact
/// product of the rounded factors to f32's rounding of the sums; they differ in the
/// order of those sums only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles: TDPBF16PS, a 16 x 32 by 32 x 16 block product per instruction.
    Amx,
    /// AVX-512 BF16: VDPBF16PS, 16 sums of a bf16 pair product each per instruction.
    DotProducts,
    /// No bf16 instruction: the rounded factors through the f32 product, slower than
    /// f32 itself (an extra pass over both factors, nothing gained), kept so that a
    /// forced `model.matmul = "bf16"` computes the same numbers on any CPU.
    Rounded,
}

impl Kernel {
    /// The fastest kernel the CPU (capped by `VITSCOPE_CPU`) may use.
    pub fn current() -> Kernel {
        Kernel::for_level(super::cpu::level())
    }

    fn for_level(level: Level) -> Kernel {
        match level {
            Level::Amx => Kernel::Amx,
            Level::Avx512Bf16 => Kernel::DotProducts,
            _ => Kernel::Rounded,
        }
    }

    /// Every kernel this machine can run, slowest first.
    pub fn runnable() -> Vec<Kernel> {
        let mut kernels: Vec<Kernel> = super::cpu::runnable()
            .into_iter()
            .map(Kernel::for_level)
            .collect();
        kernels.dedup();
        kernels
    }

    /// Whether the kernel runs on a bf16 instruction (and so is faster than f32).
    pub fn is_native(self) -> bool {
        self != Kernel::Rounded
    }

    /// In a few words, for the status line.
    pub fn short(self) -> &'static str {
        match self {
            Kernel::Amx => "bf16 AMX",
            Kernel::DotProducts => "bf16 AVX-512",
            Kernel::Rounded => "bf16 via f32",
        }
    }

    /// In words, for `bench` and run.log.
    pub fn describe(self) -> &'static str {
        match self {
            Kernel::Amx => "bf16 on AMX tiles",
            Kernel::DotProducts => "bf16 on AVX-512 BF16 dot products",
            Kernel::Rounded => {
                "bf16 factors through the f32 product (no bf16 instruction here: slower than f32)"
            }
        }
    }
}

/// A right-hand factor (k x n), packed once for every product that reads it, for the
/// kernel that will read it.
pub struct PackedRhs {
    k: usize,
    n: usize,
    kernel: Kernel,
    data: Packed,
}

/// Freed packed factors kept for reuse: the forward pass keeps each linear layer's
/// input packed per tile (four per tile and block) and three of the attention's factors
/// per image, head and block (about 1,900 a micro-batch of 32 images of the default
/// model: 3,800 a step on two lanes), and a fresh vector would be zero-filled before
/// the packing overwrites it.
static PAIRS: super::kernel::BufferPool<u32> = super::kernel::BufferPool::with_limit(8192);

impl Drop for PackedRhs {
    fn drop(&mut self) {
        if let Packed::Pairs(pairs) = &mut self.data {
            PAIRS.give(std::mem::take(&mut pairs.buf));
        }
    }
}

enum Packed {
    /// For the bf16 instructions: k/2 rows (padded to 16) of n pairs (padded to 32).
    Pairs(Pairs),
    /// Without them: the rounded values, k x n row-major.
    Rounded(Vec<f32>),
}

impl PackedRhs {
    /// (k, n): its rows and columns.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Starts bringing the packed pairs into the cache (see [`super::kernel::prefetch`]).
    pub fn prefetch(&self) {
        match &self.data {
            Packed::Pairs(pairs) => super::kernel::prefetch(pairs.as_slice()),
            Packed::Rounded(values) => super::kernel::prefetch(values),
        }
    }

    /// Packs the k x n matrix at `src`, element (i, j) at `src[i * rs + j * cs]`, for
    /// [`Kernel::current`].
    ///
    /// # Safety
    /// `src` must cover the matrix its strides describe.
    pub unsafe fn new(dims: (usize, usize), src: *const f32, strides: (usize, usize)) -> Self {
        Self::for_kernel(Kernel::current(), dims, src, strides)
    }

    /// As [`PackedRhs::new`], for `kernel` (one of [`Kernel::runnable`]).
    ///
    /// # Safety
    /// As [`PackedRhs::new`].
    pub unsafe fn for_kernel(
        kernel: Kernel,
        (k, n): (usize, usize),
        src: *const f32,
        strides: (usize, usize),
    ) -> Self {
        let data = match kernel {
            Kernel::Amx | Kernel::DotProducts => {
                // A pooled vector: packing overwrites what it needs of it.
                let size = padded(k) / 2 * padded(n) + LINE_PAIRS;
                let mut pairs = Pairs::from_vec(PAIRS.take(size));
                pack_rhs(&mut pairs, (k, n), src, strides);
                Packed::Pairs(pairs)
            }
            Kernel::Rounded => Packed::Rounded(rounded((k, n), src, strides)),
        };
        Self { k, n, kernel, data }
    }
}

/// A left-hand factor (m x k) packed for the bf16 instructions (the AMX tiles and
/// VDPBF16PS read the same layout), where it is packed in the same pass as another
/// factor of the same values: see [`pack_input`] and [`pack_gradient`].
pub struct PackedLhs {
    m: usize,
    k: usize,
    pairs: Pairs,
}

thread_local! {
    /// The buffers of this thread's packed left factors, free again: a left factor is
    /// read by the product right after its packing, on the same thread, so its buffer
    /// comes back still in that core's cache (from a shared pool it could come from a
    /// factor the other lane freed, or from one the forward pass kept).
    static LEFT: RefCell<Vec<Vec<u32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer for a packed left factor: one this thread freed, or a new one.
fn left_pairs() -> Pairs {
    Pairs::from_vec(LEFT.with_borrow_mut(Vec::pop).unwrap_or_default())
}

impl Drop for PackedLhs {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.pairs.buf);
        LEFT.with_borrow_mut(|free| {
            // A few are in use at once; more would only hold memory.
            if free.len() < 4 {
                free.push(buf);
            }
        });
    }
}

/// Pooled pairs for a packed factor of `len` pairs.
fn pooled(len: usize) -> Pairs {
    Pairs::from_vec(PAIRS.take(len + LINE_PAIRS))
}

/// A layer's input x (m x k, rows `rs` apart) packed in one pass as the left factor of
/// its forward product (x · Wᵀ) and the right factor of its weight gradient (gᵀ · x),
/// for [`Kernel::current`] where it is a bf16 instruction (None elsewhere: the rounded
/// kernel packs nothing ahead). The same pairs as packing it twice.
///
/// # Safety
/// `src` covers the matrix; a row holds at most 4,096 values.
pub unsafe fn pack_input(
    (m, k): (usize, usize),
    src: *const f32,
    rs: usize,
) -> Option<(PackedLhs, PackedRhs)> {
    let kernel = Kernel::current();
    if !kernel.is_native() {
        return None;
    }
    let mut lhs = left_pairs();
    let mut rhs = pooled(padded(m) / 2 * padded(k));
    pack::pack_rows_both_ways((&mut lhs, &mut rhs), (m, k), src, rs);
    let rhs = PackedRhs {
        k: m,
        n: k,
        kernel,
        data: Packed::Pairs(rhs),
    };
    Some((PackedLhs { m, k, pairs: lhs }, rhs))
}

/// A layer's output gradient g (m x k, rows `rs` apart) packed in one pass as the left
/// factor of both its products: g (the input gradient g · W) and gᵀ (the weight
/// gradient gᵀ · x), where [`Kernel::current`] is a bf16 instruction (None elsewhere).
/// The same pairs as packing it twice.
///
/// # Safety
/// `src` covers the matrix.
pub unsafe fn pack_gradient(
    (m, k): (usize, usize),
    src: *const f32,
    rs: usize,
) -> Option<(PackedLhs, PackedLhs)> {
    if !Kernel::current().is_native() {
        return None;
    }
    let (mut rows, mut transposed) = (left_pairs(), left_pairs());
    #[cfg(target_arch = "x86_64")]
    pack::pack_lhs_both_ways((&mut rows, &mut transposed), (m, k), src, rs);
    #[cfg(not(target_arch = "x86_64"))]
    {
        pack_lhs(&mut rows, (m, k), src, (rs, 1));
        pack_lhs(&mut transposed, (k, m), src, (1, rs));
    }
    Some((
        PackedLhs { m, k, pairs: rows },
        PackedLhs {
            m: k,
            k: m,
            pairs: transposed,
        },
    ))
}

/// The m x n matrix at `src` rounded to bf16, row-major.
unsafe fn rounded((m, n): (usize, usize), src: *const f32, (rs, cs): (usize, usize)) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            out.push(round(*src.add(i * rs + j * cs)));
        }
    }
    out
}

/// Scratch space of one thread: packed left factors, packed right factors read once,
/// and an output that does not fit the tiles directly.
#[derive(Default)]
struct Scratch {
    lhs: Pairs,
    rhs: Pairs,
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

/// A left factor as a kernel reads it: a matrix packed for this product alone, or
/// rows packed already (from a product's first row).
#[derive(Clone, Copy)]
enum LhsAt<'a> {
    Matrix(*const f32, (usize, usize)),
    Packed(&'a [u32]),
}

// SAFETY: the pointer is only read, by products whose factors outlive them.
unsafe impl Send for LhsAt<'_> {}
unsafe impl Sync for LhsAt<'_> {}

impl<'a> LhsAt<'a> {
    /// The same factor from row `i0` on (a multiple of 32 for a packed one).
    unsafe fn rows_from(self, i0: usize, row_pairs: usize) -> LhsAt<'a> {
        match self {
            LhsAt::Matrix(src, strides) => LhsAt::Matrix(src.add(i0 * strides.0), strides),
            LhsAt::Packed(pairs) => LhsAt::Packed(&pairs[i0 * row_pairs..]),
        }
    }
}

/// [`product`] of two factors packed already: `dst (m x n) (+)= lhs · rhs`.
///
/// # Safety
/// As [`product`]; the packed factors' shapes are checked.
pub unsafe fn product_packed(
    dst: *mut f32,
    dst_strides: (usize, usize),
    lhs: &PackedLhs,
    rhs: &PackedRhs,
    start: Start,
) {
    assert_eq!(
        lhs.k, rhs.k,
        "bf16 product: the packed factors' inner sizes"
    );
    assert!(
        rhs.kernel.is_native(),
        "bf16 product: a packed left factor needs a bf16 kernel"
    );
    let dims = (lhs.m, rhs.n, lhs.k);
    product_split(
        dims,
        dst,
        dst_strides,
        LhsAt::Packed(lhs.pairs.as_slice()),
        Rhs::Packed(rhs),
        start,
    );
}

/// `dst (m x n) (+)= round(lhs) (m x k) · round(rhs) (k x n)` with f32 sums, on the
/// calling thread; strides in elements (rows, columns), as [`super::products::product`].
/// A packed `rhs` says the kernel; a matrix goes to [`Kernel::current`].
///
/// # Safety
/// As [`super::products::product`]; a packed `rhs` must be k x n.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (usize, usize),
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: Rhs,
    start: Start,
) {
    let lhs = LhsAt::Matrix(lhs, lhs_strides);
    product_split(dims, dst, dst_strides, lhs, rhs, start);
}

/// [`product`] with its left factor as the kernels read it.
unsafe fn product_split(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (usize, usize),
    lhs: LhsAt,
    rhs: Rhs,
    start: Start,
) {
    let kernel = match &rhs {
        Rhs::Packed(p) => p.kernel,
        Rhs::Matrix(..) => Kernel::current(),
    };
    let (m, n, k) = dims;
    let threads = rayon::current_num_threads();
    // A lane with several threads (more cores than micro-batches) splits the rows: on
    // a bf16 instruction a value's sums do not depend on the rows around it, so the
    // split changes no bit. A right factor read once is packed once, for all parts.
    if kernel.is_native() && threads > 1 && m >= 2 * SPLIT_ROWS {
        let packed;
        let rhs = match rhs {
            Rhs::Packed(p) => p,
            Rhs::Matrix(src, strides) => {
                packed = PackedRhs::for_kernel(kernel, (k, n), src, strides);
                &packed
            }
        };
        let parts = threads.min(m / SPLIT_ROWS);
        let rows = m.div_ceil(parts).next_multiple_of(BLOCK);
        let dst = dst as usize;
        let start = Shared(start);
        let row_pairs = padded(k) / 2;
        rayon::scope(|scope| {
            for i0 in (0..m).step_by(rows) {
                scope.spawn(move |_| {
                    let dst = dst as *mut f32;
                    let start = start.get();
                    // SAFETY: the parts write disjoint rows of dst.
                    unsafe {
                        product_on(
                            kernel,
                            ((rows.min(m - i0), n, k), m),
                            dst.add(i0 * dst_strides.0),
                            dst_strides,
                            lhs.rows_from(i0, row_pairs),
                            Rhs::Packed(rhs),
                            start,
                        )
                    }
                });
            }
        });
        return;
    }
    product_on(kernel, (dims, m), dst, dst_strides, lhs, rhs, start);
}

/// A [`Start`] sent to the threads of a split product: its row is only read, and
/// outlives the scope they run in.
#[derive(Clone, Copy)]
struct Shared(Start);
// SAFETY: see above; the row pointer is read-only for the product's duration.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The start (a method, so that a closure captures the whole `Shared`).
    fn get(self) -> Start {
        self.0
    }
}

/// Fewest rows a thread multiplies when a product is split over a lane's threads.
const SPLIT_ROWS: usize = 128;

/// [`product`] on `kernel`, one of [`Kernel::runnable`]: rows `m` of a product of
/// `whole_rows` (the AMX tiles pick their path by the whole product).
///
/// # Safety
/// As [`product`]; a packed `rhs` must have been packed for `kernel`.
#[allow(clippy::too_many_arguments)]
unsafe fn product_on(
    kernel: Kernel,
    ((m, n, k), whole_rows): ((usize, usize, usize), usize),
    dst: *mut f32,
    dst_strides: (usize, usize),
    lhs: LhsAt,
    rhs: Rhs,
    start: Start,
) {
    if let Rhs::Packed(p) = &rhs {
        assert_eq!((p.k, p.n), (k, n), "bf16 product: packed factor's shape");
        assert_eq!(p.kernel, kernel, "bf16 product: packed for another kernel");
    }
    if m == 0 || n == 0 {
        return;
    }
    if kernel == Kernel::Rounded {
        // The f32 product adds onto dst, so a row to start from is written into dst
        // first (the bf16 instructions' kernels read it from the row).
        let accumulate = match start {
            Start::Zero => false,
            Start::Dst => true,
            Start::Row(row) => {
                for i in 0..m {
                    for j in 0..n {
                        *dst.add(i * dst_strides.0 + j * dst_strides.1) = *row.add(j);
                    }
                }
                true
            }
        };
        let owned;
        let r = match rhs {
            Rhs::Packed(PackedRhs {
                data: Packed::Rounded(r),
                ..
            }) => r,
            Rhs::Packed(_) => unreachable!("packed for the rounded kernel (asserted)"),
            Rhs::Matrix(src, strides) => {
                owned = rounded((k, n), src, strides);
                &owned
            }
        };
        let LhsAt::Matrix(lhs, lhs_strides) = lhs else {
            unreachable!("a packed left factor only with a bf16 kernel (asserted)")
        };
        let a = rounded((m, k), lhs, lhs_strides);
        super::gemm::product(
            (m, n, k),
            dst,
            dst_strides,
            a.as_ptr(),
            (k, 1),
            r.as_ptr(),
            (n, 1),
            (accumulate, gemm::Parallelism::None),
        );
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
                data: Packed::Pairs(p),
                ..
            }) => p.as_slice(),
            Rhs::Packed(_) => unreachable!("packed for a bf16 instruction (asserted)"),
            Rhs::Matrix(src, strides) => {
                pack_rhs(b, (k, n), src, strides);
                b.as_slice()
            }
        };
        let a = match lhs {
            LhsAt::Matrix(src, strides) => {
                pack_lhs(a, (m, k), src, strides);
                a.as_slice()
            }
            LhsAt::Packed(pairs) => pairs,
        };
        match kernel {
            Kernel::Amx => amx::multiply(
                (m, n, k),
                whole_rows,
                dst,
                dst_strides,
                a,
                pairs,
                out,
                start,
            ),
            Kernel::DotProducts => dot::multiply((m, n, k), dst, dst_strides, a, pairs, start),
            Kernel::Rounded => unreachable!("handled above"),
        }
    })
}

mod layout;
use layout::{padded, BLOCK};

mod pack;
use pack::{pack_lhs, pack_rhs, to_bf16, Pairs, LINE_PAIRS};

mod start;
pub use start::Start;

#[cfg(target_arch = "x86_64")]
mod dot;

#[cfg(not(target_arch = "x86_64"))]
mod dot {
    pub unsafe fn multiply(
        _: (usize, usize, usize),
        _: *mut f32,
        _: (usize, usize),
        _: &[u32],
        _: &[u32],
        _: super::Start,
    ) {
        unreachable!("VDPBF16PS products only run where the CPU has AVX-512 BF16")
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod amx {
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn multiply(
        _: (usize, usize, usize),
        _: usize,
        _: *mut f32,
        _: (usize, usize),
        _: &[u32],
        _: &[u32],
        _: &mut Vec<f32>,
        _: crate::ops::bf16::Start,
    ) {
        unreachable!("AMX products only run where the CPU has AMX")
    }
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn peak_loop(_: u64) -> f32 {
        unreachable!("AMX products only run where the CPU has AMX")
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

    /// The vector packing rounds every value as [`to_bf16`] does (ties to even, NaN
    /// kept, infinities, subnormals) and pads with zeros, for both factors' layouts.
    /// One subnormal, in the last row: the vectors holding it take the lane-by-lane
    /// rounding, all others the rounding instruction (which would flush it to zero).
    #[test]
    fn packing_rounds_every_value_as_the_scalar_rounding() {
        if Kernel::current() == Kernel::Rounded {
            eprintln!("no bf16 instruction here: the packing (AVX-512) cannot run");
            return;
        }
        let special = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -(1.0 + 2f32.powi(-8)),
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -0.0,
        ];
        let (m, k) = (3, 37);
        let mut src: Vec<f32> = (0..m * k)
            .map(|i| {
                special
                    .get(i % 13)
                    .copied()
                    .unwrap_or(i as f32 * 0.37 - 5.0)
            })
            .collect();
        src[(m - 1) * k + 20] = 1e-40;
        assert!(src[..(m - 1) * k].iter().all(|v| !v.is_subnormal()));
        // Buffers that held something longer: padding must be zeroed, not left.
        let (mut lhs, mut rhs) = (Pairs::default(), Pairs::default());
        lhs.resize(5000).fill(7);
        rhs.resize(5000).fill(7);
        // SAFETY: src holds m x k values, read along rows (and as k x m transposed).
        unsafe {
            pack_lhs(&mut lhs, (m, k), src.as_ptr(), (k, 1));
            pack_rhs(&mut rhs, (m, k), src.as_ptr(), (k, 1));
        }
        let (lhs, rhs) = (lhs.as_slice(), rhs.as_slice());
        assert_eq!(
            lhs.as_ptr() as usize % 64,
            0,
            "the packed pairs start a cache line"
        );
        let halves: Vec<u16> = lhs
            .iter()
            .flat_map(|p| [*p as u16, (p >> 16) as u16])
            .collect();
        let row = padded(k);
        assert_eq!(halves.len(), padded(m) * row);
        for i in 0..padded(m) {
            for j in 0..row {
                let want = if i < m && j < k {
                    to_bf16(src[i * k + j])
                } else {
                    0
                };
                assert_eq!(halves[i * row + j], want, "left factor ({i}, {j})");
            }
        }
        let np = padded(k);
        for p in 0..padded(m) / 2 {
            for j in 0..np {
                let at = |i: usize| {
                    if i < m && j < k {
                        to_bf16(src[i * k + j])
                    } else {
                        0
                    }
                };
                let want = at(2 * p) as u32 | (at(2 * p + 1) as u32) << 16;
                assert_eq!(rhs[p * np + j], want, "right factor pair ({p}, {j})");
            }
        }
    }

    /// Packing a factor for both its products in one pass ([`pack_input`]: rows and
    /// pairs of rows; [`pack_gradient`]: rows and the transpose's rows) gives the pairs
    /// the packings apart give, padding included, and the same products: odd rows,
    /// rows that are not whole vectors, a subnormal (the lane-by-lane rounding), into
    /// buffers that held something longer.
    #[test]
    fn packing_both_ways_in_one_pass_is_packing_twice() {
        if !Kernel::current().is_native() {
            eprintln!("no bf16 instruction here: nothing is packed ahead (the rounded kernel)");
            return;
        }
        for (m, k) in [(256, 96), (7, 37), (65, 288), (33, 20)] {
            let mut src = values(m * k, (m + k) as u64);
            src[(m - 1) * k + k / 2] = 1e-40;
            let stale = || {
                let mut p = Pairs::from_vec(vec![7; 40_000]);
                p.resize(30_000).fill(7);
                p
            };
            // SAFETY: src holds m x k values, rows contiguous.
            let (input, gradient) = unsafe {
                LEFT.with_borrow_mut(|free| free.extend([stale().buf, stale().buf]));
                let input = pack_input((m, k), src.as_ptr(), k).expect("a bf16 kernel");
                LEFT.with_borrow_mut(|free| free.extend([stale().buf, stale().buf]));
                let gradient = pack_gradient((m, k), src.as_ptr(), k).expect("a bf16 kernel");
                (input, gradient)
            };
            let apart = |lhs: bool, (m, k): (usize, usize), strides: (usize, usize)| {
                let mut p = stale();
                // SAFETY: as above; the strides read src as m x k or as its transpose.
                unsafe {
                    match lhs {
                        true => pack_lhs(&mut p, (m, k), src.as_ptr(), strides),
                        false => pack_rhs(&mut p, (m, k), src.as_ptr(), strides),
                    }
                }
                p.as_slice().to_vec()
            };
            let rows = apart(true, (m, k), (k, 1));
            assert_eq!(input.0.pairs.as_slice(), &rows[..], "{m}x{k}: input's rows");
            let Packed::Pairs(pairs) = &input.1.data else {
                unreachable!("a bf16 kernel's pairs")
            };
            let rhs = apart(false, (m, k), (k, 1));
            assert_eq!(pairs.as_slice(), &rhs[..], "{m}x{k}: input's pairs of rows");
            assert_eq!((input.1.k, input.1.n), (m, k));
            assert_eq!(
                gradient.0.pairs.as_slice(),
                &rows[..],
                "{m}x{k}: gradient's rows"
            );
            let transposed = apart(true, (k, m), (1, k));
            assert_eq!(
                gradient.1.pairs.as_slice(),
                &transposed[..],
                "{m}x{k}: gradient's transpose"
            );
            assert_eq!((gradient.1.m, gradient.1.k), (k, m));
            // The products from packed left factors are the products packing them.
            let b = values(k * 40, 9);
            let w = unsafe { PackedRhs::new((k, 40), b.as_ptr(), (40, 1)) };
            let (mut packed, mut plain) = (vec![0f32; m * 40], vec![0f32; m * 40]);
            // SAFETY: every matrix is allocated at the size its strides describe.
            unsafe {
                product_packed(packed.as_mut_ptr(), (40, 1), &input.0, &w, Start::Zero);
                let rhs = Rhs::Packed(&w);
                product(
                    (m, 40, k),
                    plain.as_mut_ptr(),
                    (40, 1),
                    src.as_ptr(),
                    (k, 1),
                    rhs,
                    Start::Zero,
                );
            }
            assert_eq!(packed, plain, "{m}x{k}: the product");
        }
    }

    /// The packings of a factor read transposed (a gradient read as gᵀ by the weight
    /// gradient, keys read as Kᵀ, weights as Wᵀ) round every value as [`to_bf16`] does
    /// too and pad with zeros: an odd number of pairs, rows that are not whole tiles;
    /// one subnormal, in the last row, as above.
    #[test]
    fn packing_a_transposed_factor_rounds_every_value_as_the_scalar_rounding() {
        if Kernel::current() == Kernel::Rounded {
            eprintln!("no bf16 instruction here: the packing (AVX-512) cannot run");
            return;
        }
        let special = [
            1.0 + 2f32.powi(-8),
            f32::NAN,
            f32::NEG_INFINITY,
            -(1.0 + 3.0 * 2f32.powi(-8)),
            -0.0,
        ];
        // src: 21 rows of 38, row-major.
        let (rows, cols) = (21, 38);
        let mut src: Vec<f32> = (0..rows * cols)
            .map(|i| match i % 11 {
                0..=4 => special[i % 11],
                _ => i as f32 * 0.37 - 50.0,
            })
            .collect();
        src[(rows - 1) * cols + 3] = -1e-40;
        let value = |i: usize, j: usize| to_bf16(src[i * cols + j]);
        // The left factor is srcᵀ (38 x 21: 11 pairs per row, the last one half padding).
        let (m, k) = (cols, rows);
        // The right factor is srcᵀ too (38 x 21 read as k x n, pairs of neighbours).
        let (kr, n) = (cols, rows);
        // Buffers that held something longer: padding must be zeroed, not left.
        let (mut lhs, mut rhs) = (Pairs::default(), Pairs::default());
        lhs.resize(5000).fill(7);
        rhs.resize(5000).fill(7);
        // SAFETY: src holds rows x cols values; both read it with strides (1, cols).
        unsafe {
            pack_lhs(&mut lhs, (m, k), src.as_ptr(), (1, cols));
            pack_rhs(&mut rhs, (kr, n), src.as_ptr(), (1, cols));
        }
        let (lhs, rhs) = (lhs.as_slice(), rhs.as_slice());
        let row = padded(k);
        assert_eq!(lhs.len(), padded(m) * row / 2);
        for i in 0..padded(m) {
            for j in 0..row {
                let pair = lhs[(i * row + j) / 2];
                let got = if j % 2 == 0 {
                    pair as u16
                } else {
                    (pair >> 16) as u16
                };
                let want = if i < m && j < k { value(j, i) } else { 0 };
                assert_eq!(got, want, "left factor ({i}, {j})");
            }
        }
        let np = padded(n);
        assert_eq!(rhs.len(), padded(kr) / 2 * np);
        for p in 0..padded(kr) / 2 {
            for j in 0..np {
                let at = |i: usize| if i < kr && j < n { value(j, i) } else { 0 };
                let want = at(2 * p) as u32 | (at(2 * p + 1) as u32) << 16;
                assert_eq!(rhs[p * np + j], want, "right factor pair ({p}, {j})");
            }
        }
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

    /// Every layout the linear layers use, and shapes that are not whole tiles, on every
    /// kernel this machine can run: the product equals the exact product of the rounded
    /// factors to f32's rounding of the sums, and differs from the unrounded product by
    /// what bf16's rounding of each factor (8 significant bits: 2^-8 relatively, so
    /// 2^-7 + 2^-16 for a product of two) explains, element by element.
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
            (9, 17, 1, false, false, true, false),
        ];
        let skipped = crate::ops::cpu::not_runnable();
        if !skipped.is_empty() {
            eprintln!("bf16 products: this CPU cannot run the levels {skipped:?}; not tested here");
        }
        for kernel in Kernel::runnable() {
            for (case, &(m, n, k, lt, rt, dt, acc)) in cases.iter().enumerate() {
                let (a, b) = (
                    values(m * k, 1 + case as u64),
                    values(k * n, 100 + case as u64),
                );
                let c0 = values(m * n, 200);
                let ls = if lt { (1, m) } else { (k, 1) };
                let rs = if rt { (1, k) } else { (n, 1) };
                let ds = if dt { (1, m) } else { (n, 1) };
                let start = if acc { Start::Dst } else { Start::Zero };
                let run_from = |packed: bool, start: Start, c0: &[f32]| {
                    let mut c = c0.to_vec();
                    let p = unsafe { PackedRhs::for_kernel(kernel, (k, n), b.as_ptr(), rs) };
                    let rhs = match packed {
                        true => Rhs::Packed(&p),
                        false => Rhs::Matrix(b.as_ptr(), rs),
                    };
                    // SAFETY: every matrix is allocated at the size its strides describe.
                    unsafe {
                        product_on(
                            kernel,
                            ((m, n, k), m),
                            c.as_mut_ptr(),
                            ds,
                            LhsAt::Matrix(a.as_ptr(), ls),
                            rhs,
                            start,
                        )
                    };
                    c
                };
                let run = |packed: bool| run_from(packed, start, &c0);
                let (c, c_packed) = (run(false), run(true));
                assert_eq!(
                    c, c_packed,
                    "{kernel:?} case {case}: packed once or per product"
                );
                // Starting from a row (a bias) is adding onto rows filled with it.
                let row = values(n, 300 + case as u64);
                let mut filled = c0.clone();
                for i in 0..m {
                    for j in 0..n {
                        filled[i * ds.0 + j * ds.1] = row[j];
                    }
                }
                assert_eq!(
                    run_from(true, Start::Row(row.as_ptr()), &c0),
                    run_from(true, Start::Dst, &filled),
                    "{kernel:?} case {case}: from a row against from filled rows"
                );
                let mut rounding_seen = 0f64;
                for i in 0..m {
                    for j in 0..n {
                        let (mut rounded, mut exact, mut size) = (0f64, 0f64, 0f64);
                        for l in 0..k {
                            let (x, y) = (a[i * ls.0 + l * ls.1], b[l * rs.0 + j * rs.1]);
                            rounded += round(x) as f64 * round(y) as f64;
                            exact += x as f64 * y as f64;
                            size += (x as f64 * y as f64).abs();
                        }
                        let d = i * ds.0 + j * ds.1;
                        let old = if acc { c0[d] as f64 } else { 0.0 };
                        let got = c[d] as f64 - old;
                        // f32 sums of k terms (and the final addition to the old value):
                        // (k + 1) * 2^-24 relative to the sum of the terms' sizes.
                        let sums = (k + 1) as f64 * 2f64.powi(-24) * (size + old.abs());
                        assert!(
                            (got - rounded).abs() <= sums,
                            "{kernel:?} case {case} ({i}, {j}): {got} against {rounded}"
                        );
                        let factors = (2f64.powi(-7) + 2f64.powi(-16)) * size;
                        assert!(
                            (got - exact).abs() <= factors + sums,
                            "{kernel:?} case {case} ({i}, {j}): {got} against exact {exact}"
                        );
                        rounding_seen = rounding_seen.max((got - exact).abs() / size.max(1e-30));
                    }
                }
                // bf16's rounding is far larger than f32's: a product that skipped it
                // would sit within the first bound of the exact one too.
                assert!(
                    rounding_seen > 2f64.powi(-12),
                    "{kernel:?} case {case}: the factors were not rounded ({rounding_seen:e})"
                );
            }
        }
    }

    /// A lane with several threads splits a product's rows between them; on a bf16
    /// instruction that changes no bit (so results do not depend on `--threads`).
    #[test]
    fn a_product_split_over_threads_changes_no_bit() {
        let kernel = Kernel::current();
        if !kernel.is_native() {
            eprintln!("no bf16 instruction here: products are not split, nothing to test");
            return;
        }
        let (m, n, k) = (1000, 96, 192);
        let (a, b) = (values(m * k, 3), values(k * n, 4));
        let c0 = values(m * n, 5);
        let bias = values(n, 6);
        let run = |threads: usize, start: Start| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = c0.clone();
            let start = Shared(start);
            pool.install(|| unsafe {
                // SAFETY: the matrices are allocated at their shapes.
                let start = start.get();
                product(
                    (m, n, k),
                    c.as_mut_ptr(),
                    (n, 1),
                    a.as_ptr(),
                    (k, 1),
                    Rhs::Matrix(b.as_ptr(), (1, k)),
                    start,
                )
            });
            c
        };
        for start in [Start::Dst, Start::Row(bias.as_ptr())] {
            let one = run(1, start);
            assert_ne!(one, c0);
            assert_eq!(one, run(3, start), "{kernel:?}: 3 threads against 1");
        }
    }

    /// The dispatcher's choice: bf16 instructions where the (capped) CPU has them.
    #[test]
    fn the_current_kernel_is_the_fastest_runnable_one() {
        let runnable = Kernel::runnable();
        assert_eq!(runnable.last(), Some(&Kernel::current()));
        assert_eq!(runnable[0], Kernel::Rounded);
        let level = crate::ops::cpu::level();
        assert_eq!(Kernel::current().is_native(), level >= Level::Avx512Bf16);
    }
}
