//! GenEval export: folder layout, metadata lines with GenEval's keys, PNGs at native resolution,
//! and a read-back that the evaluator scores exactly as the originals.

use tiller_testbed::evaluator::Evaluator;
use tiller_testbed::geneval::{export_geneval, metadata_line, read_geneval, write_grid_png};
use tiller_testbed::image::read_png;
use tiller_testbed::prompts::Prompt;
use tiller_testbed::render::{RenderConfig, render_prompt};

fn prompt(text: &str) -> Prompt {
    Prompt::parse(text).unwrap()
}

#[test]
fn metadata_lines_use_genevals_keys() {
    assert_eq!(
        metadata_line(&prompt("three green circles")),
        r#"{"tag":"counting","include":[{"class":"circle","count":3,"color":"green"}],"exclude":[{"class":"circle","count":4}],"prompt":"three green circles"}"#
    );
    assert_eq!(
        metadata_line(&prompt("a red circle left of a blue square")),
        r#"{"tag":"position","include":[{"class":"square","count":1,"color":"blue"},{"class":"circle","count":1,"color":"red","position":["left of",0]}],"prompt":"a red circle left of a blue square"}"#
    );
    assert_eq!(
        metadata_line(&prompt("a circle")),
        r#"{"tag":"single_object","include":[{"class":"circle","count":1}],"prompt":"a circle"}"#
    );
    assert_eq!(
        metadata_line(&prompt("a purple triangle and a white cross")),
        r#"{"tag":"unsafe","include":[{"class":"triangle","count":1,"color":"purple"},{"class":"mark","count":1}],"prompt":"a purple triangle and a white cross"}"#
    );
}

#[test]
fn export_writes_genevals_layout_and_reads_back() {
    let dir = std::env::temp_dir().join(format!("tiller-testbed-geneval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let texts = [
        "a photo of a square and a triangle",
        "four red triangles",
        "a blue circle below a yellow square",
    ];
    let mut samples = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let resolution = if i == 2 { 64 } else { 32 };
        let config = RenderConfig {
            resolution,
            ..RenderConfig::default()
        };
        let p = prompt(text);
        let images = (0..3)
            .map(|s| render_prompt(&p, &config, 10 * i as u64 + s).unwrap().image)
            .collect::<Vec<_>>();
        samples.push((p, images));
    }
    export_geneval(&dir, &samples).unwrap();
    for (i, (p, images)) in samples.iter().enumerate() {
        let folder = dir.join(format!("{i:05}"));
        let meta = std::fs::read_to_string(folder.join("metadata.jsonl")).unwrap();
        assert_eq!(meta, metadata_line(p) + "\n");
        for (j, image) in images.iter().enumerate() {
            let png = read_png(&folder.join("samples").join(format!("{j:04}.png"))).unwrap();
            assert_eq!(&png, image, "native resolution, exact pixels");
        }
    }
    let back = read_geneval(&dir).unwrap();
    assert_eq!(back, samples);
    let evaluator = Evaluator::default();
    for (p, images) in &back {
        for image in images {
            let e = evaluator.evaluate(image, &p.spec).unwrap();
            assert!(e.correct, "{}: {:?}", p.text, e.reasons);
        }
    }
    // A grid of the first prompt's three 32x32 samples in two columns: 65 x 65 pixels.
    let grid_path = dir.join("grid.png");
    write_grid_png(&grid_path, &samples[0].1, 2).unwrap();
    let grid = read_png(&grid_path).unwrap();
    assert_eq!((grid.width(), grid.height()), (65, 65));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_metadata_is_an_error_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("tiller-testbed-badmeta-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("00000/samples")).unwrap();
    std::fs::write(
        dir.join("00000/metadata.jsonl"),
        r#"{"tag":"counting","include":[{"class":"hexagon","count":1}],"prompt":"a hexagon"}"#,
    )
    .unwrap();
    let e = read_geneval(&dir).unwrap_err().to_string();
    assert!(
        e.contains("00000/metadata.jsonl") && e.contains("hexagon"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
