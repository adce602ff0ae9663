//! `tiller base train`, `sample`, `eval` and `quickstart` end to end on a few steps: the run folder
//! has what it should, a resumed run continues, and bad input fails with a named cause.

mod common;
use common::{resume_with_set, tiller, tiller_in};

use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tiller-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const TINY: &[&str] = &[
    "--set",
    "train.steps=2",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.warmup_steps=1",
    "--set",
    "log.checkpoint_every=1",
    "--set",
    "log.sample_every=2",
    "--set",
    "sample.steps=2",
    "--set",
    "sample.per_prompt=1",
];

#[test]
fn base_train_then_sample_and_eval() {
    let run = scratch("base");
    let run_s = run.to_str().unwrap();
    let mut args = vec![
        "base",
        "train",
        "--config",
        "configs/testbed-base.toml",
        "--out",
        run_s,
    ];
    args.extend_from_slice(TINY);
    let (ok, text) = tiller(&args);
    assert!(ok, "{text}");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "checkpoints/latest",
        "samples/step-00000002.png",
        "pipeline/model_index.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing:\n{text}");
    }
    // The same folder again without --resume is refused, and nothing is overwritten.
    let before = std::fs::read(run.join("config.toml")).unwrap();
    let (ok, text) = tiller(&args);
    assert!(!ok && text.contains("--resume latest"), "{text}");
    assert_eq!(before, std::fs::read(run.join("config.toml")).unwrap());
    // Resuming a finished run is a no-op that still writes the pipeline.
    let (ok, text) = tiller(&["base", "train", "--out", run_s, "--resume", "latest"]);
    assert!(ok && text.contains("resumed from"), "{text}");
    // On resume, --set may extend the run, and nothing else: a refused key names itself and
    // leaves the saved config as it was; an extension trains on and records the new total.
    let (ok, text) = resume_with_set(&["base", "train"], run_s, "train.learning_rate=1.0");
    assert!(!ok && text.contains("train.learning_rate"), "{text}");
    assert_eq!(before, std::fs::read(run.join("config.toml")).unwrap());
    let (ok, text) = resume_with_set(&["base", "train"], run_s, "train.steps=3");
    assert!(ok && text.contains("resumed from"), "{text}");
    assert!(run.join("checkpoints/step-00000003").exists(), "{text}");
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("steps = 3"), "{saved}");

    let pipe = run.join("pipeline");
    let grid = run.join("grid.png");
    let (ok, text) = tiller(&[
        "sample",
        "--model",
        pipe.to_str().unwrap(),
        "--prompt",
        "three red circles",
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        grid.to_str().unwrap(),
    ]);
    assert!(ok && grid.exists(), "{text}");
    // The grid is never overwritten.
    let before = std::fs::read(&grid).unwrap();
    let (ok, text) = tiller(&[
        "sample",
        "--model",
        pipe.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--out",
        grid.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("already exists"), "{text}");
    assert_eq!(before, std::fs::read(&grid).unwrap());
    let grid = run.join("grid-2.png");
    let (ok, text) = tiller(&[
        "sample",
        "--model",
        pipe.to_str().unwrap(),
        "--prompt",
        "a red hexagon",
        "--out",
        grid.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("unknown word \"hexagon\""), "{text}");
    let (ok, text) = tiller(&[
        "sample",
        "--model",
        pipe.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--resolution",
        "64",
        "--out",
        grid.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("trained at 32x32"), "{text}");
    assert!(!grid.exists());

    let eval_dir = run.join("eval");
    let (ok, text) = tiller(&[
        "eval",
        "--model",
        pipe.to_str().unwrap(),
        "--per-task",
        "1",
        "--per-prompt",
        "1",
        "--steps",
        "2",
        "--out",
        eval_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["images"], 7);
    assert!(eval_dir.join("geneval/00000/metadata.jsonl").exists());
    // results.jsonl: a line per image, pointing at its sample, agreeing with the table.
    let results = std::fs::read_to_string(eval_dir.join("results.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7);
    for l in &lines {
        let tag = l["tag"].as_str().unwrap();
        assert!(
            eval_dir.join(l["filename"].as_str().unwrap()).exists(),
            "{l}"
        );
        let correct = lines
            .iter()
            .filter(|m| m["tag"] == tag && m["correct"] == true)
            .count();
        assert_eq!(report["per_task"][tag]["correct"], correct, "{tag}");
    }
    let _ = std::fs::remove_dir_all(&run);
}

/// The flow-matching base config trains (from the DDPM base's weights), saves a pipeline with
/// diffusers' flow-matching scheduler, and that pipeline samples and evaluates with the Euler ODE,
/// or with the Flow-GRPO SDE under `--sampler ancestral`.
#[test]
fn a_flow_matching_base_trains_samples_and_evaluates() {
    let run = scratch("flow-base");
    let run_s = run.to_str().unwrap();
    let mut args = vec![
        "base",
        "train",
        "--config",
        "configs/testbed-flow-base.toml",
        "--out",
        run_s,
    ];
    args.extend_from_slice(TINY);
    let (ok, text) = tiller(&args);
    assert!(ok, "{text}");
    let pipeline = run.join("pipeline");
    let scheduler =
        std::fs::read_to_string(pipeline.join("scheduler/scheduler_config.json")).unwrap();
    assert!(
        scheduler.contains("FlowMatchEulerDiscreteScheduler"),
        "{scheduler}"
    );
    let grid = |extra: &[&str], name: &str| {
        let out = run.join(name);
        let mut a = vec![
            "sample",
            "--model",
            pipeline.to_str().unwrap(),
            "--prompt",
            "a red circle",
            "--n",
            "2",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        let (ok, text) = tiller(&a);
        assert!(ok, "{text}");
        std::fs::read(out).unwrap()
    };
    let ode = grid(&[], "ode.png");
    assert_eq!(ode, grid(&["--sampler", "ddim"], "ode-again.png"));
    assert_ne!(ode, grid(&["--sampler", "ancestral"], "sde.png"));
    let out = run.join("eval");
    let (ok, text) = tiller(&[
        "eval",
        "--model",
        pipeline.to_str().unwrap(),
        "--tasks",
        "colors",
        "--per-task",
        "2",
        "--per-prompt",
        "1",
        "--steps",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok && out.join("report.json").exists(), "{text}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("sampler = flow-ode"), "{report}");
    let _ = std::fs::remove_dir_all(&run);
}

/// `init` starts a run from a pipeline's weights: with a zero learning rate and no EMA the run's
/// pipeline samples exactly what the init pipeline samples. A pipeline whose configs differ from
/// the config's model is refused, naming the field, before any run folder exists.
#[test]
fn base_train_from_init_starts_from_its_weights() {
    let run = scratch("base-init");
    let run_s = run.to_str().unwrap();
    let mut args = vec![
        "base",
        "train",
        "--config",
        "configs/testbed-base.toml",
        "--out",
        run_s,
        "--set",
        "init=\"assets/testbed-base\"",
        "--set",
        "model.unet.norm_num_groups=4",
    ];
    let (ok, text) = tiller(&args);
    assert!(
        !ok && text.contains("init =") && text.contains("norm_num_groups"),
        "{text}"
    );
    assert!(!run.exists());
    args.truncate(args.len() - 2);
    args.extend_from_slice(TINY);
    args.extend_from_slice(&[
        "--set",
        "train.learning_rate=0.0",
        "--set",
        "train.ema_decay=0.0",
    ]);
    let (ok, text) = tiller(&args);
    assert!(
        ok && text.contains("starting from the weights of"),
        "{text}"
    );
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains("init = \"/"),
        "the path is kept absolute: {saved}"
    );
    let grid = |model: &str, name: &str| {
        let out = run.join(name);
        let (ok, text) = tiller(&[
            "sample",
            "--model",
            model,
            "--prompt",
            "a red circle with a white ring",
            "--n",
            "2",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        std::fs::read(out).unwrap()
    };
    let trained = grid(run.join("pipeline").to_str().unwrap(), "trained.png");
    assert_eq!(trained, grid("assets/testbed-base", "init.png"));
    let _ = std::fs::remove_dir_all(&run);
}

/// Every image has its own noise stream (its seed), so the batch size is a speed setting only:
/// `--batch 4` and `--batch 7` write the same results; and with no sampling flags the shipped
/// base is sampled as its folder recommends (tiller_sampling.json: ancestral, 30 steps).
#[test]
fn eval_results_do_not_depend_on_the_batch_size() {
    let mut seen = Vec::new();
    for batch in ["4", "7"] {
        let out = scratch(&format!("eval-batch-{batch}"));
        let (ok, text) = tiller(&[
            "eval",
            "--per-task",
            "1",
            "--per-prompt",
            "3",
            "--steps",
            "4",
            "--batch",
            batch,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
        seen.push((read("results.jsonl"), read("report.json")));
        let _ = std::fs::remove_dir_all(&out);
    }
    assert_eq!(
        seen[0].0, seen[1].0,
        "results.jsonl differs between batch sizes"
    );
    assert_eq!(
        seen[0].1, seen[1].1,
        "report.json differs between batch sizes"
    );

    let out = scratch("eval-defaults");
    let (ok, text) = tiller(&[
        "eval",
        "--per-task",
        "1",
        "--per-prompt",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["settings"]["steps"], "30", "{report}");
    assert_eq!(report["settings"]["sampler"], "ancestral", "{report}");
    assert_eq!(report["settings"]["guidance"], "3", "{report}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_configs_are_named() {
    let run = scratch("badcfg");
    let (ok, text) = tiller(&[
        "base",
        "train",
        "--out",
        run.to_str().unwrap(),
        "--set",
        "train.stpes=3",
    ]);
    assert!(
        !ok && text.contains("stpes") && text.contains("steps"),
        "{text}"
    );
    assert!(!run.exists(), "nothing is written for a bad config");
    let (ok, text) = tiller(&[
        "base",
        "train",
        "--config",
        "/nope.toml",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("/nope.toml"), "{text}");
    let (ok, text) = tiller(&[
        "base",
        "train",
        "--out",
        run.to_str().unwrap(),
        "--resume",
        "latest",
    ]);
    assert!(!ok && text.contains("config.toml"), "{text}");
    let (ok, text) = tiller(&["sample", "--model", "/nope", "--prompt", "a red circle"]);
    assert!(!ok && text.contains("/nope"), "{text}");
}

#[test]
fn quickstart_without_a_base_model_is_an_error() {
    let out = scratch("qs");
    let (ok, text) = tiller(&[
        "quickstart",
        "--out",
        out.to_str().unwrap(),
        "--per-task",
        "2",
        "--model",
        "/nonexistent",
    ]);
    assert!(!ok && text.contains("/nonexistent"), "{text}");
    assert!(!out.exists(), "nothing is written before the check");
}

#[test]
fn kill_nine_then_resume_equals_an_uninterrupted_run() {
    let args = |out: &str| -> Vec<String> {
        [
            "base",
            "train",
            "--out",
            out,
            "--set",
            "train.steps=16",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "log.checkpoint_every=4",
            "--set",
            "log.sample_every=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = scratch("whole");
    let args_whole = args(whole.to_str().unwrap());
    let (ok, text) = tiller(&args_whole.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");

    let killed = scratch("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiller"))
        .current_dir(
            Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../.."),
        )
        .args(args(killed.to_str().unwrap()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // SIGKILL as soon as the first checkpoint exists (wherever the run is by then).
    let first = killed.join("checkpoints/step-00000004");
    let start = std::time::Instant::now();
    while !first.exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (ok, text) = tiller(&[
        "base",
        "train",
        "--out",
        killed.to_str().unwrap(),
        "--resume",
        "latest",
    ]);
    assert!(ok && text.contains("resumed from"), "{text}");
    for f in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let a = std::fs::read(whole.join("pipeline").join(f)).unwrap();
        let b = std::fs::read(killed.join("pipeline").join(f)).unwrap();
        assert!(
            a == b,
            "{f} differs between the killed-and-resumed run and the uninterrupted one"
        );
    }
    let steps: Vec<u64> = std::fs::read_to_string(killed.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![16], "log.every = 25 logs only the last step");
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&killed);
}

#[test]
fn quickstart_runs_the_whole_loop_on_the_shipped_base() {
    // From an empty directory, as a new user would: the shipped base, reward config and presets
    // are found through the binary's search path, and the reports land where --out says.
    let home = scratch("qs-home");
    std::fs::create_dir_all(&home).unwrap();
    let out = home.join("qs");
    let (ok, text) = tiller_in(
        &home,
        &[
            "quickstart",
            "--out",
            "qs",
            "--per-task",
            "1",
            "--feedback-prompts",
            "4",
            "--reward-steps",
            "2",
            "--best-of",
            "2",
            "--align-updates",
            "1",
        ],
    );
    assert!(ok, "{text}");
    for f in [
        "report.html",
        "align/final/pytorch_lora_weights.safetensors",
        "renderer/report.md",
        "base/report.json",
        "feedback/preferences.sqlite",
        "reward/model.safetensors",
        "reward-eval.json",
        "best-of/report.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing:\n{text}");
    }
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best-of/report.json")).unwrap())
            .unwrap();
    assert_eq!(best["best_of"]["n"], 2, "{best}");
    // A second run into the same folder refuses to mix stores.
    let (ok, text) = tiller_in(&home, &["quickstart", "--out", "qs", "--per-task", "1"]);
    assert!(
        !ok && text.contains("already holds a preference store"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&home);
}

/// `tiller base distill` on the shipped base: two updates of 8 -> 4 steps, interrupted and
/// resumed; the student's pipeline samples on its own 4-step grid without guidance (its
/// `scheduler_config.json` and `tiller_sampling.json` say so); a teacher or setting that rules
/// distillation out is refused by name before anything is written.
#[test]
fn base_distill_writes_a_few_step_student() {
    let run = scratch("distill");
    let run_s = run.to_str().unwrap();
    let args = [
        "base",
        "distill",
        "--out",
        run_s,
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "--set",
        "log.checkpoint_every=1",
        "--set",
        "log.sample_every=0",
    ];
    let (ok, text) = tiller(&[&args[..], &["--stop-after", "1"]].concat());
    assert!(ok && !run.join("pipeline").exists(), "{text}");
    let (ok, text) = tiller(&["base", "distill", "--out", run_s, "--resume", "latest"]);
    assert!(ok && text.contains("resumed from"), "{text}");
    let pipe = run.join("pipeline");
    let sched: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pipe.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sched["steps_offset"], 126, "{sched}");
    let sampling: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pipe.join("tiller_sampling.json")).unwrap())
            .unwrap();
    assert_eq!(sampling["steps"], 4);
    assert_eq!(sampling["guidance"], 1.0);
    // The saved config names the teacher by its full path, so resume works from anywhere.
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("testbed-base"), "{saved}");

    let bad = scratch("distill-bad");
    let bad_s = bad.to_str().unwrap();
    for (set, named) in [
        ("distill.teacher_steps=6", "distill.teacher_steps"),
        ("distill.steps=4", "steps"),
        ("teacher=/nonexistent/teacher", "/nonexistent/teacher"),
    ] {
        let (ok, text) = tiller(&["base", "distill", "--out", bad_s, "--set", set]);
        assert!(!ok && text.contains(named), "--set {set}: {text}");
        assert!(!bad.exists(), "--set {set} wrote {}", bad.display());
    }
    let _ = std::fs::remove_dir_all(&run);
}
