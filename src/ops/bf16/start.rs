//! What a product's sums start from, shared by the product and its kernels.

/// What a product's sums start from.
#[derive(Clone, Copy)]
pub enum Start {
    /// Zero: dst = A · B.
    Zero,
    /// dst's values: dst += A · B.
    Dst,
    /// The n values at the pointer in every row (a bias): dst = row + A · B, the same
    /// sums as filling dst's rows with it and adding. The AMX tiles load it straight
    /// from the row, so dst is not written and read back first.
    Row(*const f32),
}
