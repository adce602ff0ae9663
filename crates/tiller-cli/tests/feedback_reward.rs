//! `tiller feedback collect`, `reward train`, `reward eval` and best-of-N end to end on the
//! renderer's images (no model needed): the store fills, a reward model trains and reports against
//! the annotator ceiling, and best-of-N with the gold reward never lowers gold accuracy.

mod common;
use common::tiller;

use std::path::{Path, PathBuf};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tiller-fr-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const CONFIG: &str = r#"
members = 2
[net]
image_channels = 4
hidden = 16
[net.text_encoder]
vocab_size = 128
hidden_size = 16
intermediate_size = 32
projection_dim = 16
num_hidden_layers = 1
num_attention_heads = 2
max_position_embeddings = 16
hidden_act = "quick_gelu"
layer_norm_eps = 1e-5
eos_token_id = 1
bos_token_id = 0
pad_token_id = 1
[train]
steps = 10
batch_size = 8
"#;

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn collect_train_eval_and_best_of() {
    let dir = scratch("loop");
    std::fs::create_dir_all(&dir).unwrap();
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    for (split, seed) in [("train", "0"), ("test", "1")] {
        let (ok, text) = tiller(&[
            "feedback",
            "collect",
            "--model",
            "renderer",
            "--store",
            s,
            "--split",
            split,
            "--prompts",
            "24",
            "--per-prompt",
            "3",
            "--agreement-pairs",
            "40",
            "--seed",
            seed,
        ]);
        assert!(ok, "{text}");
        assert!(text.contains("annotator agreement 0."), "{text}");
    }
    let agreement = json(&store.join("agreement-test.json"));
    assert!(agreement["agreement"].as_f64().unwrap() > 0.5);

    let config = dir.join("reward.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let model = dir.join("reward");
    let m = model.to_str().unwrap();
    let train = [
        "reward",
        "train",
        "--config",
        config.to_str().unwrap(),
        "--store",
        s,
        "--out",
        m,
    ];
    let (ok, text) = tiller(&train);
    assert!(ok, "{text}");
    assert!(model.join("model.safetensors").exists() && model.join("config.json").exists());
    // The collected region marks are read; without a region head the start line says they
    // go unused, with one they train it.
    assert!(
        text.contains("region marks (unused: no net.region_head)"),
        "{text}"
    );
    let regional = dir.join("reward-region");
    let mut with_head = train.to_vec();
    with_head[7] = regional.to_str().unwrap();
    with_head.extend(["--set", "net.region_head=true"]);
    let (ok, text) = tiller(&with_head);
    assert!(ok, "{text}");
    let marks: usize = text
        .split(" region marks")
        .next()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(marks > 0 && !text.contains("unused"), "{text}");
    assert_eq!(
        json(&regional.join("config.json"))["net"]["region_head"],
        true
    );
    // Contrastive pretraining of the towers, then training from them (`init`).
    let towers = dir.join("towers");
    let pretrain = |out: &std::path::Path, batch: &str| {
        tiller(&[
            "reward",
            "pretrain",
            "--config",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--set",
            "pretrain.steps=3",
            "--set",
            "pretrain.hard_negatives=true",
            "--set",
            batch,
        ])
    };
    let (ok, text) = pretrain(&towers, "pretrain.batch_size=8");
    assert!(ok, "{text}");
    let log = std::fs::read_to_string(towers.join("pretrain.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");
    assert_eq!(json(&towers.join("config.json"))["members"], 1);
    let summary = json(&towers.join("pretrain.json"));
    assert_eq!(summary["hard_negatives"], true);
    for key in [
        "minimal_pairs_image_train_prompts",
        "minimal_pairs_text_test_prompts",
    ] {
        let v = summary[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key}: {v}");
    }
    let init = format!("init={}", towers.display());
    let mut from_towers = train.to_vec();
    let warm = dir.join("reward-init");
    from_towers[7] = warm.to_str().unwrap();
    from_towers.extend(["--set", &init, "--set", "net.caption_match=true"]);
    let (ok, text) = tiller(&from_towers);
    assert!(ok, "{text}");
    assert!(warm.join("model.safetensors").exists());
    assert_eq!(
        json(&warm.join("config.json"))["net"]["caption_match"],
        true
    );
    // Towers of another shape, and a batch without negatives, are refused by name.
    let bad = dir.join("reward-bad");
    let mut mismatched = from_towers.clone();
    mismatched[7] = bad.to_str().unwrap();
    mismatched.extend(["--set", "net.hidden=8"]);
    let (ok, text) = tiller(&mismatched);
    assert!(
        !ok && text.contains("`init`") && text.contains("hidden 16"),
        "{text}"
    );
    assert!(!bad.exists());
    // One folder of towers per member (a TOML list); a count that is neither one nor the
    // member count (2 here), or an empty list, is refused by name, writing nothing.
    let t = towers.display();
    for (name, list, refused) in [
        (
            "reward-per-member",
            format!("init=[\"{t}\", \"{t}\"]"),
            None,
        ),
        (
            "reward-three",
            format!("init=[\"{t}\", \"{t}\", \"{t}\"]"),
            Some("3 pretrained towers for 2 members"),
        ),
        (
            "reward-empty",
            "init=[]".to_string(),
            Some("`init`: an empty list"),
        ),
    ] {
        let out = dir.join(name);
        let mut args = train.to_vec();
        args[7] = out.to_str().unwrap();
        args.extend(["--set", &list]);
        let (ok, text) = tiller(&args);
        match refused {
            None => assert!(ok && out.join("model.safetensors").exists(), "{text}"),
            Some(message) => {
                assert!(
                    !ok && text.contains("init") && text.contains(message),
                    "{text}"
                );
                assert!(!out.exists());
            }
        }
    }
    let (ok, text) = pretrain(&dir.join("towers-bad"), "pretrain.batch_size=1");
    assert!(!ok && text.contains("pretrain.batch_size"), "{text}");
    assert!(!dir.join("towers-bad").exists());
    let (ok, text) = pretrain(
        &dir.join("towers-bad-render"),
        "pretrain.render.soft_edge_rate=2",
    );
    assert!(
        !ok && text.contains("pretrain.render.soft_edge_rate"),
        "{text}"
    );
    assert!(!dir.join("towers-bad-render").exists());
    // The folder is never overwritten.
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let (ok, text) = tiller(&train);
    assert!(!ok && text.contains("already exists"), "{text}");
    assert_eq!(
        before,
        std::fs::read(model.join("model.safetensors")).unwrap()
    );

    // `reward eval` of `model` on `store` with `extra` flags, writing its report and one line
    // per comparison under `tag`: (success, output, the lines, the report's path).
    let reward_eval = |tag: &str, model: &str, store: &str, extra: &[&str]| {
        let folder = dir.join(format!("eval-{tag}"));
        let (report, lines) = (folder.join("report.json"), folder.join("comparisons.jsonl"));
        let mut args = vec![
            "reward",
            "eval",
            "--model",
            model,
            "--store",
            store,
            "--out",
            folder.to_str().unwrap(),
        ];
        args.extend(extra);
        let (ok, text) = tiller(&args);
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(&lines)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (ok, text, rows, report)
    };
    let (ok, text, rows, report) = reward_eval("reward-eval", m, s, &[]);
    assert!(ok, "{text}");
    let r = json(&report);
    // One line per comparison, ties included, with both images' scores.
    assert_eq!(rows.len() as u64, r["comparisons"].as_u64().unwrap());
    for row in &rows {
        for side in ["a", "b"] {
            for key in ["reward", "caption_match", "gold", "utility"] {
                assert!(row[side][key].as_f64().unwrap().is_finite(), "{row}");
            }
        }
        assert!(row["content_differs"].is_boolean(), "{row}");
    }
    assert!(r["comparisons"].as_u64().unwrap() > 0, "{r}");
    assert!(r["pairwise_accuracy"].as_f64().is_some(), "{r}");
    assert_eq!(r["annotator_agreement"], agreement["agreement"]);
    assert_eq!(r["factor_correlation"].as_array().unwrap().len(), 10);
    assert!(
        r["mean_uncertainty_held_out_types"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    let matched = r["caption_match_pairwise_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&matched), "{r}");
    // The per-task rows split the comparisons between them.
    let per_task = r["per_task"].as_array().unwrap();
    assert!(!per_task.is_empty(), "{r}");
    let split: u64 = per_task
        .iter()
        .map(|t| t["comparisons"].as_u64().unwrap())
        .sum();
    assert_eq!(split, r["comparisons"].as_u64().unwrap(), "{r}");
    // So do the rows by what separates the two images (content or looks only).
    let by_difference = r["per_difference"].as_array().unwrap();
    assert_eq!(by_difference.len(), 2, "{r}");
    let split: u64 = by_difference
        .iter()
        .map(|t| t["comparisons"].as_u64().unwrap())
        .sum();
    assert_eq!(split, r["comparisons"].as_u64().unwrap(), "{r}");

    // Late fusion of the reward and the towers' caption match, standardised over the training
    // split's images: each fused score is the parts' standardised sum, part by part.
    let fused = dir.join("fused");
    let cm_part = format!("caption-match:{}", towers.display());
    let fuse = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "reward",
            "fuse",
            "--part",
            m,
            "--part",
            &cm_part,
            "--store",
            s,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        tiller(&args)
    };
    let (ok, text) = fuse(&fused, &[]);
    assert!(ok, "{text}");
    let config = json(&fused.join("fusion.json"));
    let parts = config["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(
        (parts[0]["score"].as_str(), parts[1]["score"].as_str()),
        (Some("reward"), Some("caption_match"))
    );
    assert!(fused.join("part-1/model.safetensors").exists());
    let stat = |k: usize, key: &str| parts[k][key].as_f64().unwrap();
    let eval_rows = |model: &std::path::Path, tag: &str| {
        let (ok, text, rows, _) = reward_eval(tag, model.to_str().unwrap(), s, &[]);
        assert!(ok, "{text}");
        rows
    };
    let fused_rows = eval_rows(&fused, "fused");
    let matched_rows = eval_rows(&towers, "towers");
    assert_eq!(fused_rows.len(), rows.len());
    for ((f, r), c) in fused_rows.iter().zip(&rows).zip(&matched_rows) {
        for side in ["a", "b"] {
            let v = |row: &serde_json::Value, key: &str| row[side][key].as_f64().unwrap();
            let expected = (v(r, "reward") - stat(0, "mean")) / stat(0, "std")
                + (v(c, "caption_match") - stat(1, "mean")) / stat(1, "std");
            assert!(
                (v(f, "reward") - expected).abs() < 1e-6,
                "{} vs {expected}",
                v(f, "reward")
            );
            assert_eq!(v(f, "caption_match"), v(c, "caption_match"));
        }
    }
    // Bad parts and weights are refused by name, and nothing is written.
    let (ok, text) = fuse(&dir.join("fused-bad"), &["--weight", "1"]);
    assert!(!ok && text.contains("--weight"), "{text}");
    let (ok, text) = fuse(&dir.join("fused-bad"), &["--part", "/nonexistent"]);
    assert!(
        !ok && text.contains("--part") && text.contains("part 2 (/nonexistent)"),
        "{text}"
    );
    assert!(!dir.join("fused-bad").exists() && !dir.join(".fused-bad.tmp").exists());

    // `--unseen-in`: a second collection on the training split, evaluated on the prompts the
    // first store never held (nor their mirror images).
    let other = dir.join("store-2");
    let (ok, text) = tiller(&[
        "feedback",
        "collect",
        "--model",
        "renderer",
        "--store",
        other.to_str().unwrap(),
        "--prompts",
        "40",
        "--per-prompt",
        "3",
        "--agreement-pairs",
        "20",
        "--seed",
        "3",
    ]);
    assert!(ok, "{text}");
    let eval_other = |tag: &str, unseen_in: Option<&std::path::Path>| {
        let mut extra = vec!["--split", "train"];
        if let Some(p) = unseen_in {
            extra.extend(["--unseen-in", p.to_str().unwrap()]);
        }
        let (ok, text, rows, out) = reward_eval(tag, m, other.to_str().unwrap(), &extra);
        let prompts: Vec<String> = rows.iter().map(|r| r["prompt"].to_string()).collect();
        (ok, text, prompts, out)
    };
    let (ok, text, all, out) = eval_other("other-all", None);
    assert!(ok, "{text}");
    // Training-split prompts never hold a held-out combination: the spread by prompt type has
    // only its training-type side there (the test split's report has the other, above).
    let r = json(&out);
    assert!(r["mean_uncertainty_held_out_types"].is_null(), "{r}");
    assert_eq!(r["mean_uncertainty_training_types"], r["mean_uncertainty"]);
    let (ok, text, kept, out) = eval_other("other-unseen", Some(&store));
    assert!(ok, "{text}");
    use tiller_feedback::PreferenceStore;
    let seen: std::collections::HashSet<String> = tiller_feedback::SqliteStore::open(&store)
        .unwrap()
        .prompts(None)
        .unwrap()
        .into_iter()
        .flat_map(|p| [tiller_testbed::prompts::mirror_prompt(&p.text), p.text])
        .map(|t| serde_json::Value::from(t).to_string())
        .collect();
    let expected: Vec<String> = all.iter().filter(|p| !seen.contains(*p)).cloned().collect();
    assert_eq!(kept, expected);
    assert!(
        !kept.is_empty() && kept.len() < all.len(),
        "{} of {}",
        kept.len(),
        all.len()
    );
    let r = json(&out);
    assert_eq!(r["seen_comparisons_removed"], all.len() - kept.len());
    assert_eq!(r["unseen_in"], store.display().to_string());
    assert!(text.contains("Only prompts unseen in"), "{text}");
    // Every prompt seen, or no store there: clear errors, and nothing is created.
    let (ok, text, _, _) = eval_other("other-self", Some(&other));
    assert!(
        !ok && text.contains("unseen_in") && text.contains("every one of the"),
        "{text}"
    );
    // A failed evaluation leaves no report folder, nor its staging copy.
    assert!(!dir.join("eval-other-self").exists() && !dir.join(".eval-other-self.tmp").exists());
    // An existing report folder is refused, untouched.
    let (ok, text, _, _) = eval_other("other-all", None);
    assert!(!ok && text.contains("already exists"), "{text}");
    let missing = dir.join("no-store");
    let (ok, text, _, _) = eval_other("other-missing", Some(&missing));
    assert!(
        !ok && text.contains("--unseen-in") && text.contains("no preference store"),
        "{text}"
    );
    assert!(!missing.exists());

    // Best-of-4: plain sampling, the learned reward's pick and the gold reward's pick from the
    // same candidates; the gold pick is an upper bound on both.
    let out = dir.join("best-of");
    let (ok, text) = tiller(&[
        "eval",
        "--model",
        "renderer",
        "--per-task",
        "4",
        "--per-prompt",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--best-of",
        "4",
        "--reward",
        m,
    ]);
    assert!(ok, "{text}");
    let b = &json(&out.join("report.json"))["best_of"];
    let (plain, learned, gold) = (
        b["plain_overall"].as_f64().unwrap(),
        b["reward_overall"].as_f64().unwrap(),
        b["gold_overall"].as_f64().unwrap(),
    );
    assert!(gold >= plain && gold >= learned, "{b}");
    assert_eq!(b["n"], 4);
    // Best-of-2 on one prompt per task, by `reward`.
    let best_of_2 = |out: &std::path::Path, reward: &str| {
        tiller(&[
            "eval",
            "--model",
            "renderer",
            "--per-task",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--best-of",
            "2",
            "--reward",
            reward,
        ])
    };
    let (ok, text) = best_of_2(&dir.join("bad"), "/nonexistent");
    assert!(!ok && text.contains("--reward /nonexistent"), "{text}");
    // The pretrained towers' caption match is a label-free reward.
    let out = dir.join("best-of-cm");
    let (ok, text) = best_of_2(&out, &format!("caption-match:{}", towers.display()));
    assert!(ok, "{text}");
    assert!(json(&out.join("report.json"))["best_of"]["reward_overall"].is_number());
    let out = dir.join("best-of-fused");
    let (ok, text) = best_of_2(&out, fused.to_str().unwrap());
    assert!(ok, "{text}");
    assert!(json(&out.join("report.json"))["best_of"]["reward_overall"].is_number());
    let (ok, text) = best_of_2(&dir.join("bad-cm"), "caption-match:/nonexistent");
    assert!(
        !ok && text.contains("--reward caption-match:/nonexistent"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reward_config_errors_name_the_key() {
    let dir = scratch("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("reward.toml");
    std::fs::write(&config, CONFIG.replace("steps = 10", "stpes = 10")).unwrap();
    let (ok, text) = tiller(&[
        "reward",
        "train",
        "--config",
        config.to_str().unwrap(),
        "--store",
        dir.join("store").to_str().unwrap(),
        "--out",
        dir.join("m").to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("stpes"), "{text}");
    // A missing store is refused by its flag without creating one; a store with no feedback
    // is a clear error; neither leaves a model folder.
    std::fs::write(&config, CONFIG).unwrap();
    let train = || {
        tiller(&[
            "reward",
            "train",
            "--config",
            config.to_str().unwrap(),
            "--store",
            dir.join("store").to_str().unwrap(),
            "--out",
            dir.join("m").to_str().unwrap(),
        ])
    };
    let (ok, text) = train();
    assert!(!ok && text.contains("no preference store"), "{text}");
    assert!(!dir.join("store").exists());
    tiller_feedback::SqliteStore::open(dir.join("store")).unwrap();
    let (ok, text) = train();
    assert!(!ok && text.contains("no feedback"), "{text}");
    assert!(!dir.join("m").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `reward score` scores another program's PNGs as the loop would: a renderer drawing of its
/// prompt scores above a blank image under the gold reward, every line comes back in order, and
/// a missing image or an existing `--out` is an error that writes nothing.
#[test]
fn reward_score_scores_pngs_from_a_manifest() {
    use tiller_testbed::prompts::PromptGenerator;
    use tiller_testbed::{Image, RenderConfig, Split, Task, image::write_png, render_prompt};
    let dir = scratch("score");
    std::fs::create_dir_all(&dir).unwrap();
    let prompt = PromptGenerator::new(3)
        .prompt(Task::SingleObject, Split::Train)
        .unwrap();
    let config = RenderConfig::default();
    let drawn = render_prompt(&prompt, &config, 5).unwrap().image;
    let r = config.resolution;
    let blank = Image::from_rgb(r, r, vec![255; r * r * 3]).unwrap();
    write_png(&dir.join("drawn.png"), &drawn).unwrap();
    write_png(&dir.join("blank.png"), &blank).unwrap();
    let manifest = dir.join("manifest.jsonl");
    let line =
        |image: &str| serde_json::json!({ "image": image, "prompt": prompt.text }).to_string();
    std::fs::write(
        &manifest,
        format!("{}\n{}\n", line("drawn.png"), line("blank.png")),
    )
    .unwrap();
    let out = dir.join("scores.jsonl");
    let args = |out: &std::path::Path| {
        vec![
            "reward".to_string(),
            "score".into(),
            "--manifest".into(),
            manifest.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    let run = |a: Vec<String>| tiller(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, text) = run(args(&out));
    assert!(ok, "{text}");
    let scores: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(scores.len(), 2);
    assert_eq!(scores[0]["image"], "drawn.png");
    let (d, b) = (
        scores[0]["reward"].as_f64().unwrap(),
        scores[1]["reward"].as_f64().unwrap(),
    );
    assert!(d > b + 0.5, "drawn {d} vs blank {b}");
    // An existing --out is refused and left as it was.
    let before = std::fs::read_to_string(&out).unwrap();
    let (ok, text) = run(args(&out));
    assert!(!ok && text.contains("already exists"), "{text}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), before);
    // A missing image is named.
    std::fs::write(&manifest, format!("{}\n", line("missing.png"))).unwrap();
    let (ok, text) = run(args(&dir.join("other.jsonl")));
    assert!(!ok && text.contains("missing.png"), "{text}");
    assert!(!dir.join("other.jsonl").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `reward score --reward clip-score:<CLIPModel folder>` scores PNGs of any size through CLIP's
/// preprocessing, the same scores the library gives.
#[test]
fn reward_score_takes_the_clip_rewards() {
    use tiller_testbed::{Image, image::write_png};
    let dir = scratch("score-clip");
    std::fs::create_dir_all(&dir).unwrap();
    let clip = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../tiller-diffusion/tests/fixtures/tiny-clip-model");
    let images: Vec<Image> = (0..2u8)
        .map(|k| {
            let rgb = (0..24 * 20 * 3)
                .map(|i| ((i * 37 + k as usize * 91) % 251) as u8)
                .collect();
            Image::from_rgb(24, 20, rgb).unwrap()
        })
        .collect();
    let prompts = vec!["a photo of a red cube".to_string(); 2];
    let mut lines = String::new();
    for (i, im) in images.iter().enumerate() {
        write_png(&dir.join(format!("{i}.png")), im).unwrap();
        lines += &format!(
            "{}\n",
            serde_json::json!({ "image": format!("{i}.png"), "prompt": prompts[i] })
        );
    }
    std::fs::write(dir.join("manifest.jsonl"), lines).unwrap();
    let spec = format!("clip-score:{}", clip.display());
    let out = dir.join("scores.jsonl");
    let (ok, text) = tiller(&[
        "reward",
        "score",
        "--manifest",
        dir.join("manifest.jsonl").to_str().unwrap(),
        "--reward",
        &spec,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let got: Vec<f64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let device = burn::tensor::Device::flex();
    let reward =
        tiller_reward::load::load(&spec, &tiller_testbed::Tokenizer::shapes(), &device).unwrap();
    let want = reward.score(&images, &prompts).unwrap();
    assert_eq!(got.len(), 2);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    assert!(got[0] != got[1]);
    let _ = std::fs::remove_dir_all(&dir);
}
