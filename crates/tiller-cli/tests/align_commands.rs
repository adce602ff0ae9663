//! `tiller align`, `tiller eval --model <run>` and `tiller compare` end to end on the shipped base
//! with a few updates of a short chain: the run folder has its exports, an interrupted run
//! resumes, and bad input fails with a named cause.

mod common;
use common::{resume_with_set, tiller};

use std::path::PathBuf;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tiller-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Two updates of two chains of three steps; validation on one prompt per task.
const SMALL: &[&str] = &[
    "--set",
    "train.updates=2",
    "--set",
    "train.batch_size=2",
    "--set",
    "sampling.steps=3",
    "--set",
    "prompts.val_per_task=1",
    "--set",
    "log.val_every=0",
    "--set",
    "log.checkpoint_every=1",
];

#[test]
fn align_exports_lora_and_eval_reads_the_run() {
    let run = scratch("align-draft");
    let run_s = run.to_str().unwrap();
    let mut args = vec![
        "align",
        "--config",
        "configs/draft-k-testbed.toml",
        "--out",
        run_s,
    ];
    args.extend_from_slice(SMALL);
    // Interrupted after one update, then resumed; `--seed` is the config's `train.seed`.
    let mut first = args.clone();
    first.extend_from_slice(&["--stop-after", "1", "--seed", "7"]);
    let (ok, text) = tiller(&first);
    assert!(ok, "{text}");
    let saved: toml::Table =
        toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    assert_eq!(saved["train"]["seed"].as_integer(), Some(7), "{saved}");
    assert!(
        !run.join("final").exists(),
        "an interrupted run has no final weights"
    );
    // Resuming may not change what the finished update meant.
    let (ok, text) = resume_with_set(&["align"], run_s, "train.learning_rate=1.0");
    assert!(!ok && text.contains("train.learning_rate"), "{text}");
    let (ok, text) = tiller(&["align", "--out", run_s, "--resume", "latest"]);
    assert!(ok, "{text}");
    assert!(text.contains("resumed from"), "{text}");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "final/pytorch_lora_weights.safetensors",
        "final/lora_kohya.safetensors",
        "samples/val-000000.png",
        "samples/val-000002.png",
    ] {
        assert!(run.join(f).exists(), "{f} missing:\n{text}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"val/gold_accuracy\""), "{metrics}");
    assert!(metrics.contains("\"reward_queries\""), "{metrics}");
    // The run evaluates like any model folder; the report without its `model` field.
    let eval_small = |model: &str, out: &PathBuf| -> serde_json::Value {
        let (ok, text) = tiller(&[
            "eval",
            "--model",
            model,
            "--per-task",
            "1",
            "--per-prompt",
            "1",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        v.as_object_mut().unwrap().remove("model");
        v
    };
    let out = scratch("align-eval");
    let run_report = eval_small(run_s, &out);
    // `merge` writes base + merged LoRA as a pipeline folder that evaluates to the same report.
    let merged = scratch("align-merged");
    let merged_s = merged.to_str().unwrap();
    let (ok, text) = tiller(&["merge", "--run", run_s, "--out", merged_s]);
    assert!(ok, "{text}");
    assert!(
        merged
            .join("unet/diffusion_pytorch_model.safetensors")
            .exists()
    );
    let (ok, text) = tiller(&["merge", "--run", run_s, "--out", merged_s]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let out2 = scratch("align-eval-merged");
    assert_eq!(run_report, eval_small(merged_s, &out2));
    // A checkpoint evaluates too: the last one holds the final weights.
    let last = run.join("checkpoints/step-00000002");
    let out3 = scratch("align-eval-checkpoint");
    assert_eq!(run_report, eval_small(last.to_str().unwrap(), &out3));
    let _ = std::fs::remove_dir_all(&out3);
    // The same folder again without --resume is refused.
    let (ok, text) = tiller(&args);
    assert!(!ok, "{text}");
    let _ = std::fs::remove_dir_all(&run);
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&merged);
    let _ = std::fs::remove_dir_all(&out2);
}

/// Reward-weighted likelihood's pre-training loss on a user's image folder (`[pretrain]`, the
/// Hugging Face imagefolder layout) instead of the testbed's renderings; a folder without its
/// metadata is refused before the run folder exists.
#[test]
fn align_trains_on_an_image_folder() {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tiller-align/tests/fixtures/pretrain-folder");
    let run = scratch("align-folder");
    let run_s = run.to_str().unwrap();
    // `tiller align` of `preset` into `run` with pre-training images from `folder`.
    let align_on = |preset: &str, folder: &std::path::Path| {
        let path = format!("pretrain.path=\"{}\"", folder.display());
        let mut args = vec![
            "align",
            "--config",
            preset,
            "--out",
            run_s,
            "--set",
            "pretrain.source=\"folder\"",
            "--set",
            &path,
        ];
        args.extend_from_slice(SMALL);
        tiller(&args)
    };
    let (ok, text) = align_on("configs/reward-weighted-testbed.toml", &folder);
    assert!(ok, "{text}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("pretrain_loss"), "{metrics}");
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains("[pretrain]") && saved.contains("folder"),
        "{saved}"
    );
    let _ = std::fs::remove_dir_all(&run);

    let empty = scratch("align-folder-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, text) = align_on("configs/refl-testbed.toml", &empty);
    assert!(!ok && text.contains("no metadata.jsonl"), "{text}");
    assert!(!run.exists(), "a refused run leaves no folder");
    // A caption with a word the model's tokenizer lacks is named before training.
    std::fs::copy(folder.join("c.png"), empty.join("c.png")).unwrap();
    std::fs::write(
        empty.join("metadata.jsonl"),
        "{\"file_name\": \"c.png\", \"text\": \"a grey triangle\"}\n",
    )
    .unwrap();
    let (ok, text) = align_on("configs/refl-testbed.toml", &empty);
    assert!(
        !ok && text.contains("c.png") && text.contains("unknown word \"grey\""),
        "{text}"
    );
    assert!(!run.exists(), "a refused run leaves no folder");
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn align_rejects_bad_configs_with_the_field_named() {
    let run = scratch("align-bad");
    let run_s = run.to_str().unwrap();
    let (ok, text) = tiller(&[
        "align",
        "--config",
        "configs/ddpo-testbed.toml",
        "--out",
        run_s,
        "--set",
        "train.bogus=1",
    ]);
    assert!(!ok && text.contains("bogus"), "{text}");
    // `--device` is the config's `device`, checked like it.
    let (ok, text) = tiller(&[
        "align",
        "--config",
        "configs/ddpo-testbed.toml",
        "--out",
        run_s,
        "--device",
        "tpu",
    ]);
    assert!(!ok && text.contains("unknown device `tpu`"), "{text}");
    let (ok, text) = tiller(&[
        "align",
        "--config",
        "configs/ddpo-testbed.toml",
        "--out",
        run_s,
        "--set",
        "sampling.eta=0",
    ]);
    assert!(!ok && text.contains("sampling.eta"), "{text}");
    let (ok, text) = tiller(&[
        "align",
        "--config",
        "configs/diffusion-dpo-testbed.toml",
        "--out",
        run_s,
        "--set",
        "method.diffusion-dpo.store=\"/nonexistent/store\"",
    ]);
    assert!(!ok && text.contains("not a preference store"), "{text}");
    // DRaFT-K needs gradients: the gold evaluator has none.
    let mut args = vec![
        "align",
        "--config",
        "configs/draft-k-testbed.toml",
        "--out",
        run_s,
        "--set",
        "reward=\"gold\"",
    ];
    args.extend_from_slice(SMALL);
    let (ok, text) = tiller(&args);
    assert!(!ok && text.contains("not differentiable"), "{text}");
    let _ = std::fs::remove_dir_all(&run);
}

/// LaSRO through the command: the surrogate folder loads with the base's tokenizer, the run
/// alternates a query batch with a generator update, resumes from the checkpoint between them
/// (the surrogate, its optimizer and the buffer restored) and exports; a missing surrogate folder
/// is named by its field before any run folder exists.
#[test]
fn lasro_runs_on_the_few_step_student_and_resumes() {
    let run = scratch("align-lasro");
    let run_s = run.to_str().unwrap();
    let args = [
        "align",
        "--config",
        "configs/lasro-testbed.toml",
        "--out",
        run_s,
        "--set",
        "train.updates=2",
        "--set",
        "train.batch_size=8",
        "--set",
        "method.lasro.updates_per_query=1",
        "--set",
        "method.lasro.surrogate_steps=2",
        "--set",
        "method.lasro.surrogate_batch=4",
        "--set",
        "prompts.val_per_task=1",
        "--set",
        "log.val_every=0",
        "--set",
        "log.checkpoint_every=1",
    ];
    let mut first = args.to_vec();
    first.extend_from_slice(&["--stop-after", "1"]);
    let (ok, text) = tiller(&first);
    assert!(ok, "{text}");
    let (ok, text) = tiller(&["align", "--out", run_s, "--resume", "latest"]);
    assert!(ok, "{text}");
    assert!(run.join("final").exists(), "{text}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    // Two query batches of 8 samples, nothing else queried.
    let last = metrics
        .lines()
        .rev()
        .find(|l| l.contains("\"loss\""))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["reward_queries"].as_f64(), Some(16.0), "{last}");
    assert!(v["surrogate_acc_after"].as_f64().is_some(), "{last}");
    let _ = std::fs::remove_dir_all(&run);
    let mut bad = args.to_vec();
    bad.extend_from_slice(&["--set", "method.lasro.surrogate=\"/nonexistent/reward\""]);
    let (ok, text) = tiller(&bad);
    assert!(!ok && text.contains("method.lasro.surrogate"), "{text}");
    assert!(!run.exists(), "a failed start leaves no run folder");
}

#[test]
fn compare_writes_a_table_and_plots() {
    let out = scratch("compare");
    let mut args = vec![
        "compare",
        "--methods",
        "ddpo,draft-k",
        "--budget",
        "4",
        "--micro-batches",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    for s in [
        "train.batch_size=2",
        "sampling.steps=3",
        "prompts.val_per_task=1",
        "method.ddpo.stat_min_count=2",
    ] {
        args.extend_from_slice(&["--set", s]);
    }
    let (ok, text) = tiller(&args);
    assert!(ok, "{text}");
    for f in [
        "compare.md",
        "compare.json",
        "compare.svg",
        "ddpo/final",
        "draft-k/final",
    ] {
        assert!(out.join(f).exists(), "{f} missing:\n{text}");
    }
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(
        md.contains("| ddpo |") && md.contains("| draft-k |"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    // Budget 4 at 2 per update: both spend exactly 4 reward queries.
    for m in json["methods"].as_array().unwrap() {
        let last = m["points"].as_array().unwrap().last().unwrap();
        assert_eq!(last["reward_queries"], 4.0, "{m}");
        // Each later validation is paired with update 0's verdicts.
        assert!(last["gain_se"].as_f64().unwrap() >= 0.0, "{m}");
        assert!(last["gain_p"].as_f64().unwrap() <= 1.0, "{m}");
    }
    assert!(out.join("ddpo/samples/val-000000.jsonl").exists());
    // `--micro-batches 2` ran each update as 2 x 1 accumulated, so every run measured its
    // gradient noise scale over its 2 updates.
    for m in json["methods"].as_array().unwrap() {
        assert_eq!(m["noise_scale"]["updates"], 2, "{m}");
    }
    assert!(md.contains("Gradient noise scale"), "{md}");
    let _ = std::fs::remove_dir_all(&out);

    // A batch the micro-batches do not divide is refused before anything is written.
    let bad = scratch("compare-bad");
    let (ok, text) = tiller(&[
        "compare",
        "--methods",
        "ddpo",
        "--budget",
        "4",
        "--micro-batches",
        "3",
        "--set",
        "train.batch_size=2",
        "--out",
        bad.to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("train.batch_size 2 is not a multiple"),
        "{text}"
    );
    assert!(!bad.exists());
}

#[test]
fn align_on_a_stable_diffusion_folder_then_sample_and_merge_the_run() {
    let dir = scratch("align-sd");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let run_s = run.to_str().unwrap();
    // Interrupted after one update, then resumed.
    let (ok, text) = tiller(&[
        "align",
        "--config",
        "configs/draft-k-sd.toml",
        "--out",
        run_s,
        "--set",
        "train.updates=2",
        "--set",
        "log.checkpoint_every=1",
        "--stop-after",
        "1",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("proxy_reward"), "{text}");
    assert!(!run.join("final").exists());
    let (ok, text) = tiller(&["align", "--out", run_s, "--resume", "latest"]);
    assert!(ok && text.contains("resumed"), "{text}");
    assert!(run.join("final/pytorch_lora_weights.safetensors").is_file());
    // The run samples as a Stable Diffusion pipeline, and merged it is one diffusers loads: the
    // base folder with the run's UNet, sampling the same pixels.
    let sample = |model: &str, out: &str| {
        let (ok, text) = tiller(&[
            "sample",
            "--model",
            model,
            "--prompt",
            "a red car",
            "--n",
            "2",
            "--steps",
            "4",
            "--out",
            out,
        ]);
        assert!(ok, "{text}");
        std::fs::read(out).unwrap()
    };
    let from_run = sample(run_s, dir.join("run.png").to_str().unwrap());
    let merged = dir.join("merged");
    let (ok, text) = tiller(&["merge", "--run", run_s, "--out", merged.to_str().unwrap()]);
    assert!(ok, "{text}");
    for part in [
        "model_index.json",
        "vae/config.json",
        "tokenizer",
        "unet/config.json",
    ] {
        assert!(merged.join(part).exists(), "merged pipeline lacks {part}");
    }
    let from_merged = sample(
        merged.to_str().unwrap(),
        dir.join("merged.png").to_str().unwrap(),
    );
    assert!(
        from_run == from_merged,
        "the merged pipeline samples what the run does"
    );
    let base = sample(
        "crates/tiller-diffusion/tests/fixtures/tiny-sd-pipeline",
        dir.join("base.png").to_str().unwrap(),
    );
    assert!(base != from_run, "the run's UNet differs from the base's");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SafetyDPO end to end on the shipped base: safe/unsafe pairs in CoProV2's form, one expert of
/// the `mark` category and one of the `ring`, and both merges into one adapter of rank 2r
/// written with the merged pipeline, which `sample` reads.
#[test]
fn safety_pairs_train_experts_that_merge_into_one_adapter() {
    let dir = scratch("safety");
    std::fs::create_dir_all(&dir).unwrap();
    let store = dir.join("pairs");
    let store_s = store.to_str().unwrap();
    let (ok, text) = tiller(&[
        "feedback",
        "safety-pairs",
        "--store",
        store_s,
        "--prompts",
        "3",
        "--per-prompt",
        "2",
        "--keep-all",
        "--steps",
        "3",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("stored 6 safe/unsafe pairs (mark: 4, ring: 2)"),
        "{text}"
    );
    let expert = |name: &str, seed: &str, category: &str| {
        let out = dir.join(name);
        let mut args = vec![
            "align".to_string(),
            "--config".into(),
            "configs/safety-dpo-testbed.toml".into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--seed".into(),
            seed.into(),
            "--set".into(),
            format!("method.safety-dpo.store={store_s}"),
            "--set".into(),
            format!("method.safety-dpo.category={category}"),
        ];
        args.extend(SMALL.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        (tiller(&refs), out)
    };
    // A category with no pairs is refused, naming it.
    let ((ok, text), _) = expert("none", "1", "symbol");
    assert!(!ok && text.contains("category `symbol`"), "{text}");
    let ((ok, text), a) = expert("expert-a", "1", "mark");
    assert!(ok, "{text}");
    let ((ok, text), b) = expert("expert-b", "2", "ring");
    assert!(ok, "{text}");
    for strategy in ["co-merge", "average"] {
        let merged = dir.join(format!("merged-{strategy}"));
        let (ok, text) = tiller(&[
            "merge",
            "--run",
            a.to_str().unwrap(),
            "--run",
            b.to_str().unwrap(),
            "--strategy",
            strategy,
            "--calibration-prompts",
            "2",
            "--steps",
            "3",
            "--out",
            merged.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged.join("merge.json")).unwrap())
                .unwrap();
        assert_eq!(report["rank"], 8, "{report}");
        let units = report["units"].as_u64().unwrap();
        let kept: Vec<u64> = report["units_kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        if strategy == "co-merge" {
            assert_eq!(kept.iter().sum::<u64>(), units, "{report}");
            assert_eq!(report["calibration_images"], 2, "{report}");
        } else {
            assert_eq!(kept, vec![units, units], "{report}");
        }
        for f in [
            "pytorch_lora_weights.safetensors",
            "model_index.json",
            "unet/config.json",
        ] {
            assert!(merged.join(f).exists(), "{f} missing: {text}");
        }
        let png = dir.join(format!("{strategy}.png"));
        let (ok, text) = tiller(&[
            "sample",
            "--model",
            merged.to_str().unwrap(),
            "--prompt",
            "a red circle with the forbidden mark",
            "--steps",
            "3",
            "--out",
            png.to_str().unwrap(),
        ]);
        assert!(ok && png.is_file(), "{text}");
    }
    // One expert is not a merge of experts; an existing output is refused.
    let (ok, text) = tiller(&[
        "merge",
        "--run",
        a.to_str().unwrap(),
        "--run",
        a.to_str().unwrap(),
        "--out",
        dir.join("merged-average").to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("--out"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
