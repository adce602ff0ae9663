//! Scheduler configs: our TOML/JSON form, diffusers' `scheduler_config.json`, and refusal of what
//! we do not implement.
//!
//! `tests/fixtures/schedulers/diffusers_config_*.json` are written by diffusers itself
//! (`save_config` output, via `scripts/fixtures/schedulers.py`), so reading the `*_default` ones
//! to our `Default`s proves our defaults are diffusers'.

use std::path::{Path, PathBuf};
use tiller_diffusion::SchedulerConfig;
use tiller_diffusion::schedulers::{
    BetaSchedule, DdimConfig, DdpmConfig, FlowMatchConfig, FlowSde, PredictionType, SchedulerKind,
    TimestepSpacing,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures/schedulers")
        .join(name)
}

/// Writes `text` to a fresh temporary file named `name` and returns its path.
fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tiller-scheduler-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn diffusers_error(name: &str, json: &str) -> String {
    let path = temp_file(name, json);
    let error = SchedulerConfig::from_diffusers_json(&path)
        .unwrap_err()
        .to_string();
    assert!(error.contains(name), "the error names the file: {error}");
    error
}

#[test]
fn our_defaults_are_diffusers_defaults() {
    for (file, expected) in [
        (
            "diffusers_config_ddpm_default.json",
            SchedulerConfig::Ddpm(DdpmConfig::default()),
        ),
        (
            "diffusers_config_ddim_default.json",
            SchedulerConfig::Ddim(DdimConfig::default()),
        ),
        (
            "diffusers_config_flow_match_default.json",
            SchedulerConfig::FlowMatch(FlowMatchConfig::default()),
        ),
    ] {
        let ours =
            SchedulerConfig::from_diffusers_json(fixture(file)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ours, expected, "{file}");
    }
}

#[test]
fn stable_diffusion_3_flow_config() {
    let ours =
        SchedulerConfig::from_diffusers_json(fixture("diffusers_config_flow_match_sd3.json"))
            .unwrap();
    assert_eq!(
        ours,
        SchedulerConfig::FlowMatch(FlowMatchConfig {
            shift: 3.0,
            ..FlowMatchConfig::default()
        })
    );
    // The minimal file SD3-medium ships is enough too.
    let path = temp_file(
        "sd3_medium.json",
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
            "num_train_timesteps": 1000, "shift": 3.0}"#,
    );
    assert_eq!(SchedulerConfig::from_diffusers_json(path).unwrap(), ours);
}

#[test]
fn stable_diffusion_1_pndm_config_reads_as_ddim_the_way_ddpo_does() {
    // DDPO: `DDIMScheduler.from_config(pipeline.scheduler.config)` on SD 1.x's PNDMScheduler.
    let file = fixture("diffusers_config_pndm_sd15.json");
    let e = SchedulerConfig::from_diffusers_json(&file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PNDMScheduler") && e.contains("from_diffusers_json_as"),
        "{e}"
    );

    let ours = SchedulerConfig::from_diffusers_json_as(&file, SchedulerKind::Ddim).unwrap();
    let expected = DdimConfig {
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: BetaSchedule::ScaledLinear,
        set_alpha_to_one: false,
        steps_offset: 1,
        ..DdimConfig::default()
    };
    assert_eq!(ours, SchedulerConfig::Ddim(expected));

    // The hub's actual SD 1.5 file also says clip_sample: false.
    let path = temp_file(
        "sd15_hub.json",
        r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
            "trained_betas": null, "clip_sample": false}"#,
    );
    let SchedulerConfig::Ddim(ddim) =
        SchedulerConfig::from_diffusers_json_as(&path, SchedulerKind::Ddim).unwrap()
    else {
        panic!("read as DDIM");
    };
    assert!(!ddim.clip_sample);
    // As DDPM, DDIM's set_alpha_to_one is dropped like diffusers' from_config drops it.
    let ddpm = SchedulerConfig::from_diffusers_json_as(&path, SchedulerKind::Ddpm).unwrap();
    assert_eq!(ddpm.kind(), SchedulerKind::Ddpm);
}

#[test]
fn unsupported_features_are_refused_naming_the_key() {
    let e = diffusers_error(
        "thresholding.json",
        r#"{"_class_name": "DDIMScheduler", "thresholding": true}"#,
    );
    assert!(
        e.contains("`thresholding`") && e.contains("not implemented"),
        "{e}"
    );
    let e = diffusers_error(
        "dynamic_shift.json",
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": true}"#,
    );
    assert!(e.contains("`use_dynamic_shifting`"), "{e}");
    let e = diffusers_error(
        "trained.json",
        r#"{"_class_name": "DDPMScheduler", "trained_betas": [0.1, 0.2]}"#,
    );
    assert!(e.contains("`trained_betas`"), "{e}");
    let e = diffusers_error(
        "learned.json",
        r#"{"_class_name": "DDPMScheduler", "variance_type": "learned_range"}"#,
    );
    assert!(
        e.contains("`variance_type`") && e.contains("fixed_small"),
        "{e}"
    );
    let e = diffusers_error(
        "sigmoid.json",
        r#"{"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}"#,
    );
    assert!(
        e.contains("`beta_schedule`") && e.contains("scaled_linear"),
        "{e}"
    );
    let e = diffusers_error(
        "unknown.json",
        r#"{"_class_name": "DDIMScheduler", "karras": 1}"#,
    );
    assert!(e.contains("`karras`") && e.contains("known keys"), "{e}");
    // Not a DDIM key even though another scheduler has it: only from_diffusers_json_as drops it.
    let e = diffusers_error(
        "prk.json",
        r#"{"_class_name": "DDIMScheduler", "skip_prk_steps": true}"#,
    );
    assert!(e.contains("`skip_prk_steps`"), "{e}");
    let e = diffusers_error("classless.json", r#"{"beta_start": 0.001}"#);
    assert!(e.contains("_class_name"), "{e}");
    let e = diffusers_error("euler.json", r#"{"_class_name": "EulerDiscreteScheduler"}"#);
    assert!(
        e.contains("EulerDiscreteScheduler") && e.contains("DDIMScheduler"),
        "{e}"
    );
}

#[test]
fn inert_keys_and_underscore_keys_are_ignored() {
    let path = temp_file(
        "inert.json",
        r#"{"_class_name": "DDIMScheduler", "_anything": [1, 2], "thresholding": false,
            "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0, "clip_sample": false}"#,
    );
    let ours = SchedulerConfig::from_diffusers_json(path).unwrap();
    assert_eq!(
        ours,
        SchedulerConfig::Ddim(DdimConfig {
            clip_sample: false,
            ..DdimConfig::default()
        })
    );
    // η is ours, not a diffusers config key (diffusers passes it to step()): set it after loading.
    let e = diffusers_error(
        "eta.json",
        r#"{"_class_name": "DDIMScheduler", "eta": 1.0}"#,
    );
    assert!(e.contains("`eta`"), "{e}");
}

#[test]
fn our_config_format_is_tagged_toml_with_defaults() {
    let path = temp_file(
        "ddpo.toml",
        "type = \"ddim\"\neta = 1.0\nbeta_schedule = \"scaled_linear\"\n",
    );
    let ours: SchedulerConfig = tiller_core::config::from_toml_file(&path).unwrap();
    let expected = DdimConfig {
        eta: 1.0,
        beta_schedule: BetaSchedule::ScaledLinear,
        ..DdimConfig::default()
    };
    assert_eq!(ours, SchedulerConfig::Ddim(expected));

    // `[sde]` with no fields is Flow-GRPO's default noise level 0.7.
    let path = temp_file("flow.toml", "type = \"flow_match\"\nshift = 3.0\n[sde]\n");
    let ours: SchedulerConfig = tiller_core::config::from_toml_file(&path).unwrap();
    let expected = FlowMatchConfig {
        shift: 3.0,
        sde: Some(FlowSde { noise_level: 0.7 }),
        ..FlowMatchConfig::default()
    };
    assert_eq!(ours, SchedulerConfig::FlowMatch(expected));
}

#[test]
fn misspellings_are_errors_that_list_the_valid_names() {
    let path = temp_file("typo.toml", "type = \"ddim\"\netaa = 1.0\n");
    let e = tiller_core::config::from_toml_file::<SchedulerConfig>(&path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("etaa") && e.contains("eta") && e.contains("set_alpha_to_one"),
        "{e}"
    );
    let path = temp_file("kind.toml", "type = \"euler\"\n");
    let e = tiller_core::config::from_toml_file::<SchedulerConfig>(&path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("euler") && e.contains("ddim") && e.contains("flow_match"),
        "{e}"
    );
    let path = temp_file(
        "spacing.toml",
        "type = \"ddpm\"\ntimestep_spacing = \"evenly\"\n",
    );
    let e = tiller_core::config::from_toml_file::<SchedulerConfig>(&path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("evenly") && e.contains("trailing"), "{e}");
}

#[test]
fn json_round_trip() {
    let configs = [
        SchedulerConfig::Ddpm(DdpmConfig {
            prediction_type: PredictionType::VPrediction,
            ..DdpmConfig::default()
        }),
        SchedulerConfig::Ddim(DdimConfig {
            timestep_spacing: TimestepSpacing::Trailing,
            eta: 0.3,
            ..DdimConfig::default()
        }),
        SchedulerConfig::FlowMatch(FlowMatchConfig {
            sde: Some(FlowSde::default()),
            ..FlowMatchConfig::default()
        }),
    ];
    for config in configs {
        let text = serde_json::to_string(&config).unwrap();
        let back: SchedulerConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, config, "{text}");
    }
}

#[test]
fn invalid_values_are_errors_at_build() {
    let cases: Vec<(SchedulerConfig, usize, &str)> = vec![
        (
            SchedulerConfig::Ddim(DdimConfig {
                eta: 1.5,
                ..DdimConfig::default()
            }),
            10,
            "eta",
        ),
        (
            SchedulerConfig::Ddim(DdimConfig {
                eta: -0.1,
                ..DdimConfig::default()
            }),
            10,
            "eta",
        ),
        (
            SchedulerConfig::Ddim(DdimConfig::default()),
            0,
            "num_inference_steps",
        ),
        (
            SchedulerConfig::Ddpm(DdpmConfig::default()),
            1001,
            "num_inference_steps",
        ),
        (
            SchedulerConfig::Ddpm(DdpmConfig {
                steps_offset: 600,
                ..DdpmConfig::default()
            }),
            2,
            "steps_offset",
        ),
        (
            SchedulerConfig::Ddpm(DdpmConfig {
                beta_end: 1.5,
                ..DdpmConfig::default()
            }),
            10,
            "beta_end",
        ),
        (
            SchedulerConfig::Ddpm(DdpmConfig {
                num_train_timesteps: 1,
                ..DdpmConfig::default()
            }),
            1,
            "num_train_timesteps",
        ),
        (
            SchedulerConfig::Ddim(DdimConfig {
                clip_sample_range: 0.0,
                ..DdimConfig::default()
            }),
            10,
            "clip_sample_range",
        ),
        (
            SchedulerConfig::FlowMatch(FlowMatchConfig {
                shift: 0.0,
                ..FlowMatchConfig::default()
            }),
            10,
            "shift",
        ),
        (
            SchedulerConfig::FlowMatch(FlowMatchConfig {
                sde: Some(FlowSde { noise_level: 0.0 }),
                ..FlowMatchConfig::default()
            }),
            10,
            "noise_level",
        ),
        (
            SchedulerConfig::FlowMatch(FlowMatchConfig::default()),
            0,
            "num_inference_steps",
        ),
    ];
    for (config, steps, field) in cases {
        let e = config.build(steps).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(field), "{config:?} with {steps} steps: {e}");
    }
}
