//! The step Gaussian: hand-derived values, and f64 finite-difference checks of every gradient the
//! RL losses take (log-prob and KL w.r.t. means, stds and x; log-prob through a scheduler step
//! w.r.t. the model output).

use burn::tensor::{Device, Tensor};
use tiller_diffusion::schedulers::{DdimConfig, DdpmConfig, FlowMatchConfig, FlowSde};
use tiller_diffusion::{Gaussian, LogProbReduction, SchedulerConfig};
use tiller_testkit::{assert_close, assert_gradient_matches, tensor_f32, tensor_f64, to_vec_f64};

/// log sqrt(2π).
const LOG_SQRT_2PI: f64 = 0.918_938_533_204_672_8;
/// [B, C, H, W] of the gradient checks: small, so finite differences stay cheap.
const SHAPE: [usize; 4] = [2, 1, 2, 2];
/// C·H·W.
const D: usize = 4;
/// Per-sample weights of the scalar objective Σ_b w_b f_b, unequal so that a gradient routed to
/// the wrong sample shows.
const WEIGHTS: [f64; 2] = [0.7, -1.3];

fn reductions() -> [(LogProbReduction, f64); 2] {
    // The factor by which the reduction scales each element's contribution.
    [
        (LogProbReduction::Mean, 1.0 / D as f64),
        (LogProbReduction::Sum, 1.0),
    ]
}

// ------------------------------------------------------------------------------------------------
// Hand-derived values
// ------------------------------------------------------------------------------------------------

#[test]
fn log_prob_of_a_point_one_std_away() {
    // μ = 0, σ = 2, x = 2 everywhere: each element is -(2²)/(2·2²) - ln 2 - ln sqrt(2π)
    // = -0.5 - ln 2 - ln sqrt(2π); the mean over elements is the same, the sum is D times it.
    let device = Device::flex();
    let g = Gaussian::with_scalar_std(tensor_f32(&[0.0; 8], SHAPE, &device), 2.0);
    let x = tensor_f32(&[2.0; 8], SHAPE, &device);
    let per_element = -0.5 - 2f64.ln() - LOG_SQRT_2PI;
    let mean = g.log_prob(x.clone(), LogProbReduction::Mean).unwrap();
    assert_close(&mean, [per_element; 2], 1e-6, 1e-6);
    let sum = g.log_prob(x, LogProbReduction::Sum).unwrap();
    assert_close(&sum, [D as f64 * per_element; 2], 1e-6, 1e-6);
}

#[test]
fn kl_of_two_known_gaussians() {
    // KL(N(0, 1) || N(1, 2²)) per element = ln(2/1) + (1² + (0 - 1)²)/(2·2²) - 1/2 = ln 2 - 1/4.
    let device = Device::flex();
    let p = Gaussian::with_scalar_std(tensor_f32(&[0.0; 8], SHAPE, &device), 1.0);
    let q = Gaussian::with_scalar_std(tensor_f32(&[1.0; 8], SHAPE, &device), 2.0);
    let per_element = 2f64.ln() - 0.25;
    assert_close(
        p.kl(&q, LogProbReduction::Mean).unwrap(),
        [per_element; 2],
        1e-6,
        1e-6,
    );
    assert_close(
        p.kl(&q, LogProbReduction::Sum).unwrap(),
        [D as f64 * per_element; 2],
        1e-6,
        1e-6,
    );
    // KL(p || p) = ln 1 + (1 + 0)/2 - 1/2 = 0.
    assert_close(
        p.kl(&p, LogProbReduction::Sum).unwrap(),
        [0.0; 2],
        0.0,
        1e-7,
    );
}

#[test]
fn kl_with_equal_stds_is_flow_grpos_squared_mean_gap() {
    // σ_p = σ_q = σ: KL = (μ_p - μ_q)² / (2σ²) per element. μ gap 0.3, σ = 0.5: 0.09 / 0.5 = 0.18.
    let device = Device::flex();
    let p = Gaussian::with_scalar_std(tensor_f32(&[0.3; 8], SHAPE, &device), 0.5);
    let q = Gaussian::with_scalar_std(tensor_f32(&[0.0; 8], SHAPE, &device), 0.5);
    assert_close(
        p.kl(&q, LogProbReduction::Mean).unwrap(),
        [0.18; 2],
        1e-6,
        1e-7,
    );
}

#[test]
fn sample_is_mean_plus_std_times_noise_per_sample() {
    // Sample 0 has σ = 1, sample 1 has σ = 3: x = μ + σ_b z.
    let device = Device::flex();
    let mean = tensor_f32(&[1.0; 8], SHAPE, &device);
    let std = tensor_f32(&[1.0, 3.0], [2, 1, 1, 1], &device);
    let g = Gaussian { mean, std };
    let z = tensor_f32(&[0.5; 8], SHAPE, &device);
    assert_close(
        g.sample(z),
        [1.5, 1.5, 1.5, 1.5, 2.5, 2.5, 2.5, 2.5],
        0.0,
        1e-7,
    );
    assert!(!g.is_deterministic());
}

#[test]
fn a_deterministic_step_has_no_density_and_ignores_noise() {
    let device = Device::flex();
    let g = Gaussian::deterministic(tensor_f32(&[0.25; 8], SHAPE, &device));
    assert!(g.is_deterministic());
    assert_close(
        g.sample(tensor_f32(&[9.0; 8], SHAPE, &device)),
        [0.25; 8],
        0.0,
        0.0,
    );
    let x = tensor_f32(&[0.25; 8], SHAPE, &device);
    let e = g
        .log_prob(x, LogProbReduction::Mean)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no density") && e.contains("eta"), "{e}");
    let other = Gaussian::with_scalar_std(tensor_f32(&[0.0; 8], SHAPE, &device), 1.0);
    assert!(g.kl(&other, LogProbReduction::Mean).is_err());
    assert!(other.kl(&g, LogProbReduction::Mean).is_err());
}

#[test]
fn one_zero_std_in_the_batch_is_already_an_error() {
    let device = Device::flex();
    let g = Gaussian {
        mean: tensor_f32(&[0.0; 8], SHAPE, &device),
        std: tensor_f32(&[1.0, 0.0], [2, 1, 1, 1], &device),
    };
    assert!(!g.is_deterministic());
    assert!(
        g.log_prob(tensor_f32(&[0.0; 8], SHAPE, &device), LogProbReduction::Sum)
            .is_err()
    );
}

#[test]
fn shape_mistakes_are_errors() {
    let device = Device::flex();
    let g = Gaussian::with_scalar_std(tensor_f32(&[0.0; 8], SHAPE, &device), 1.0);
    let e = g
        .log_prob(
            tensor_f32(&[0.0; 4], [1, 1, 2, 2], &device),
            LogProbReduction::Sum,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("[1, 1, 2, 2]"), "{e}");
    let bad_std = Gaussian {
        mean: tensor_f32(&[0.0; 8], SHAPE, &device),
        std: tensor_f32(&[1.0; 8], SHAPE, &device),
    };
    let e = bad_std
        .log_prob(tensor_f32(&[0.0; 8], SHAPE, &device), LogProbReduction::Sum)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[B, 1, 1, 1]"), "{e}");
}

// ------------------------------------------------------------------------------------------------
// f64 finite-difference checks
// ------------------------------------------------------------------------------------------------

/// Σ_b w_b values_b, as an f64.
fn weighted_sum(values: Tensor<1>) -> f64 {
    to_vec_f64(&values)
        .iter()
        .zip(WEIGHTS)
        .map(|(v, w)| v * w)
        .sum()
}

/// The same as a differentiable scalar tensor.
fn weighted_sum_tensor(values: Tensor<1>) -> Tensor<1> {
    let w = tensor_f64(&WEIGHTS, [2], &values.device());
    (values * w).sum()
}

fn grad_of<const N: usize>(t: &Tensor<N>, grads: &burn::tensor::Gradients) -> Vec<f64> {
    to_vec_f64(&t.grad(grads).expect("tensor is in the graph"))
}

/// Fixed, unequal test values.
fn values(n: usize, phase: f64, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|i| scale * (1.3 * i as f64 + phase).sin())
        .collect()
}

/// L = Σ_b w_b log π_b(x), where per element
///   log N(x; μ, σ²) = -(x - μ)²/(2σ²) - log σ - log sqrt(2π),
/// so, with c = 1/D for the mean reduction and 1 for the sum:
///   ∂L/∂μ = w_b c (x - μ)/σ²,   ∂L/∂x = -w_b c (x - μ)/σ²,
///   ∂L/∂σ_b = w_b c Σ_elements [(x - μ)²/σ³ - 1/σ].
#[test]
fn log_prob_gradients_match_the_derivation_and_finite_differences() {
    let (mean, x, std) = (values(8, 0.1, 1.0), values(8, 2.0, 1.5), vec![0.6, 1.7]);
    for (reduction, c) in reductions() {
        // Autodiff, in f64.
        let ad = Device::flex().autodiff();
        let (mean_t, x_t, std_t) = (
            tensor_f64(&mean, SHAPE, &ad).require_grad(),
            tensor_f64(&x, SHAPE, &ad).require_grad(),
            tensor_f64(&std, [2, 1, 1, 1], &ad).require_grad(),
        );
        let g = Gaussian {
            mean: mean_t.clone(),
            std: std_t.clone(),
        };
        let grads = weighted_sum_tensor(g.log_prob(x_t.clone(), reduction).unwrap()).backward();
        let (d_mean, d_x, d_std) = (
            grad_of(&mean_t, &grads),
            grad_of(&x_t, &grads),
            grad_of(&std_t, &grads),
        );

        // The derivation above.
        let sample_of = |i: usize| i / D;
        let analytic_mean: Vec<f64> = (0..8)
            .map(|i| WEIGHTS[sample_of(i)] * c * (x[i] - mean[i]) / std[sample_of(i)].powi(2))
            .collect();
        let analytic_x: Vec<f64> = analytic_mean.iter().map(|v| -v).collect();
        let analytic_std: Vec<f64> = (0..2)
            .map(|b| {
                let s = std[b];
                let inner: f64 = (b * D..(b + 1) * D)
                    .map(|i| (x[i] - mean[i]).powi(2) / s.powi(3) - 1.0 / s)
                    .sum();
                WEIGHTS[b] * c * inner
            })
            .collect();
        assert_close(&d_mean, &analytic_mean, 1e-10, 1e-12);
        assert_close(&d_x, &analytic_x, 1e-10, 1e-12);
        assert_close(&d_std, &analytic_std, 1e-10, 1e-12);

        // Finite differences of the plain (non-autodiff) f64 computation.
        let cpu = Device::flex();
        let objective = |m: &[f64], x: &[f64], s: &[f64]| {
            let g = Gaussian {
                mean: tensor_f64(m, SHAPE, &cpu),
                std: tensor_f64(s, [2, 1, 1, 1], &cpu),
            };
            weighted_sum(g.log_prob(tensor_f64(x, SHAPE, &cpu), reduction).unwrap())
        };
        assert_gradient_matches(
            "log_prob w.r.t. mean",
            |m| objective(m, &x, &std),
            &mean,
            &d_mean,
            1e-6,
            1e-8,
        );
        assert_gradient_matches(
            "log_prob w.r.t. x",
            |v| objective(&mean, v, &std),
            &x,
            &d_x,
            1e-6,
            1e-8,
        );
        assert_gradient_matches(
            "log_prob w.r.t. std",
            |s| objective(&mean, &x, s),
            &std,
            &d_std,
            1e-6,
            1e-8,
        );
    }
}

/// L = Σ_b w_b KL(p || q)_b, where per element
///   KL = log σ_q - log σ_p + (σ_p² + (μ_p - μ_q)²)/(2σ_q²) - 1/2,
/// so, with c as above:
///   ∂L/∂μ_p = w_b c (μ_p - μ_q)/σ_q²,   ∂L/∂μ_q = -∂L/∂μ_p,
///   ∂L/∂σ_p = w_b c Σ_elements (-1/σ_p + σ_p/σ_q²),
///   ∂L/∂σ_q = w_b c Σ_elements (1/σ_q - (σ_p² + (μ_p - μ_q)²)/σ_q³).
#[test]
fn kl_gradients_match_the_derivation_and_finite_differences() {
    let (mp, mq) = (values(8, 0.3, 1.0), values(8, 1.1, 0.8));
    let (sp, sq) = (vec![0.5, 1.2], vec![0.9, 0.7]);
    for (reduction, c) in reductions() {
        let ad = Device::flex().autodiff();
        let (mp_t, mq_t, sp_t, sq_t) = (
            tensor_f64(&mp, SHAPE, &ad).require_grad(),
            tensor_f64(&mq, SHAPE, &ad).require_grad(),
            tensor_f64(&sp, [2, 1, 1, 1], &ad).require_grad(),
            tensor_f64(&sq, [2, 1, 1, 1], &ad).require_grad(),
        );
        let p = Gaussian {
            mean: mp_t.clone(),
            std: sp_t.clone(),
        };
        let q = Gaussian {
            mean: mq_t.clone(),
            std: sq_t.clone(),
        };
        let grads = weighted_sum_tensor(p.kl(&q, reduction).unwrap()).backward();
        let d = [
            grad_of(&mp_t, &grads),
            grad_of(&mq_t, &grads),
            grad_of(&sp_t, &grads),
            grad_of(&sq_t, &grads),
        ];

        let b_of = |i: usize| i / D;
        let d_mp: Vec<f64> = (0..8)
            .map(|i| WEIGHTS[b_of(i)] * c * (mp[i] - mq[i]) / sq[b_of(i)].powi(2))
            .collect();
        let d_mq: Vec<f64> = d_mp.iter().map(|v| -v).collect();
        let per_sample = |f: &dyn Fn(usize, usize) -> f64| -> Vec<f64> {
            (0..2)
                .map(|b| WEIGHTS[b] * c * (b * D..(b + 1) * D).map(|i| f(b, i)).sum::<f64>())
                .collect()
        };
        let d_sp = per_sample(&|b, _| -1.0 / sp[b] + sp[b] / sq[b].powi(2));
        let d_sq = per_sample(&|b, i| {
            1.0 / sq[b] - (sp[b].powi(2) + (mp[i] - mq[i]).powi(2)) / sq[b].powi(3)
        });
        for (ours, analytic) in d.iter().zip([&d_mp, &d_mq, &d_sp, &d_sq]) {
            assert_close(ours, analytic, 1e-10, 1e-12);
        }

        let cpu = Device::flex();
        let kl = |mp: &[f64], mq: &[f64], sp: &[f64], sq: &[f64]| {
            let p = Gaussian {
                mean: tensor_f64(mp, SHAPE, &cpu),
                std: tensor_f64(sp, [2, 1, 1, 1], &cpu),
            };
            let q = Gaussian {
                mean: tensor_f64(mq, SHAPE, &cpu),
                std: tensor_f64(sq, [2, 1, 1, 1], &cpu),
            };
            weighted_sum(p.kl(&q, reduction).unwrap())
        };
        assert_gradient_matches(
            "kl w.r.t. mean_p",
            |v| kl(v, &mq, &sp, &sq),
            &mp,
            &d[0],
            1e-6,
            1e-8,
        );
        assert_gradient_matches(
            "kl w.r.t. mean_q",
            |v| kl(&mp, v, &sp, &sq),
            &mq,
            &d[1],
            1e-6,
            1e-8,
        );
        assert_gradient_matches(
            "kl w.r.t. std_p",
            |v| kl(&mp, &mq, v, &sq),
            &sp,
            &d[2],
            1e-6,
            1e-8,
        );
        assert_gradient_matches(
            "kl w.r.t. std_q",
            |v| kl(&mp, &mq, &sp, v),
            &sq,
            &d[3],
            1e-6,
            1e-8,
        );
    }
}

/// What policy-gradient methods differentiate: log π(x_fixed | x_t) as a function of the model
/// output, through a scheduler step. For DDIM with ε-prediction the mean is affine in ε̂,
///   μ = sqrt(ᾱ')(x_t - sqrt(1-ᾱ) ε̂)/sqrt(ᾱ) + sqrt(1-ᾱ'-σ²) ε̂,
/// so ∂ log π/∂ε̂ = k (x - μ)/σ² · c with k = sqrt(1-ᾱ'-σ²) - sqrt(ᾱ'(1-ᾱ)/ᾱ); here the check is
/// autodiff against finite differences for each scheduler with a density.
#[test]
fn log_prob_through_a_step_has_the_finite_difference_gradient_wrt_model_output() {
    let configs = [
        (
            "ddim eta 1",
            SchedulerConfig::Ddim(DdimConfig {
                eta: 1.0,
                clip_sample: false,
                ..DdimConfig::default()
            }),
        ),
        (
            "ddpm",
            SchedulerConfig::Ddpm(DdpmConfig {
                clip_sample: false,
                ..DdpmConfig::default()
            }),
        ),
        (
            "flow sde",
            SchedulerConfig::FlowMatch(FlowMatchConfig {
                shift: 3.0,
                sde: Some(FlowSde::default()),
                ..FlowMatchConfig::default()
            }),
        ),
    ];
    let (sample, model_output, x_prev) = (
        values(8, 0.2, 1.0),
        values(8, 0.9, 1.0),
        values(8, 2.5, 0.8),
    );
    for (name, config) in configs {
        let scheduler = config.build(10).unwrap();
        for i in [0, 5] {
            let ad = Device::flex().autodiff();
            let eps = tensor_f64(&model_output, SHAPE, &ad).require_grad();
            let out = scheduler
                .step(eps.clone(), i, tensor_f64(&sample, SHAPE, &ad))
                .unwrap();
            let log_prob = out
                .distribution
                .log_prob(tensor_f64(&x_prev, SHAPE, &ad), LogProbReduction::Mean)
                .unwrap();
            let grads = weighted_sum_tensor(log_prob).backward();
            let d_eps = grad_of(&eps, &grads);

            let cpu = Device::flex();
            let objective = |e: &[f64]| {
                let out = scheduler
                    .step(
                        tensor_f64(e, SHAPE, &cpu),
                        i,
                        tensor_f64(&sample, SHAPE, &cpu),
                    )
                    .unwrap();
                weighted_sum(
                    out.distribution
                        .log_prob(tensor_f64(&x_prev, SHAPE, &cpu), LogProbReduction::Mean)
                        .unwrap(),
                )
            };
            assert_gradient_matches(
                &format!("{name} step {i} log_prob w.r.t. model output"),
                objective,
                &model_output,
                &d_eps,
                1e-5,
                1e-7,
            );
            assert!(
                d_eps.iter().any(|g| g.abs() > 1e-6),
                "{name} step {i}: gradient vanished"
            );
        }
    }
}
