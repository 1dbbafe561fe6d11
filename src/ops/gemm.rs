//! The f32 (and f64) matrix product: the gemm crate's kernels behind one call with
//! row and column strides. The lowest layer of the products: the bf16 kernels fall
//! back to it for rounded factors, and [`super::products`] dispatches to it for f32.

use super::kernel::Real;

/// Parallelism for a product inside an op: the current rayon pool's threads.
pub(super) fn gemm_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// How the attention tasks multiply: overwrite, on the task's own thread (the tasks
/// are the parallelism).
pub(super) const IN_TASK: (bool, gemm::Parallelism) = (false, gemm::Parallelism::None);

/// `dst (m x n) (+)= lhs (m x k) · rhs (k x n)`, strides in elements (rows, columns);
/// with `accumulate`, dst's values are kept and the product added.
///
/// # Safety
/// The pointers must cover the matrices their strides describe; `dst` must not overlap
/// the inputs or anything another thread writes.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn product<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
    (accumulate, parallelism): (bool, gemm::Parallelism),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        parallelism,
    );
}
