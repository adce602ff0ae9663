//! Scheduler values worked out by hand on tiny schedules, derivations in the comments.
//!
//! The two-step discrete schedule used throughout: N = 2, linear β from 0.1 to 0.5, so
//! β = [0.1, 0.5], ᾱ = [0.9, 0.9 · 0.5] = [0.9, 0.45]; with 2 inference steps and `leading`
//! spacing (N div n = 1) the timesteps are [1, 0].

use burn::tensor::{Device, Tensor};
use tiller_diffusion::schedulers::{
    BetaSchedule, DdimConfig, DdpmConfig, FlowMatchConfig, FlowSde, PredictionType, VarianceType,
    schedule,
};
use tiller_diffusion::{Scheduler, SchedulerConfig};
use tiller_testkit::{assert_close, tensor_f32, to_vec_f64};

const SHAPE: [usize; 4] = [2, 1, 1, 2];

fn constant(value: f64) -> Tensor<4> {
    tensor_f32(&[value; 4], SHAPE, &Device::flex())
}

fn std_of(scheduler: &dyn Scheduler, i: usize) -> f64 {
    let out = scheduler.step(constant(1.0), i, constant(1.0)).unwrap();
    to_vec_f64(&out.distribution.std)[0]
}

fn two_step_ddim(eta: f64, set_alpha_to_one: bool) -> Box<dyn Scheduler> {
    SchedulerConfig::Ddim(DdimConfig {
        num_train_timesteps: 2,
        beta_start: 0.1,
        beta_end: 0.5,
        clip_sample: false,
        set_alpha_to_one,
        eta,
        ..DdimConfig::default()
    })
    .build(2)
    .unwrap()
}

fn two_step_ddpm(
    variance_type: VarianceType,
    prediction_type: PredictionType,
) -> Box<dyn Scheduler> {
    SchedulerConfig::Ddpm(DdpmConfig {
        num_train_timesteps: 2,
        beta_start: 0.1,
        beta_end: 0.5,
        clip_sample: false,
        variance_type,
        prediction_type,
        ..DdpmConfig::default()
    })
    .build(2)
    .unwrap()
}

#[test]
fn ddim_first_step_by_hand() {
    // Step 0: t = 1, t' = 0, ᾱ = 0.45, ᾱ' = 0.9. With x_t = 1 and ε̂ = 1:
    //   x̂_0 = (1 - sqrt(0.55)) / sqrt(0.45)
    //   σ² = η² (1 - 0.9)/(1 - 0.45) · (1 - 0.45/0.9) = η² · (0.1/0.55) · 0.5 = η²/11
    //   μ  = sqrt(0.9) x̂_0 + sqrt(1 - 0.9 - σ²) · 1; with η = 1, 0.1 - 1/11 = 1/110, and
    //        sqrt(0.9)/sqrt(0.45) = sqrt(2), so μ = sqrt(2)(1 - sqrt(0.55)) + sqrt(1/110).
    let s = two_step_ddim(1.0, true);
    assert_eq!(s.timesteps(), &[1.0, 0.0]);
    let out = s.step(constant(1.0), 0, constant(1.0)).unwrap();
    let x0 = (1.0 - 0.55f64.sqrt()) / 0.45f64.sqrt();
    assert_close(&out.pred_original_sample, [x0; 4], 1e-6, 1e-6);
    assert_close(
        &out.distribution.std,
        [(1.0f64 / 11.0).sqrt(); 2],
        1e-6,
        1e-7,
    );
    let mean = 2f64.sqrt() * (1.0 - 0.55f64.sqrt()) + (1.0f64 / 110.0).sqrt();
    assert_close(&out.distribution.mean, [mean; 4], 1e-6, 1e-6);

    // η = 0.5: σ² = 0.25/11 and μ = sqrt(2)(1 - sqrt(0.55)) + sqrt(0.1 - 0.25/11).
    let out = two_step_ddim(0.5, true)
        .step(constant(1.0), 0, constant(1.0))
        .unwrap();
    assert_close(
        &out.distribution.std,
        [(0.25f64 / 11.0).sqrt(); 2],
        1e-6,
        1e-7,
    );
    let mean = 2f64.sqrt() * (1.0 - 0.55f64.sqrt()) + (0.1f64 - 0.25 / 11.0).sqrt();
    assert_close(&out.distribution.mean, [mean; 4], 1e-6, 1e-6);
}

#[test]
fn ddim_last_step_uses_final_alpha_cumprod() {
    // Step 1: t = 0, t' = 0 - 1 < 0, so ᾱ' is 1 (set_alpha_to_one) or ᾱ_0 = 0.9.
    // ᾱ' = 1: σ² = (1 - 1)/(…) · … = 0 whatever η, and μ = x̂_0 = (1 - sqrt(0.1))/sqrt(0.9).
    let out = two_step_ddim(1.0, true)
        .step(constant(1.0), 1, constant(1.0))
        .unwrap();
    assert!(out.distribution.is_deterministic());
    assert_close(
        &out.distribution.mean,
        [(1.0 - 0.1f64.sqrt()) / 0.9f64.sqrt(); 4],
        1e-6,
        1e-6,
    );
    // ᾱ' = ᾱ = 0.9: σ² = (0.1/0.1)(1 - 1) = 0 and μ = sqrt(0.9) x̂_0 + sqrt(0.1) ε̂ = x_t: the
    // step from a timestep to itself is the identity.
    let out = two_step_ddim(1.0, false)
        .step(constant(2.0), 1, constant(1.0))
        .unwrap();
    assert!(out.distribution.is_deterministic());
    assert_close(&out.distribution.mean, [1.0; 4], 1e-6, 1e-6);
}

#[test]
fn ddpm_steps_by_hand() {
    // Step 0: t = 1, t' = 0: α = ᾱ/ᾱ' = 0.5, β = 0.5.
    //   μ = sqrt(0.9)·0.5/0.55 · x̂_0 + sqrt(0.5)·(1 - 0.9)/0.55 · x_t
    //   fixed_small σ² = (0.1/0.55)·0.5 = 1/11 (the same as DDIM with η = 1), fixed_large σ² = β = 0.5.
    // With x_t = 1 and x̂_0 = model output = 0.5 (prediction_type = sample):
    let small = two_step_ddpm(VarianceType::FixedSmall, PredictionType::Sample);
    let out = small.step(constant(0.5), 0, constant(1.0)).unwrap();
    let mean = 0.9f64.sqrt() * 0.5 / 0.55 * 0.5 + 0.5f64.sqrt() * 0.1 / 0.55;
    assert_close(&out.distribution.mean, [mean; 4], 1e-6, 1e-6);
    assert_close(
        &out.distribution.std,
        [(1.0f64 / 11.0).sqrt(); 2],
        1e-6,
        1e-7,
    );
    let large = two_step_ddpm(VarianceType::FixedLarge, PredictionType::Sample);
    assert!((std_of(large.as_ref(), 0) - 0.5f64.sqrt()).abs() < 1e-7);

    // Step 1: t = 0, after it ᾱ' = 1: α = 0.9, β = 0.1, μ = 1·0.1/0.1 · x̂_0 + sqrt(0.9)·0/0.1 · x_t
    // = x̂_0, and t = 0 adds no noise for either variance type.
    let out = small.step(constant(0.5), 1, constant(1.0)).unwrap();
    assert_close(&out.distribution.mean, [0.5; 4], 1e-6, 1e-6);
    assert!(out.distribution.is_deterministic());
    assert_eq!(std_of(large.as_ref(), 1), 0.0);
}

#[test]
fn ddpm_last_step_above_timestep_zero_still_adds_noise() {
    // diffusers adds noise whenever the timestep value is > 0. Trailing spacing with N = 1000 and
    // 10 steps ends at t = 99; the following ᾱ is 1, so β̃ = 0 and fixed_small floors σ² at 1e-20
    // (σ = 1e-10), while fixed_large uses σ² = β = 1 - ᾱ_99.
    let build = |variance_type| {
        SchedulerConfig::Ddpm(DdpmConfig {
            timestep_spacing: schedule::TimestepSpacing::Trailing,
            variance_type,
            ..DdpmConfig::default()
        })
        .build(10)
        .unwrap()
    };
    let small = build(VarianceType::FixedSmall);
    assert_eq!(small.timesteps()[9], 99.0);
    assert!((std_of(small.as_ref(), 9) - 1e-10).abs() < 1e-15);
    let alpha_bar_99 =
        schedule::cumulative_alphas(&schedule::betas(BetaSchedule::Linear, 1e-4, 0.02, 1000))[99];
    let large = build(VarianceType::FixedLarge);
    assert!((std_of(large.as_ref(), 9) - (1.0 - alpha_bar_99).sqrt()).abs() < 1e-6);
}

#[test]
fn forward_process_and_targets_by_hand() {
    // At t = 1 (ᾱ = 0.45) with x_0 = 1 and ε = 1:
    //   x_t = sqrt(0.45) + sqrt(0.55);  ε-target 1;  v-target sqrt(0.45)·1 - sqrt(0.55)·1;  x_0-target 1.
    // Sample 1 is at t = 0 (ᾱ = 0.9): x_t = sqrt(0.9) + sqrt(0.1), v = sqrt(0.9) - sqrt(0.1).
    let ts = [1.0, 0.0];
    let expected_noisy = [
        0.45f64.sqrt() + 0.55f64.sqrt(),
        0.9f64.sqrt() + 0.1f64.sqrt(),
    ];
    let expected_v = [
        0.45f64.sqrt() - 0.55f64.sqrt(),
        0.9f64.sqrt() - 0.1f64.sqrt(),
    ];
    for (prediction_type, target) in [
        (PredictionType::Epsilon, [1.0, 1.0]),
        (PredictionType::VPrediction, expected_v),
        (PredictionType::Sample, [1.0, 1.0]),
    ] {
        let s = two_step_ddpm(VarianceType::FixedSmall, prediction_type);
        let noisy = s.add_noise(constant(1.0), constant(1.0), &ts).unwrap();
        let per_sample = |v: [f64; 2]| [v[0], v[0], v[1], v[1]];
        assert_close(&noisy, per_sample(expected_noisy), 1e-6, 1e-6);
        let t = s
            .training_target(constant(1.0), constant(1.0), &ts)
            .unwrap();
        assert_close(&t, per_sample(target), 1e-6, 1e-6);
    }
    // Timesteps must be integers below N.
    let s = two_step_ddpm(VarianceType::FixedSmall, PredictionType::Epsilon);
    assert!(
        s.add_noise(constant(1.0), constant(1.0), &[0.5, 0.0])
            .is_err()
    );
    assert!(
        s.add_noise(constant(1.0), constant(1.0), &[2.0, 0.0])
            .is_err()
    );
}

#[test]
fn clipping_clamps_the_predicted_original() {
    // prediction_type = sample with model output 3: x̂_0 = 3, clamped to clip_sample_range = 0.5.
    let s = SchedulerConfig::Ddim(DdimConfig {
        num_train_timesteps: 2,
        beta_start: 0.1,
        beta_end: 0.5,
        prediction_type: PredictionType::Sample,
        clip_sample: true,
        clip_sample_range: 0.5,
        ..DdimConfig::default()
    })
    .build(2)
    .unwrap();
    let out = s.step(constant(3.0), 0, constant(1.0)).unwrap();
    assert_close(&out.pred_original_sample, [0.5; 4], 0.0, 1e-7);
}

#[test]
fn cosine_schedule_caps_beta() {
    // N = 2: ᾱ(t) = cos²((t + 0.008)/1.008 · π/2); β_0 = 1 - ᾱ(0.5)/ᾱ(0), and ᾱ(1) = cos²(π/2) = 0
    // so β_1 = min(1 - 0, 0.999) = 0.999.
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    let b = schedule::betas(BetaSchedule::SquaredcosCapV2, 0.0, 0.0, 2);
    assert!((b[0] - (1.0 - alpha_bar(0.5) / alpha_bar(0.0))).abs() < 1e-15);
    assert_eq!(b[1], 0.999);
    // Scaled linear squares a linspace of square roots: the midpoint of 3 is ((0.1 + 0.3)/2)² = 0.04.
    let b = schedule::betas(BetaSchedule::ScaledLinear, 0.01, 0.09, 3);
    assert_close(b, [0.01, 0.04, 0.09], 1e-14, 1e-15);
}

#[test]
fn flow_timesteps_are_shifted_twice_like_diffusers() {
    // shift s = 3, N = 4, n = 3. shift(σ) = 3σ/(1 + 2σ): σ_max = shift(1) = 1,
    // σ_min = shift(1/4) = 0.75/1.5 = 0.5. linspace(4, 2, 3) = [4, 3, 2], /4 = [1, 0.75, 0.5],
    // shifted again: [1, 2.25/2.5, 1.5/2] = [1, 0.9, 0.75]; timesteps ×4 = [4, 3.6, 3].
    let s = SchedulerConfig::FlowMatch(FlowMatchConfig {
        num_train_timesteps: 4,
        shift: 3.0,
        sde: None,
    })
    .build(3)
    .unwrap();
    assert_close(s.timesteps(), [4.0, 3.6, 3.0], 1e-14, 1e-14);
}

#[test]
fn flow_steps_by_hand() {
    // shift 1, N = 1000, n = 2: linspace(1000, 1, 2) = [1000, 1], σ = [1, 0.001, 0].
    let build = |sde| {
        SchedulerConfig::FlowMatch(FlowMatchConfig {
            sde,
            ..FlowMatchConfig::default()
        })
        .build(2)
        .unwrap()
    };
    let (x, v) = (constant(1.0), constant(0.5));

    // ODE step 0: dt = 0.001 - 1 = -0.999, x' = x - 0.999 v = 1 - 0.4995; x̂_0 = x - 1·v = 0.5.
    let ode = build(None);
    let out = ode.step(v.clone(), 0, x.clone()).unwrap();
    assert!(out.distribution.is_deterministic());
    assert_close(&out.distribution.mean, [0.5005; 4], 1e-6, 1e-6);
    assert_close(&out.pred_original_sample, [0.5; 4], 1e-6, 1e-6);

    // SDE (a = 0.7) step 0: σ = 1, so the ratio uses σ_1 = 0.001: σ_t = 0.7 sqrt(1/0.999) and
    // std = σ_t sqrt(0.999) = 0.7 exactly. μ = x(1 + σ_t²/2 · dt) + v(1 + 0) dt
    // = x(1 - 0.49/(2·0.999)·0.999) - 0.999 v = 0.755 x - 0.999 v.
    let sde = build(Some(FlowSde { noise_level: 0.7 }));
    let out = sde.step(v.clone(), 0, x.clone()).unwrap();
    assert_close(&out.distribution.std, [0.7; 2], 1e-6, 1e-7);
    assert_close(&out.distribution.mean, [0.755 - 0.999 * 0.5; 4], 1e-6, 1e-6);

    // SDE step 1: σ = 0.001, dt = -0.001, σ_t² = 0.49 · 0.001/0.999.
    //   std = σ_t sqrt(0.001) = 0.7 · 0.001 / sqrt(0.999)
    //   μ = x (1 - σ_t²/(2·0.001) · 0.001) - 0.001 v (1 + σ_t² · 0.999/(2·0.001))
    //     = x (1 - 0.245 · 0.001/0.999) - 0.001 v (1 + 0.245)
    let out = sde.step(v, 1, x).unwrap();
    assert_close(
        &out.distribution.std,
        [0.7 * 0.001 / 0.999f64.sqrt(); 2],
        1e-6,
        1e-9,
    );
    let mean = (1.0 - 0.245 * 0.001 / 0.999) - 0.001 * 0.5 * 1.245;
    assert_close(&out.distribution.mean, [mean; 4], 1e-6, 1e-7);
}

#[test]
fn flow_forward_process_by_hand() {
    // x_σ = σ ε + (1 - σ) x_0 with σ = t/N: t = 250 → 0.25 · 2 + 0.75 · 1 = 1.25; t = 1000 → ε = 2.
    // The target is ε - x_0 = 1 at any t.
    let s = SchedulerConfig::FlowMatch(FlowMatchConfig::default())
        .build(4)
        .unwrap();
    let noisy = s
        .add_noise(constant(1.0), constant(2.0), &[250.0, 1000.0])
        .unwrap();
    assert_close(&noisy, [1.25, 1.25, 2.0, 2.0], 1e-6, 1e-6);
    let target = s
        .training_target(constant(1.0), constant(2.0), &[250.0, 1000.0])
        .unwrap();
    assert_close(&target, [1.0; 4], 1e-6, 1e-6);
    assert!(
        s.add_noise(constant(1.0), constant(2.0), &[250.0, 1000.5])
            .is_err()
    );
}
