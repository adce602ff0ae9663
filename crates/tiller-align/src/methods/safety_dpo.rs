//! SafetyDPO (Liu et al., "SafetyDPO: Scalable Safety Alignment for Text-to-Image Generation",
//! 2024; ICCV 2025 as AlignGuard; code `Visualignment/SafetyDPO`, data CoProV2).
//!
//! **Training** is Diffusion-DPO ([`super::diffusion_dpo`], the repository's `train.py` is
//! SalesforceAIResearch/DiffusionDPO's) on safe/unsafe pairs: for an unsafe prompt, the image of
//! its minimally changed safe twin is preferred to the unsafe prompt's own image, both scored under
//! the unsafe prompt, so the model learns to draw the safe version when asked for the unsafe one.
//! beta 5000 (Salesforce's convention, `launchers/train_lora_sd15.sh`), LoRA. One run per harm
//! category trains one **expert**: `category` keeps the comparisons of that category
//! (`tiller feedback safety-pairs` records category `c` as annotator `safe-twin/c`; any
//! comparison whose annotator id ends in `/c` counts).
//!
//! **Merging** the experts into one adapter ([`co_merge_gates`], [`average_gates`]; `tiller merge
//! --run A --run B --strategy co-merge|average`). The paper's Co-Merge keeps, "per weight", the
//! expert with the highest activation over inputs; its code is not released (methods.md §2.16).
//! Our reading, stated because it is a choice: per output unit of every adapted projection, the
//! expert whose update `a_e b_e` has the largest mean squared output on the inputs that projection
//! sees while the expert's own model denoises the calibration prompts (by default the unsafe
//! training prompts of every category) wins that unit; the merged update is
//! `sum_e a_e b_e diag(winner == e)`. Selecting per output unit rather than per matrix entry keeps
//! the result exactly one LoRA (rank N r: the experts' factors side by side, each expert's `b`
//! masked to its units), which the paper says the merge produces; an element-wise choice would not
//! factor. Plain averaging (`sum_e a_e b_e / N`, also exactly a rank-N r LoRA) is the baseline.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::diffusion_dpo::{DiffusionDpo, train_split};
use crate::methods::{Fields, MethodSpec, StoreData, StoreRead};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::module::ParamId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::lora::AdapterSet;
use tiller_diffusion::models::probe::InputMoments;

/// The annotator prefix `tiller feedback safety-pairs` records a category's pairs under.
pub const SAFE_TWIN: &str = "safe-twin";

/// `[method.safety-dpo]`: one safety expert (Visualignment/SafetyDPO).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SafetyDpoConfig {
    /// beta in Salesforce's convention (`-log sigmoid(-beta/2 (d_theta - d_ref))`): 5000, the
    /// `--beta_dpo` of SafetyDPO's SD1.5 launcher.
    pub beta: f64,
    /// The store of safe/unsafe pairs (`tiller feedback safety-pairs --store`).
    pub store: String,
    /// Its split: `train`.
    pub split: String,
    /// The expert's harm category: comparisons whose annotator id ends in `/<category>`. Empty:
    /// every non-tie comparison (one model for all categories, or an imported CoProV2 store,
    /// whose rows name no category).
    pub category: String,
    /// Train on at most this many pairs (the first in the store; 0: all).
    pub max_comparisons: usize,
}

impl Default for SafetyDpoConfig {
    fn default() -> Self {
        Self {
            beta: 5000.0,
            store: "runs/safety-pairs".into(),
            split: "train".into(),
            category: String::new(),
            max_comparisons: 0,
        }
    }
}

impl MethodSpec for SafetyDpoConfig {
    fn name(&self) -> &'static str {
        "safety-dpo"
    }

    fn paper(&self) -> &'static str {
        "Liu et al., SafetyDPO: Scalable Safety Alignment for Text-to-Image Generation, 2024 (ICCV 2025 as AlignGuard)"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        let f = Fields("safety-dpo");
        f.positive(&[("beta", self.beta)])?;
        if self.category.contains('/') {
            return Err(f.error(
                "category",
                format!(
                    "is a category name such as `mark`, without `/`; got `{}`",
                    self.category
                ),
            ));
        }
        train_split("method.safety-dpo.split", &self.split)
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(SafetyDpo(DiffusionDpo::new(self.beta)))
    }

    /// Regularised by beta, not a per-step KL.
    fn takes_kl(&self) -> bool {
        false
    }

    /// Trains on the store's pairs; samples nothing.
    fn samples(&self) -> bool {
        false
    }

    fn store(&self) -> Option<StoreRead> {
        Some(StoreRead {
            data: StoreData::Comparisons,
            store: self.store.clone(),
            split: self.split.clone(),
            limit: self.max_comparisons,
            field: "method.safety-dpo.store",
            category: (!self.category.is_empty()).then(|| self.category.clone()),
        })
    }

    /// Each pair is one labelled comparison.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        (
            vec![format!("method.safety-dpo.max_comparisons={budget}")],
            config.train.updates,
        )
    }
}

/// Diffusion-DPO's update under SafetyDPO's name.
pub struct SafetyDpo(pub DiffusionDpo);

impl<M: PolicyModel> Algorithm<M> for SafetyDpo {
    fn name(&self) -> &'static str {
        "safety-dpo"
    }

    fn collects(&self) -> Collect {
        Collect::Pairs
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        <DiffusionDpo as Algorithm<M>>::gradients(&mut self.0, cx, batch, scale, rng)
    }
}

/// Whether a comparison by `annotator` belongs to `category`.
pub fn in_category(annotator: &str, category: &str) -> bool {
    annotator
        .rsplit_once('/')
        .is_some_and(|(_, c)| c == category)
}

/// How several experts' adapters become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergeStrategy {
    /// Per output unit, the expert most active on the calibration inputs.
    CoMerge,
    /// The mean of the experts' updates.
    Average,
}

impl std::str::FromStr for MergeStrategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "co-merge" => Ok(Self::CoMerge),
            "average" => Ok(Self::Average),
            other => Err(Error::invalid(format!(
                "unknown merge strategy `{other}`; valid: co-merge, average"
            ))),
        }
    }
}

/// Per module, per output unit, the expert that keeps it.
pub type Winners = BTreeMap<String, Vec<usize>>;

/// Co-Merge's choice: `experts[e]`'s update at each module is scored on `moments[e]`, the inputs
/// its own model gave that module (keyed by the weight's id in that model), and the unit goes to
/// the expert with the largest mean squared output (the first on ties). A module an expert's
/// recording never reached is an error naming it.
pub fn co_merge_gates(
    experts: &[AdapterSet],
    moments: &[HashMap<ParamId, InputMoments>],
) -> Result<Winners> {
    if experts.len() != moments.len() || experts.is_empty() {
        return Err(Error::invalid(format!(
            "{} experts and {} recordings: one recording per expert",
            experts.len(),
            moments.len()
        )));
    }
    let mut winners = Winners::new();
    for module in experts[0].modules.keys() {
        let mut best: Vec<(f64, usize)> = Vec::new();
        for (e, (set, seen)) in experts.iter().zip(moments).enumerate() {
            let Some((id, u)) = set.modules.get(module) else {
                return Err(Error::invalid(format!(
                    "expert {e} has no adapter at `{module}`; experts must adapt the same modules"
                )));
            };
            let m = seen.get(id).ok_or_else(|| {
                Error::invalid(format!(
                    "the calibration never reached `{module}` of expert {e}: Co-Merge scores the \
                     attention and feed-forward projections the denoiser records; merge with \
                     `average`, or adapt only those"
                ))
            })?;
            let scores = m.mean_square(&u.a, &u.b, u.rank)?;
            if best.is_empty() {
                best = scores.iter().map(|&s| (s, 0)).collect();
            } else {
                for (b, s) in best.iter_mut().zip(scores) {
                    if s > b.0 {
                        *b = (s, e);
                    }
                }
            }
        }
        winners.insert(module.clone(), best.into_iter().map(|(_, e)| e).collect());
    }
    Ok(winners)
}

/// The gates of [`tiller_diffusion::models::lora::attach_combination`] for `strategy`: one-hot
/// on the winners, or `1/N` everywhere.
pub fn gates(
    winners: Option<&Winners>,
    n: usize,
    e: usize,
    module: &str,
    d_out: usize,
) -> Vec<f32> {
    match winners.and_then(|w| w.get(module)) {
        Some(w) => w.iter().map(|&k| (k == e) as u8 as f32).collect(),
        None => vec![1.0 / n as f32; d_out],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_diffusion::models::lora::AdapterUpdate;

    /// Two experts on one 2-in 3-out module, inputs along the first axis only: the expert whose
    /// update reads that axis wins every unit it writes larger, ties go to the first.
    #[test]
    fn co_merge_picks_the_expert_most_active_on_the_inputs() {
        let id = ParamId::new();
        let set = |a: Vec<f32>, b: Vec<f32>| AdapterSet {
            modules: BTreeMap::from([(
                "attn.to_q".to_string(),
                (
                    id,
                    AdapterUpdate {
                        d_in: 2,
                        d_out: 3,
                        rank: 1,
                        a,
                        b,
                    },
                ),
            )]),
        };
        // Expert 0 reads x_0 and writes (1, 0, 2); expert 1 reads x_1 (never active) and writes
        // (9, 9, 9); so expert 0 wins units 0 and 2, unit 1 ties at 0 and goes to expert 0 too.
        let experts = [
            set(vec![1.0, 0.0], vec![1.0, 0.0, 2.0]),
            set(vec![0.0, 1.0], vec![9.0, 9.0, 9.0]),
        ];
        let inputs = InputMoments {
            d_in: 2,
            rows: 4,
            gram: vec![4.0, 0.0, 0.0, 0.0],
        };
        let moments = vec![HashMap::from([(id, inputs.clone())]); 2];
        let w = co_merge_gates(&experts, &moments).unwrap();
        assert_eq!(w["attn.to_q"], vec![0, 0, 0]);
        // With the inputs along x_1, expert 1 wins everything.
        let other = InputMoments {
            gram: vec![0.0, 0.0, 0.0, 1.0],
            ..inputs
        };
        let moments = vec![HashMap::from([(id, other)]); 2];
        let w = co_merge_gates(&experts, &moments).unwrap();
        assert_eq!(w["attn.to_q"], vec![1, 1, 1]);
        assert_eq!(gates(Some(&w), 2, 1, "attn.to_q", 3), vec![1.0, 1.0, 1.0]);
        assert_eq!(gates(Some(&w), 2, 0, "attn.to_q", 3), vec![0.0, 0.0, 0.0]);
        assert_eq!(gates(None, 2, 0, "attn.to_q", 3), vec![0.5, 0.5, 0.5]);
        // A module the recording missed is named.
        let err = co_merge_gates(&experts, &[HashMap::new(), HashMap::new()]).unwrap_err();
        assert!(err.to_string().contains("attn.to_q"), "{err}");
        assert!(in_category("safe-twin/mark", "mark"));
        assert!(!in_category("safe-twin/marks", "mark"));
        assert!(!in_category("mark", "mark"));
    }
}
