//! Why saved optimizer or EMA state cannot be restored into this model: a tensor the
//! checkpoint lacks, or one of another shape. The checkpoint loader names the file.

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("optimizer state `{key}` is missing")]
    OptimizerMissing { key: String },
    #[error("optimizer state `{key}` has shape {got:?}, expected {expected:?}")]
    OptimizerShape {
        key: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("`{key}` is missing: the checkpoint was written without train.ema_decay")]
    EmaMissing { key: String },
    #[error("`{key}` has shape {got:?}, the model expects {expected:?}")]
    EmaShape {
        key: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
