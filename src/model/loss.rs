//! What the logits are scored by: the smoothed cross-entropy training minimises (on
//! the composed, differentiable log-softmax) and the count of correct predictions.

use candle_core::{Result, Tensor, D};

use crate::ops::composed::log_softmax_last_dim;

/// Mean cross-entropy against targets smoothed towards uniform by `smoothing`.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &[u32], smoothing: f64) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let off = smoothing / k as f64;
    let mut target = vec![off; b * k];
    for (row, &label) in labels.iter().enumerate() {
        target[row * k + label as usize] += 1.0 - smoothing;
    }
    let target = Tensor::from_vec(target, (b, k), logits.device())?.to_dtype(logits.dtype())?;
    let log_probs = log_softmax_last_dim(logits)?;
    (target * log_probs)?.sum(1)?.mean(0)?.neg()
}

/// Number of rows whose arg-max equals the label.
pub fn correct_predictions(logits: &Tensor, labels: &[u32]) -> Result<usize> {
    let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(predicted.iter().zip(labels).filter(|(p, l)| p == l).count())
}
