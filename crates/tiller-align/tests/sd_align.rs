//! `tiller align` on a latent pipeline, end to end: the tiny random SD 1.x pipeline saved by
//! diffusers (`scripts/fixtures/sd_pipelines.py`), CLIPScore on a tiny random CLIPModel
//! (`scripts/fixtures/clip_rewards.py`) as the reward, a prompt file of the user's. DDPO scores
//! decoded rollouts, Diffusion-DPO trains on a store's 16x16 images encoded to latents, DRaFT-K
//! backpropagates CLIPScore through CLIP's preprocessing and the frozen VAE decoder into the
//! UNet's LoRA; each run validates on held-out prompts and writes its adapters. DRaFT-K raises the
//! reward on the held-out prompts, DDPO on a fixed prompt. The tiny SDXL pipeline trains with
//! DDPO, DRaFT-K and Diffusion-DPO as well, through its pooled embedding and time ids.

use std::path::{Path, PathBuf};
use tiller_align::run::{Request, run};
use tiller_feedback::{
    AnnotatorId, AnnotatorRecord, Batch, Choice, Comparison, Feedback, PreferenceStore,
    PromptRecord, Provenance, Source, Split, SqliteStore,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../tiller-diffusion/tests/fixtures")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tiller-sd-align-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const PROMPTS: &str = "# training prompts, then two held out\n\
a photo of a red cube\n\
a blue ball on a table\n\
a green tree\n\
\n\
a photo of a cat\n\
a red car\n\
a small house\n";

/// A preset for `method` on the tiny pipeline with the prompt file in `dir`.
fn preset(dir: &Path, method: &str, extra: &str) -> PathBuf {
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, PROMPTS).unwrap();
    // `[method.<name>]` in `extra` names the method with its settings.
    let named = if extra.contains("[method.") {
        String::new()
    } else {
        format!("method = \"{method}\"\n")
    };
    let text = format!(
        "{named}base = \"{}\"\nreward = \"clip-score:{}\"\n{extra}\n\
         [sampling]\nsteps = 4\nguidance = 3.0\n\
         [prompts]\nfile = \"{}\"\nval_per_task = 2\nval_per_prompt = 2\n\
         [log]\nval_every = 0\ncheckpoint_every = 0\n",
        fixture("tiny-sd-pipeline").display(),
        fixture("tiny-clip-model").display(),
        prompts.display()
    );
    let path = dir.join(format!("{method}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn align(config: &Path, out: &Path) -> tiller_align::run::AlignSummary {
    run(&Request {
        config,
        out,
        resume: None,
        overrides: &[],
        stop_after: None,
        locate: &|p: &Path| p.to_path_buf(),
    })
    .unwrap()
}

fn value(v: &[(String, f64)], key: &str) -> f64 {
    v.iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} in {v:?}"))
        .1
}

/// The values of `key` in a run's metrics, one per update that logged it.
fn metric(run: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.get(key).and_then(|r| r.as_f64())
        })
        .collect()
}

fn assert_finished(out: &Path, s: &tiller_align::run::AlignSummary) {
    assert!(
        out.join("final/pytorch_lora_weights.safetensors").is_file()
            || out.join("final/unet/config.json").is_file(),
        "no adapters or UNet in {}",
        out.display()
    );
    assert!(out.join("samples/val-000000.png").is_file());
    for v in [&s.before, &s.after] {
        assert!(value(v, "proxy_reward").is_finite(), "{v:?}");
        assert!(value(v, "kl_to_base") >= 0.0, "{v:?}");
    }
    assert!(
        value(&s.before, "kl_to_base").abs() < 1e-9,
        "the starting model is the base: {:?}",
        s.before
    );
}

#[test]
fn ddpo_scores_decoded_rollouts_and_trains_lora_on_the_latent_chain() {
    let dir = scratch("ddpo");
    let out = dir.join("run");
    let config = preset(
        &dir,
        "ddpo",
        "[train]\nupdates = 3\nbatch_size = 4\nlearning_rate = 3e-3\n",
    );
    let s = align(&config, &out);
    assert_finished(&out, &s);
    let means = metric(&out, "reward_mean");
    assert_eq!(means.len(), 3, "one reward_mean per update: {means:?}");
    // CLIPScore is a cosine.
    assert!(means.iter().all(|m| m.abs() <= 1.0), "{means:?}");
    assert!(value(&s.after, "kl_to_base") > 0.0, "{:?}", s.after);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A flat 16x16 image of one colour, as PNG bytes.
fn png(rgb: [u8; 3], noise: u64) -> Vec<u8> {
    let mut rng = tiller_core::SeededRng::new(noise);
    let data: Vec<u8> = (0..16 * 16)
        .flat_map(|_| rgb.map(|c| c.saturating_add((rng.below(32)) as u8)))
        .collect();
    tiller_testbed::image::encode_png(&tiller_testbed::Image::from_rgb(16, 16, data).unwrap())
        .unwrap()
}

/// A store in `dir` of four comparisons on two prompts: a reddish 16x16 image preferred to a
/// bluish one.
fn store_of_pairs(dir: &Path) -> PathBuf {
    let store_dir = dir.join("store");
    let mut store = SqliteStore::open(&store_dir).unwrap();
    let annotator = AnnotatorRecord {
        id: AnnotatorId("person".into()),
        source: Source::Human,
        taste: None,
    };
    let mut prompts = Vec::new();
    let mut feedback = Vec::new();
    for (i, text) in ["a photo of a red cube", "a blue ball on a table"]
        .iter()
        .enumerate()
    {
        let p = PromptRecord::new(*text, Split::Train, None);
        for j in 0..2u64 {
            let red = store
                .add_image(&png([200, 20, 20], 10 * i as u64 + j))
                .unwrap();
            let blue = store
                .add_image(&png([20, 20, 200], 100 + 10 * i as u64 + j))
                .unwrap();
            feedback.push(Feedback::Comparison(Comparison {
                prompt: p.id.clone(),
                image_a: blue.id,
                image_b: red.id,
                choice: Choice::B,
                provenance: Provenance {
                    annotator: annotator.id.clone(),
                    source: Source::Human,
                    time_ms: None,
                },
            }));
        }
        prompts.push(p);
    }
    store
        .write(&Batch {
            prompts,
            annotators: vec![annotator],
            feedback,
            ..Batch::default()
        })
        .unwrap();
    drop(store);
    store_dir
}

#[test]
fn diffusion_dpo_trains_on_stored_images_encoded_by_the_vae() {
    let dir = scratch("dpo");
    let store_dir = store_of_pairs(&dir);
    let out = dir.join("run");
    let config = preset(
        &dir,
        "diffusion-dpo",
        &format!(
            "[train]\nupdates = 4\nbatch_size = 2\nlearning_rate = 1e-3\n\
             [method.diffusion-dpo]\nstore = \"{}\"\n",
            store_dir.display()
        ),
    );
    let s = align(&config, &out);
    assert_finished(&out, &s);
    assert_eq!(s.reward_queries, 4, "the four stored comparisons");
    let losses = metric(&out, "loss");
    assert_eq!(losses.len(), 4, "{losses:?}");
    // The first update's policy is the reference: Diffusion-DPO's loss is ln 2.
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-4,
        "{losses:?}"
    );
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");

    // Stored images of another size than the run's are refused, naming the size.
    let e = run(&Request {
        config: &config,
        out: &dir.join("run-32"),
        resume: None,
        overrides: &["sampling.resolution=32".to_string()],
        stop_after: None,
        locate: &|p: &Path| p.to_path_buf(),
    })
    .err()
    .expect("16x16 images in a 32x32 run");
    assert!(
        e.to_string().contains("3x32x32") && e.to_string().contains("method.diffusion-dpo.store"),
        "{e}"
    );
    assert!(!dir.join("run-32").exists(), "nothing is left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn draft_k_backpropagates_clip_score_through_the_decoder_and_raises_it() {
    let dir = scratch("draft");
    let out = dir.join("run");
    let config = preset(
        &dir,
        "draft-k",
        // The whole chain differentiated (step-level recomputation), every UNet weight trained:
        // this tiny random CLIP's score moves slowly, and LoRA rank 4 on a UNet of width 8 has
        // few parameters to move it with.
        "[adapter]\nkind = \"full\"\n\
         [train]\nupdates = 16\nbatch_size = 3\nlearning_rate = 1e-2\n[method.draft-k]\nk = 0\n",
    );
    let s = align(&config, &out);
    assert_finished(&out, &s);
    let (before, after) = (
        value(&s.before, "proxy_reward"),
        value(&s.after, "proxy_reward"),
    );
    let se = value(&s.after, "proxy_reward_se");
    let se = se.max(value(&s.before, "proxy_reward_se"));
    println!("held-out CLIPScore {before:.4} -> {after:.4} (se {se:.4})");
    // The same held-out prompts and seeds before and after.
    assert!(
        after - before > 2.0 * se,
        "CLIPScore {before} -> {after} (se {se})"
    );
    assert!(
        out.join("final/unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sdxl_trains_with_its_pooled_embedding_and_time_ids() {
    let dir = scratch("sdxl");
    let store_dir = store_of_pairs(&dir);
    let sdxl = format!("base={}", fixture("tiny-sdxl-pipeline").display());
    let align_with = |config: &Path, out: &Path| {
        run(&Request {
            config,
            out,
            resume: None,
            overrides: std::slice::from_ref(&sdxl),
            stop_after: None,
            locate: &|p: &Path| p.to_path_buf(),
        })
        .unwrap()
    };
    // DDPO's rollouts and their log-probabilities under SDXL's conditioning.
    let out = dir.join("ddpo");
    let config = preset(&dir, "ddpo", "[train]\nupdates = 2\nbatch_size = 2\n");
    let s = align_with(&config, &out);
    assert_finished(&out, &s);
    assert_eq!(metric(&out, "reward_mean").len(), 2);
    // Reward backpropagation through SDXL's UNet (text_time conditioning) and VAE.
    let out = dir.join("draft");
    let config = preset(
        &dir,
        "draft-k",
        "[train]\nupdates = 2\nbatch_size = 2\nlearning_rate = 3e-3\n",
    );
    let s = align_with(&config, &out);
    assert_finished(&out, &s);
    assert!(value(&s.after, "kl_to_base") > 0.0, "{:?}", s.after);
    // Diffusion-DPO's denoising losses take the added conditioning too.
    let out = dir.join("dpo");
    let config = preset(
        &dir,
        "diffusion-dpo",
        &format!(
            "[train]\nupdates = 2\nbatch_size = 2\nlearning_rate = 1e-3\n\
             [method.diffusion-dpo]\nstore = \"{}\"\n",
            store_dir.display()
        ),
    );
    let s = align_with(&config, &out);
    assert_finished(&out, &s);
    let losses = metric(&out, "loss");
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-4,
        "{losses:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pretraining_on_a_stable_diffusion_base_reads_a_store_and_refuses_the_testbed() {
    let dir = scratch("refused");
    let config = preset(&dir, "refl", "[train]\nupdates = 1\nbatch_size = 1\n");
    let e = run(&Request {
        config: &config,
        out: &dir.join("refl"),
        resume: None,
        overrides: &[],
        stop_after: None,
        locate: &|p: &Path| p.to_path_buf(),
    })
    .err()
    .expect("ReFL needs pre-training images");
    assert!(e.to_string().contains("pretrain.source"), "{e}");
    assert!(
        !dir.join("refl").exists(),
        "refused before the run folder is made"
    );
    // With a store's images as the pre-training data, they are encoded to latents.
    let store = store_of_pairs(&dir);
    let out = dir.join("refl-store");
    let s = run(&Request {
        config: &config,
        out: &out,
        resume: None,
        overrides: &[
            "pretrain.source=store".to_string(),
            format!("pretrain.path={}", store.display()),
        ],
        stop_after: None,
        locate: &|p: &Path| p.to_path_buf(),
    })
    .unwrap();
    assert_finished(&out, &s);
    let pretrain = metric(&out, "pretrain_loss");
    assert!(
        !pretrain.is_empty() && pretrain.iter().all(|l| l.is_finite() && *l > 0.0),
        "{pretrain:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ddpo_raises_clip_score_on_a_fixed_prompt() {
    let dir = scratch("ddpo-fixed");
    // One prompt, trained on and validated on (8 fixed seeds).
    let prompts = dir.join("fixed.txt");
    std::fs::write(&prompts, "a photo of a red cube\n".repeat(3)).unwrap();
    let config = preset(
        &dir,
        "ddpo",
        "[adapter]\nkind = \"full\"\n[train]\nupdates = 20\nbatch_size = 8\nlearning_rate = 1e-2\n",
    );
    let out = dir.join("run");
    let s = run(&Request {
        config: &config,
        out: &out,
        resume: None,
        overrides: &[
            format!("prompts.file={}", prompts.display()),
            "prompts.val_per_prompt=8".into(),
        ],
        stop_after: None,
        locate: &|p: &Path| p.to_path_buf(),
    })
    .unwrap();
    let (before, after) = (
        value(&s.before, "proxy_reward"),
        value(&s.after, "proxy_reward"),
    );
    let se = value(&s.before, "proxy_reward_se").max(value(&s.after, "proxy_reward_se"));
    println!("CLIPScore on the fixed prompt {before:.4} -> {after:.4} (se {se:.4})");
    assert!(
        after - before > 2.0 * se,
        "CLIPScore {before} -> {after} (se {se})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
