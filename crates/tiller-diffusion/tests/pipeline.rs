//! The pipeline folder round-trips: what Tiller saves in diffusers' layout loads back to the same
//! functions and scheduler.

use burn::tensor::Device;
use std::path::Path;
use tiller_diffusion::models::{load_clip_text, load_unet};
use tiller_diffusion::pipeline::{RecommendedSampling, SAMPLING_FILE, TextToImage};
use tiller_diffusion::schedulers::{DdimConfig, SchedulerConfig};

#[test]
fn save_and_load_a_pipeline_folder() {
    let device = Device::flex();
    let fixtures = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures");
    let (unet_config, unet) = load_unet(&fixtures.join("tiny-unet-sd1"), None, &device).unwrap();
    let (text_config, text_encoder) =
        load_clip_text(&fixtures.join("tiny-clip"), None, &device).unwrap();
    let scheduler = SchedulerConfig::Ddim(DdimConfig {
        steps_offset: 1,
        set_alpha_to_one: false,
        ..Default::default()
    });
    let p = TextToImage {
        text_config,
        text_encoder,
        unet_config,
        unet,
        scheduler: scheduler.clone(),
        recommended: Some(RecommendedSampling {
            steps: 30,
            eta: 1.0,
            guidance: 3.0,
        }),
    };
    let dir = std::env::temp_dir().join(format!("tiller-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    p.save(&dir, "{\"model\": {}}").unwrap();
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["unet"][1], "UNet2DConditionModel");
    assert_eq!(index["scheduler"][1], "DDIMScheduler");

    let (q, tok) = TextToImage::load(&dir, &device).unwrap();
    assert_eq!(tok, "{\"model\": {}}");
    // eta is not a diffusers config key; everything else survives.
    assert_eq!(q.scheduler, scheduler);
    // The recommended sampler travels with the folder; a bad one is refused, naming the file.
    assert_eq!(q.recommended, p.recommended);
    std::fs::write(
        dir.join(SAMPLING_FILE),
        r#"{"steps": 30, "eta": 2.0, "guidance": 3.0}"#,
    )
    .unwrap();
    let e = TextToImage::load(&dir, &device).unwrap_err().to_string();
    assert!(e.contains(SAMPLING_FILE) && e.contains("eta"), "{e}");
    std::fs::write(dir.join(SAMPLING_FILE), r#"{"steps": 30, "etaa": 1.0}"#).unwrap();
    let e = TextToImage::load(&dir, &device).unwrap_err().to_string();
    assert!(e.contains("etaa"), "{e}");
    let ids = vec![vec![0i64, 5, 9, 98, 98, 98]];
    let a = p.encode(&ids, &device).unwrap();
    let b = q.encode(&ids, &device).unwrap();
    assert_eq!(
        a.into_data().try_to_vec::<f32>().unwrap(),
        b.into_data().try_to_vec::<f32>().unwrap()
    );

    let e = TextToImage::load(&dir.join("unet"), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_index.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
