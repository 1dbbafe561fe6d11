//! Matrix products: the gemm crate's f32 kernels, or bf16 factors on AMX tiles or
//! AVX-512 BF16 dot products ([`super::bf16`]) as `model.matmul` says, behind one call the ops share.

use super::bf16::{self, PackedLhs, PackedRhs};
use super::gemm::product;
pub(super) use super::gemm::{gemm_parallelism, IN_TASK};
use super::kernel::Real;

/// How a product multiplies: f32, or bf16 factors ([`bf16`]) with the
/// right-hand one packed for this product or packed already. bf16 applies to f32 values
/// only: f64 runs stay exact, the reference the tests compare against.
#[derive(Clone, Copy)]
pub(super) enum Factors<'a> {
    F32,
    Bf16,
    Bf16Packed(&'a bf16::PackedRhs),
}

/// The weight `w` (out x in, as stored) packed for bf16 products when `T` is f32:
/// read as Wᵀ (`transposed`: the forward pass) or as W (the input gradient).
pub(super) fn pack_weight<T: Real>(
    w: &[T],
    (out_dim, in_dim): (usize, usize),
    transposed: bool,
) -> Option<PackedRhs> {
    assert_eq!(w.len(), out_dim * in_dim, "pack_weight: weight size");
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        return None;
    }
    let w = w.as_ptr().cast::<f32>();
    // SAFETY: T is f32, and w holds out x in values (checked).
    Some(unsafe {
        match transposed {
            true => PackedRhs::new((in_dim, out_dim), w, (1, in_dim)),
            false => PackedRhs::new((out_dim, in_dim), w, (in_dim, 1)),
        }
    })
}

/// The rows of `values` as a matrix of `cols` columns, which it must fill whole.
fn whole_rows<T>(values: &[T], cols: usize, what: &str) -> usize {
    let rows = values.len() / cols.max(1);
    assert_eq!(rows * cols, values.len(), "{what}: whole rows");
    rows
}

/// A layer's input x (rows x cols, rows contiguous) packed as the right-hand factor
/// of its weight gradient dW = gᵀ x when `T` is f32: the forward pass packs it while x
/// is in cache, and the backward pass reads half the bytes (bf16 pairs, not f32) and
/// rounds nothing. The same pairs as packing x then, so the same products.
pub(super) fn pack_activation<T: Real>(x: &[T], cols: usize) -> Option<PackedRhs> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        return None;
    }
    let rows = whole_rows(x, cols, "pack_activation");
    // SAFETY: T is f32, and x holds rows x cols values (checked).
    Some(unsafe { PackedRhs::new((rows, cols), x.as_ptr().cast(), (cols, 1)) })
}

/// A layer's input x (rows x cols, rows contiguous) packed in one pass for both
/// products that read it, when `T` is f32 and the CPU has a bf16 instruction: the
/// left factor of its forward product and the right one of its weight gradient (as
/// [`pack_activation`] packs it). None elsewhere.
pub(super) fn pack_input<T: Real>(x: &[T], cols: usize) -> Option<(PackedLhs, PackedRhs)> {
    if !packs_native::<T>() {
        return None;
    }
    let rows = whole_rows(x, cols, "pack_input");
    // SAFETY: T is f32, and x holds rows x cols values (checked).
    unsafe { bf16::pack_input((rows, cols), x.as_ptr().cast(), cols) }
}

/// A layer's output gradient g (rows x cols, rows contiguous) packed in one pass as
/// the left factor of its input gradient (g) and of its weight gradient (gᵀ), when
/// `T` is f32 and the CPU has a bf16 instruction. None elsewhere.
pub(super) fn pack_gradient<T: Real>(g: &[T], cols: usize) -> Option<(PackedLhs, PackedLhs)> {
    if !packs_native::<T>() {
        return None;
    }
    let rows = whole_rows(g, cols, "pack_gradient");
    // SAFETY: T is f32, and g holds rows x cols values (checked).
    unsafe { bf16::pack_gradient((rows, cols), g.as_ptr().cast(), cols) }
}

/// What a product of packed factors starts its sums from.
#[derive(Clone, Copy)]
pub(super) enum SumsFrom<'a, T> {
    Zero,
    /// dst's values: dst += lhs · rhs.
    Dst,
    /// The row in every row of dst (a bias).
    Row(&'a [T]),
}

/// dst (rows contiguous, `dst_rows` apart) = lhs · rhs plus what `from` says, of two
/// factors packed already (so `T` is f32, and the kernel a bf16 instruction's): the
/// same sums as [`product_with`] packing them itself.
///
/// # Safety
/// dst covers lhs's rows of `dst_rows` values, rhs's columns within each.
pub(super) unsafe fn product_packed<T: Real>(
    dst: *mut T,
    dst_rows: usize,
    lhs: &PackedLhs,
    rhs: &PackedRhs,
    from: SumsFrom<T>,
) {
    assert!(
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>(),
        "packed factors multiply f32 values"
    );
    let start = match from {
        SumsFrom::Zero => bf16::Start::Zero,
        SumsFrom::Dst => bf16::Start::Dst,
        SumsFrom::Row(row) => {
            assert_eq!(
                row.len(),
                rhs.dims().1,
                "product_packed: a value per column"
            );
            bf16::Start::Row(row.as_ptr().cast())
        }
    };
    bf16::product_packed(dst.cast(), (dst_rows, 1), lhs, rhs, start);
}

/// The k x n matrix at `src` (strides in elements) packed as a right-hand factor when
/// `T` is f32 and the CPU has a bf16 instruction: what the attention's forward pass
/// keeps for its backward products ([`super::attention`]). None elsewhere (f64, or
/// bf16 through the f32 product), where those products read the matrices as they are.
///
/// # Safety
/// `src` covers the matrix its strides describe.
pub(super) unsafe fn pack_native<T: Real>(
    dims: (usize, usize),
    src: *const T,
    strides: (usize, usize),
) -> Option<PackedRhs> {
    if !packs_native::<T>() {
        return None;
    }
    Some(PackedRhs::new(dims, src.cast(), strides))
}

/// Whether [`pack_native`] packs values of `T` (f32, on a bf16 instruction).
pub(super) fn packs_native<T: Real>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && bf16::Kernel::current().is_native()
}

/// The right-hand factor of a bf16 product, when `factors` asks for one and `T` is
/// f32 (f64 stays exact): `rhs` with its strides, or the factor packed already.
fn bf16_rhs<'a, T: Real>(
    factors: Factors<'a>,
    rhs: *const T,
    rhs_strides: (usize, usize),
) -> Option<bf16::Rhs<'a>> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        return None;
    }
    match factors {
        Factors::F32 => None,
        Factors::Bf16 => Some(bf16::Rhs::Matrix(rhs.cast(), rhs_strides)),
        Factors::Bf16Packed(packed) => Some(bf16::Rhs::Packed(packed)),
    }
}

/// [`product`] with its factors as `factors` says. A bf16 product runs on the calling
/// thread (the training lanes are single-threaded).
///
/// # Safety
/// As [`product`]; a packed factor is the k x n right-hand one.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_with<T: Real>(
    dims: (usize, usize, usize),
    dst: *mut T,
    dst_strides: (usize, usize),
    lhs: *const T,
    lhs_strides: (usize, usize),
    rhs: *const T,
    rhs_strides: (usize, usize),
    factors: Factors,
    (accumulate, parallelism): (bool, gemm::Parallelism),
) {
    if let Some(rhs) = bf16_rhs::<T>(factors, rhs, rhs_strides) {
        // T is f32: the pointers are f32 pointers.
        let (dst, lhs) = (dst.cast(), lhs.cast());
        let start = match accumulate {
            true => bf16::Start::Dst,
            false => bf16::Start::Zero,
        };
        bf16::product(dims, dst, dst_strides, lhs, lhs_strides, rhs, start);
        return;
    }
    product(
        dims,
        dst,
        dst_strides,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        (accumulate, parallelism),
    );
}

/// dst (m x n, rows contiguous) = `row` in every row + lhs · rhs, as
/// [`product_with`] adding onto rows filled with `row` computes it (the same sums); bf16
/// products start their sums from `row` itself where the kernel can (the AMX tiles),
/// so dst is not filled and read back first.
///
/// # Safety
/// As [`product_with`]; `row` holds n values.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_onto_row<T: Real>(
    dims: (usize, usize, usize),
    dst: *mut T,
    dst_rows: usize,
    lhs: *const T,
    lhs_strides: (usize, usize),
    rhs: *const T,
    rhs_strides: (usize, usize),
    factors: Factors,
    (row, parallelism): (&[T], gemm::Parallelism),
) {
    let (m, n, _) = dims;
    assert_eq!(row.len(), n, "product_onto_row: a value per column");
    if let Some(rhs) = bf16_rhs::<T>(factors, rhs, rhs_strides) {
        // T is f32: the pointers are f32 pointers.
        let (dst, lhs) = (dst.cast(), lhs.cast());
        let row = bf16::Start::Row(row.as_ptr().cast());
        bf16::product(dims, dst, (dst_rows, 1), lhs, lhs_strides, rhs, row);
        return;
    }
    for i in 0..m {
        std::slice::from_raw_parts_mut(dst.add(i * dst_rows), n).copy_from_slice(row);
    }
    product_with(
        dims,
        dst,
        (dst_rows, 1),
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        factors,
        (true, parallelism),
    );
}

/// Seconds for `reps` products (rows x k) · (k x n) as the fused ops run a linear
/// layer: on the calling thread, single-threaded, the weights read as Wᵀ; with `bf16`,
/// bf16 factors, the weights packed once as the fused block packs them. What
/// `vitscope bench` measures the machine's own limit with.
pub fn time_products(rows: usize, k: usize, n: usize, reps: usize, bf16: bool) -> f64 {
    let x: Vec<f32> = (0..rows * k)
        .map(|i| (i % 7) as f32 * 0.25 - 0.75)
        .collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.125 - 0.25).collect();
    // Aligned, as the activations the model's products write into (see `Buffer`).
    let mut y = super::kernel::Buffer::<f32>::new(rows * n);
    let start = std::time::Instant::now();
    let wt = bf16.then(|| pack_weight(&w, (n, k), true)).flatten();
    let factors = wt.as_ref().map_or(Factors::F32, Factors::Bf16Packed);
    for _ in 0..reps {
        // SAFETY: y is rows x n, x rows x k, w n x k, all allocated above.
        unsafe {
            product_with(
                (rows, n, k),
                y.as_mut_ptr(),
                (n, 1),
                x.as_ptr(),
                (k, 1),
                w.as_ptr(),
                (1, k),
                factors,
                IN_TASK,
            );
        }
    }
    std::hint::black_box(&y[..]);
    start.elapsed().as_secs_f64()
}

/// What the blocks' products run on, bf16 or not, in words.
pub fn matmul_kind(bf16: bool) -> &'static str {
    match bf16 {
        false => "f32",
        true => bf16::Kernel::current().describe(),
    }
}

/// [`matmul_kind`] in a few words, for the status line.
pub fn matmul_short(bf16: bool) -> &'static str {
    match bf16 {
        false => "f32",
        true => bf16::Kernel::current().short(),
    }
}
