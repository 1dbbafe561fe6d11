//! The plumbing every fused kernel shares: the element types they run on ([`Real`]),
//! reused work buffers ([`BufferPool`]), rows split over rayon's pool ([`par_rows`]),
//! deterministic column sums, and the two macros: `kernel!` compiles a loop for three
//! vector widths picked at run time, `by_dtype!` runs one closure on f32 or f64
//! storage. Kept apart from the op families so each family's file is only its maths.

use std::ops::Range;

use candle_core::{Layout, Result, Shape, Tensor};
use num_traits::Float;

pub(super) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: expects a contiguous input"),
    }
}

/// The gradients packed one after another in `packed` (1-D, as the backward ops
/// return them), cut apart into tensors of `shapes`, in order.
pub(super) fn unpack<const N: usize>(packed: &Tensor, shapes: [&Shape; N]) -> [Result<Tensor>; N] {
    let mut start = 0;
    shapes.map(|shape| {
        let len = shape.elem_count();
        let piece = packed.narrow(0, start, len).and_then(|p| p.reshape(shape));
        start += len;
        piece
    })
}

/// `values` cut into consecutive pieces of `lens`.
pub(super) fn pieces<T, const N: usize>(mut values: &[T], lens: [usize; N]) -> [&[T]; N] {
    lens.map(|len| {
        let (piece, rest) = values.split_at(len);
        values = rest;
        piece
    })
}

/// `values` cut into consecutive mutable pieces of `lens`.
pub(super) fn pieces_mut<T, const N: usize>(
    mut values: &mut [T],
    lens: [usize; N],
) -> [&mut [T]; N] {
    lens.map(|len| {
        let (piece, rest) = std::mem::take(&mut values).split_at_mut(len);
        values = rest;
        piece
    })
}

/// Value range of rows `rows` in a buffer of `width` values per row.
pub(super) fn span(rows: &Range<usize>, width: usize) -> Range<usize> {
    rows.start * width..rows.end * width
}

/// Asks the CPU to bring `data` into its L2 cache, a line at a time, without waiting
/// for it: for what a task will read after the one running now, when it was written
/// long ago and has left the caches (a hint only: nothing changes but timing).
pub(super) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let bytes = std::mem::size_of_val(data);
        let start = data.as_ptr().cast::<i8>();
        for offset in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and the address lies inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Images `first..first + images` as rows of `per_image` rows each.
pub(super) fn image_rows(first: usize, images: usize, per_image: usize) -> Range<usize> {
    first * per_image..(first + images) * per_image
}

/// The element types the kernels run on: f32 for training, f64 for the exact tests.
pub trait Real: Float + std::ops::AddAssign + Send + Sync + std::iter::Sum + 'static {
    /// erf: vectorisable for f32 ([`crate::ops::fastmath`], within 3e-7), exact for f64.
    /// `FMA`: fused multiply-adds (only in kernels compiled for them, see `kernel!`).
    fn erf<const FMA: bool>(self) -> Self;
    /// e^x: vectorisable for f32 ([`crate::ops::fastmath`]), exact for f64.
    fn fast_exp<const FMA: bool>(self) -> Self;
    /// The pool of freed buffers of this type.
    fn pool() -> &'static BufferPool<Self>;
}

impl Real for f32 {
    #[inline(always)]
    fn erf<const FMA: bool>(self) -> Self {
        super::fastmath::erf::<FMA>(self)
    }
    #[inline(always)]
    fn fast_exp<const FMA: bool>(self) -> Self {
        super::fastmath::exp::<FMA>(self)
    }
    fn pool() -> &'static BufferPool<Self> {
        static POOL: BufferPool<f32> = BufferPool::new();
        &POOL
    }
}

impl Real for f64 {
    #[inline(always)]
    fn erf<const FMA: bool>(self) -> Self {
        libm::erf(self)
    }
    #[inline(always)]
    fn fast_exp<const FMA: bool>(self) -> Self {
        self.exp()
    }
    fn pool() -> &'static BufferPool<Self> {
        static POOL: BufferPool<f64> = BufferPool::new();
        &POOL
    }
}

/// Freed work buffers kept for reuse. A training step fills the same activation
/// buffers of the same few sizes every time; taken from here they are overwritten as
/// they are, where a fresh allocation would be zero-filled first (a whole extra pass
/// over memory). Kept by length, so that finding one costs a lookup, not a pass over
/// the thousands of packed factors a step keeps.
pub struct BufferPool<T> {
    pub(super) free: std::sync::Mutex<Free<T>>,
    /// Buffers kept at most; beyond that, freed buffers go back to the allocator.
    limit: usize,
}

/// The free buffers by length, and how many there are.
pub(super) struct Free<T> {
    by_len: std::collections::BTreeMap<usize, Vec<Vec<T>>>,
    count: usize,
}

impl<T> Free<T> {
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Buffers kept at most by the activations' pools: more than one step's activations
/// of the default model on two lanes.
const POOLED_BUFFERS: usize = 256;

impl<T: Copy + num_traits::Zero> BufferPool<T> {
    pub(super) const fn new() -> Self {
        Self::with_limit(POOLED_BUFFERS)
    }

    /// A pool that keeps up to `limit` buffers.
    pub(super) const fn with_limit(limit: usize) -> Self {
        Self {
            free: std::sync::Mutex::new(Free {
                by_len: std::collections::BTreeMap::new(),
                count: 0,
            }),
            limit,
        }
    }

    /// A vector of at least `len` values with unspecified contents: the shortest free
    /// one that is long enough, else a new one. Vectors stay at their full length in
    /// the pool, so handing one out never writes to it.
    pub(super) fn take(&self, len: usize) -> Vec<T> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let shortest = free.by_len.range(len..).next().map(|(&at, _)| at);
            shortest.and_then(|at| {
                let list = free.by_len.get_mut(&at)?;
                let buffer = list.pop()?;
                // No empty lists: the first length at or above `len` has a buffer.
                if list.is_empty() {
                    free.by_len.remove(&at);
                }
                free.count -= 1;
                Some(buffer)
            })
        };
        reused.unwrap_or_else(|| vec![T::zero(); len])
    }

    pub(super) fn give(&self, buffer: Vec<T>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.count < self.limit && !buffer.is_empty() {
            free.by_len.entry(buffer.len()).or_default().push(buffer);
            free.count += 1;
        }
    }
}

/// `len` values of work memory from [`BufferPool`], which they go back to when
/// dropped, starting at a cache line (64 bytes): the AMX tiles store and load the
/// products' rows (64 bytes each) there, and a row across two lines costs both.
pub(super) struct Buffer<T: Real> {
    data: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Real> Buffer<T> {
    pub(super) fn new(len: usize) -> Self {
        let size = std::mem::size_of::<T>();
        let data = T::pool().take(len + 64 / size);
        // Values to the next multiple of 64 bytes (a Vec<T> starts at a multiple of T's size).
        let start = (data.as_ptr() as usize).wrapping_neg() % 64 / size;
        Self { data, start, len }
    }
}

impl<T: Real> Drop for Buffer<T> {
    fn drop(&mut self) {
        T::pool().give(std::mem::take(&mut self.data));
    }
}

impl<T: Real> std::ops::Deref for Buffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data[self.start..self.start + self.len]
    }
}

impl<T: Real> std::ops::DerefMut for Buffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data[self.start..self.start + self.len]
    }
}

/// Rows per chunk of [`par_rows`] and [`par_rows_with`]: a few chunks per thread,
/// for balance without much scheduling overhead.
fn chunk_rows(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// Runs `f(rows, out_rows)` over disjoint chunks of `rows` rows of `row_len` values
/// on the rayon pool that candle's matrix products run on, so the kernels and the
/// products share the same worker threads instead of two pools competing for the
/// cores; `out` holds `rows * row_len` values.
pub(super) fn par_rows<T: Send + Sync>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    use rayon::prelude::*;
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    if rows == 0 {
        return;
    }
    let chunk_rows = chunk_rows(rows);
    if rows <= chunk_rows {
        f(0..rows, out);
        return;
    }
    out.par_chunks_mut(chunk_rows * row_len)
        .enumerate()
        .for_each(|(i, chunk)| {
            let start = i * chunk_rows;
            f(start..start + chunk.len() / row_len, chunk);
        });
}

/// [`par_rows`] over two outputs with a row each per row: `f(rows, out_rows,
/// side_rows)`, `side` holding `side_len` values per row of `out`, split alike.
pub(super) fn par_rows_with<T: Send + Sync>(
    (out, row_len): (&mut [T], usize),
    (side, side_len): (&mut [T], usize),
    f: impl Fn(Range<usize>, &mut [T], &mut [T]) + Sync,
) {
    use rayon::prelude::*;
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    assert_eq!(
        side.len(),
        rows * side_len,
        "par_rows_with: a side row per row"
    );
    if rows == 0 {
        return;
    }
    let chunk_rows = chunk_rows(rows);
    if rows <= chunk_rows {
        f(0..rows, out, side);
        return;
    }
    out.par_chunks_mut(chunk_rows * row_len)
        .zip(side.par_chunks_mut(chunk_rows * side_len))
        .enumerate()
        .for_each(|(i, (chunk, side))| {
            let start = i * chunk_rows;
            f(start..start + chunk.len() / row_len, chunk, side);
        });
}

/// Whether the kernels may use 256-bit vectors with FMA ([`cpu::level`], checked once).
#[cfg(target_arch = "x86_64")]
pub(super) fn wide_vectors() -> bool {
    super::cpu::level() >= super::cpu::Level::Avx2
}

/// Defines a kernel function compiled three times: for the baseline target (SSE2), for
/// AVX2 + FMA and for AVX-512, picked at run time ([`cpu::level`], which
/// `VITSCOPE_CPU` caps). The loops vectorise twice as wide in the second and again in
/// the third, and the body's `FMA` (a const generic it can pass on to [`Real::erf`]
/// and [`Real::fast_exp`]) is true in both, for fused multiply-adds.
macro_rules! kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<T: Real>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name<T: Real>($($arg: $ty),*) {
            #[inline(always)]
            fn body<T: Real, const FMA: bool>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn widest<T: Real>($($arg: $ty),*) {
                    body::<T, true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide<T: Real>($($arg: $ty),*) {
                    body::<T, true>($($arg),*)
                }
                if super::cpu::level() >= super::cpu::Level::Avx512 {
                    // SAFETY: taken only when the CPU has AVX-512 F, BW, DQ and VL.
                    unsafe { widest($($arg),*) };
                    return;
                }
                if super::kernel::wide_vectors() {
                    // SAFETY: taken only when the CPU has AVX2 and FMA.
                    unsafe { wide($($arg),*) };
                    return;
                }
            }
            body::<T, false>($($arg),*)
        }
    };
}

/// Rows per block for reductions over rows: each block sums into its own partial.
pub(super) const BLOCK_ROWS: usize = 128;

/// Adds into `total` what `per_block(rows, partial)` sums into a zeroed partial of
/// `total.len()` values for each block of rows: the blocks run in parallel, their
/// partials are summed in order (deterministic for a given shape), then added.
pub(super) fn add_row_sums<T: Real>(
    rows: usize,
    total: &mut [T],
    per_block: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    let len = total.len();
    let mut partials = vec![T::zero(); rows.div_ceil(BLOCK_ROWS) * len];
    par_rows(&mut partials, len, |block_range, out| {
        for (b, partial) in block_range.zip(out.chunks_exact_mut(len)) {
            per_block(b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(rows), partial);
        }
    });
    let mut sums = vec![T::zero(); len];
    add_partials(&mut sums, &partials);
    add_partials(total, &sums);
}

kernel! {
/// Adds each row of `src` into `partial` (rows of `partial.len()` values).
pub(super) fn add_rows_chunk<T: Real>(src: &[T], partial: &mut [T]) {
    for row in src.chunks_exact(partial.len()) {
        for (p, &v) in partial.iter_mut().zip(row) {
            *p += v;
        }
    }
}
}

/// Adds each `total.len()`-long partial of `partials` into `total`, in order.
pub(super) fn add_partials<T: Real>(total: &mut [T], partials: &[T]) {
    for partial in partials.chunks_exact(total.len()) {
        for (t, &p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
}

/// What a kernel returns: its output, or its output or an error.
pub(super) trait KernelOutput<T> {
    fn into_result(self) -> Result<Vec<T>>;
}

impl<T> KernelOutput<T> for Vec<T> {
    fn into_result(self) -> Result<Vec<T>> {
        Ok(self)
    }
}

impl<T> KernelOutput<T> for Result<Vec<T>> {
    fn into_result(self) -> Result<Vec<T>> {
        self
    }
}

/// Runs a kernel on one, two or three contiguous inputs of one float type, f32 or
/// f64: `$f` is expanded once per type, so one closure serves both; it returns a
/// vector, or a `Result` of one ([`KernelOutput`]). Bails out of the calling function
/// (naming the op) on other types, mixed types, strided inputs or the kernel's error.
macro_rules! by_dtype {
    (@run $f:expr, $($input:expr),+) => {
        super::kernel::KernelOutput::into_result(($f)($($input),+))?
    };
    ($name:expr, $f:expr, ($s1:expr, $l1:expr)) => {
        match $s1 {
            candle_core::CpuStorage::F32(a) => {
                candle_core::CpuStorage::F32(by_dtype!(@run $f, super::kernel::contiguous(a, $l1, $name)?))
            }
            candle_core::CpuStorage::F64(a) => {
                candle_core::CpuStorage::F64(by_dtype!(@run $f, super::kernel::contiguous(a, $l1, $name)?))
            }
            _ => candle_core::bail!("{}: expects f32 or f64", $name),
        }
    };
    ($name:expr, $f:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr)) => {
        match ($s1, $s2) {
            (candle_core::CpuStorage::F32(a), candle_core::CpuStorage::F32(b)) => candle_core::CpuStorage::F32(by_dtype!(
                @run $f,
                super::kernel::contiguous(a, $l1, $name)?,
                super::kernel::contiguous(b, $l2, $name)?
            )),
            (candle_core::CpuStorage::F64(a), candle_core::CpuStorage::F64(b)) => candle_core::CpuStorage::F64(by_dtype!(
                @run $f,
                super::kernel::contiguous(a, $l1, $name)?,
                super::kernel::contiguous(b, $l2, $name)?
            )),
            _ => candle_core::bail!("{}: inputs must all be f32 or all f64", $name),
        }
    };
    ($name:expr, $f:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr)) => {
        match ($s1, $s2, $s3) {
            (candle_core::CpuStorage::F32(a), candle_core::CpuStorage::F32(b), candle_core::CpuStorage::F32(c)) => {
                candle_core::CpuStorage::F32(by_dtype!(
                    @run $f,
                    super::kernel::contiguous(a, $l1, $name)?,
                    super::kernel::contiguous(b, $l2, $name)?,
                    super::kernel::contiguous(c, $l3, $name)?
                ))
            }
            (candle_core::CpuStorage::F64(a), candle_core::CpuStorage::F64(b), candle_core::CpuStorage::F64(c)) => {
                candle_core::CpuStorage::F64(by_dtype!(
                    @run $f,
                    super::kernel::contiguous(a, $l1, $name)?,
                    super::kernel::contiguous(b, $l2, $name)?,
                    super::kernel::contiguous(c, $l3, $name)?
                ))
            }
            _ => candle_core::bail!("{}: inputs must all be f32 or all f64", $name),
        }
    };
}
