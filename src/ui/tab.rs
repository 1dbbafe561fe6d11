//! The dashboard's tabs, in order: one enum that the state, the key table's scopes and
//! the shell's dispatch all use, below each of them.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Training,
    LayerNorm,
    Attention,
    Features,
    Patches,
    Predictions,
    Layers,
}

impl Tab {
    pub const ALL: [Tab; 7] = [
        Tab::Training,
        Tab::LayerNorm,
        Tab::Attention,
        Tab::Features,
        Tab::Patches,
        Tab::Predictions,
        Tab::Layers,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Self::Training => "Training",
            Self::LayerNorm => "LayerNorm",
            Self::Attention => "Attention",
            Self::Features => "Features",
            Self::Patches => "Patches",
            Self::Predictions => "Predictions",
            Self::Layers => "Layers",
        }
    }

    /// The title where the full ones do not fit (80 columns).
    pub fn short(self) -> &'static str {
        match self {
            Self::Training => "Train",
            Self::LayerNorm => "Norm",
            Self::Attention => "Attn",
            Self::Features => "Feat",
            Self::Patches => "Patch",
            Self::Predictions => "Pred",
            Self::Layers => "Layers",
        }
    }

    /// Tabs that draw probes (they share the probe image and the scrubbing).
    pub fn shows_probes(self) -> bool {
        matches!(
            self,
            Self::LayerNorm | Self::Attention | Self::Features | Self::Patches
        )
    }
}
