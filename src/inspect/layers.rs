//! Quantities by depth over training, from a run's per-layer records
//! ([`LayerHistory`]): one row per depth, one column per record, as the Layers tab,
//! the compare view and `vitscope export` draw them. Gradient rows gather a depth's
//! parameter groups (‖g‖ of a block = √Σ of its groups' ‖g‖², its update ratio
//! ‖Δw‖/‖w‖ over the block's weights together).

use crate::inspect::layer_records::{GradRecord, LayerHistory};

/// Where a parameter group sits in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Depth {
    /// Patch embedding, CLS token, position embedding.
    Embedding,
    Block(usize),
    /// The final norm and the head.
    Head,
}

impl Depth {
    pub fn of(group: &str) -> Self {
        match group.strip_prefix("blocks.") {
            Some(rest) => rest
                .split('.')
                .next()
                .and_then(|i| i.parse().ok())
                .map_or(Self::Embedding, Self::Block),
            None if group == "norm" || group == "head" => Self::Head,
            None => Self::Embedding,
        }
    }

    pub fn label(self) -> String {
        match self {
            Self::Embedding => "embed".into(),
            Self::Block(i) => format!("block {i}"),
            Self::Head => "norm+head".into(),
        }
    }
}

/// The group a variable belongs to: its name without ".weight" / ".bias".
pub fn group_of(var_name: &str) -> &str {
    var_name
        .strip_suffix(".weight")
        .or_else(|| var_name.strip_suffix(".bias"))
        .unwrap_or(var_name)
}

/// The quantities a layer × time map can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    GradNorm,
    UpdateRatio,
    ResidualRms,
    ProbeAccuracy,
    LensAccuracy,
}

impl Quantity {
    pub const ALL: [Quantity; 5] = [
        Self::GradNorm,
        Self::UpdateRatio,
        Self::ResidualRms,
        Self::ProbeAccuracy,
        Self::LensAccuracy,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Self::GradNorm => "gradient norm ‖g‖",
            Self::UpdateRatio => "update ratio ‖Δw‖/‖w‖",
            Self::ResidualRms => "residual stream RMS",
            Self::ProbeAccuracy => "linear probe accuracy",
            Self::LensAccuracy => "logit lens accuracy",
        }
    }

    /// The head of its column in a table.
    pub fn short(self) -> &'static str {
        match self {
            Self::GradNorm => "‖g‖",
            Self::UpdateRatio => "‖Δw‖/‖w‖",
            Self::ResidualRms => "RMS",
            Self::ProbeAccuracy => "probe",
            Self::LensAccuracy => "lens",
        }
    }

    /// A short name for files.
    pub fn key(self) -> &'static str {
        match self {
            Self::GradNorm => "grad-norm",
            Self::UpdateRatio => "update-ratio",
            Self::ResidualRms => "residual-rms",
            Self::ProbeAccuracy => "probe-accuracy",
            Self::LensAccuracy => "lens-accuracy",
        }
    }

    pub fn is_accuracy(self) -> bool {
        matches!(self, Self::ProbeAccuracy | Self::LensAccuracy)
    }

    pub fn next(self) -> Self {
        let i = Self::ALL.iter().position(|q| *q == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    pub fn previous(self) -> Self {
        let i = Self::ALL.iter().position(|q| *q == self).unwrap_or(0);
        Self::ALL[(i + Self::ALL.len() - 1) % Self::ALL.len()]
    }

    /// How a value of this quantity reads.
    pub fn format(self, v: f64) -> String {
        match self {
            _ if !v.is_finite() => format!("{v}"),
            Self::ProbeAccuracy | Self::LensAccuracy => format!("{:.1}%", v * 100.0),
            Self::UpdateRatio => format!("{v:.2e}"),
            _ if v != 0.0 && !(1e-3..1e4).contains(&v.abs()) => format!("{v:.2e}"),
            _ => format!("{v:.3}"),
        }
    }

    /// The map of this quantity over a run's records.
    pub fn map(self, history: &LayerHistory) -> LayerMap {
        let (rows, columns): (Vec<String>, Vec<(u64, Vec<f64>)>) = match self {
            Self::GradNorm | Self::UpdateRatio => {
                let rows = history.grads.last().map(record_depths).unwrap_or_default();
                let columns = history
                    .grads
                    .iter()
                    .map(|r| {
                        let by = by_depth(r);
                        let v = by
                            .iter()
                            .map(|d| match self {
                                Self::GradNorm => d.grad_norm,
                                _ => d.update_ratio,
                            })
                            .collect();
                        (r.step, v)
                    })
                    .collect();
                (rows.iter().map(|d| d.label()).collect(), columns)
            }
            Self::ResidualRms => {
                let layers = history.scale.last().map_or(0, |r| r.residual_rms.len());
                let columns = history
                    .scale
                    .iter()
                    .map(|r| (r.step, r.residual_rms.clone()))
                    .collect();
                (layer_rows(layers), columns)
            }
            Self::ProbeAccuracy | Self::LensAccuracy => {
                let layers = history
                    .knowledge
                    .last()
                    .map_or(0, |r| r.probe_accuracy.len());
                let columns = history
                    .knowledge
                    .iter()
                    .map(|r| {
                        let v = match self {
                            Self::ProbeAccuracy => r.probe_accuracy.clone(),
                            _ => r.lens_accuracy.clone(),
                        };
                        (r.step, v)
                    })
                    .collect();
                (layer_rows(layers), columns)
            }
        };
        let (steps, values) = columns.into_iter().unzip();
        let mut map = LayerMap {
            quantity: self,
            rows,
            steps,
            values,
            log: false,
        };
        let (lo, hi) = map.range();
        // Norms and ratios span decades; accuracies are read as they are.
        map.log = !self.is_accuracy() && lo > 0.0 && hi / lo > 10.0;
        map
    }
}

/// The residual stream's layer `l`: the embeddings (0), then after each block.
pub fn layer_label(l: usize) -> String {
    match l {
        0 => "embed".to_string(),
        l => format!("block {}", l - 1),
    }
}

fn layer_rows(layers: usize) -> Vec<String> {
    (0..layers).map(layer_label).collect()
}

/// Every map's depth rows in one list, top to bottom ("norm+head", which only the
/// gradient maps have, last): the rows of a table of several quantities.
pub fn depth_rows<'a>(maps: impl IntoIterator<Item = &'a LayerMap>) -> Vec<String> {
    let mut rows: Vec<String> = Vec::new();
    for map in maps {
        for r in &map.rows {
            if !rows.contains(r) {
                rows.push(r.clone());
            }
        }
    }
    rows.sort_by_key(|r| match r.as_str() {
        "embed" => (0, 0),
        "norm+head" => (2, 0),
        r => (1, r.trim_start_matches("block ").parse().unwrap_or(0)),
    });
    rows
}

/// A map: `values[column][row]`, columns in step order.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerMap {
    pub quantity: Quantity,
    pub rows: Vec<String>,
    pub steps: Vec<u64>,
    pub values: Vec<Vec<f64>>,
    /// Shades on a log scale (the values span more than a decade).
    pub log: bool,
}

impl LayerMap {
    /// The smallest and largest finite values: the shades span them (accuracies too,
    /// so that 40% against 55% reads; the title says the range).
    pub fn range(&self) -> (f64, f64) {
        let finite = self.values.iter().flatten().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
        if lo > hi {
            (0.0, 1.0)
        } else {
            (lo, hi)
        }
    }

    /// A value's shade in [0, 1] on this map's scale (NaN for a missing value).
    pub fn level(&self, v: f64) -> f64 {
        if !v.is_finite() {
            return f64::NAN;
        }
        let (lo, hi) = self.range();
        let (v, lo, hi) = match self.log && v > 0.0 {
            true => (v.log10(), lo.log10(), hi.log10()),
            false => (v, lo, hi),
        };
        match hi > lo {
            true => ((v - lo) / (hi - lo)).clamp(0.0, 1.0),
            false => 0.5,
        }
    }

    /// The column at or last before `step`.
    pub fn column_at(&self, step: u64) -> Option<usize> {
        self.steps.iter().rposition(|&s| s <= step)
    }

    /// Row `row`'s value at or last before `step` (the latest without one).
    pub fn value_at(&self, step: Option<u64>, row: &str) -> Option<f64> {
        let column = match step {
            Some(step) => self.column_at(step),
            None => self.values.len().checked_sub(1),
        }?;
        let r = self.rows.iter().position(|x| x == row)?;
        self.values[column].get(r).copied()
    }
}

/// One depth's gradient figures at one record.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthGrads {
    pub depth: Depth,
    pub grad_norm: f64,
    pub weight_norm: f64,
    pub update_ratio: f64,
}

fn record_depths(record: &GradRecord) -> Vec<Depth> {
    let mut rows: Vec<Depth> = record.groups.iter().map(|g| Depth::of(g)).collect();
    rows.sort();
    rows.dedup();
    rows
}

/// A record's groups gathered by depth.
pub fn by_depth(record: &GradRecord) -> Vec<DepthGrads> {
    record_depths(record)
        .into_iter()
        .map(|depth| {
            let (mut g2, mut w2, mut d2) = (0.0, 0.0, 0.0);
            for (i, group) in record.groups.iter().enumerate() {
                if Depth::of(group) == depth {
                    g2 += record.grad_norm[i].powi(2);
                    let w = record.weight_norm[i];
                    w2 += w * w;
                    d2 += (record.update_ratio[i] * w).powi(2);
                }
            }
            DepthGrads {
                depth,
                grad_norm: g2.sqrt(),
                weight_norm: w2.sqrt(),
                update_ratio: if w2 > 0.0 { (d2 / w2).sqrt() } else { 0.0 },
            }
        })
        .collect()
}

/// The parts of a block, as the table's columns name them.
pub const BLOCK_PARTS: [(&str, &str); 6] = [
    ("norm1", "norm1"),
    ("attn.qkv", "qkv"),
    ("attn.proj", "proj"),
    ("norm2", "norm2"),
    ("mlp.fc1", "fc1"),
    ("mlp.fc2", "fc2"),
];

/// One group's figure in a record, if it has that group.
pub fn group_value(record: &GradRecord, group: &str, quantity: Quantity) -> Option<f64> {
    let i = record.groups.iter().position(|g| g == group)?;
    match quantity {
        Quantity::UpdateRatio => Some(record.update_ratio[i]),
        _ => Some(record.grad_norm[i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::layer_records::{KnowledgeRecord, ScaleRecord};

    fn grads(step: u64, scale: f64) -> GradRecord {
        GradRecord {
            step,
            epoch: 1,
            groups: [
                "patch_embed",
                "blocks.0.attn.qkv",
                "blocks.0.mlp.fc1",
                "norm",
                "head",
            ]
            .map(String::from)
            .to_vec(),
            grad_norm: vec![3.0 * scale, 3.0 * scale, 4.0 * scale, 1.0, 0.0],
            weight_norm: vec![1.0, 3.0, 4.0, 1.0, 2.0],
            update_ratio: vec![0.1, 0.01, 0.02, 0.0, 0.5],
        }
    }

    #[test]
    fn gradient_rows_gather_a_depth_by_hand() {
        let by = by_depth(&grads(10, 1.0));
        assert_eq!(
            by.iter().map(|d| d.depth).collect::<Vec<_>>(),
            [Depth::Embedding, Depth::Block(0), Depth::Head]
        );
        // Block 0: ‖g‖ = √(3² + 4²), ‖w‖ = 5, ‖Δw‖ = √(0.03² + 0.08²).
        assert!((by[1].grad_norm - 5.0).abs() < 1e-12);
        assert!((by[1].weight_norm - 5.0).abs() < 1e-12);
        let delta = (0.03f64.powi(2) + 0.08f64.powi(2)).sqrt();
        assert!((by[1].update_ratio - delta / 5.0).abs() < 1e-12);
        assert!((by[2].update_ratio - 1.0 / 5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn maps_have_a_row_per_depth_a_column_per_record_and_log_shades_over_decades() {
        let history = LayerHistory {
            grads: vec![grads(10, 1.0), grads(20, 100.0)],
            scale: vec![ScaleRecord {
                step: 0,
                epoch: 1,
                residual_rms: vec![1.0, 2.0, 4.0],
                norm_rms: vec![1.0; 5],
            }],
            knowledge: vec![KnowledgeRecord {
                step: 20,
                epoch: 1,
                train_images: 10,
                test_images: 10,
                lambda: 0.01,
                probe_accuracy: vec![0.2, 0.3, 0.5],
                lens_accuracy: vec![0.1, 0.1, 0.5],
                cka: vec![vec![1.0; 3]; 3],
                secs: 0.1,
            }],
        };
        let g = Quantity::GradNorm.map(&history);
        assert_eq!(g.rows, ["embed", "block 0", "norm+head"]);
        assert_eq!(g.steps, [10, 20]);
        assert!((g.values[1][1] - 500.0).abs() < 1e-9);
        assert!(g.log, "1 to 500 spans decades");
        assert_eq!(g.level(1.0), 0.0);
        assert_eq!(g.level(500.0), 1.0);
        assert!((g.level(500f64.sqrt()) - 0.5).abs() < 1e-12, "log midpoint");
        assert_eq!(g.column_at(15), Some(0));
        assert_eq!(g.column_at(5), None);
        let r = Quantity::ResidualRms.map(&history);
        assert_eq!(r.rows, ["embed", "block 0", "block 1"]);
        assert_eq!(
            depth_rows([&g, &r]),
            ["embed", "block 0", "block 1", "norm+head"]
        );
        assert_eq!(g.value_at(Some(15), "block 0"), Some(5.0));
        assert_eq!(g.value_at(None, "block 0"), Some(500.0));
        assert_eq!(g.value_at(Some(5), "block 0"), None);
        assert_eq!(r.value_at(None, "norm+head"), None);
        assert!(!r.log, "1 to 4 is linear");
        let p = Quantity::ProbeAccuracy.map(&history);
        assert_eq!(p.range(), (0.2, 0.5));
        assert!(!p.log, "accuracies are linear");
        assert!((p.level(0.35) - 0.5).abs() < 1e-12);
        assert_eq!(Quantity::LensAccuracy.map(&history).values[0][0], 0.1);
        assert_eq!(Quantity::ProbeAccuracy.format(0.4567), "45.7%");
        assert_eq!(
            group_value(&history.grads[0], "blocks.0.mlp.fc1", Quantity::GradNorm),
            Some(4.0)
        );
        assert!(Quantity::ALL.iter().all(|q| q.next().previous() == *q));
    }
}
