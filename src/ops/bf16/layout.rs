//! How the packed factors are laid out, shared by the packing and both kernels (AMX
//! tiles and VDPBF16PS): in whole blocks of 32 along every dimension.

/// The packed factors span whole tiles: 32 rows or columns (two tiles) and 32 values of
/// the inner dimension.
pub(super) const BLOCK: usize = 32;

/// Padded sizes of the packed factors: rows of the left one, columns of the right one,
/// and the inner dimension.
pub(super) fn padded(len: usize) -> usize {
    len.next_multiple_of(BLOCK).max(BLOCK)
}
