//! One DDPO update against a PyTorch reference written from ddpo-pytorch
//! (`scripts/fixtures/ddpo_update.py`, fixture `tests/fixtures/ddpo-update/`): from the same tiny
//! UNet and the same recorded rollout (every x_t, the rollout's log-probs, prompt states,
//! rewards), Tiller's per-step log-probs, ratios, advantages, loss, gradient of every trainable
//! tensor, gradient norm and the weights after the clipped AdamW step must equal the reference's,
//! for full fine-tuning and LoRA, with and without classifier-free guidance.
//!
//! The reference computes in float64 from the float32 values in the fixture, so the differences
//! measured here are Tiller's own float32 error.

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_align::batch::{Batch, Prompts, Rollouts};
use tiller_align::config::{AdapterKind, AdapterSection, AlignTrainSection};
use tiller_align::methods::Ddpo;
use tiller_align::methods::ddpo::DdpoConfig;
use tiller_align::methods::ddpo::step_log_prob;
use tiller_align::policy::sampler_config;
use tiller_align::trainer::{optimizer, optimizer_step};
use tiller_align::{Algorithm, Context, Policy};
use tiller_core::SeededRng;
use tiller_diffusion::models::load_unet;
use tiller_diffusion::models::lora::load_lora;
use tiller_diffusion::models::unet::UNet2DConditionModel;
use tiller_diffusion::models::weights::{HostTensor, collect_tensors, load_into, read_safetensors};
use tiller_diffusion::schedulers::SchedulerConfig;
use tiller_reward::Reward;
use tiller_testbed::Image;
use tiller_testkit::assert_close;

/// The fixture folder; `TILLER_DDPO_FIXTURE` points the same test at another one (e.g. written
/// by a copy of the script for the shipped base model).
fn fixture() -> PathBuf {
    if let Some(dir) = std::env::var_os("TILLER_DDPO_FIXTURE") {
        return PathBuf::from(dir);
    }
    committed("ddpo-update")
}

/// The committed fixture folder `name` (`tests/fixtures/<name>`).
fn committed(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures")
        .join(name)
}

/// The settings `ddpo_update.py` writes next to its cases.
#[derive(serde::Deserialize)]
struct Meta {
    steps: usize,
    eta: f64,
    clip_range: f64,
    adv_clip_max: f64,
    stat_min_count: usize,
    stat_buffer: usize,
    max_grad_norm: f64,
    adam_betas: [f64; 2],
    adam_eps: f64,
    weight_decay: f64,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    adapter: String,
    guidance: f64,
    lr: f64,
    prompts: Vec<String>,
    trainable_tensors: usize,
    /// 2: the fixture also holds a second update (`second.*`).
    #[serde(default = "one")]
    updates: usize,
}

fn one() -> usize {
    1
}

/// Rollouts are scored before the loop sees them; DDPO never asks the reward again.
struct NoReward;

impl Reward for NoReward {
    fn name(&self) -> String {
        "none".into()
    }
    fn score(&self, _: &[Image], _: &[String]) -> tiller_core::Result<Vec<f64>> {
        unreachable!("DDPO's gradients do not query the reward")
    }
}

fn tensor<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
    let shape: [usize; D] = t.shape.clone().try_into().expect("rank");
    Tensor::from_data(TensorData::new(t.data.clone(), shape), device)
}

/// Tensor `i` along the first axis of a host tensor, with the remaining shape.
fn row<const D: usize>(t: &HostTensor, i: usize, device: &Device) -> Tensor<D> {
    let rest: [usize; D] = t.shape[1..].to_vec().try_into().expect("rank");
    let n: usize = rest.iter().product();
    Tensor::from_data(
        TensorData::new(t.data[i * n..(i + 1) * n].to_vec(), rest),
        device,
    )
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// Every trainable tensor's gradient under its torch name: one SGD step of lr 1 from all-zero
/// weights gives exactly -g (the zeroed copy keeps the parameter ids the gradients are keyed by).
fn gradients_by_name(
    unet: &UNet2DConditionModel,
    grads: GradientsParams,
) -> BTreeMap<String, HostTensor> {
    struct Zero;
    impl ModuleMapper for Zero {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let id = param.id;
            let value = Tensor::<D>::zeros(param.lazy_shape(), &param.lazy_device());
            param.transform_for_load(value, id)
        }
    }
    let zero = unet.clone().map(&mut Zero);
    let mut sgd = SgdConfig::new().init();
    let stepped = sgd.step(1.0, zero, grads);
    collect_tensors(&stepped.valid())
        .into_iter()
        .map(|(k, v)| {
            let data = v.data.iter().map(|x| -x).collect();
            (k, HostTensor { data, ..v })
        })
        .collect()
}

/// Tiller's value of the reference's tensor `name` (torch name and layout) in `tensors`: LoRA
/// factors `<module>.lora_A.weight` [r, d_in] and `lora_B.weight` [d_out, r] are burn's
/// `<module>.weight.lora.a` [d_in, r] and `.lora.b` [r, d_out], transposed.
fn torch_view(tensors: &BTreeMap<String, HostTensor>, name: &str) -> Vec<f32> {
    let lora = [
        (".lora_A.weight", ".weight.lora.a"),
        (".lora_B.weight", ".weight.lora.b"),
    ];
    match lora.iter().find(|(torch, _)| name.ends_with(torch)) {
        None => tensors
            .get(name)
            .unwrap_or_else(|| panic!("no trainable tensor {name}"))
            .data
            .clone(),
        Some((torch, burn)) => {
            let key = format!("{}{burn}", &name[..name.len() - torch.len()]);
            let t = tensors
                .get(&key)
                .unwrap_or_else(|| panic!("no LoRA factor {key}"));
            let [rows, cols] = t.shape[..] else {
                panic!("{key}: shape {:?}", t.shape)
            };
            (0..cols)
                .flat_map(|c| (0..rows).map(move |r| t.data[r * cols + c]))
                .collect()
        }
    }
}

/// |actual - expected| <= 4 rtol * max|expected| of the tensor, element by element, and the whole
/// tensor's relative L2 error below rtol: "relative" for a tensor whose elements span several
/// orders of magnitude. A single float32 element sits up to a few times above the tensor's L2
/// error, and which one depends on the CPU's summation order (on one AVX-512 machine an element
/// of a guided gradient was 3.3e-4 of its tensor's scale, while the machines before stayed within
/// 3e-4). Returns the relative L2 error.
fn assert_tensor_close(name: &str, actual: &[f32], expected: &[f32], rtol: f64) -> f64 {
    assert_eq!(actual.len(), expected.len(), "{name}: length");
    let scale = expected.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let (mut diff, mut norm) = (0f64, 0f64);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let d = (*a as f64 - *e as f64).abs();
        assert!(
            !rtol.is_finite() || d <= 4.0 * rtol * scale + 1e-12,
            "{name}[{i}]: {a} vs reference {e} (|diff| {d:.3e}, tensor scale {scale:.3e})"
        );
        diff += d * d;
        norm += (*e as f64).powi(2);
    }
    let l2 = diff.sqrt() / norm.sqrt().max(1e-30);
    assert!(
        !rtol.is_finite() || l2 <= rtol,
        "{name}: relative L2 error {l2:.3e}"
    );
    l2
}

/// The weights after AdamW's first step, `w (1 - lr wd) - lr g / (|g| + eps)`: about `lr`
/// times the sign of each gradient element. Where the reference gradient is below 1e-3 of its
/// tensor's largest element, its float32 value (error ~1e-4 of that scale) does not determine the
/// sign, so such an element may differ by up to 2 lr; every other element agrees to 1e-4 of the
/// tensor's scale. `grads` are the reference gradients of every step taken so far. Returns how
/// many elements were sign-ambiguous.
fn assert_updated_close(
    name: &str,
    actual: &[f32],
    expected: &[f32],
    grads: &[&[f32]],
    lr: f64,
) -> usize {
    let scale = expected.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let scales: Vec<f64> = grads
        .iter()
        .map(|g| g.iter().fold(0f64, |m, x| m.max(x.abs() as f64)))
        .collect();
    let mut ambiguous = 0;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let d = (*a as f64 - *e as f64).abs();
        // Each step whose gradient element was tiny may have gone the other way.
        let tiny = grads
            .iter()
            .zip(&scales)
            .filter(|(g, s)| (g[i] as f64).abs() < 1e-3 * **s)
            .count();
        ambiguous += (tiny > 0 && d > 1e-4 * scale) as usize;
        let allowed = 1e-4 * scale + 2.0 * lr * tiny as f64;
        assert!(
            d <= allowed,
            "{name}[{i}]: {a} vs reference {e} (|diff| {d:.3e}, gradients {:?})",
            grads.iter().map(|g| g[i]).collect::<Vec<_>>()
        );
    }
    ambiguous
}

/// The fixture's recorded rollout (`<prefix>latents`, `<prefix>old_log_probs`,
/// `<prefix>rewards`) as the loop would have collected it, `group` per prompt.
fn recorded_rollouts(
    io: &BTreeMap<String, HostTensor>,
    prefix: &str,
    (prompts, group): (&[String], usize),
    steps: usize,
    device: &Device,
) -> Batch {
    let latents = &io[&format!("{prefix}latents")];
    let old = &io[&format!("{prefix}old_log_probs")];
    Batch::Rollouts(Rollouts {
        prompts: Prompts {
            texts: prompts.to_vec(),
            context: tensor(&io["context"], device),
            uncond: tensor(&io["uncond"], device),
            added: None,
        },
        latents: (0..=steps).map(|i| row(latents, i, device)).collect(),
        timesteps: Vec::new(),
        log_probs: (0..steps).map(|i| Some(row(old, i, device))).collect(),
        // The fixture records no estimates of x_0: DDPO reads none.
        predicted: Vec::new(),
        rewards: io[&format!("{prefix}rewards")]
            .data
            .iter()
            .map(|&r| r as f64)
            .collect(),
        advantages: Vec::new(),
        step_advantages: Vec::new(),
        train_steps: Vec::new(),
        group,
    })
}

/// Every trained tensor of `stepped` against the reference's `<prefix>after.<name>`, with the
/// reference gradients of the steps taken so far (`grad_prefixes`) deciding which elements are
/// sign-ambiguous ([`assert_updated_close`]). Returns how many were.
fn check_updated(
    io: &BTreeMap<String, HostTensor>,
    trained: &[&String],
    stepped: &Policy,
    prefix: &str,
    grad_prefixes: &[&str],
    case: &Case,
) -> usize {
    let after = collect_tensors(&stepped.model.valid());
    let mut ambiguous = 0;
    for key in trained {
        let name = &key["grad.".len()..];
        let grads: Vec<&[f32]> = grad_prefixes
            .iter()
            .map(|g| io[&format!("{g}{name}")].data.as_slice())
            .collect();
        ambiguous += assert_updated_close(
            &format!("{} {prefix}after {name}", case.name),
            &torch_view(&after, name),
            &io[&format!("{prefix}after.{name}")].data,
            &grads,
            case.lr,
        );
    }
    ambiguous
}

fn scalar(io: &BTreeMap<String, HostTensor>, key: &str) -> f64 {
    io[key].data[0] as f64
}

/// The fixture's tiny UNet (`<dir>/unet`, its scheduler `<dir>/scheduler_config.json`) with the
/// reference's adapters (both factors random) from their kohya file as the trainable policy, the
/// UNet without them as the frozen reference, sampling DDIM at `eta` over `steps`.
fn lora_policy(
    dir: &Path,
    lora: &Path,
    guidance: f64,
    (eta, steps): (f64, usize),
    device: &Device,
) -> Policy {
    let (unet_config, base) = load_unet(&dir.join("unet"), None, device).unwrap();
    let pipeline = SchedulerConfig::from_diffusers_json(dir.join("scheduler_config.json")).unwrap();
    let sampler = || {
        sampler_config(&pipeline, eta)
            .unwrap()
            .build(steps)
            .unwrap()
    };
    let (adapted, _, _) = load_lora(base.clone(), lora).unwrap();
    Policy {
        model: adapted.to_device(&device.clone().autodiff()).train(),
        reference: base,
        model_config: unet_config,
        sampler: sampler(),
        noise: sampler(),
        guidance,
        adapter: AdapterKind::Lora,
        device: device.clone(),
        latents: None,
    }
}

fn run_case(meta: &Meta, case: &Case) {
    let dir = fixture();
    let device = tiller_core::device::parse_device("cpu").unwrap();
    let io = read_safetensors(&dir.join(format!("{}.safetensors", case.name))).unwrap();
    let (unet_config, base) = load_unet(&dir.join("unet"), None, &device).unwrap();
    let pipeline = SchedulerConfig::from_diffusers_json(dir.join("scheduler_config.json")).unwrap();
    let sampler = || {
        sampler_config(&pipeline, meta.eta)
            .unwrap()
            .build(meta.steps)
            .unwrap()
    };
    let policy = match case.adapter.as_str() {
        "full" => Policy::new(
            base,
            unet_config,
            sampler(),
            sampler(),
            case.guidance,
            &AdapterSection {
                kind: AdapterKind::Full,
                ..Default::default()
            },
            &mut SeededRng::new(0),
            &device,
        )
        .unwrap(),
        "lora" => lora_policy(
            &dir,
            &dir.join(format!("{}.lora.safetensors", case.name)),
            case.guidance,
            (meta.eta, meta.steps),
            &device,
        ),
        other => panic!("unknown adapter {other}"),
    };

    // ---- the recorded rollout
    let n = case.prompts.len();
    let latents = &io["latents"];
    let old = &io["old_log_probs"];
    let mut batch = recorded_rollouts(&io, "", (&case.prompts, 3), meta.steps, &device);

    // ---- advantages: per-prompt statistics, clipped
    let mut ddpo = Ddpo::new(DdpoConfig {
        clip_range: meta.clip_range,
        adv_clip_max: meta.adv_clip_max,
        stat_min_count: meta.stat_min_count,
        stat_buffer: meta.stat_buffer,
        ..Default::default()
    });
    let mut rng = SeededRng::new(0);
    ddpo.prepare(
        &Context {
            policy: &policy,
            reward: &NoReward,
            kl_weight: 0.0,
        },
        &mut batch,
        &mut rng,
    )
    .unwrap();
    <Ddpo as Algorithm>::begin_update(&mut ddpo, &mut batch, 0, &mut rng).unwrap();
    let Batch::Rollouts(r) = &batch else {
        unreachable!()
    };
    for steps in &r.train_steps {
        assert_eq!(steps.len(), meta.steps, "every step is trained");
    }
    let adv: Vec<f64> = r.advantages.clone();
    assert_close(adv.as_slice(), io["advantages"].data.as_slice(), 1e-6, 1e-6);

    // ---- per-step log-probs and ratios, re-scored under the current weights
    let cond = policy.conditioning(&r.prompts, &policy.autodiff_device());
    let per_image = latents.data.len() / ((meta.steps + 1) * n);
    for i in 0..meta.steps {
        let x_t = r.latents[i].clone().autodiff();
        let t = policy.sampler.timesteps()[i];
        let pred = values(cond.predict(&policy.model, x_t, t).inner());
        let (step, lp) = step_log_prob(&policy, &cond, r, i).unwrap();
        let mean = values(step.mean.inner());
        let lp = values(lp.inner());
        let expected = &io["log_probs"].data[i * n..(i + 1) * n];
        let span = i * n * per_image..(i + 1) * n * per_image;
        let span_out = span.clone();
        let worst = |a: &[f32], e: &[f32]| {
            a.iter()
                .zip(e)
                .map(|(x, y)| (*x as f64 - *y as f64).abs())
                .fold(0.0, f64::max)
        };
        let sigma = values(step.std.inner())[0] as f64;
        let (out_err, mean_err, lp_err) = (
            worst(&pred, &io["model_outputs"].data[span.clone()]),
            worst(&mean, &io["step_means"].data[span]),
            worst(&lp, expected),
        );
        eprintln!(
            "{} step {i} (sigma {sigma:.4}): max |model output err| {out_err:.2e}, |mean err| \
             {mean_err:.2e}, |log-prob err| {lp_err:.2e}",
            case.name
        );
        // The guided UNet output and the step's mean agree to float32 rounding of the kernels
        // (the output relative to its scale, which grows as t -> 0 for a trained model).
        let out_scale = io["model_outputs"].data[span_out.clone()]
            .iter()
            .fold(1f64, |m, x| m.max(x.abs() as f64));
        assert!(
            out_err < 1e-5 * out_scale && mean_err < 1e-5,
            "{}: step {i}: output error {out_err:.2e} (scale {out_scale:.2e}), mean error {mean_err:.2e}",
            case.name
        );
        // Measured: at most 3.8e-6. (With diffusers' float32 alphas_cumprod instead of the float64
        // schedule Tiller uses, sigma moves by 1e-4 relative at the two low-noise steps and the
        // log-probs by up to 4e-5: `ddpo_update.py --float32-schedule`.)
        let atol = 1e-5;
        assert_close(lp.as_slice(), expected, 0.0, atol);
        let ratio: Vec<f64> = lp
            .iter()
            .zip(&old.data[i * n..(i + 1) * n])
            .map(|(l, o)| (*l as f64 - *o as f64).exp())
            .collect();
        assert_close(
            ratio.as_slice(),
            &io["ratios"].data[i * n..(i + 1) * n],
            0.0,
            atol,
        );
    }

    // ---- the loss and its gradients
    let cx = Context {
        policy: &policy,
        reward: &NoReward,
        kl_weight: 0.0,
    };
    let out = ddpo.gradients(&cx, &batch, 1.0, &mut rng).unwrap();
    // The loss is a sum of terms -A r whose A cancel within each prompt, so what is left (~1e-5)
    // is mean(-A (r - 1)): it carries the log-probs' absolute error (a few 1e-6, times |A| ~ 1),
    // not a relative one. A sign error (a difference of 2.4e-5) fails.
    let loss = scalar(&io, "loss");
    assert!(loss.abs() > 1e-5, "reference loss {loss}");
    assert!(
        (out.loss - loss).abs() < 3e-6,
        "{}: loss {} vs reference {loss}",
        case.name,
        out.loss
    );
    let metric = |k: &str| out.metrics.iter().find(|(m, _)| *m == k).unwrap().1;
    assert!((metric("clipfrac") - scalar(&io, "clipfrac")).abs() < 1e-6);
    assert!((metric("approx_kl") - scalar(&io, "approx_kl")).abs() < 1e-9);

    let grads = gradients_by_name(&policy.model, out.grads);
    let trained: Vec<&String> = io.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(trained.len(), case.trainable_tensors);
    // Guided predictions are u + g (c - u) with g = 3, which triples the float32 error of the
    // two passes' difference: torch's own float32 gradients on these inputs are 6.0e-5 (no
    // guidance) and 2.2e-4 (guidance 3) from the float64 reference, in relative L2
    // (`ddpo_update.py --torch-float32-check`). Ours reached 1.2e-4 without guidance on an
    // AVX-512 machine (summation order), so the bound is twice torch's own error or more.
    let rtol = if case.guidance == 1.0 { 2e-4 } else { 3e-4 };
    let mut worst = 0f64;
    for key in &trained {
        let name = &key["grad.".len()..];
        let got = torch_view(&grads, name);
        let l2 = assert_tensor_close(
            &format!("{} grad {name}", case.name),
            &got,
            &io[*key].data,
            rtol,
        );
        worst = worst.max(l2);
    }
    eprintln!(
        "{}: gradients' worst relative L2 error {worst:.2e}",
        case.name
    );
    // Under LoRA, Tiller trains exactly the reference's factors, and the frozen base weights get
    // no gradient.
    if case.adapter == "lora" {
        let factors = grads.keys().filter(|k| k.contains(".lora.")).count();
        assert_eq!(factors, case.trainable_tensors, "{}", case.name);
    }
    for (name, g) in &grads {
        if !io.contains_key(&format!("grad.{name}")) {
            let lora_factor = name.contains(".lora.");
            assert!(
                lora_factor || g.data.iter().all(|x| *x == 0.0),
                "{}: {name} has a gradient",
                case.name
            );
        }
    }

    // ---- clip_grad_norm_(1.0) over everything, then AdamW
    let train = AlignTrainSection {
        learning_rate: case.lr,
        adam_beta1: meta.adam_betas[0],
        adam_beta2: meta.adam_betas[1],
        adam_epsilon: meta.adam_eps,
        weight_decay: meta.weight_decay,
        max_grad_norm: meta.max_grad_norm,
        ..Default::default()
    };
    // Reading the gradients above consumed them: take them again (DDPO's gradients are a pure
    // function of the batch and the weights).
    let out = ddpo.gradients(&cx, &batch, 1.0, &mut rng).unwrap();
    let mut optim = optimizer(&train);
    let (stepped, norm) = optimizer_step(policy, &mut optim, out.grads, &train, case.lr);
    let expected_norm = scalar(&io, "grad_norm");
    assert!(
        (norm - expected_norm).abs() <= 1e-4 * expected_norm,
        "{}: grad norm {norm} vs reference {expected_norm}",
        case.name
    );
    let ambiguous = check_updated(&io, &trained, &stepped, "", &["grad."], case);
    eprintln!(
        "{}: {ambiguous} updated weights with an ambiguous gradient sign",
        case.name
    );
    if case.updates < 2 {
        return;
    }

    // ---- a second update: what the loop carries from one update to the next (the weights,
    // Adam's moments and step count, the per-prompt reward buffers), on a fresh on-policy rollout
    // of the updated weights
    let mut batch = recorded_rollouts(&io, "second.", (&case.prompts, 3), meta.steps, &device);
    ddpo.prepare(
        &Context {
            policy: &stepped,
            reward: &NoReward,
            kl_weight: 0.0,
        },
        &mut batch,
        &mut rng,
    )
    .unwrap();
    <Ddpo as Algorithm>::begin_update(&mut ddpo, &mut batch, 0, &mut rng).unwrap();
    let Batch::Rollouts(r) = &batch else {
        unreachable!()
    };
    // The buffers now hold both updates' rewards of each prompt.
    assert_close(
        r.advantages.as_slice(),
        io["second.advantages"].data.as_slice(),
        1e-6,
        1e-6,
    );
    let cx = Context {
        policy: &stepped,
        reward: &NoReward,
        kl_weight: 0.0,
    };
    let out = ddpo.gradients(&cx, &batch, 1.0, &mut rng).unwrap();
    let metric = |k: &str| out.metrics.iter().find(|(m, _)| *m == k).unwrap().1;
    // On-policy for the reference; Tiller's weights differ from its by float32 rounding (and the
    // first step's sign-ambiguous elements), which the clip at 1e-4 may see.
    eprintln!(
        "{}: second update, clip fraction {:.4}, ratio mean - 1 {:.2e}",
        case.name,
        metric("clipfrac"),
        metric("ratio_mean") - 1.0
    );
    let grads = gradients_by_name(&stepped.model, out.grads);
    // The first step left a few sign-ambiguous weights 2 lr from the reference's (above), which
    // moves the second update's gradients by more than float32 rounding alone.
    // On a fixture of the shipped base (TILLER_DDPO_FIXTURE, a measurement, not a golden) that
    // gap is larger; it is printed, and the checks from the reference's weights below still run.
    let measuring = std::env::var_os("TILLER_DDPO_FIXTURE").is_some();
    let second_rtol = if measuring { f64::INFINITY } else { 2e-3 };
    let mut second_worst = 0f64;
    for key in &trained {
        let name = &key["grad.".len()..];
        let l2 = assert_tensor_close(
            &format!("{} second grad {name}", case.name),
            &torch_view(&grads, name),
            &io[&format!("second.grad.{name}")].data,
            second_rtol,
        );
        second_worst = second_worst.max(l2);
    }
    eprintln!(
        "{}: second gradients' worst relative L2 error {second_worst:.2e}",
        case.name
    );
    if case.adapter == "full" {
        // The same second update from the reference's own weights after the first step: the
        // gradients depend on the weights, the rollout and the advantages only, so what is left
        // of the difference above is not the weights (issue 28: is the second update's gap the
        // first step's sign-ambiguous weights, or state carried between updates?).
        let after: BTreeMap<String, HostTensor> = trained
            .iter()
            .map(|k| {
                let name = &k["grad.".len()..];
                (name.to_string(), io[&format!("after.{name}")].clone())
            })
            .collect();
        let model = load_into(
            stepped.model.valid(),
            &after,
            Path::new("the reference's weights after update 1"),
        )
        .unwrap();
        let from_reference = Policy {
            model: model.to_device(&device.clone().autodiff()).train(),
            reference: stepped.reference.clone(),
            model_config: stepped.model_config.clone(),
            sampler: sampler(),
            noise: sampler(),
            guidance: case.guidance,
            adapter: AdapterKind::Full,
            device: device.clone(),
            latents: None,
        };
        let cx = Context {
            policy: &from_reference,
            reward: &NoReward,
            kl_weight: 0.0,
        };
        let out = ddpo.gradients(&cx, &batch, 1.0, &mut rng).unwrap();
        let grads = gradients_by_name(&from_reference.model, out.grads);
        let mut worst = 0f64;
        for key in &trained {
            let name = &key["grad.".len()..];
            let l2 = assert_tensor_close(
                &format!(
                    "{} second grad from the reference's weights {name}",
                    case.name
                ),
                &torch_view(&grads, name),
                &io[&format!("second.grad.{name}")].data,
                rtol,
            );
            worst = worst.max(l2);
        }
        eprintln!(
            "{}: second gradients from the reference's weights: worst relative L2 error {worst:.2e}",
            case.name
        );
        // And Tiller's AdamW, carrying its own moments and step count from the first update,
        // steps those weights to the reference's second-update weights.
        let mut carried = optimizer(&train).load_record(optim.to_record());
        let out = ddpo.gradients(&cx, &batch, 1.0, &mut rng).unwrap();
        let (stepped_from_reference, _) =
            optimizer_step(from_reference, &mut carried, out.grads, &train, case.lr);
        let ambiguous = check_updated(
            &io,
            &trained,
            &stepped_from_reference,
            "second.",
            &["grad.", "second.grad."],
            case,
        );
        eprintln!(
            "{}: second step from the reference's weights, {ambiguous} weights with an ambiguous gradient",
            case.name
        );
    }
    if measuring {
        // Tiller's own second step starts from weights the reference never had.
        return;
    }
    let out = ddpo.gradients(&cx, &batch, 1.0, &mut rng).unwrap();
    let (stepped, norm) = optimizer_step(stepped, &mut optim, out.grads, &train, case.lr);
    let expected_norm = scalar(&io, "second.grad_norm");
    assert!(
        (norm - expected_norm).abs() <= 1e-4 * expected_norm,
        "{}: second grad norm {norm} vs reference {expected_norm}",
        case.name
    );
    let ambiguous = check_updated(
        &io,
        &trained,
        &stepped,
        "second.",
        &["grad.", "second.grad."],
        case,
    );
    eprintln!(
        "{}: second update, {ambiguous} weights with an ambiguous gradient",
        case.name
    );
}

fn meta() -> Meta {
    tiller_testkit::fixture::load_json(fixture().join("cases.json"))
}

fn case(name: &str) {
    let meta = meta();
    let case = meta
        .cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name} in cases.json"));
    run_case(&meta, case);
}

#[test]
fn full_fine_tuning_without_guidance_matches_the_reference() {
    case("full-g1");
}

#[test]
fn full_fine_tuning_with_guidance_matches_the_reference() {
    case("full-g3");
}

#[test]
fn lora_without_guidance_matches_the_reference() {
    case("lora-g1");
}

#[test]
fn lora_with_guidance_matches_the_reference() {
    case("lora-g3");
}

/// The settings `d3po_update.py` writes next to its cases.
#[derive(serde::Deserialize)]
struct D3poMeta {
    steps: usize,
    eta: f64,
    cases: Vec<D3poCase>,
}

#[derive(serde::Deserialize)]
struct D3poCase {
    name: String,
    guidance: f64,
    beta: f64,
    eps: f64,
    prompts: Vec<String>,
    trainable_tensors: usize,
}

/// Case `name` of the fixture folder `dir`: its tensors (`<name>.safetensors`), and the DDPO
/// fixture's committed UNet with the case's adapters (`<name>.lora.safetensors`) as the policy
/// ([`lora_policy`]).
fn lora_case(
    dir: &Path,
    name: &str,
    guidance: f64,
    chain: (f64, usize),
    device: &Device,
) -> (BTreeMap<String, HostTensor>, Policy) {
    let io = read_safetensors(&dir.join(format!("{name}.safetensors"))).unwrap();
    let lora = dir.join(format!("{name}.lora.safetensors"));
    let unet = committed("ddpo-update");
    (io, lora_policy(&unet, &lora, guidance, chain, device))
}

/// The fixture's `grad.<name>` (every trained LoRA factor, `tensors` of them) against `grads`
/// ([`assert_tensor_close`] at `rtol`); prints the worst relative L2 error.
fn check_gradients(
    case: &str,
    io: &BTreeMap<String, HostTensor>,
    policy: &Policy,
    grads: GradientsParams,
    tensors: usize,
    rtol: f64,
) {
    let grads = gradients_by_name(&policy.model, grads);
    let trained: Vec<&String> = io.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(trained.len(), tensors, "{case}");
    let mut worst = 0f64;
    for key in &trained {
        let name = &key["grad.".len()..];
        let l2 = assert_tensor_close(
            &format!("{case} grad {name}"),
            &torch_view(&grads, name),
            &io[*key].data,
            rtol,
        );
        worst = worst.max(l2);
    }
    eprintln!("{case}: gradients' worst relative L2 error {worst:.2e}");
}

/// D3PO against a PyTorch reference written from `yk7333/d3po` (`scripts/fixtures/d3po_update.py`,
/// fixture `tests/fixtures/d3po-update/`): on the same pairs of trajectories (one initial latent
/// per pair) and with the same adapters over the DDPO fixture's UNet (the UNet without them is
/// the reference), the preferences, the loss and the gradient of every LoRA factor must equal the
/// reference's; at the paper's beta and eps with guidance, and at a beta where the sigmoid is far
/// from linear, each with one step whose ratios are all clamped (and give no gradient).
#[test]
fn d3po_update_matches_the_reference() {
    use tiller_align::methods::D3po;
    use tiller_align::methods::d3po::D3poConfig;
    let dir = committed("d3po-update");
    let meta: D3poMeta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let device = tiller_core::device::parse_device("cpu").unwrap();
    for case in &meta.cases {
        let (io, policy) = lora_case(
            &dir,
            &case.name,
            case.guidance,
            (meta.eta, meta.steps),
            &device,
        );
        let mut batch = recorded_rollouts(&io, "", (&case.prompts, 2), meta.steps, &device);
        let mut d3po = D3po::new(D3poConfig {
            beta: case.beta,
            clip_range: case.eps,
            ..Default::default()
        });
        let cx = Context {
            policy: &policy,
            reward: &NoReward,
            kl_weight: 0.0,
        };
        let mut rng = SeededRng::new(0);
        d3po.prepare(&cx, &mut batch, &mut rng).unwrap();
        <D3po as Algorithm>::begin_update(&mut d3po, &mut batch, 0, &mut rng).unwrap();
        let Batch::Rollouts(r) = &batch else {
            unreachable!()
        };
        assert_close(
            r.advantages.as_slice(),
            io["preferences"].data.as_slice(),
            0.0,
            0.0,
        );
        for pair in r.train_steps.chunks(2) {
            assert_eq!(pair[0].len(), meta.steps, "every step is trained");
            assert_eq!(pair[0], pair[1], "a pair trains the same steps");
        }
        let out = d3po.gradients(&cx, &batch, 1.0, &mut rng).unwrap();
        let loss = scalar(&io, "loss");
        // The loss is near ln 2 = 0.693 (at beta 0.1 within 1e-3 of it): an error in the
        // log-ratios of 1e-5 moves it by beta x 1e-5 / 2.
        eprintln!("{}: loss {:.7} vs reference {loss:.7}", case.name, out.loss);
        assert!(
            (out.loss - loss).abs() < 1e-6,
            "{}: loss {} vs reference {loss}",
            case.name,
            out.loss
        );
        let metric = |k: &str| out.metrics.iter().find(|(m, _)| *m == k).unwrap().1;
        assert!(
            (metric("clipfrac") - scalar(&io, "clipfrac")).abs() < 1e-9,
            "{}: clipfrac {}",
            case.name,
            metric("clipfrac")
        );
        // The DDPO cases' bounds: twice torch's own float32 error or more (see `run_case`).
        let rtol = if case.guidance == 1.0 { 2e-4 } else { 3e-4 };
        check_gradients(
            &case.name,
            &io,
            &policy,
            out.grads,
            case.trainable_tensors,
            rtol,
        );
    }
}

/// The settings `dense_dpo_update.py` writes next to its cases.
#[derive(serde::Deserialize)]
struct DenseMeta {
    steps: usize,
    eta: f64,
    cases: Vec<DenseCase>,
}

#[derive(serde::Deserialize)]
struct DenseCase {
    name: String,
    guidance: f64,
    temperature: f64,
    clip: f64,
    reg_to_init: bool,
    reg_to_old: bool,
    prompts: Vec<String>,
    group: usize,
    trainable_tensors: usize,
}

/// Dense-reward DPO against a PyTorch reference written from `Shentao-YANG/Dense_Reward_T2I`
/// (`scripts/fixtures/dense_dpo_update.py`, fixture `tests/fixtures/dense-dpo-update/`): on the
/// same ranked trajectories (two prompts, three each) with the same drawn steps (one repeated),
/// the listMLE loss of the discounted trajectory logits and the gradient of every LoRA factor must
/// equal the reference's, with the pi_init term alone and with both terms (old log-probs shifted
/// so that some clamp), with and without guidance.
#[test]
fn dense_dpo_update_matches_the_reference() {
    use tiller_align::methods::DenseDpo;
    use tiller_align::methods::dense_dpo::DenseDpoConfig;
    let dir = committed("dense-dpo-update");
    let meta: DenseMeta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let device = tiller_core::device::parse_device("cpu").unwrap();
    for case in &meta.cases {
        let (io, policy) = lora_case(
            &dir,
            &case.name,
            case.guidance,
            (meta.eta, meta.steps),
            &device,
        );
        let mut batch =
            recorded_rollouts(&io, "", (&case.prompts, case.group), meta.steps, &device);
        let steps = &io["steps"];
        let m = steps.shape[1];
        let mut dense = DenseDpo {
            config: DenseDpoConfig {
                temperature: case.temperature,
                log_ratio_clip: case.clip,
                reg_to_init: case.reg_to_init,
                reg_to_old: case.reg_to_old,
                steps_per_logit: m,
                ..Default::default()
            },
        };
        let mut rng = SeededRng::new(0);
        <DenseDpo as Algorithm>::begin_update(&mut dense, &mut batch, 0, &mut rng).unwrap();
        let Batch::Rollouts(r) = &mut batch else {
            unreachable!()
        };
        // The rankings (no ties): 0 for the best of each group.
        let expected_ranks = [2.0, 0.0, 1.0, 0.0, 2.0, 1.0];
        assert_eq!(r.advantages, expected_ranks, "{}", case.name);
        assert!(r.train_steps.iter().all(|s| s.len() == m));
        // The reference's drawn steps in place of this draw.
        r.train_steps = steps
            .data
            .chunks(m)
            .map(|s| s.iter().map(|&t| t as usize).collect())
            .collect();
        let cx = Context {
            policy: &policy,
            reward: &NoReward,
            kl_weight: 0.0,
        };
        let out = dense.gradients(&cx, &batch, 1.0, &mut rng).unwrap();
        let loss = scalar(&io, "loss");
        eprintln!("{}: loss {:.7} vs reference {loss:.7}", case.name, out.loss);
        assert!(
            (out.loss - loss).abs() < 1e-5,
            "{}: loss {} vs reference {loss}",
            case.name,
            out.loss
        );
        // torch's own float32 gradients on these inputs are 9.7e-6 (init-g1) and 3.9e-4 (both-g3,
        // median 9.2e-5) from the float64 reference in relative L2 (`dense_dpo_update.py
        // --torch-float32-check`): the guided case's listMLE weights of opposite sign cancel in
        // the sum over a prompt's trajectories. Ours measured 1.5e-5 and 4.3e-4.
        let rtol = if case.guidance == 1.0 { 2e-4 } else { 1e-3 };
        check_gradients(
            &case.name,
            &io,
            &policy,
            out.grads,
            case.trainable_tensors,
            rtol,
        );
    }
}
