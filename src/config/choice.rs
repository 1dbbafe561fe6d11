//! Settings with a fixed set of values, as enums: written in TOML as the lowercase
//! strings users type, matched in code as variants, so that no code path can meet a
//! value it does not know. An unknown value is refused before deserialising, naming
//! the key and the allowed values ([`check_choices`]).

use super::error::ConfigError;

/// Defines a setting's enum: each variant with the string it is written as.
macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, as written in TOML.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The value as written in TOML.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, String> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(format!("expected one of {}", Self::NAMES.join(", "))),
                }
            }
        }
    };
}

choice! {
    /// `data.dataset`: which data set trains.
    DatasetKind { Cifar10 = "cifar10", Synthetic = "synthetic" }
}

choice! {
    /// `model.norm`: where a block's norms sit.
    Placement {
        /// x + MHSA(norm1(x)), then x + MLP(norm2(x)): the ViT's.
        Pre = "pre",
        /// norm1(x + MHSA(x)), then norm2(x + MLP(x)): the original Transformer's.
        Post = "post",
        /// x + MHSA(x), then x + MLP(x).
        None = "none",
    }
}

choice! {
    /// `model.norm_kind`: which normalisation a norm layer computes.
    NormKind {
        /// (x - mean) / sqrt(var + eps) * gamma + beta.
        LayerNorm = "layernorm",
        /// x / sqrt(mean(x²) + eps) * gamma: no centring, no bias (Zhang & Sennrich, 2019).
        RmsNorm = "rmsnorm",
    }
}

choice! {
    /// `model.pos_embed`: how tokens know where their patch is.
    PosEmbed {
        /// A learned vector per token.
        Learned = "learned",
        /// Fixed 2-D sines and cosines of the patch's row and column.
        Sincos = "sincos",
        /// None: attention sees a bag of patches.
        None = "none",
    }
}

choice! {
    /// `model.patch_tokens`: what a patch token is made of.
    PatchTokens {
        /// The patch's own pixels (the ViT's).
        Plain = "plain",
        /// The patch and the same patch of four copies of the image shifted by half a
        /// patch diagonally, then a LayerNorm (shifted patch tokenisation, Lee et al. 2021).
        Shifted = "shifted",
    }
}

impl PatchTokens {
    /// Images a token's values come from: the image, and its four shifted copies.
    pub fn copies(self) -> usize {
        match self {
            Self::Plain => 1,
            Self::Shifted => 5,
        }
    }
}

choice! {
    /// `model.attention`: how a block's queries weigh the tokens.
    AttentionKind {
        /// softmax(Q Kᵀ/√d_k): the ViT's.
        Standard = "standard",
        /// Locality self-attention (Lee et al. 2021): each query's own token masked out
        /// and a learned scale of Q Kᵀ per head (starting at 1/√d_k).
        Locality = "lsa",
    }
}

choice! {
    /// `model.pool`: what the head classifies.
    Pool {
        /// A learned CLS token's final state (the original ViT).
        Cls = "cls",
        /// The mean of the patch tokens' final states.
        Mean = "mean",
    }
}

choice! {
    /// `model.init`: how the weights start.
    Init {
        /// Truncated normal weights of `model.init_std` (timm's ViT).
        TruncNormal = "trunc_normal",
        /// PyTorch's defaults: uniform within 1/sqrt(fan_in).
        Pytorch = "pytorch",
    }
}

choice! {
    /// `model.matmul`: the kind of the blocks' matrix products.
    Matmul {
        /// bf16 where the CPU has a bf16 instruction, else f32.
        Auto = "auto",
        F32 = "f32",
        Bf16 = "bf16",
    }
}

choice! {
    /// `ui.color`: the terminal's colours.
    ColorSetting {
        /// From the terminal's environment (COLORTERM, TERM, NO_COLOR).
        Auto = "auto",
        TrueColor = "truecolor",
        Ansi256 = "256",
        None = "none",
    }
}

choice! {
    /// `ui.markers`: how charts draw their points.
    Markers { Braille = "braille", Block = "block", Dot = "dot" }
}

choice! {
    /// `train.optimizer`: what updates the weights.
    Optimizer {
        /// AdamW for every parameter.
        AdamW = "adamw",
        /// Muon (momentum, then the update orthogonalised by Newton-Schulz) for the
        /// blocks' weight matrices; AdamW for the rest.
        Muon = "muon",
    }
}

/// Every enum-like key with its allowed values.
const CHOICES: [(&str, &str, &[&str]); 12] = [
    ("model", "norm", Placement::NAMES),
    ("model", "attention", AttentionKind::NAMES),
    ("model", "patch_tokens", PatchTokens::NAMES),
    ("model", "norm_kind", NormKind::NAMES),
    ("model", "pos_embed", PosEmbed::NAMES),
    ("model", "pool", Pool::NAMES),
    ("model", "init", Init::NAMES),
    ("model", "matmul", Matmul::NAMES),
    ("train", "optimizer", Optimizer::NAMES),
    ("data", "dataset", DatasetKind::NAMES),
    ("ui", "color", ColorSetting::NAMES),
    ("ui", "markers", Markers::NAMES),
];

/// Refuses a value no enum has, naming the key and the allowed values: checked on
/// the merged table before deserialising, so that the error names the key.
pub(super) fn check_choices(table: &toml::Table) -> Result<(), ConfigError> {
    for (section, key, allowed) in CHOICES {
        let value = table
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_str)
            .unwrap_or_default();
        if !allowed.contains(&value) {
            return Err(ConfigError::Invalid {
                key: format!("{section}.{key}"),
                value: format!("{value:?}"),
                reason: format!("expected one of {}", allowed.join(", ")),
            });
        }
    }
    Ok(())
}
