//! Every scheduler against diffusers' goldens, and the conformance suite every scheduler passes.
//!
//! Goldens: `tests/fixtures/schedulers/{ddim,ddpm,flow_match}*.json`, made by
//! `scripts/fixtures/schedulers.py` (its docstring says what each field is). All comparisons are
//! |ours - theirs| <= 1e-5 + 1e-5 |theirs|. Both sides compute the DDPM/DDIM noise schedule in
//! f64 and the tensors in float32 (the script runs diffusers' step code on a float64 schedule and
//! checks that against diffusers' float32 one); flow goldens use diffusers' float32 sigmas as is.

use burn::tensor::{Device, Tensor};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tiller_diffusion::schedulers::{
    BetaSchedule, DdimConfig, DdpmConfig, FlowMatchConfig, FlowSde, PredictionType,
    TimestepSpacing, VarianceType,
};
use tiller_diffusion::{LogProbReduction, Scheduler, SchedulerConfig, StepOutput};
use tiller_testkit::{check_close, fixture_files, load_json, tensor_f32, to_vec_f64};

const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-5;

// ------------------------------------------------------------------------------------------------
// Golden fixtures
// ------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Fixture {
    header: Header,
    inputs: Inputs,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Header {
    generated_by: String,
    shape: [usize; 4],
}

#[derive(Deserialize)]
struct Inputs {
    sample: Vec<f64>,
    model_output: Vec<f64>,
    noise: Vec<f64>,
    original: Vec<f64>,
    other: Vec<f64>,
    /// [L, B, C, H, W]; step i of the loop uses entry i mod L.
    loop_noise: Vec<f64>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: SchedulerConfig,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    steps: Vec<StepGolden>,
    add_noise: Vec<AddNoiseGolden>,
    full_loop: Vec<f64>,
}

#[derive(Deserialize)]
struct StepGolden {
    index: usize,
    prev_sample_mean: Vec<f64>,
    std: f64,
    pred_original_sample: Vec<f64>,
    prev_sample: Vec<f64>,
    /// ddpo-pytorch's log-prob of prev_sample; null where the step is deterministic.
    log_prob: Option<Vec<f64>>,
    /// The same of `inputs.other`, an x unrelated to the step.
    log_prob_other: Option<Vec<f64>>,
}

#[derive(Deserialize)]
struct AddNoiseGolden {
    timesteps: Vec<f64>,
    noisy: Vec<f64>,
    target: Vec<f64>,
}

/// Tensors of one fixture's inputs.
struct Tensors {
    shape: [usize; 4],
    sample: Tensor<4>,
    model_output: Tensor<4>,
    noise: Tensor<4>,
    original: Tensor<4>,
    other: Tensor<4>,
    loop_noise: Vec<Tensor<4>>,
}

impl Tensors {
    fn new(fixture: &Fixture, device: &Device) -> Self {
        let shape = fixture.header.shape;
        let t = |v: &[f64]| tensor_f32(v, shape, device);
        let numel: usize = shape.iter().product();
        let inputs = &fixture.inputs;
        Self {
            shape,
            sample: t(&inputs.sample),
            model_output: t(&inputs.model_output),
            noise: t(&inputs.noise),
            original: t(&inputs.original),
            other: t(&inputs.other),
            loop_noise: inputs.loop_noise.chunks(numel).map(t).collect(),
        }
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures/schedulers")
}

/// The fixed stand-in network of the golden loops: 0.5 x + 0.1 inputs.model_output.
fn loop_model(x: &Tensor<4>, tensors: &Tensors) -> Tensor<4> {
    x.clone() * 0.5 + tensors.model_output.clone() * 0.1
}

/// Compares one case with its golden, returning every mismatch found.
fn check_case(case: &Case, tensors: &Tensors) -> Vec<String> {
    let mut failures = Vec::new();
    let mut expect = |what: &str, actual: &[f64], expected: &[f64]| {
        if let Err(message) = check_close(actual, expected, RTOL, ATOL) {
            failures.push(format!("{}: {what}: {message}", case.name));
        }
    };
    let mut deterministic_but_scored = Vec::new();
    let scheduler = match case.config.build(case.num_inference_steps) {
        Ok(s) => s,
        Err(e) => return vec![format!("{}: build failed: {e}", case.name)],
    };
    expect("timesteps", scheduler.timesteps(), &case.timesteps);

    for golden in &case.steps {
        let what = |field: &str| format!("step {} {field}", golden.index);
        let out = scheduler
            .step(
                tensors.model_output.clone(),
                golden.index,
                tensors.sample.clone(),
            )
            .expect("step");
        let std = to_vec_f64(&out.distribution.std);
        expect(&what("std"), &std, &vec![golden.std; std.len()]);
        expect(
            &what("prev_sample_mean"),
            &to_vec_f64(&out.distribution.mean),
            &golden.prev_sample_mean,
        );
        expect(
            &what("pred_original_sample"),
            &to_vec_f64(&out.pred_original_sample),
            &golden.pred_original_sample,
        );
        let prev_sample = out.sample(tensors.noise.clone());
        expect(
            &what("prev_sample"),
            &to_vec_f64(&prev_sample),
            &golden.prev_sample,
        );

        match (&golden.log_prob, &golden.log_prob_other) {
            (Some(log_prob), Some(log_prob_other)) => {
                let ours = out
                    .distribution
                    .log_prob(prev_sample, LogProbReduction::Mean)
                    .expect("log_prob of a stochastic step");
                expect(&what("log_prob"), &to_vec_f64(&ours), log_prob);
                let ours = out
                    .distribution
                    .log_prob(tensors.other.clone(), LogProbReduction::Mean)
                    .expect("log_prob of a stochastic step");
                expect(&what("log_prob_other"), &to_vec_f64(&ours), log_prob_other);
            }
            _ => {
                if out
                    .distribution
                    .log_prob(prev_sample, LogProbReduction::Mean)
                    .is_ok()
                {
                    deterministic_but_scored.push(format!(
                        "{}: {}: deterministic step has a log_prob",
                        case.name,
                        what("log_prob")
                    ));
                }
            }
        }
    }

    for golden in &case.add_noise {
        let what = format!("timesteps {:?}", golden.timesteps);
        let noisy = scheduler
            .add_noise(
                tensors.original.clone(),
                tensors.noise.clone(),
                &golden.timesteps,
            )
            .expect("add_noise");
        expect(
            &format!("add_noise at {what}"),
            &to_vec_f64(&noisy),
            &golden.noisy,
        );
        let target = scheduler
            .training_target(
                tensors.original.clone(),
                tensors.noise.clone(),
                &golden.timesteps,
            )
            .expect("training_target");
        expect(
            &format!("training_target at {what}"),
            &to_vec_f64(&target),
            &golden.target,
        );
    }

    let mut x = tensors.sample.clone();
    for i in 0..scheduler.timesteps().len() {
        let out = scheduler
            .step(loop_model(&x, tensors), i, x)
            .expect("loop step");
        x = out.sample(tensors.loop_noise[i % tensors.loop_noise.len()].clone());
    }
    expect("full_loop", &to_vec_f64(&x), &case.full_loop);
    assert_eq!(x.dims(), tensors.shape);
    failures.extend(deterministic_but_scored);
    failures
}

/// Runs every case of every `prefix*.json` fixture and reports all mismatches at once.
fn check_fixtures(prefix: &str) {
    let device = Device::flex();
    let mut failures = Vec::new();
    let mut cases = 0;
    for path in fixture_files(fixture_dir(), prefix) {
        let fixture: Fixture = load_json(&path);
        assert_eq!(
            fixture.header.generated_by,
            "scripts/fixtures/schedulers.py"
        );
        let tensors = Tensors::new(&fixture, &device);
        for case in &fixture.cases {
            failures.extend(check_case(case, &tensors));
            cases += 1;
        }
    }
    assert!(cases > 0, "no {prefix} cases");
    assert!(
        failures.is_empty(),
        "{} mismatches with diffusers over {cases} {prefix} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn ddim_matches_diffusers() {
    check_fixtures("ddim_");
}

#[test]
fn ddpm_matches_diffusers() {
    check_fixtures("ddpm_");
}

#[test]
fn flow_match_matches_diffusers_and_flow_grpo() {
    check_fixtures("flow_match");
}

// ------------------------------------------------------------------------------------------------
// Conformance: what every scheduler must do, whatever its math
// ------------------------------------------------------------------------------------------------

/// A spread of configs over every scheduler and option. Clipping is off so that a perfect model
/// output recovers x_0 exactly (see `perfect_prediction_recovers_the_original`).
fn conformance_configs() -> Vec<(String, SchedulerConfig)> {
    let mut configs = Vec::new();
    for (schedule, spacing, prediction) in [
        (
            BetaSchedule::Linear,
            TimestepSpacing::Leading,
            PredictionType::Epsilon,
        ),
        (
            BetaSchedule::ScaledLinear,
            TimestepSpacing::Trailing,
            PredictionType::VPrediction,
        ),
        (
            BetaSchedule::SquaredcosCapV2,
            TimestepSpacing::Linspace,
            PredictionType::Sample,
        ),
    ] {
        for eta in [0.0, 0.5, 1.0] {
            configs.push((
                format!("ddim {schedule:?} {spacing:?} {prediction:?} eta {eta}"),
                SchedulerConfig::Ddim(DdimConfig {
                    beta_schedule: schedule,
                    timestep_spacing: spacing,
                    prediction_type: prediction,
                    clip_sample: false,
                    eta,
                    ..DdimConfig::default()
                }),
            ));
        }
        for variance_type in [VarianceType::FixedSmall, VarianceType::FixedLarge] {
            configs.push((
                format!("ddpm {schedule:?} {spacing:?} {prediction:?} {variance_type:?}"),
                SchedulerConfig::Ddpm(DdpmConfig {
                    beta_schedule: schedule,
                    timestep_spacing: spacing,
                    prediction_type: prediction,
                    clip_sample: false,
                    variance_type,
                    ..DdpmConfig::default()
                }),
            ));
        }
    }
    for shift in [1.0, 3.0] {
        for sde in [None, Some(FlowSde { noise_level: 0.7 })] {
            configs.push((
                format!("flow_match shift {shift} sde {sde:?}"),
                SchedulerConfig::FlowMatch(FlowMatchConfig {
                    shift,
                    sde,
                    ..FlowMatchConfig::default()
                }),
            ));
        }
    }
    configs
}

const CONFORMANCE_STEPS: [usize; 3] = [1, 4, 25];
const SHAPE: [usize; 4] = [2, 3, 4, 4];

/// Deterministic, non-trivial values: sin of a scaled index, shifted per call.
fn wave(phase: f64) -> Vec<f64> {
    let numel: usize = SHAPE.iter().product();
    (0..numel)
        .map(|i| (0.37 * i as f64 + phase).sin())
        .collect()
}

fn for_each_scheduler(mut check: impl FnMut(&str, usize, &dyn Scheduler)) {
    for (name, config) in conformance_configs() {
        for n in CONFORMANCE_STEPS {
            let scheduler = config
                .build(n)
                .unwrap_or_else(|e| panic!("{name} with {n} steps: {e}"));
            check(&name, n, scheduler.as_ref());
        }
    }
}

#[test]
fn timesteps_are_strictly_decreasing_and_in_range() {
    for_each_scheduler(|name, n, scheduler| {
        let t = scheduler.timesteps();
        let big_n = scheduler.num_train_timesteps() as f64;
        assert_eq!(t.len(), n, "{name}: {n} steps");
        assert!(t.windows(2).all(|w| w[0] > w[1]), "{name}: {t:?}");
        assert!(
            t.iter().all(|&v| (0.0..=big_n).contains(&v)),
            "{name}: {t:?}"
        );
        assert_eq!(scheduler.init_noise_sigma(), 1.0, "{name}");
    });
}

#[test]
fn every_step_has_the_documented_shapes_and_finite_values() {
    let device = Device::flex();
    let (sample, model_output) = (
        tensor_f32(&wave(0.0), SHAPE, &device),
        tensor_f32(&wave(1.0), SHAPE, &device),
    );
    for_each_scheduler(|name, n, scheduler| {
        for i in 0..n {
            let out = scheduler
                .step(model_output.clone(), i, sample.clone())
                .unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
            assert_eq!(out.distribution.mean.dims(), SHAPE, "{name} step {i}");
            assert_eq!(out.pred_original_sample.dims(), SHAPE, "{name} step {i}");
            assert_eq!(out.distribution.std.dims(), [2, 1, 1, 1], "{name} step {i}");
            for (what, values) in [
                ("mean", to_vec_f64(&out.distribution.mean)),
                ("std", to_vec_f64(&out.distribution.std)),
                (
                    "pred_original_sample",
                    to_vec_f64(&out.pred_original_sample),
                ),
            ] {
                assert!(
                    values.iter().all(|v| v.is_finite()),
                    "{name} step {i}: {what} not finite"
                );
            }
            assert!(
                to_vec_f64(&out.distribution.std).iter().all(|&s| s >= 0.0),
                "{name}"
            );
        }
    });
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let device = Device::flex();
    let x = tensor_f32(&wave(0.0), SHAPE, &device);
    let wrong = tensor_f32(&wave(0.0)[..48], [1, 3, 4, 4], &device);
    for_each_scheduler(|name, n, scheduler| {
        let e = scheduler
            .step(x.clone(), n, x.clone())
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{name}: {e}");
        assert!(
            scheduler.step(wrong.clone(), 0, x.clone()).is_err(),
            "{name}"
        );
        assert!(
            scheduler.add_noise(x.clone(), x.clone(), &[1.0]).is_err(),
            "{name}: one timestep for two samples"
        );
        assert!(
            scheduler
                .add_noise(x.clone(), wrong.clone(), &[1.0, 1.0])
                .is_err(),
            "{name}"
        );
        let too_late = scheduler.num_train_timesteps() as f64 + 1.0;
        assert!(
            scheduler
                .add_noise(x.clone(), x.clone(), &[1.0, too_late])
                .is_err(),
            "{name}"
        );
        assert!(
            scheduler
                .training_target(x.clone(), x.clone(), &[f64::NAN, 1.0])
                .is_err(),
            "{name}"
        );
    });
}

#[test]
fn deterministic_steps_have_no_log_prob_and_stochastic_ones_do() {
    let device = Device::flex();
    let (sample, model_output) = (
        tensor_f32(&wave(0.0), SHAPE, &device),
        tensor_f32(&wave(1.0), SHAPE, &device),
    );
    let noise = tensor_f32(&wave(2.0), SHAPE, &device);
    for_each_scheduler(|name, n, scheduler| {
        for i in 0..n {
            let out = scheduler
                .step(model_output.clone(), i, sample.clone())
                .unwrap();
            let x = out.sample(noise.clone());
            let log_prob = out.distribution.log_prob(x.clone(), LogProbReduction::Mean);
            if out.distribution.is_deterministic() {
                let e = log_prob.unwrap_err().to_string();
                assert!(e.contains("no density"), "{name} step {i}: {e}");
                // A deterministic step ignores the noise.
                assert_eq!(
                    to_vec_f64(&x),
                    to_vec_f64(&out.distribution.mean),
                    "{name} step {i}"
                );
            } else {
                let log_prob =
                    to_vec_f64(&log_prob.unwrap_or_else(|e| panic!("{name} step {i}: {e}")));
                assert_eq!(log_prob.len(), 2, "{name} step {i}");
                assert!(
                    log_prob.iter().all(|v| v.is_finite()),
                    "{name} step {i}: {log_prob:?}"
                );
            }
        }
    });
}

#[test]
fn eta_zero_and_the_flow_ode_are_deterministic_everywhere() {
    let device = Device::flex();
    let (sample, model_output) = (
        tensor_f32(&wave(0.0), SHAPE, &device),
        tensor_f32(&wave(1.0), SHAPE, &device),
    );
    for (name, config) in conformance_configs() {
        let deterministic = match &config {
            SchedulerConfig::Ddim(c) => c.eta == 0.0,
            SchedulerConfig::FlowMatch(c) => c.sde.is_none(),
            SchedulerConfig::Ddpm(_) => false,
        };
        let scheduler = config.build(10).unwrap();
        for i in 0..10 {
            let out = scheduler
                .step(model_output.clone(), i, sample.clone())
                .unwrap();
            if deterministic {
                assert!(out.distribution.is_deterministic(), "{name} step {i}");
            }
        }
    }
}

#[test]
fn steps_are_pure_functions_of_their_inputs() {
    let device = Device::flex();
    let (sample, model_output) = (
        tensor_f32(&wave(0.0), SHAPE, &device),
        tensor_f32(&wave(1.0), SHAPE, &device),
    );
    for_each_scheduler(|name, n, scheduler| {
        let run = |i: usize| -> StepOutput {
            scheduler
                .step(model_output.clone(), i, sample.clone())
                .unwrap()
        };
        for i in [0, n - 1] {
            let (a, b) = (run(i), run(i));
            assert_eq!(
                to_vec_f64(&a.distribution.mean),
                to_vec_f64(&b.distribution.mean),
                "{name} step {i}"
            );
            assert_eq!(
                to_vec_f64(&a.distribution.std),
                to_vec_f64(&b.distribution.std),
                "{name} step {i}"
            );
        }
    });
}

/// If the model output is exactly the training target at the step's own timestep, x̂_0 is the
/// original: the step inverts `add_noise` and `training_target` for every prediction type.
#[test]
fn perfect_prediction_recovers_the_original() {
    let device = Device::flex();
    let (original, noise) = (
        tensor_f32(&wave(0.5), SHAPE, &device),
        tensor_f32(&wave(3.0), SHAPE, &device),
    );
    for_each_scheduler(|name, n, scheduler| {
        for i in 0..n {
            let t = scheduler.timesteps()[i];
            let ts = [t, t];
            let x_t = scheduler
                .add_noise(original.clone(), noise.clone(), &ts)
                .unwrap();
            let target = scheduler
                .training_target(original.clone(), noise.clone(), &ts)
                .unwrap();
            let out = scheduler.step(target, i, x_t).unwrap();
            // x̂_0 divides float32 rounding error by sqrt(ᾱ) (ε) or sqrt(1 - ᾱ) (x_0 -> ε̂), up to
            // ~15 at ᾱ_999 of the linear schedule: a loose tolerance, still far below any formula
            // error (which would be O(1) here).
            if let Err(message) = check_close(&out.pred_original_sample, &original, 1e-3, 1e-3) {
                panic!("{name} step {i} (t = {t}): {message}");
            }
        }
    });
}

// ------------------------------------------------------------------------------------------------
// Cross-scheduler identities
// ------------------------------------------------------------------------------------------------

/// Song et al. 2021 (section 4.1): DDIM with η = 1 is DDPM's ancestral step. With `leading`
/// spacing DDIM's previous timestep t - N/n is DDPM's next inference timestep, and at the last
/// step both use ᾱ = 1, so mean and std must agree (std: η sqrt(β̃) vs sqrt(β̃)).
#[test]
fn ddim_with_eta_one_is_the_ddpm_step() {
    let device = Device::flex();
    let (sample, model_output) = (
        tensor_f32(&wave(0.0), SHAPE, &device),
        tensor_f32(&wave(1.0), SHAPE, &device),
    );
    for prediction_type in [
        PredictionType::Epsilon,
        PredictionType::VPrediction,
        PredictionType::Sample,
    ] {
        let ddim = DdimConfig {
            eta: 1.0,
            clip_sample: false,
            prediction_type,
            ..DdimConfig::default()
        };
        let ddpm = DdpmConfig {
            clip_sample: false,
            prediction_type,
            ..DdpmConfig::default()
        };
        let (ddim, ddpm) = (
            SchedulerConfig::Ddim(ddim).build(10).unwrap(),
            SchedulerConfig::Ddpm(ddpm).build(10).unwrap(),
        );
        assert_eq!(ddim.timesteps(), ddpm.timesteps());
        for i in 0..10 {
            let a = ddim.step(model_output.clone(), i, sample.clone()).unwrap();
            let b = ddpm.step(model_output.clone(), i, sample.clone()).unwrap();
            check_close(&a.distribution.mean, &b.distribution.mean, 1e-5, 1e-5)
                .unwrap_or_else(|e| panic!("{prediction_type:?} step {i} mean: {e}"));
            check_close(&a.distribution.std, &b.distribution.std, 1e-6, 1e-9)
                .unwrap_or_else(|e| panic!("{prediction_type:?} step {i} std: {e}"));
        }
    }
}

/// DDIM with η = 0 is the Euler step of the probability-flow ODE in the variables
/// x̄ = x / sqrt(ᾱ) and s = sqrt((1 - ᾱ)/ᾱ) (Song et al. 2021, eq. 14): dx̄/ds = ε̂, so
/// x_{t'} / sqrt(ᾱ') = x_t / sqrt(ᾱ) + (s' - s) ε̂. Derivation: with x̂_0 = x̄_t - s ε̂ the DDIM
/// mean sqrt(ᾱ') x̂_0 + sqrt(1-ᾱ') ε̂ divided by sqrt(ᾱ') is x̄_t - s ε̂ + s' ε̂.
#[test]
fn ddim_with_eta_zero_is_the_probability_flow_euler_step() {
    let device = Device::flex();
    let (sample, eps) = (
        tensor_f32(&wave(0.0), SHAPE, &device),
        tensor_f32(&wave(1.0), SHAPE, &device),
    );
    let config = DdimConfig {
        clip_sample: false,
        set_alpha_to_one: false,
        ..DdimConfig::default()
    };
    let scheduler = SchedulerConfig::Ddim(config.clone()).build(10).unwrap();
    let alpha_bars = tiller_diffusion::schedulers::NoiseSchedule::new(
        config.beta_schedule,
        config.beta_start,
        config.beta_end,
        config.num_train_timesteps,
        false,
    )
    .unwrap()
    .alphas_cumprod;
    for i in 0..9 {
        let (t, t_prev) = (
            scheduler.timesteps()[i] as usize,
            scheduler.timesteps()[i + 1] as usize,
        );
        let (a, a_prev) = (alpha_bars[t], alpha_bars[t_prev]);
        let s = |a: f64| ((1.0 - a) / a).sqrt();
        let expected =
            (sample.clone() / a.sqrt() + eps.clone() * (s(a_prev) - s(a))) * a_prev.sqrt();
        let out = scheduler.step(eps.clone(), i, sample.clone()).unwrap();
        check_close(&out.distribution.mean, &expected, 1e-5, 1e-5)
            .unwrap_or_else(|e| panic!("step {i}: {e}"));
    }
}

/// As the noise level a -> 0, the Flow-GRPO SDE's mean tends to the Euler ODE step: the drift
/// correction is a²/(2(1 - σ)) (x + (1 - σ) v) dt, O(a²).
#[test]
fn flow_sde_with_vanishing_noise_is_the_ode() {
    let device = Device::flex();
    let (sample, v) = (
        tensor_f32(&wave(0.0), SHAPE, &device),
        tensor_f32(&wave(1.0), SHAPE, &device),
    );
    let ode = SchedulerConfig::FlowMatch(FlowMatchConfig {
        shift: 3.0,
        ..FlowMatchConfig::default()
    })
    .build(10)
    .unwrap();
    let sde = SchedulerConfig::FlowMatch(FlowMatchConfig {
        shift: 3.0,
        sde: Some(FlowSde { noise_level: 1e-4 }),
        ..FlowMatchConfig::default()
    })
    .build(10)
    .unwrap();
    for i in 0..10 {
        let a = ode.step(v.clone(), i, sample.clone()).unwrap();
        let b = sde.step(v.clone(), i, sample.clone()).unwrap();
        check_close(&b.distribution.mean, &a.distribution.mean, 1e-5, 1e-5)
            .unwrap_or_else(|e| panic!("step {i}: {e}"));
        assert!(!b.distribution.is_deterministic());
        assert!(
            to_vec_f64(&b.distribution.std).iter().all(|&s| s < 1e-3),
            "step {i}"
        );
    }
}
