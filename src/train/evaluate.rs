//! One pass of the model over test images (optionally scored with flip test-time
//! augmentation, [`Scoring`]): batches shared out over one lane per core,
//! each batch's loss, predictions and (for the first images) class probabilities, summed
//! into a confusion matrix in batch order, so the result does not depend on which lane
//! finished first.

use candle_core::{DType, Result};

use super::step::Workers;
use crate::config::IMAGE_SIZE;
use crate::data::batch::{images_f32, Normalizer};
use crate::data::{Split, NUM_CLASSES};
use crate::inspect::knowledge::{self, Knowledge, KnowledgeSet, LayerOutputs};
use crate::model::{images_tensor, smoothed_cross_entropy, VisionTransformer};
use crate::ops::composed::softmax_last_dim;

/// What one evaluation batch gives.
struct EvalChunk {
    /// Loss summed over the batch's images.
    loss_sum: f64,
    predicted: Vec<u32>,
    labels: Vec<u32>,
    /// Class probabilities of those of its images among the first `recorded`.
    probabilities: Vec<f32>,
}

/// How an evaluation scores: the loss's label smoothing, and whether the logits are
/// the mean of the image's and its mirror image's (flip test-time augmentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    pub smoothing: f64,
    pub flip: bool,
}

/// Images (B, 3, H, W) in row-major order, each row mirrored left to right.
pub fn mirrored(pixels: &[f32], width: usize) -> Vec<f32> {
    pixels
        .chunks_exact(width)
        .flat_map(|row| row.iter().rev().copied())
        .collect()
}

fn eval_chunk(
    model: &VisionTransformer,
    test: &Split,
    norm: &Normalizer,
    chunk: &[usize],
    recorded: usize,
    scoring: Scoring,
) -> Result<EvalChunk> {
    let pixels = images_f32(test, chunk, norm);
    let labels: Vec<u32> = chunk.iter().map(|&i| u32::from(test.labels[i])).collect();
    let logits = match scoring.flip {
        true => {
            let flipped = images_tensor(mirrored(&pixels, IMAGE_SIZE), chunk.len(), DType::F32)?;
            let images = images_tensor(pixels, chunk.len(), DType::F32)?;
            ((model.forward(&images)? + model.forward(&flipped)?)? * 0.5)?
        }
        false => model.forward(&images_tensor(pixels, chunk.len(), DType::F32)?)?,
    };
    let wanted = recorded.saturating_sub(chunk[0]).min(chunk.len());
    let probabilities = if wanted > 0 {
        softmax_last_dim(&logits.narrow(0, 0, wanted)?)?
            .flatten_all()?
            .to_vec1::<f32>()?
    } else {
        Vec::new()
    };
    let loss: f32 = smoothed_cross_entropy(&logits, &labels, scoring.smoothing)?.to_scalar()?;
    Ok(EvalChunk {
        loss_sum: f64::from(loss) * chunk.len() as f64,
        predicted: logits.argmax(1)?.to_vec1::<u32>()?,
        labels,
        probabilities,
    })
}

/// What a pass over test images gives.
pub struct TestPass {
    /// Loss summed over the images.
    pub loss_sum: f64,
    /// `confusion[label][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Class probabilities of the first `recorded` images, image after image.
    pub probabilities: Vec<f32>,
}

/// The model over the test images `indices`, `batch` at a time: all batches shared out
/// over one lane per core at once, each holding only its predictions, so the lanes
/// never wait for each other until the last one.
pub fn test_pass(
    model: &VisionTransformer,
    test: &Split,
    norm: &Normalizer,
    indices: &[usize],
    batch: usize,
    recorded: usize,
    scoring: Scoring,
) -> Result<TestPass> {
    let mut pass = TestPass {
        loss_sum: 0.0,
        confusion: vec![vec![0u64; NUM_CLASSES]; NUM_CLASSES],
        probabilities: Vec::with_capacity(recorded * NUM_CLASSES),
    };
    let chunks: Vec<&[usize]> = indices.chunks(batch).collect();
    for part in Workers::per_thread().map(&chunks, |&chunk| {
        eval_chunk(model, test, norm, chunk, recorded, scoring)
    })? {
        pass.loss_sum += part.loss_sum;
        pass.probabilities.extend(part.probabilities);
        for (&p, &l) in part.predicted.iter().zip(&part.labels) {
            pass.confusion[l as usize][p as usize] += 1;
        }
    }
    Ok(pass)
}

/// Each class's share of its images predicted right (0 for a class with none).
pub fn per_class_accuracy(confusion: &[Vec<u64>]) -> Vec<f64> {
    confusion
        .iter()
        .enumerate()
        .map(|(k, row)| {
            let total: u64 = row.iter().sum();
            if total == 0 {
                0.0
            } else {
                row[k] as f64 / total as f64
            }
        })
        .collect()
}

/// What each layer of `model` knows ([`crate::inspect::knowledge`]) about the set's
/// training and test images, their batches shared out over one lane per core.
pub fn layer_knowledge(
    model: &VisionTransformer,
    (train, test): (&Split, &Split),
    set: &KnowledgeSet,
    norm: &Normalizer,
    batch: usize,
    lambda: f64,
) -> Result<Knowledge> {
    let workers = Workers::per_thread();
    let outputs = |split: &Split, indices: &[usize]| {
        let chunks: Vec<&[usize]> = indices.chunks(batch.max(1)).collect();
        workers
            .map(&chunks, |c| KnowledgeSet::run(model, split, c, norm))
            .map(LayerOutputs::concat)
    };
    let train_out = outputs(train, &set.train)?;
    let test_out = outputs(test, &set.test)?;
    knowledge::measure(
        &train_out,
        &set.train_labels,
        &test_out,
        &set.test_labels,
        lambda,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::model::ModelState;

    #[test]
    fn mirrored_reverses_each_row_by_hand() {
        assert_eq!(
            mirrored(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3),
            [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]
        );
    }

    #[test]
    fn flip_scoring_predicts_from_the_mean_of_both_views_logits() {
        let data = synthetic::generate(3, 20, 30);
        let norm = Normalizer::from_split(&data.train);
        let mut cfg = crate::config::Config::default().model;
        cfg.depth = 1;
        let state = ModelState::new(&cfg, 5, DType::F32).unwrap();
        let indices: Vec<usize> = (0..data.test.len()).collect();
        let scoring = |flip| Scoring {
            smoothing: 0.0,
            flip,
        };
        let pass = test_pass(
            &state.model,
            &data.test,
            &norm,
            &indices,
            7,
            30,
            scoring(true),
        )
        .unwrap();
        let pixels = images_f32(&data.test, &indices, &norm);
        let n = indices.len();
        let plain = state
            .model
            .forward(&images_tensor(pixels.clone(), n, DType::F32).unwrap())
            .unwrap();
        let flipped = state
            .model
            .forward(&images_tensor(mirrored(&pixels, IMAGE_SIZE), n, DType::F32).unwrap())
            .unwrap();
        let mean = ((plain + flipped).unwrap() * 0.5).unwrap();
        let predicted: Vec<u32> = mean.argmax(1).unwrap().to_vec1().unwrap();
        let mut confusion = vec![vec![0u64; NUM_CLASSES]; NUM_CLASSES];
        for (i, &p) in predicted.iter().enumerate() {
            confusion[usize::from(data.test.labels[i])][p as usize] += 1;
        }
        assert_eq!(pass.confusion, confusion);
        let probabilities: Vec<f32> = softmax_last_dim(&mean)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in pass.probabilities.iter().zip(&probabilities) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Without flip the scores differ (the untrained model is not mirror-symmetric).
        let plain_pass = test_pass(
            &state.model,
            &data.test,
            &norm,
            &indices,
            7,
            30,
            scoring(false),
        )
        .unwrap();
        assert_ne!(plain_pass.probabilities, pass.probabilities);
    }
}
