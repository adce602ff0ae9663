//! Focus-N-Fix (Xing et al., "Focus-N-Fix: Region-Aware Fine-Tuning for Text-to-Image
//! Generation", CVPR 2025): reward fine-tuning that may change only the regions where the
//! pretrained model's image was at fault. For a prompt c and a start x_T, the frozen pretrained
//! model theta_0 samples Î0 and the fine-tuned model theta samples Î from the same x_T (and here
//! the same step noise); a localiser marks the problem regions M(Î0) of the pretrained image, and
//! the objective (the paper's Figure 2) is
//!
//! ```text
//! J(theta) = E_c E_{x_T}[ r(Î, c) - lambda ‖(1 - M(Î0)) ⊙ (Î - Î0)‖_F ]
//! ```
//!
//! so the reward's gradient is free inside the mask and every change outside it is penalised.
//! It builds on DRaFT (the gradient of J through the last K denoising steps, LoRA only: the
//! paper's setting) and needs nothing at inference beyond the fine-tuned model.
//!
//! The authors released no code; this file reads the paper as follows:
//! - the norm is the Frobenius norm (not squared) of the masked difference of the images in
//!   [-1, 1] (decoded, for a latent pipeline), per image, computed as `sqrt(sum + 1e-8)` so its
//!   gradient at Î = Î0 (the first update of a LoRA, whose B starts at zero) is zero, not 0/0;
//!   its gradient in the image has norm lambda wherever Î differs from Î0 outside the mask, so
//!   lambda is compared with the reward gradient's norm;
//! - Î0 comes from the policy's frozen starting weights (`Policy::reference`) with the chain's
//!   guidance, and is sampled again for every micro-batch (no graph, one extra chain);
//! - the mask source is a setting (`mask`): the testbed's gold evaluator (its forbidden marks,
//!   or every factor's region at fault), the run's learned reward's region head (RichHF-style
//!   heatmaps, as the paper's), or a fixed box; `dilate` widens it by whole pixels, to take in a
//!   detected region's soft edge;
//! - defaults: K = 1 (DRaFT-1, DRaFT's recommended setting), lambda = 1 (no value is published).

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::draft_k::{backprop_reward, check_last_steps, run_prefix_with};
use crate::methods::{Fields, MethodSpec};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use tiller_core::{Error, Result, SeededRng};
use tiller_reward::localize::{FixedBox, GoldRegion, GoldRegions, Localizer, RegionHead, dilate};
use tiller_reward::tensor_to_images;
use tiller_testbed::Mask;

/// Added under the norm's square root: a zero gradient where Î = Î0.
pub const NORM_EPSILON: f64 = 1e-8;

/// Where the problem regions of the pretrained model's image come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskSource {
    /// The testbed's gold evaluator: the forbidden marks' pixels (safety).
    GoldMarks,
    /// The testbed's gold evaluator: every factor's region at fault, marks included.
    GoldFaults,
    /// The run's learned reward's region head: cells whose flaw probability for any of
    /// `factors` exceeds `threshold`.
    RegionHead,
    /// `mask_box`, the same for every image.
    Box,
}

/// `[method.focus-n-fix]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FocusNFixConfig {
    /// Steps differentiated from the end of the chain (DRaFT-K's K; 0: all).
    pub k: usize,
    /// lambda, the weight of the change outside the mask.
    pub lambda: f64,
    /// The localiser of the pretrained model's image.
    pub mask: MaskSource,
    /// With `region-head`: the factors whose regions count (empty: all of the reward's).
    pub factors: Vec<String>,
    /// With `region-head`: the flaw probability above which a cell is in the mask.
    pub threshold: f64,
    /// With `box`: `[x0, y0, x1, y1]` in fractions of the image's width and height.
    pub mask_box: Vec<f64>,
    /// Pixels by which the mask is widened.
    pub dilate: usize,
}

impl Default for FocusNFixConfig {
    fn default() -> Self {
        Self {
            k: 1,
            lambda: 1.0,
            mask: MaskSource::GoldMarks,
            factors: Vec::new(),
            threshold: 0.5,
            mask_box: Vec::new(),
            dilate: 1,
        }
    }
}

impl FocusNFixConfig {
    fn fixed_box(&self) -> Result<FixedBox> {
        let corners: [f64; 4] = self.mask_box.as_slice().try_into().map_err(|_| {
            Error::config(
                "method.focus-n-fix.mask_box",
                format!(
                    "mask = \"box\" needs four numbers [x0, y0, x1, y1], got {:?}",
                    self.mask_box
                ),
            )
        })?;
        FixedBox::new(corners, "method.focus-n-fix.mask_box")
    }
}

impl MethodSpec for FocusNFixConfig {
    fn name(&self) -> &'static str {
        "focus-n-fix"
    }

    fn paper(&self) -> &'static str {
        "Xing et al., Focus-N-Fix: Region-Aware Fine-Tuning for Text-to-Image Generation, CVPR 2025"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        let f = Fields("focus-n-fix");
        f.non_negative(&[("lambda", self.lambda)])?;
        if self.mask == MaskSource::Box {
            self.fixed_box()?;
        } else if !self.mask_box.is_empty() {
            return Err(f.error("mask_box", "applies only with mask = \"box\""));
        }
        if self.mask != MaskSource::RegionHead && !self.factors.is_empty() {
            return Err(f.error("factors", "apply only with mask = \"region-head\""));
        }
        f.open_unit_interval(&[("threshold", self.threshold)])
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(FocusNFix {
            config: self.clone(),
        })
    }

    fn check_sampler(
        &self,
        sampler: &dyn tiller_diffusion::schedulers::Scheduler,
        device: &Device,
    ) -> Result<()> {
        check_last_steps(sampler, self.k, device, "method.focus-n-fix.k")
    }
}

/// The per-image loss `-r + lambda ‖keep ⊙ (images - base)‖_F` (the norm as
/// `sqrt(sum + NORM_EPSILON)`): `rewards` [B], `images` and `base` [B, 3, H, W], `keep` [B, 3, H, W]
/// (1 outside the mask, 0 inside); and the norm itself, [B].
pub fn focus_objective(
    rewards: Tensor<1>,
    images: Tensor<4>,
    base: Tensor<4>,
    keep: Tensor<4>,
    lambda: f64,
) -> (Tensor<1>, Tensor<1>) {
    let norm = outside_norm(images, base, keep);
    (rewards.neg() + norm.clone() * lambda, norm)
}

/// `‖keep ⊙ (images - base)‖_F` per image, as `sqrt(sum + NORM_EPSILON)`.
pub fn outside_norm(images: Tensor<4>, base: Tensor<4>, keep: Tensor<4>) -> Tensor<1> {
    let b = images.dims()[0];
    let d = (images - base) * keep;
    (d.powi_scalar(2)
        .reshape([b as i64, -1])
        .sum_dim(1)
        .reshape([b])
        + NORM_EPSILON)
        .sqrt()
}

pub struct FocusNFix {
    pub config: FocusNFixConfig,
}

impl FocusNFix {
    fn masks(
        &self,
        cx: &Context<'_, impl PolicyModel>,
        images: &[tiller_testbed::Image],
        prompts: &[String],
    ) -> Result<Vec<Mask>> {
        let masks = match self.config.mask {
            MaskSource::GoldMarks => GoldRegions::new(GoldRegion::Marks).localize(images, prompts),
            MaskSource::GoldFaults => {
                GoldRegions::new(GoldRegion::Faults).localize(images, prompts)
            }
            MaskSource::Box => self.config.fixed_box()?.localize(images, prompts),
            MaskSource::RegionHead => {
                let learned = cx.reward.learned().ok_or_else(|| {
                    Error::config(
                        "method.focus-n-fix.mask",
                        format!(
                            "\"region-head\" localises with the run's reward's region head, but `{}` is not a learned reward",
                            cx.reward.name()
                        ),
                    )
                })?;
                RegionHead::new(learned, &self.config.factors, self.config.threshold)?
                    .localize(images, prompts)
            }
        }?;
        Ok(masks
            .iter()
            .map(|m| dilate(m, self.config.dilate))
            .collect())
    }
}

/// 1 outside the masks, 0 inside, as [B, 3, H, W] on `device`.
fn keep_tensor(masks: &[Mask], device: &Device) -> Tensor<4> {
    let (w, h) = (masks[0].width, masks[0].height);
    let mut v = Vec::with_capacity(masks.len() * 3 * w * h);
    for m in masks {
        for _ in 0..3 {
            v.extend(m.bits.iter().map(|&set| if set { 0.0f32 } else { 1.0 }));
        }
    }
    Tensor::from_data(TensorData::new(v, [masks.len(), 3, h, w]), device)
}

impl<M: PolicyModel> Algorithm<M> for FocusNFix {
    fn name(&self) -> &'static str {
        "focus-n-fix"
    }

    fn collects(&self) -> Collect {
        Collect::Starts
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Starts(s) = batch else {
            return Err(Error::invalid("focus-n-fix needs chain starts"));
        };
        let policy = cx.policy;
        // Î0: the pretrained model's sample from the same start and step noise.
        let steps = policy.sampler.timesteps().len();
        let (x0, _) = run_prefix_with(policy, &policy.reference, s, steps)?;
        let base = policy.images(x0);
        let masks = self.masks(cx, &tensor_to_images(base.clone())?, &s.prompts.texts)?;
        let device = policy.autodiff_device();
        let keep = keep_tensor(&masks, &device);
        let base = Tensor::from_data(base.into_data(), &device);
        let lambda = self.config.lambda;
        let outside: RefCell<Vec<f64>> = RefCell::new(Vec::new());
        let objective = |r: Tensor<1>, images: Tensor<4>| {
            let (loss, norm) = focus_objective(r, images, base.clone(), keep.clone(), lambda);
            if let Ok(v) = crate::methods::draft_k::to_vec(&norm) {
                *outside.borrow_mut() = v;
            }
            loss
        };
        let mut out = backprop_reward(cx, s, scale, self.config.k, "focus-n-fix", &objective)?;
        let outside = outside.into_inner();
        let n = masks.len() as f64;
        let masked = masks
            .iter()
            .map(|m| m.count() as f64 / m.bits.len() as f64)
            .sum::<f64>()
            / n;
        // Root mean square change per value outside the masks (0 where nothing is outside).
        let rms = outside
            .iter()
            .zip(&masks)
            .map(|(norm, m)| {
                let values = 3.0 * (m.bits.len() - m.count()) as f64;
                if values > 0.0 {
                    norm / values.sqrt()
                } else {
                    0.0
                }
            })
            .sum::<f64>()
            / n;
        out.metrics.push(("mask_fraction", masked));
        out.metrics.push(("outside_rms_change", rms));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_testkit::{assert_close, finite_diff::assert_gradient_matches};

    /// The objective in f64: `-r + lambda sqrt(sum keep (x - base)^2 + eps)` per image, summed.
    fn by_hand(x: &[f64], base: &[f64], keep: &[f64], r: &[f64], lambda: f64) -> Vec<f64> {
        let per = x.len() / r.len();
        r.iter()
            .enumerate()
            .map(|(i, ri)| {
                let sq: f64 = (i * per..(i + 1) * per)
                    .map(|j| (keep[j] * (x[j] - base[j])).powi(2))
                    .sum();
                -ri + lambda * (sq + NORM_EPSILON).sqrt()
            })
            .collect()
    }

    #[test]
    fn the_objective_and_its_image_gradient_match_a_hand_computation() {
        let device = Device::default().autodiff();
        let shape = [2, 3, 3, 4];
        let n: usize = shape.iter().product();
        let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).sin() * 0.8).collect();
        let base: Vec<f64> = (0..n).map(|i| (i as f64 * 1.3).cos() * 0.5).collect();
        // The mask: the first column of every image, and all of the second image's last row.
        let keep: Vec<f64> = (0..n)
            .map(|i| {
                let (img, col, row) = (i / 36, i % 4, (i / 4) % 3);
                if col == 0 || (img == 1 && row == 2) {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let r = [0.3, -1.2];
        let lambda = 0.7;
        let t = |v: &[f64]| {
            let f: Vec<f32> = v.iter().map(|&a| a as f32).collect();
            Tensor::<4>::from_data(TensorData::new(f, shape), &device)
        };
        let xs = t(&x).require_grad();
        let rs = Tensor::<1>::from_data(TensorData::new(vec![0.3f32, -1.2], [2]), &device);
        let (loss, _) = focus_objective(rs, xs.clone(), t(&base), t(&keep), lambda);
        let values: Vec<f64> = crate::methods::draft_k::to_vec(&loss).unwrap();
        assert_close(
            values.as_slice(),
            by_hand(&x, &base, &keep, &r, lambda).as_slice(),
            1e-6,
            1e-6,
        );
        let grads = loss.sum().backward();
        let g: Vec<f64> = xs
            .grad(&grads)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        // Zero inside the mask, and the finite differences of the hand computation elsewhere.
        assert!(g.iter().zip(&keep).all(|(gi, k)| *k == 1.0 || *gi == 0.0));
        assert_gradient_matches(
            "the Focus-N-Fix objective in the image",
            |v| by_hand(v, &base, &keep, &r, lambda).iter().sum(),
            &x,
            &g,
            1e-4,
            1e-6,
        );
        // Where the image equals the base the penalty's gradient is zero, not 0/0.
        let same = t(&base).require_grad();
        let (l, _) = focus_objective(
            Tensor::<1>::zeros([2], &device),
            same.clone(),
            t(&base),
            t(&keep),
            lambda,
        );
        let g = same.grad(&l.sum().backward()).unwrap();
        let g = g
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        assert!(g.iter().all(|v| v.abs() < 1e-6), "{g:?}");
    }
}
