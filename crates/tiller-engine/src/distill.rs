//! Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of
//! Diffusion Models", ICLR 2022, Algorithm 2): a student learns to take in one deterministic DDIM
//! step what its teacher takes in two, so each stage halves the number of sampling steps (8 -> 4
//! -> 2 -> 1 with three stages, the student of one stage the teacher of the next).
//!
//! For a clean image x and noise eps, at a student step from t to t'' (the teacher's t -> t' ->
//! t''), with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t):
//!
//! ```text
//! z_t    = alpha_t x + sigma_t eps
//! z_t''  = the teacher's two DDIM (eta = 0) steps from z_t, with its classifier-free guidance
//! x~     = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
//! L      = max(SNR_t, 1) ||x^_student(z_t) - x~||^2          ("truncated SNR" weighting, sec. 3)
//! ```
//!
//! x~ is the clean image whose one DDIM step from z_t lands on the teacher's z_t''. An
//! eps-predicting student (the testbed base and Stable Diffusion 1.x predict eps) has
//! x^ = (z_t - sigma_t eps^) / alpha_t, so the loss is the weighted eps regression
//! `max(1, 1 / SNR_t) ||eps^ - eps~||^2` with eps~ = (z_t - alpha_t x~) / sigma_t; that is what
//! [`ProgressiveDistillation`] hands the training loop.
//!
//! Three choices of ours, where the paper's setting (a v-predicting model sampled from pure noise
//! at t = T) differs from a diffusers eps model with `leading` timesteps:
//! - **The grid.** The student's N steps are the teacher's 2N steps taken two at a time: a
//!   `leading` DDIM grid with the teacher's stride doubled and `steps_offset` raised by the
//!   teacher's stride (teacher 8 steps at offset 1: 876, 751, ..., 1; student 4 steps at offset
//!   126: 876, 626, 376, 126), so the student starts where the teacher starts and ends on the
//!   same final alpha. The student's `scheduler_config.json` says so, and samples in diffusers.
//! - **Guidance.** The teacher samples with classifier-free guidance at `guidance`; the student
//!   learns the guided steps in its conditional prediction and is sampled without guidance (one
//!   network pass per step instead of two), as guided distillation's first stage does (Meng et
//!   al., "On Distillation of Guided Diffusion Models", CVPR 2023).
//! - **Clipping.** The teacher's steps clip x^_0 as its scheduler says (the testbed base's does);
//!   the student's regression does not (a clipped prediction has no gradient), and its sampler
//!   clips as the teacher's does.

use crate::denoiser::{Objective, Regression, TextToImageModules};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::schedulers::{
    DdimConfig, DdimScheduler, PredictionType, Scheduler, TimestepSpacing, per_sample,
};

/// `[distill]`: one stage of progressive distillation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSection {
    /// The teacher's deterministic DDIM steps, 2N; the student takes N.
    pub teacher_steps: usize,
    /// The teacher's classifier-free guidance scale (1 = none); the student is sampled without.
    pub guidance: f64,
}

impl DistillSection {
    /// Errors, naming the setting, unless a teacher sampled with `teacher` can be distilled with
    /// these settings.
    pub fn validate(&self, teacher: &DdimConfig) -> Result<()> {
        student_scheduler(teacher, self.teacher_steps)?;
        if !(self.guidance.is_finite() && self.guidance >= 1.0) {
            return Err(Error::config(
                "distill.guidance",
                format!(
                    "must be at least 1 (1 = no guidance), got {}",
                    self.guidance
                ),
            ));
        }
        Ok(())
    }
}

impl Default for DistillSection {
    fn default() -> Self {
        Self {
            teacher_steps: 8,
            guidance: 3.0,
        }
    }
}

/// The student's DDIM settings for a teacher sampled with `teacher` at `teacher_steps` steps:
/// the teacher's noise schedule, eta 0, `steps_offset` raised by the teacher's stride (see the
/// module notes). Errors name the setting that rules distillation out.
pub fn student_scheduler(teacher: &DdimConfig, teacher_steps: usize) -> Result<DdimConfig> {
    if teacher.timestep_spacing != TimestepSpacing::Leading {
        return Err(Error::config(
            "scheduler.timestep_spacing",
            "progressive distillation pairs the student's steps with the teacher's on a `leading` \
             grid (its `steps_offset` shifts); the teacher's scheduler has another spacing",
        ));
    }
    if teacher.prediction_type != PredictionType::Epsilon {
        return Err(Error::config(
            "scheduler.prediction_type",
            "progressive distillation is implemented for epsilon-predicting teachers",
        ));
    }
    let n = teacher.num_train_timesteps;
    if teacher_steps < 2 || !teacher_steps.is_multiple_of(2) || !n.is_multiple_of(teacher_steps) {
        return Err(Error::config(
            "distill.teacher_steps",
            format!(
                "must be even, at least 2, and divide num_train_timesteps {n}; got {teacher_steps}"
            ),
        ));
    }
    Ok(DdimConfig {
        steps_offset: teacher.steps_offset + n / teacher_steps,
        eta: 0.0,
        ..teacher.clone()
    })
}

/// One deterministic DDIM step (eta = 0) with a different timestep per example: x^_0 from the eps
/// prediction (clipped to `clip` when set), then `sqrt(abar') x^_0 + sqrt(1 - abar') eps`. The
/// same math as [`DdimScheduler::step`] at eta 0 (tested), one (abar, abar') pair per row.
pub fn ddim_step_per_example(
    eps: Tensor<4>,
    z: Tensor<4>,
    alpha_bars: &[(f64, f64)],
    clip: Option<f64>,
) -> Tensor<4> {
    let col = |f: &dyn Fn(f64, f64) -> f64| {
        per_sample(alpha_bars.iter().map(|&(a, p)| f(a, p)).collect(), &z)
    };
    let (signal, sigma) = (col(&|a, _| a.sqrt()), col(&|a, _| (1.0 - a).sqrt()));
    let (signal_end, sigma_end) = (col(&|_, p| p.sqrt()), col(&|_, p| (1.0 - p).sqrt()));
    let mut x0 = (z - eps.clone() * sigma) / signal;
    if let Some(r) = clip {
        x0 = x0.clamp(-r, r);
    }
    x0 * signal_end + eps * sigma_end
}

/// The coefficients of the distillation target x~ = (z'' - k z) / (alpha'' - k alpha), with
/// k = sigma'' / sigma, for a student step from abar to abar_end: returns
/// (1 / (alpha'' - k alpha), k), so that x~ = (z'' - k z) * first.
pub fn target_coefficients(abar: f64, abar_end: f64) -> (f64, f64) {
    let (alpha, sigma) = (abar.sqrt(), (1.0 - abar).sqrt());
    let (alpha_end, sigma_end) = (abar_end.sqrt(), (1.0 - abar_end).sqrt());
    let k = sigma_end / sigma;
    (1.0 / (alpha_end - k * alpha), k)
}

/// The progressive-distillation objective for `train_denoiser` (the module notes): a frozen
/// teacher, its 2N-step DDIM grid, and the student's N steps over it.
pub struct ProgressiveDistillation<'a> {
    teacher: &'a TextToImageModules,
    grid: DdimScheduler,
    clip: Option<f64>,
    guidance: f64,
    empty: Vec<i64>,
}

impl<'a> ProgressiveDistillation<'a> {
    /// `teacher` on the training device (without a graph), its scheduler settings, the stage's
    /// settings and the empty prompt's ids (the unconditional branch of guidance).
    pub fn new(
        teacher: &'a TextToImageModules,
        teacher_scheduler: &DdimConfig,
        settings: &DistillSection,
        empty: Vec<i64>,
    ) -> Result<Self> {
        settings.validate(teacher_scheduler)?;
        let grid = DdimScheduler::new(
            DdimConfig {
                eta: 0.0,
                ..teacher_scheduler.clone()
            },
            settings.teacher_steps,
        )?;
        Ok(Self {
            teacher,
            clip: teacher_scheduler
                .clip_sample
                .then_some(teacher_scheduler.clip_sample_range),
            grid,
            guidance: settings.guidance,
            empty,
        })
    }

    /// The student's number of steps, N.
    pub fn student_steps(&self) -> usize {
        self.grid.timesteps().len() / 2
    }

    /// The teacher's guided eps prediction at per-example timesteps `t`.
    fn teacher_eps(
        &self,
        z: Tensor<4>,
        t: &[f64],
        cond: Tensor<3>,
        uncond: Tensor<3>,
    ) -> Tensor<4> {
        let device = z.device();
        let b = t.len();
        let tt = |n: usize| {
            let v: Vec<f32> = t.iter().cycle().take(n).map(|&v| v as f32).collect();
            Tensor::<1>::from_data(TensorData::new(v, [n]), &device)
        };
        if self.guidance == 1.0 {
            return self.teacher.unet.forward(z, tt(b), cond);
        }
        let both = self.teacher.unet.forward(
            Tensor::cat(vec![z.clone(), z], 0),
            tt(2 * b),
            Tensor::cat(vec![cond, uncond], 0),
        );
        let c = both.clone().narrow(0, 0, b);
        let u = both.narrow(0, b, b);
        u.clone() + (c - u) * self.guidance
    }
}

impl Objective for ProgressiveDistillation<'_> {
    fn regression(
        &self,
        x0: Tensor<4>,
        ids: &[Vec<i64>],
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Regression> {
        let shape = x0.dims();
        let b = shape[0];
        // The student step of each example, then its noise: all from the one stream.
        let steps: Vec<usize> = (0..b).map(|_| rng.below(self.student_steps())).collect();
        let noise = rng.normal(shape, device);
        let grid = &self.grid;
        let at = |i: usize| -> Result<(f64, f64)> { grid.step_alpha_bars(i) };
        let first: Vec<(f64, f64)> = steps.iter().map(|&k| at(2 * k)).collect::<Result<_>>()?;
        let second: Vec<(f64, f64)> = steps
            .iter()
            .map(|&k| at(2 * k + 1))
            .collect::<Result<_>>()?;
        let t0: Vec<f64> = steps.iter().map(|&k| grid.timesteps()[2 * k]).collect();
        let t1: Vec<f64> = steps.iter().map(|&k| grid.timesteps()[2 * k + 1]).collect();
        let abar: Vec<f64> = first.iter().map(|p| p.0).collect();
        let signal = per_sample(abar.iter().map(|a| a.sqrt()).collect(), &x0);
        let sigma = per_sample(abar.iter().map(|a| (1.0 - a).sqrt()).collect(), &x0);
        let z = x0 * signal.clone() + noise * sigma.clone();

        // The teacher's two guided DDIM steps, without a graph.
        let cond = self
            .teacher
            .text_encoder
            .forward_ids(ids, device)?
            .last_hidden_state;
        let uncond = self
            .teacher
            .text_encoder
            .forward_ids(&vec![self.empty.clone(); b], device)?
            .last_hidden_state;
        let eps = self.teacher_eps(z.clone(), &t0, cond.clone(), uncond.clone());
        let mid = ddim_step_per_example(eps, z.clone(), &first, self.clip);
        let eps = self.teacher_eps(mid.clone(), &t1, cond, uncond);
        let end = ddim_step_per_example(eps, mid, &second, self.clip);

        // x~ from the teacher's end point, then the student's eps target and weights.
        let (scale, k): (Vec<f64>, Vec<f64>) = first
            .iter()
            .zip(&second)
            .map(|(f, s)| target_coefficients(f.0, s.1))
            .unzip();
        let x_target = (end - z.clone() * per_sample(k, &z)) * per_sample(scale, &z);
        let target = (z.clone() - x_target * signal) / sigma;
        // max(SNR, 1) on the x error is max(1, 1 / SNR) on the eps error.
        let weights = abar.iter().map(|a| ((1.0 - a) / a).max(1.0)).collect();
        Ok(Regression {
            timesteps: t0,
            x_t: z,
            target,
            weights: Some(weights),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine() -> DdimConfig {
        DdimConfig {
            beta_schedule: tiller_diffusion::schedulers::BetaSchedule::SquaredcosCapV2,
            steps_offset: 1,
            set_alpha_to_one: false,
            ..Default::default()
        }
    }

    #[test]
    fn the_student_grid_is_every_other_teacher_step() {
        for (teacher_steps, offset) in [(8, 1), (4, 126), (2, 376)] {
            let t = DdimConfig {
                steps_offset: offset,
                ..cosine()
            };
            let teacher = DdimScheduler::new(t.clone(), teacher_steps).unwrap();
            let s = student_scheduler(&t, teacher_steps).unwrap();
            let student = DdimScheduler::new(s, teacher_steps / 2).unwrap();
            for k in 0..teacher_steps / 2 {
                assert_eq!(student.timesteps()[k], teacher.timesteps()[2 * k]);
                assert_eq!(
                    student.previous_timestep(k),
                    teacher.previous_timestep(2 * k + 1)
                );
                let (a, end) = student.step_alpha_bars(k).unwrap();
                assert_eq!(a, teacher.step_alpha_bars(2 * k).unwrap().0);
                assert_eq!(end, teacher.step_alpha_bars(2 * k + 1).unwrap().1);
            }
        }
        // 8 -> 4 -> 2 -> 1 from the testbed base's offset 1: 876, 626, 376, 126 then 876, 376.
        let s = student_scheduler(&cosine(), 8).unwrap();
        assert_eq!(s.steps_offset, 126);
        assert_eq!(
            DdimScheduler::new(s, 4).unwrap().timesteps(),
            &[876.0, 626.0, 376.0, 126.0]
        );
    }

    #[test]
    fn settings_that_rule_distillation_out_are_named() {
        let e = student_scheduler(&cosine(), 6).unwrap_err().to_string();
        assert!(e.contains("distill.teacher_steps"), "{e}");
        let trailing = DdimConfig {
            timestep_spacing: TimestepSpacing::Trailing,
            ..cosine()
        };
        let e = student_scheduler(&trailing, 8).unwrap_err().to_string();
        assert!(e.contains("timestep_spacing"), "{e}");
        let v = DdimConfig {
            prediction_type: PredictionType::VPrediction,
            ..cosine()
        };
        let e = student_scheduler(&v, 8).unwrap_err().to_string();
        assert!(e.contains("prediction_type"), "{e}");
    }

    #[test]
    fn the_per_example_step_is_the_schedulers_step() {
        let device = Device::default();
        let mut rng = SeededRng::new(4);
        let ddim = DdimScheduler::new(cosine(), 8).unwrap();
        let (z, eps) = (
            rng.normal([3, 2, 4, 4], &device),
            rng.normal([3, 2, 4, 4], &device),
        );
        for i in [0usize, 3, 7] {
            let want = ddim
                .step(eps.clone(), i, z.clone())
                .unwrap()
                .distribution
                .mean;
            let ab = ddim.step_alpha_bars(i).unwrap();
            let got = ddim_step_per_example(eps.clone(), z.clone(), &[ab; 3], Some(1.0));
            let d = (want - got).abs().max().into_scalar::<f64>();
            assert!(d < 1e-5, "step {i}: {d}");
        }
    }

    #[test]
    fn one_student_step_to_the_target_lands_on_the_teachers_end() {
        // x~ is the clean image whose DDIM step from z_t lands on z_t'': check it by hand with
        // scalars, for the first and the last of the testbed base's 4-step student steps.
        for (abar, abar_end) in [(0.0368, 0.4129), (0.9568, 0.99996)] {
            let (z, z_end) = (0.7f64, -0.3f64);
            let (scale, k) = target_coefficients(abar, abar_end);
            let x = (z_end - k * z) * scale;
            let eps = (z - abar.sqrt() * x) / (1.0 - abar).sqrt();
            let landed = abar_end.sqrt() * x + (1.0 - abar_end).sqrt() * eps;
            assert!((landed - z_end).abs() < 1e-12, "{landed} vs {z_end}");
        }
    }
}
