//! What a forward pass can record on the way (LayerNorm inputs and outputs, attention
//! weights, the residual stream), detached: the probes' raw material, kept apart from
//! the layers that fill it so the norms and blocks share it without importing the model.

use candle_core::Tensor;

/// Intermediate tensors recorded by a forward pass (all detached from the graph).
#[derive(Debug, Default)]
pub struct Capture {
    /// Inputs of each LayerNorm in order: block 0 norm1, block 0 norm2, ..., final norm; (B, T, D).
    pub ln_inputs: Vec<Tensor>,
    /// Outputs of the same LayerNorms; (B, T, D).
    pub ln_outputs: Vec<Tensor>,
    /// Attention weights softmax(QK^T / sqrt(d_k)) per block; (B, H, T, T).
    pub attention: Vec<Tensor>,
    /// The residual stream: after the embeddings, then after each block; (B, T, D).
    pub hidden: Vec<Tensor>,
}
