//! Scale by depth, from the probes already taken: the residual stream's RMS after the
//! embeddings and after each block, and each norm's output RMS, over every token of
//! the probe images. Without norms the stream's RMS grows with depth; with them each
//! norm's output stays near 1 whatever goes in: the picture behind "LayerNorm keeps
//! activations at a consistent scale".

use crate::inspect::layer_records::ScaleRecord;
use crate::inspect::probe::ProbeSnapshot;

/// The scale record of a probe.
pub fn of_probe(snapshot: &ProbeSnapshot) -> ScaleRecord {
    let m = &snapshot.meta;
    let residual_rms = (0..=m.depth)
        .map(|layer| {
            let (mut sum, mut count) = (0.0, 0usize);
            for image in 0..m.images {
                let h = snapshot.hidden_state(image, layer);
                sum += h.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>();
                count += h.len();
            }
            (sum / count.max(1) as f64).sqrt()
        })
        .collect();
    // E[x²] = mean² + variance (the stored deviation is the population one).
    let norm_rms = m
        .layer_norms
        .iter()
        .map(|ln| {
            let s = &ln.output.stats;
            (f64::from(s.mean).powi(2) + f64::from(s.std).powi(2)).sqrt()
        })
        .collect();
    ScaleRecord {
        step: m.step,
        epoch: m.epoch,
        residual_rms,
        norm_rms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::data::batch::Normalizer;
    use crate::data::synthetic;
    use crate::inspect::probe::ProbeSet;
    use crate::model::ModelState;
    use candle_core::DType;

    #[test]
    fn residual_and_norm_rms_by_hand_from_a_real_probe() {
        let config = Config::default();
        let mut mc = config.model.clone();
        mc.depth = 2;
        let state = ModelState::new(&mc, 1, DType::F32).unwrap();
        let set = synthetic::generate(1, 20, 10);
        let norm = Normalizer::from_split(&set.train);
        let snap = ProbeSet::new(&set.test, 3, &norm)
            .probe(&state.model, &config.probe, 7, 1)
            .unwrap();
        let record = of_probe(&snap);
        assert_eq!((record.step, record.epoch), (7, 1));
        assert_eq!(record.residual_rms.len(), 3);
        assert_eq!(record.norm_rms.len(), 5);
        let after_first: Vec<f32> = (0..3)
            .flat_map(|i| snap.hidden_state(i, 1).to_vec())
            .collect();
        let by_hand = (after_first
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            / after_first.len() as f64)
            .sqrt();
        assert!((record.residual_rms[1] - by_hand).abs() < 1e-9 * by_hand);
        // LayerNorm with gamma 1 and beta 0 puts out unit RMS per token.
        for rms in &record.norm_rms {
            assert!((rms - 1.0).abs() < 1e-2, "{rms}");
        }
    }
}
