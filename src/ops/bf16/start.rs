//! What a product's sums start from, shared by the product and its kernels.

/// What a product's sums start from.
#[derive(Clone, Copy)]
pub enum Start {
    /// Zero: dst = A · B.
    Zero,
    /// dst's values: dst += A · B.
    Dst,
    /// The n values at the pointer in every row (a bias): dst = row + A · B, the same
    /// sums as filling dst's rows with it and adding. The bf16 instructions' kernels
    /// read it from the row (the AMX tiles load it, VDPBF16PS's sums add it at the
    /// end), so dst is not written and read back first.
    Row(*const f32),
}
