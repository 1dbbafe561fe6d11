//! An evaluation's predictions on the first test images (`probe.predictions` of them),
//! kept so the dashboard can page through real predictions, compare evaluations and
//! list what flipped. Stored as safetensors (f32 probabilities, JSON metadata).

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "vitscope-predictions-1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionsMeta {
    /// Optimizer steps completed at the evaluation.
    pub step: u64,
    pub epoch: u64,
    pub images: usize,
    pub classes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    pub meta: PredictionsMeta,
    /// (images, classes): softmax of the logits, test images 0.. in order.
    pub probabilities: Vec<f32>,
}

/// How an image's prediction changed from one evaluation to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    ToRight,
    ToWrong,
}

impl Predictions {
    pub fn len(&self) -> usize {
        self.meta.images
    }

    pub fn is_empty(&self) -> bool {
        self.meta.images == 0
    }

    pub fn of(&self, image: usize) -> &[f32] {
        let k = self.meta.classes;
        &self.probabilities[image * k..(image + 1) * k]
    }

    /// The predicted class and its probability.
    pub fn predicted(&self, image: usize) -> (usize, f32) {
        self.of(image)
            .iter()
            .copied()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (k, p)| {
                if p > best.1 {
                    (k, p)
                } else {
                    best
                }
            })
    }

    /// Classes by falling probability, the first `n`.
    pub fn top(&self, image: usize, n: usize) -> Vec<(usize, f32)> {
        let mut ranked: Vec<(usize, f32)> = self.of(image).iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(n);
        ranked
    }

    /// Whether `image`'s right-or-wrong changed since `previous` (same images).
    pub fn flip(&self, previous: &Self, image: usize, label: usize) -> Option<Flip> {
        if image >= previous.len() {
            return None;
        }
        let now = self.predicted(image).0 == label;
        let before = previous.predicted(image).0 == label;
        match (before, now) {
            (false, true) => Some(Flip::ToRight),
            (true, false) => Some(Flip::ToWrong),
            _ => None,
        }
    }

    /// `confusion[true][predicted]` counts over the images that have a label.
    pub fn confusion(&self, labels: &[u8]) -> Vec<Vec<u64>> {
        let k = self.meta.classes;
        let mut counts = vec![vec![0u64; k]; k];
        for (i, &label) in labels.iter().enumerate().take(self.len()) {
            if usize::from(label) < k {
                counts[usize::from(label)][self.predicted(i).0] += 1;
            }
        }
        counts
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let bytes: Vec<u8> = self
            .probabilities
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let view = TensorView::new(
            Dtype::F32,
            vec![self.meta.images, self.meta.classes],
            &bytes,
        )
        .expect("shape matches the data");
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "meta".to_string(),
                serde_json::to_string(&self.meta).expect("meta serialises"),
            ),
        ]);
        safetensors::serialize([("probabilities", view)], Some(metadata))
            .expect("predictions serialise")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let info = header.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(format!("not a {FORMAT} file"));
        }
        let meta: PredictionsMeta =
            serde_json::from_str(info.get("meta").map_or("", String::as_str))
                .map_err(|e| format!("bad predictions metadata: {e}"))?;
        let tensors = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let view = tensors
            .tensor("probabilities")
            .map_err(|e| format!("probabilities: {e}"))?;
        if view.dtype() != Dtype::F32 || view.shape() != [meta.images, meta.classes] {
            return Err(format!(
                "probabilities: expected f32 [{}, {}], found {:?} {:?}",
                meta.images,
                meta.classes,
                view.dtype(),
                view.shape()
            ));
        }
        let probabilities = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Self {
            meta,
            probabilities,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predictions(step: u64, rows: &[[f32; 3]]) -> Predictions {
        Predictions {
            meta: PredictionsMeta {
                step,
                epoch: 1,
                images: rows.len(),
                classes: 3,
            },
            probabilities: rows.iter().flatten().copied().collect(),
        }
    }

    #[test]
    fn predicted_top_confusion_and_flips_by_hand() {
        let before = predictions(
            10,
            &[
                [0.7, 0.2, 0.1],
                [0.1, 0.8, 0.1],
                [0.3, 0.3, 0.4],
                [0.5, 0.4, 0.1],
            ],
        );
        let after = predictions(
            20,
            &[
                [0.2, 0.7, 0.1],
                [0.1, 0.8, 0.1],
                [0.6, 0.3, 0.1],
                [0.5, 0.4, 0.1],
            ],
        );
        let labels = [0u8, 1, 0, 2];
        assert_eq!(after.predicted(0), (1, 0.7));
        assert_eq!(after.top(2, 2), vec![(0, 0.6), (1, 0.3)]);
        // true 0 -> predicted 1, true 1 -> 1, true 0 -> 0, true 2 -> 0
        assert_eq!(
            after.confusion(&labels),
            vec![vec![1, 1, 0], vec![0, 1, 0], vec![1, 0, 0]]
        );
        assert_eq!(after.flip(&before, 0, 0), Some(Flip::ToWrong));
        assert_eq!(after.flip(&before, 1, 1), None);
        assert_eq!(after.flip(&before, 2, 0), Some(Flip::ToRight));
        assert_eq!(after.flip(&before, 3, 2), None);
        let back = Predictions::from_bytes(&after.to_bytes()).unwrap();
        assert_eq!(back, after);
        assert!(Predictions::from_bytes(b"junk").is_err());
    }
}
