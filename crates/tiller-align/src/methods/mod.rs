//! One file per method, each reading like its paper, and the one registry of them.
//!
//! A method is its file (its config section with the paper's defaults, its [`MethodSpec`] and its
//! [`Algorithm`]) plus one line in [`registry!`] below. Everything that lists, parses, validates,
//! builds or budgets methods (the `[method.<name>]` section of a preset, `tiller align --help`,
//! `tiller compare`, every "valid: ..." message) reads the registry; the loop itself knows only
//! [`Algorithm`] and the data it asks for.

pub mod alignprop;
pub mod d3po;
pub mod ddpo;
pub mod denoising;
pub mod dense_dpo;
pub mod diffusion_dpo;
pub mod diffusion_kto;
pub mod dpok;
pub mod draft_k;
pub mod draft_lv;
pub mod focus_n_fix;
pub mod lasro;
pub mod mlp;
pub mod prdp;
pub mod pso;
pub mod raft;
pub mod refl;
pub mod reward_weighted;
pub mod rwr;
pub mod safety_dpo;
pub mod seiko;
pub mod spo;
pub mod tdpo;

pub use alignprop::AlignProp;
pub use d3po::D3po;
pub use ddpo::Ddpo;
pub use dense_dpo::DenseDpo;
pub use diffusion_dpo::DiffusionDpo;
pub use diffusion_kto::DiffusionKto;
pub use dpok::Dpok;
pub use draft_k::DraftK;
pub use draft_lv::DraftLv;
pub use focus_n_fix::FocusNFix;
pub use prdp::Prdp;
pub use raft::Raft;
pub use refl::Refl;
pub use reward_weighted::RewardWeighted;
pub use rwr::Rwr;
pub use safety_dpo::SafetyDpo;
pub use seiko::Seiko;
pub use spo::Spo;
pub use tdpo::Tdpo;

use crate::config::AlignConfig;
use crate::{Algorithm, PolicyModel};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use tiller_core::Result;

/// Which feedback a method reads from a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreData {
    /// Non-tie comparisons as (prompt, chosen, rejected) pairs.
    Comparisons,
    /// Likes and dislikes of single images.
    Labels,
}

/// Preference data a method trains on, read from a store before training.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreRead {
    pub data: StoreData,
    /// The store folder (`tiller feedback collect --store`).
    pub store: String,
    /// `train` or `test`.
    pub split: String,
    /// At most this many comparisons or labels (the first in the store; 0: all).
    pub limit: usize,
    /// The config key that names the store, for errors.
    pub field: &'static str,
    /// Only comparisons of this category (annotator ids ending in `/<category>`; SafetyDPO's
    /// experts). `None`: all.
    pub category: Option<String>,
}

/// What the registry knows about a method, implemented by its config section.
pub trait MethodSpec {
    /// The name in presets (`[method.<name>]`) and on the command line.
    fn name(&self) -> &'static str;
    /// The paper, for help text and the methods table.
    fn paper(&self) -> &'static str;
    /// Checks of this method's own settings and of the run settings it depends on; errors name
    /// the field.
    fn validate(&self, config: &AlignConfig) -> Result<()>;
    /// The algorithm, ready for the loop, for a policy of model `M`.
    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>>
    where
        Self: Sized;
    /// Whether `train.kl_weight` (a per-step KL to the reference) applies.
    fn takes_kl(&self) -> bool {
        true
    }
    /// Whether it samples from the policy (so `train.images_per_prompt` applies).
    fn samples(&self) -> bool {
        true
    }
    /// Checks against the run's sampler what the config alone cannot show (DRaFT-K: that the
    /// differentiated steps depend on the model at all).
    fn check_sampler(
        &self,
        _sampler: &dyn tiller_diffusion::schedulers::Scheduler,
        _device: &burn::tensor::Device,
    ) -> Result<()> {
        Ok(())
    }
    /// A reward-model folder the method trains beside the policy, as (its config field, the
    /// folder): the run loads it with the base's tokenizer and hands it to
    /// [`Algorithm::adopt_reward_model`] (LaSRO's surrogate).
    fn reward_model(&self) -> Option<(&'static str, String)> {
        None
    }
    /// Preference data it reads from a store before training, if any.
    fn store(&self) -> Option<StoreRead> {
        None
    }
    /// Baselines `tiller compare` runs beside a run of `config` (this method's preset as read)
    /// at `budget` reward queries, as (suffix, `--set` overrides): rows `<name>-<suffix>`
    /// (SEIKO's greedy and non-adaptive).
    fn variants(&self, _config: &AlignConfig, _budget: u64) -> Vec<(&'static str, Vec<String>)> {
        Vec::new()
    }
    /// `--set` overrides that hold a run of `config` to `budget` reward queries, and the optimizer updates
    /// the run then takes (what `tiller compare` sizes every method with).
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let train = &config.train;
        let batch = train.effective_batch().max(1) as u64;
        (
            vec![format!("train.reward_budget={budget}")],
            budget.div_ceil(batch),
        )
    }
}

/// Declares the methods: `Variant(ConfigType) = "name"`. Generates [`Method`] (one variant per
/// method, `[method.<name>]` in TOML; `method = "<name>"` is short for its defaults), its list of
/// names and its dispatch to [`MethodSpec`].
macro_rules! registry {
    ($($variant:ident($config:ty) = $name:literal),* $(,)?) => {
        /// The alignment method of a run and its settings.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        pub enum Method {
            $(#[serde(rename = $name)] $variant($config),)*
        }

        impl Method {
            /// Every method's name, in the registry's order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// A method with its paper's defaults.
            pub fn defaults(name: &str) -> Option<Method> {
                match name {
                    $($name => Some(Method::$variant(<$config>::default())),)*
                    _ => None,
                }
            }

            /// Every method with its defaults.
            pub fn all() -> Vec<Method> {
                vec![$(Method::$variant(<$config>::default())),*]
            }

            pub fn spec(&self) -> &dyn MethodSpec {
                match self {
                    $(Method::$variant(c) => c,)*
                }
            }

            fn build_for<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
                match self {
                    $(Method::$variant(c) => c.build::<M>(),)*
                }
            }

            fn from_table<'de, A: MapAccess<'de>>(name: &str, map: &mut A) -> std::result::Result<Method, A::Error> {
                match name {
                    $($name => Ok(Method::$variant(map.next_value::<$config>()?)),)*
                    other => Err(de::Error::custom(unknown(other))),
                }
            }
        }
    };
}

registry! {
    Ddpo(ddpo::DdpoConfig) = "ddpo",
    DiffusionDpo(diffusion_dpo::DpoConfig) = "diffusion-dpo",
    DraftK(draft_k::DraftConfig) = "draft-k",
    Dpok(dpok::DpokConfig) = "dpok",
    DiffusionKto(diffusion_kto::KtoConfig) = "diffusion-kto",
    RewardWeighted(reward_weighted::RewardWeightedConfig) = "reward-weighted",
    Rwr(rwr::RwrConfig) = "rwr",
    Raft(raft::RaftConfig) = "raft",
    Prdp(prdp::PrdpConfig) = "prdp",
    Refl(refl::ReflConfig) = "refl",
    DraftLv(draft_lv::DraftLvConfig) = "draft-lv",
    AlignProp(alignprop::AlignPropConfig) = "alignprop",
    Tdpo(tdpo::TdpoConfig) = "tdpo-r",
    Seiko(seiko::SeikoConfig) = "seiko",
    D3po(d3po::D3poConfig) = "d3po",
    DenseDpo(dense_dpo::DenseDpoConfig) = "dense-dpo",
    FocusNFix(focus_n_fix::FocusNFixConfig) = "focus-n-fix",
    SafetyDpo(safety_dpo::SafetyDpoConfig) = "safety-dpo",
    Spo(spo::SpoConfig) = "spo",
    Pso(pso::PsoConfig) = "pso",
    Lasro(lasro::LasroConfig) = "lasro",
}

impl Method {
    pub fn name(&self) -> &'static str {
        self.spec().name()
    }

    /// The algorithm of this method, for a policy of model `M`.
    pub fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        self.build_for::<M>()
    }

    /// `ddpo, diffusion-dpo, ...`: what "valid: ..." messages list.
    pub fn names() -> String {
        Self::NAMES.join(", ")
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::defaults(s).ok_or_else(|| unknown(s))
    }
}

fn unknown(name: &str) -> String {
    format!("unknown method `{name}`; valid: {}", Method::names())
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct MethodVisitor;
        impl<'de> Visitor<'de> for MethodVisitor {
            type Value = Method;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a `[method.<name>]` table (or `method = \"<name>\"` for its defaults), name one of: {}",
                    Method::names()
                )
            }

            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Method, E> {
                Method::defaults(s).ok_or_else(|| E::custom(unknown(s)))
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Method, A::Error> {
                let Some(name) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(format!(
                        "`[method]` names no method; add `[method.<name>]` with one of: {}",
                        Method::names()
                    )));
                };
                let method = Method::from_table(&name, &mut map)?;
                if let Some(other) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "`[method]` names two methods, `{name}` and `{other}`; a run trains one"
                    )));
                }
                Ok(method)
            }
        }
        d.deserialize_any(MethodVisitor)
    }
}

/// The algorithm a config names, with its settings, for a policy of model `M`.
pub fn build<M: PolicyModel>(config: &AlignConfig) -> Box<dyn Algorithm<M>> {
    config.method.build::<M>()
}

/// [`MethodSpec::size_to_budget`] of a method that collects rollouts: each collected batch costs
/// its rollouts' rewards and gives `inner_epochs` updates.
pub(crate) fn rollout_budget(
    config: &AlignConfig,
    budget: u64,
    inner_epochs: usize,
) -> (Vec<String>, u64) {
    let batch = config.train.effective_batch().max(1) as u64;
    (
        vec![format!("train.reward_budget={budget}")],
        budget.div_ceil(batch) * inner_epochs as u64,
    )
}

/// Scalars a method logs with later updates, as checkpoint state: `[[name, value], ...]`, each
/// value as Rust's shortest round-trip text (SEIKO's and LaSRO's last fit).
pub(crate) fn scalars_state(scalars: &[(&'static str, f64)]) -> serde_json::Value {
    serde_json::Value::from(
        scalars
            .iter()
            .map(|(k, v)| vec![k.to_string(), format!("{v:?}")])
            .collect::<Vec<_>>(),
    )
}

/// [`scalars_state`] read back, keeping the names in `known` (others are dropped).
pub(crate) fn scalars_from_state(
    state: Option<&serde_json::Value>,
    known: &[&'static str],
) -> Vec<(&'static str, f64)> {
    state
        .and_then(|l| l.as_array())
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|pair| {
                    let name = pair.get(0)?.as_str()?;
                    let v = pair.get(1)?.as_str()?.parse::<f64>().ok()?;
                    Some((known.iter().copied().find(|n| *n == name)?, v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The field checks methods' validations share; every error names `method.<name>.<field>`.
pub(crate) struct Fields(pub &'static str);

impl Fields {
    pub(crate) fn error(&self, field: &str, msg: impl Into<String>) -> tiller_core::Error {
        tiller_core::Error::config(format!("method.{}.{field}", self.0), msg.into())
    }

    /// Each value positive and finite.
    pub(crate) fn positive(&self, fields: &[(&str, f64)]) -> Result<()> {
        match fields.iter().find(|(_, v)| !(*v > 0.0 && v.is_finite())) {
            Some((f, v)) => Err(self.error(f, format!("must be positive, got {v}"))),
            None => Ok(()),
        }
    }

    /// Each value at least 0 and finite.
    pub(crate) fn non_negative(&self, fields: &[(&str, f64)]) -> Result<()> {
        match fields.iter().find(|(_, v)| !(*v >= 0.0 && v.is_finite())) {
            Some((f, v)) => Err(self.error(f, format!("must be >= 0, got {v}"))),
            None => Ok(()),
        }
    }

    /// Each value in (0, 1].
    pub(crate) fn unit_interval(&self, fields: &[(&str, f64)]) -> Result<()> {
        match fields.iter().find(|(_, v)| !(*v > 0.0 && *v <= 1.0)) {
            Some((f, v)) => Err(self.error(f, format!("must be in (0, 1], got {v}"))),
            None => Ok(()),
        }
    }

    /// Each value in (0, 1) (a ratio clamp's eps, a probability threshold).
    pub(crate) fn open_unit_interval(&self, fields: &[(&str, f64)]) -> Result<()> {
        match fields.iter().find(|(_, v)| !(*v > 0.0 && *v < 1.0)) {
            Some((f, v)) => Err(self.error(f, format!("must be in (0, 1), got {v}"))),
            None => Ok(()),
        }
    }

    /// Each count at least 1.
    pub(crate) fn at_least_one(&self, fields: &[(&str, usize)]) -> Result<()> {
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((f, _)) => Err(self.error(f, "must be at least 1")),
            None => Ok(()),
        }
    }

    /// `train.images_per_prompt == 2` and an even `train.batch_size`: the method compares two
    /// rollouts of each prompt, and a micro-batch holds whole pairs.
    pub(crate) fn whole_pairs(&self, config: &AlignConfig) -> Result<()> {
        let train = &config.train;
        if train.images_per_prompt != 2 {
            return Err(tiller_core::Error::config(
                "train.images_per_prompt",
                format!(
                    "{} compares two rollouts of each prompt: set it to 2, got {}",
                    self.0, train.images_per_prompt
                ),
            ));
        }
        if !train.batch_size.is_multiple_of(2) {
            return Err(tiller_core::Error::config(
                "train.batch_size",
                format!(
                    "must be even for {} (a micro-batch holds whole pairs), got {}",
                    self.0, train.batch_size
                ),
            ));
        }
        Ok(())
    }

    /// `sampling.eta > 0`: the method reads the log-probability of every step taken.
    pub(crate) fn stochastic_steps(&self, config: &AlignConfig) -> Result<()> {
        if config.sampling.eta <= 0.0 {
            return Err(tiller_core::Error::config(
                "sampling.eta",
                format!(
                    "must be > 0 for {}: a deterministic step has no log-probability",
                    self.0
                ),
            ));
        }
        Ok(())
    }
}
