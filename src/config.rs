//! Configuration: the commented defaults in `config/default.toml`, compiled in,
//! overlaid by a user file and then by `--set key=value` arguments.
//!
//! Every overlay is checked against the defaults' own keys and types, so an error
//! names the source, the key and the bad value on one line.

use std::path::Path;

use serde::{Deserialize, Serialize};

mod choice;
mod error;
mod overlay;
mod train_settings;

use choice::check_choices;
pub use choice::{
    AttentionKind, ColorSetting, DatasetKind, Init, Markers, Matmul, NormKind, Optimizer,
    PatchTokens, Placement, Pool, PosEmbed,
};
pub use error::ConfigError;
use error::{check, non_negative, positive};
use overlay::{insert_dotted, overlay, parse_set, parse_table};
use train_settings::check_replans;
pub use train_settings::{Replan, TrainConfig};

/// The defaults, exactly as shipped in `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// What runs written before these keys existed did: applied to a run's config.toml
/// where the key is missing ([`Config::load_run`]).
pub const RUN_LEGACY_TOML: &str = r#"
[model]
init = "trunc_normal"
pool = "cls"
matmul = "f32"
patch_tokens = "plain"
attention = "standard"
[train]
budget = ""
schedule_steps = 0
ema_decay = 0.0
drop_path = 0.0
[data]
trivial_augment = false
random_erasing = 0.0
"#;

/// Side of the (square, RGB) input images: CIFAR-10's size.
pub const IMAGE_SIZE: usize = 32;
/// Colour channels of the input images.
pub const CHANNELS: usize = 3;
/// More histogram bins than this is finer than any terminal or picture shows, and
/// every probe of a run keeps its histograms in the dashboard.
pub const MAX_HISTOGRAM_BINS: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub probe: ProbeConfig,
    pub ui: UiConfig,
    pub run: RunConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub patch_size: usize,
    pub patch_tokens: PatchTokens,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_dim: usize,
    pub attention: AttentionKind,
    pub layer_norm_eps: f64,
    pub norm: Placement,
    pub norm_kind: NormKind,
    pub pos_embed: PosEmbed,
    pub pool: Pool,
    pub init: Init,
    pub init_std: f64,
    pub matmul: Matmul,
}

impl ModelConfig {
    /// The `[model]` keys' ranges.
    fn validate(&self) -> Result<(), ConfigError> {
        let m = self;
        check(
            m.patch_size > 0 && IMAGE_SIZE.is_multiple_of(m.patch_size),
            "model.patch_size",
            m.patch_size,
            "must divide the image size 32 (1, 2, 4, 8, 16 or 32)",
        )?;
        check(
            m.patch_tokens == PatchTokens::Plain || m.patch_size >= 2,
            "model.patch_tokens",
            "\"shifted\"",
            "needs model.patch_size of at least 2 (the copies shift by half a patch); it is 1",
        )?;
        check(m.dim > 0, "model.dim", m.dim, "must be at least 1")?;
        check(m.depth > 0, "model.depth", m.depth, "must be at least 1")?;
        check(m.heads > 0, "model.heads", m.heads, "must be at least 1")?;
        check(
            m.dim.is_multiple_of(m.heads),
            "model.heads",
            m.heads,
            &format!("model.dim = {} is not divisible by it", m.dim),
        )?;
        check(
            m.mlp_dim > 0,
            "model.mlp_dim",
            m.mlp_dim,
            "must be at least 1",
        )?;
        positive("model.layer_norm_eps", m.layer_norm_eps)?;
        non_negative("model.init_std", m.init_std)?;
        check(
            m.pos_embed != PosEmbed::Sincos || m.dim.is_multiple_of(4),
            "model.pos_embed",
            "\"sincos\"",
            &format!(
                "needs model.dim divisible by 4 (a sine and a cosine per row and column); it is {}",
                m.dim
            ),
        )?;
        Ok(())
    }

    /// Whether the blocks' products multiply bf16 factors: `matmul = "bf16"`, or
    /// `"auto"` on a CPU with a bf16 instruction (AMX or AVX-512 BF16, capped by
    /// `VITSCOPE_CPU`); elsewhere `"auto"` is f32, as fast as it gets without one.
    pub fn bf16(&self) -> bool {
        match self.matmul {
            Matmul::Bf16 => true,
            Matmul::Auto => crate::ops::Bf16Kernel::current().is_native(),
            Matmul::F32 => false,
        }
    }

    /// The default block: pre-norm LayerNorm, which the fused block op computes.
    pub fn is_fused(&self) -> bool {
        self.norm == Placement::Pre && self.norm_kind == NormKind::LayerNorm
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        IMAGE_SIZE / self.patch_size
    }
    /// Patches per image.
    pub fn patches(&self) -> usize {
        self.grid() * self.grid()
    }
    /// Whether the sequence starts with a CLS token that the head reads (`pool = "cls"`);
    /// with `pool = "mean"` there is none and the head reads the mean of the patch tokens.
    pub fn has_cls(&self) -> bool {
        self.pool == Pool::Cls
    }
    /// Tokens in the sequence: the CLS token (if any) followed by the patches.
    pub fn tokens(&self) -> usize {
        self.patches() + usize::from(self.has_cls())
    }
    /// Values in one flattened patch (patch x patch x channels).
    pub fn patch_values(&self) -> usize {
        self.patch_size * self.patch_size * CHANNELS
    }
    /// Values a patch token is made from: the patch's, five times over with shifted
    /// patch tokens (the image and its four shifted copies).
    pub fn token_values(&self) -> usize {
        self.patch_values() * self.patch_tokens.copies()
    }
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
    /// Places of norms the probes record: two per block (the residual stream there
    /// when a variant has none) and the final one.
    pub fn layer_norms(&self) -> usize {
        2 * self.depth + 1
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub dataset: DatasetKind,
    pub dir: String,
    pub download: bool,
    pub download_url: String,
    pub download_size: u64,
    pub download_md5: String,
    pub augment: bool,
    pub crop_padding: usize,
    pub trivial_augment: bool,
    pub random_erasing: f64,
    pub synthetic_train_size: usize,
    pub synthetic_test_size: usize,
}

impl DataConfig {
    /// The `[data]` keys' ranges.
    fn validate(&self) -> Result<(), ConfigError> {
        let d = self;
        check(
            (0.0..=1.0).contains(&d.random_erasing),
            "data.random_erasing",
            d.random_erasing,
            "must be a probability in [0, 1]",
        )?;
        check(
            d.crop_padding <= IMAGE_SIZE / 2,
            "data.crop_padding",
            d.crop_padding,
            "must be at most 16",
        )?;
        check(
            d.synthetic_train_size > 0,
            "data.synthetic_train_size",
            d.synthetic_train_size,
            "must be at least 1",
        )?;
        check(
            d.synthetic_test_size > 0,
            "data.synthetic_test_size",
            d.synthetic_test_size,
            "must be at least 1",
        )?;
        check(
            d.download_md5.len() == 32 && d.download_md5.chars().all(|c| c.is_ascii_hexdigit()),
            "data.download_md5",
            format!("{:?}", d.download_md5),
            "must be 32 hexadecimal digits",
        )?;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    pub every_steps: usize,
    pub images: usize,
    pub predictions: usize,
    pub histogram_bins: usize,
    pub histogram_range: f64,
    pub grad_every_steps: usize,
    pub layers_every_evals: usize,
    pub layers_train_images: usize,
    pub layers_test_images: usize,
    pub ridge_lambda: f64,
}

impl ProbeConfig {
    /// The `[probe]` keys' ranges.
    fn validate(&self) -> Result<(), ConfigError> {
        let p = self;
        check(p.images > 0, "probe.images", p.images, "must be at least 1")?;
        check(
            (2..=MAX_HISTOGRAM_BINS).contains(&p.histogram_bins),
            "probe.histogram_bins",
            p.histogram_bins,
            &format!("must be between 2 and {MAX_HISTOGRAM_BINS}"),
        )?;
        positive("probe.histogram_range", p.histogram_range)?;
        positive("probe.ridge_lambda", p.ridge_lambda)?;
        if p.layers_every_evals > 0 {
            check(
                p.layers_train_images >= 2,
                "probe.layers_train_images",
                p.layers_train_images,
                "must be at least 2 while probe.layers_every_evals is on",
            )?;
            check(
                p.layers_test_images >= 2,
                "probe.layers_test_images",
                p.layers_test_images,
                "must be at least 2 while probe.layers_every_evals is on",
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UiConfig {
    pub color: ColorSetting,
    pub markers: Markers,
    pub max_fps: f64,
    pub data_refresh_secs: f64,
    pub smoothing: f64,
    pub recent_steps: usize,
}

impl UiConfig {
    /// The `[ui]` keys' ranges.
    fn validate(&self) -> Result<(), ConfigError> {
        let u = self;
        check(
            u.max_fps.is_finite() && u.max_fps > 0.0 && u.max_fps <= 60.0,
            "ui.max_fps",
            u.max_fps,
            "must be in (0, 60]",
        )?;
        non_negative("ui.data_refresh_secs", u.data_refresh_secs)?;
        check(
            (0.0..1.0).contains(&u.smoothing),
            "ui.smoothing",
            u.smoothing,
            "must be in [0, 1)",
        )?;
        check(
            u.recent_steps >= 2,
            "ui.recent_steps",
            u.recent_steps,
            "must be at least 2",
        )?;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub dir: String,
    pub print_every_secs: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self::from_sources(None, &[]).expect("config/default.toml is valid")
    }
}

impl Config {
    /// Defaults, overlaid by `file` (if any), overlaid by `sets` (`key=value`).
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self, ConfigError> {
        let file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                Some((path.display().to_string(), text))
            }
            None => None,
        };
        Self::from_sources(file.as_ref().map(|(n, t)| (n.as_str(), t.as_str())), sets)
    }

    /// A run directory's `config.toml`, overlaid by `sets`. Keys the file lacks because
    /// it was written before they existed take the value that reproduces that run
    /// ([`RUN_LEGACY_TOML`]), not today's default, so an old run resumes as it trained.
    pub fn load_run(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        let mut file = parse_table(&name, &text)?;
        let legacy = parse_table("RUN_LEGACY_TOML", RUN_LEGACY_TOML)?;
        for (section, keys) in &legacy {
            let (Some(keys), Some(toml::Value::Table(have))) =
                (keys.as_table(), file.get_mut(section.as_str()))
            else {
                continue;
            };
            for (key, value) in keys {
                have.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        let merged = toml::to_string(&file).map_err(|e| ConfigError::Read {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        Self::from_sources(Some((&name, &merged)), sets)
    }

    /// The first `model.*` key whose value differs between `self` (a run's config) and
    /// `other` (the config it would resume with), as (key, self's value, other's): the
    /// keys that define the model cannot change under a checkpoint. `model.matmul` may
    /// (the products' kind changes the sums' order, not the model).
    pub fn model_change(&self, other: &Config) -> Option<(String, String, String)> {
        let table = |m: &ModelConfig| match toml::Value::try_from(m) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        let (was, now) = (table(&self.model), table(&other.model));
        was.iter()
            .filter(|(key, _)| key.as_str() != "matmul")
            .find(|(key, value)| now.get(key.as_str()) != Some(value))
            .map(|(key, value)| {
                let other = now
                    .get(key.as_str())
                    .map_or("nothing".into(), |v| v.to_string());
                (format!("model.{key}"), value.to_string(), other)
            })
    }

    /// Like [`Config::load`] with the file's text given directly as (name, text).
    pub fn from_sources(file: Option<(&str, &str)>, sets: &[String]) -> Result<Self, ConfigError> {
        let mut table = parse_table("config/default.toml", DEFAULT_TOML)?;
        if let Some((name, text)) = file {
            let user = parse_table(name, text)?;
            overlay(&mut table, &user, name, "")?;
        }
        for arg in sets {
            let (key, value) = parse_set(arg)?;
            let mut user = toml::Table::new();
            insert_dotted(&mut user, &key, value);
            overlay(&mut table, &user, &format!("--set {arg}"), "")?;
        }
        check_choices(&table)?;
        check_replans(&table)?;
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    key: "config".into(),
                    value: String::new(),
                    reason: e.message().to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved configuration as TOML, as written into a run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }

    /// Checks what the types alone cannot: ranges and relations between keys, each
    /// section beside its schema.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.train.validate()?;
        self.data.validate()?;
        self.probe.validate()?;
        self.ui.validate()?;
        positive("run.print_every_secs", self.run.print_every_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn defaults_parse_and_match_the_documented_model() {
        let c = Config::default();
        assert_eq!(c.model.patch_size, 4);
        assert_eq!(c.model.dim, 96);
        assert_eq!(c.model.depth, 6);
        assert_eq!(c.model.heads, 3);
        assert_eq!(c.model.mlp_dim, 192);
        // Mean pooling: no CLS token, the 64 patches are the sequence.
        assert_eq!((c.model.pool.name(), c.model.tokens()), ("mean", 64));
        assert_eq!(c.model.pos_embed.name(), "sincos");
        assert_eq!(c.model.head_dim(), 32);
        assert_eq!(c.train.batch_size, 64);
        assert!((c.train.lr - 1e-3).abs() < 1e-12);
        assert!((c.train.label_smoothing - 0.1).abs() < 1e-12);
        assert!((c.train.weight_decay - 0.05).abs() < 1e-12);
    }

    #[test]
    fn the_quick_demo_and_budgets_parse() {
        let quick = Config::load(Some(Path::new("config/quick.toml")), &[]).unwrap();
        assert_eq!(quick.train.budget_secs(), Ok(Some(600.0)));
        assert_eq!(quick.train.optimizer, Optimizer::Muon);
        assert_eq!(Config::default().train.budget_secs(), Ok(Some(3600.0)));
        let c = Config::from_sources(None, &sets(&["train.budget=\"1h30m\""])).unwrap();
        assert_eq!(c.train.budget_secs(), Ok(Some(5400.0)));
        let c = Config::from_sources(None, &sets(&["train.budget=\"\""])).unwrap();
        assert_eq!(c.train.budget_secs(), Ok(None));
        for bad in ["soon", "0s", "-5m", "9999999h"] {
            let err = Config::from_sources(None, &sets(&[&format!("train.budget=\"{bad}\"")]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("`train.budget` = "), "{bad}: {err}");
        }
        let err = Config::from_sources(None, &sets(&["model.init=xavier"])).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected one of trunc_normal, pytorch"),
            "{err}"
        );
        let err = Config::from_sources(None, &sets(&["data.random_erasing=1.5"])).unwrap_err();
        assert!(err.to_string().contains("data.random_erasing"), "{err}");
    }

    #[test]
    fn a_run_written_before_new_keys_keeps_their_old_behaviour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        // Today's defaults without the keys added since (as an older run wrote them).
        let mut old: toml::Table = Config::default().to_toml().parse().unwrap();
        for (section, key) in [
            ("model", "init"),
            ("train", "budget"),
            ("train", "schedule_steps"),
            ("train", "ema_decay"),
            ("train", "drop_path"),
            ("model", "pool"),
            ("model", "matmul"),
            ("model", "patch_tokens"),
            ("model", "attention"),
            ("data", "trivial_augment"),
            ("data", "random_erasing"),
        ] {
            old[section].as_table_mut().unwrap().remove(key);
        }
        std::fs::write(&path, toml::to_string(&old).unwrap()).unwrap();
        let c = Config::load_run(&path, &[]).unwrap();
        assert_eq!(c.model.init.name(), "trunc_normal");
        assert_eq!(c.train.budget_secs(), Ok(None));
        assert!(!c.data.trivial_augment);
        assert_eq!((c.train.drop_path, c.model.pool.name()), (0.0, "cls"));
        assert_eq!(c.model.matmul.name(), "f32");
        assert_eq!(c.model.patch_tokens.name(), "plain");
        assert_eq!(c.model.attention.name(), "standard");
        // A key the run has is kept, and --set still wins.
        let c = Config::load_run(&path, &sets(&["model.init=pytorch"])).unwrap();
        assert_eq!(c.model.init.name(), "pytorch");
    }

    #[test]
    fn every_default_key_is_documented_by_a_comment() {
        // Each key sits in a group of keys headed by at least one comment line.
        let mut commented = false;
        for line in DEFAULT_TOML.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('[') {
                commented = false;
            } else if line.starts_with('#') {
                commented = true;
            } else {
                assert!(commented, "key without a comment above it: {line}");
            }
        }
    }

    #[test]
    fn precedence_is_set_over_file_over_defaults() {
        let file = "[model]\ndepth = 2\ndim = 48\n";
        let c = Config::from_sources(Some(("my.toml", file)), &sets(&["model.depth=4"])).unwrap();
        assert_eq!(c.model.depth, 4);
        assert_eq!(c.model.dim, 48);
        assert_eq!(c.model.heads, 3);
    }

    #[test]
    fn set_accepts_bare_strings_and_integers_for_floats() {
        let c = Config::from_sources(
            None,
            &sets(&["data.dataset=synthetic", "train.lr=1", "data.augment=false"]),
        )
        .unwrap();
        assert_eq!(c.data.dataset, DatasetKind::Synthetic);
        assert!((c.train.lr - 1.0).abs() < 1e-12);
        assert!(!c.data.augment);
    }

    #[test]
    fn unknown_keys_are_named_with_their_source() {
        let err = Config::from_sources(Some(("my.toml", "[model]\ndept = 4\n")), &[]).unwrap_err();
        assert_eq!(err.to_string(), "my.toml: unknown key `model.dept`");
        let err = Config::from_sources(None, &sets(&["modle.depth=4"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--set modle.depth=4: unknown key `modle.depth`"
        );
    }

    #[test]
    fn wrong_types_name_key_expected_type_and_value() {
        let err = Config::from_sources(Some(("my.toml", "[model]\ndepth = \"four\"\n")), &[])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "my.toml: `model.depth` expects an integer, got \"four\""
        );
        let err = Config::from_sources(None, &sets(&["train.batch_size=-3"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--set train.batch_size=-3: `train.batch_size` expects a non-negative integer, got -3"
        );
        let err = Config::from_sources(None, &sets(&["model=3"])).unwrap_err();
        assert!(err.to_string().contains("`model` expects a table"), "{err}");
    }

    #[test]
    fn impossible_values_are_rejected_with_the_key() {
        let cases = [
            (
                "model.heads=5",
                "`model.heads` = 5: model.dim = 96 is not divisible by it",
            ),
            (
                "model.patch_size=5",
                "`model.patch_size` = 5: must divide the image size 32 (1, 2, 4, 8, 16 or 32)",
            ),
            (
                "train.batch_size=0",
                "`train.batch_size` = 0: must be at least 1",
            ),
            (
                "train.lr=-0.001",
                "`train.lr` = -0.001: must be a finite number > 0",
            ),
            (
                "train.label_smoothing=1.5",
                "`train.label_smoothing` = 1.5: must be in [0, 1)",
            ),
            (
                "data.dataset=mnist",
                "`data.dataset` = \"mnist\": expected one of cifar10, synthetic",
            ),
        ];
        let shifted_single_pixels = sets(&["model.patch_size=1", "model.patch_tokens=shifted"]);
        let err = Config::from_sources(None, &shifted_single_pixels).unwrap_err();
        assert!(
            err.to_string().contains(
                "`model.patch_tokens` = \"shifted\": needs model.patch_size of at least 2"
            ),
            "{err}"
        );
        for (arg, expected) in cases {
            let err = Config::from_sources(None, &sets(&[arg])).unwrap_err();
            assert!(err.to_string().contains(expected), "{arg}: {err}");
            assert!(
                !err.to_string().contains('\n'),
                "{arg}: multi-line error {err}"
            );
        }
    }

    #[test]
    fn syntax_errors_give_file_and_line() {
        let err =
            Config::from_sources(Some(("bad.toml", "[model]\ndepth = = 3\n")), &[]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("bad.toml: invalid TOML at line 2:"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        let err = Config::from_sources(None, &sets(&["depth"])).unwrap_err();
        assert!(matches!(err, ConfigError::BadSet { .. }));
    }

    #[test]
    fn resolved_config_round_trips_through_toml() {
        let c = Config::from_sources(None, &sets(&["model.depth=2", "train.lr=0.01"])).unwrap();
        let again = Config::from_sources(Some(("config.toml", &c.to_toml())), &[]).unwrap();
        assert_eq!(c, again);
    }
}
