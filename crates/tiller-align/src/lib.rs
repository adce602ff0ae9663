//! Alignment: one training loop, and each method a loss over a batch.
//!
//! The survey's three families need different data: rollouts with per-step log-probabilities
//! (policy gradient), preference pairs (DPO), and differentiable samples (reward backpropagation).
//! The loop ([`trainer::align`]) collects what the method asks for ([`Collect`]), scores it,
//! cuts it into micro-batches, asks the method for each micro-batch's gradients, accumulates,
//! steps, logs, validates and checkpoints. A method ([`Algorithm`]) is one file in `methods/`
//! that reads like its paper.

pub mod batch;
pub mod config;
pub mod experts;
pub mod methods;
pub mod policy;
pub mod pretraining;
pub mod run;
pub mod trainer;

pub use batch::{Batch, Collect, Labeled, Pairs, Prompts, Rollouts, Samples, Starts, Supervised};
pub use config::AlignConfig;
pub use methods::{Method, MethodSpec};
pub use policy::{Policy, PolicyModel};
pub use trainer::{AlignData, Aligned, PromptEncoder, align};

use burn::optim::GradientsParams;
use tiller_core::{Result, SeededRng};
use tiller_diffusion::models::unet::UNet2DConditionModel;
use tiller_reward::Reward;

/// What a method sees when computing gradients.
pub struct Context<'a, M: PolicyModel = UNet2DConditionModel> {
    pub policy: &'a Policy<M>,
    /// The reward being optimised (the proxy).
    pub reward: &'a dyn Reward,
    /// Weight of the per-step KL to the reference (0: off).
    pub kl_weight: f64,
}

/// One micro-batch's contribution.
pub struct MicroStep {
    /// d(scale * loss) / d(trainable parameters).
    pub grads: GradientsParams,
    /// The (unscaled) loss of this micro-batch.
    pub loss: f64,
    /// Method-specific scalars (means over the micro-batch), e.g. `approx_kl`, `implicit_acc`.
    pub metrics: Vec<(&'static str, f64)>,
    /// Rewards computed while taking the step (DRaFT: the differentiable reward of its samples).
    pub rewards: Vec<f64>,
}

/// An alignment method: which batch it needs, and the gradients of its loss on a micro-batch.
/// Methods implement it for every [`PolicyModel`]: the loop is the same for any denoiser.
pub trait Algorithm<M: PolicyModel = UNet2DConditionModel> {
    fn name(&self) -> &'static str;

    /// The data the loop collects for it, asked before each batch.
    fn collects(&self) -> Collect;

    /// Sees the run's policy (its sampler above all) before the loop asks anything else, e.g.
    /// to count the chain's stochastic steps (TDPO-R takes one update per trained step).
    fn bind(&mut self, _policy: &Policy<M>) -> Result<()> {
        Ok(())
    }

    /// Takes the reward model the method trains beside the policy ([`MethodSpec::reward_model`]:
    /// LaSRO's surrogate starts from it), loaded on the run's plain device before training.
    fn adopt_reward_model(&mut self, _model: tiller_reward::LearnedReward) -> Result<()> {
        Err(tiller_core::Error::invalid(format!(
            "{} trains no reward model beside the policy",
            self.name()
        )))
    }

    /// Optimizer updates taken on each collected batch (DDPO's inner epochs); 1 for the rest.
    /// Asked before each batch is collected, with [`Self::collects`]: a method whose batches
    /// differ answers for the one about to be collected (SEIKO's true-reward queries take none).
    fn updates_per_batch(&self) -> usize {
        1
    }

    /// Whether the batch also carries pre-training images, one per example (the base model's
    /// own training data: ReFL's and reward-weighted likelihood's regulariser).
    fn pretrain(&self) -> bool {
        false
    }

    /// Called once per collected batch before its micro-batches, with the policy as it is before
    /// the batch's updates (DDPO: advantages; DPOK: its value network; Diffusion-KTO: its
    /// reference point). Returns scalars to log.
    fn prepare(
        &mut self,
        _cx: &Context<'_, M>,
        _batch: &mut Batch,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        Ok(Vec::new())
    }

    /// Called before each update on a collected batch (`epoch` counts them from 0), e.g. to
    /// draw which steps this update trains (DDPO, per sample and per inner epoch).
    fn begin_update(
        &mut self,
        _batch: &mut Batch,
        _epoch: usize,
        _rng: &mut SeededRng,
    ) -> Result<()> {
        Ok(())
    }

    /// Gradients of `scale * loss` on one micro-batch (`scale` = 1 / accumulation steps, so an
    /// accumulated update equals one big batch).
    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        rng: &mut SeededRng,
    ) -> Result<MicroStep>;

    /// State to checkpoint beyond the weights (DDPO's per-prompt statistics).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn restore(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }

    /// Writes what the method trains besides the policy (DPOK's value network and its
    /// optimizer) into the checkpoint folder `dir`, before it is committed.
    fn save_files(&self, _dir: &std::path::Path) -> Result<()> {
        Ok(())
    }

    /// Reads what [`Self::save_files`] wrote, after [`Self::restore`], onto `device`.
    fn load_files(&mut self, _dir: &std::path::Path, _device: &burn::tensor::Device) -> Result<()> {
        Ok(())
    }
}
