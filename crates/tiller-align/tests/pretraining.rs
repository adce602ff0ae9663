//! Pre-training data from a user's image folder and from a preference store (`[pretrain]`):
//! preprocessing against PIL's (the fixture's `gen.py`), the per-example draw, and the errors
//! that name the bad file, line or key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_align::AlignConfig;
use tiller_align::config::{PretrainData, PretrainSection};
use tiller_align::pretraining::{Pretraining, preprocess};
use tiller_feedback::images::decode_rgb;
use tiller_feedback::{
    Batch, Candidate, Panel, PanelConfig, PreferenceStore, PromptRecord, Split, SqliteStore,
};
use tiller_testbed::{Evaluator, Prompt, PromptSpec, RenderConfig, render_prompt};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretrain-folder")
}

fn folder_section(path: &Path) -> PretrainSection {
    PretrainSection {
        source: PretrainData::Folder,
        path: path.display().to_string(),
        ..PretrainSection::default()
    }
}

/// A pixel in [-1, 1] as PIL's 8-bit level.
fn level(v: f32) -> f32 {
    (v + 1.0) * 127.5
}

#[test]
fn folder_images_are_preprocessed_as_diffusers_training_script_does() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
            .unwrap();
    let res = expected["resolution"].as_u64().unwrap() as usize;
    let source = Pretraining::open(&folder_section(&fixture()), &fixture(), &[], res, 7).unwrap();
    let file_of = BTreeMap::from([
        ("a red square", "a.jpg"),
        ("a blue circle", "sub/b.png"),
        ("one blue circle", "sub/b.png"),
        ("a white triangle", "c.png"),
    ]);
    let mut seen = BTreeMap::new();
    for i in 0..40 {
        let (caption, pixels) = source.example(i).unwrap();
        assert_eq!(source.example(i).unwrap().1, pixels, "example {i} is fixed");
        let file = file_of[caption.as_str()];
        *seen.entry(caption.clone()).or_insert(0) += 1;
        let want = expected["preprocessed"][file].as_array().unwrap();
        assert_eq!(pixels.len(), 3 * res * res);
        let mut worst: f32 = 0.0;
        for (p, rgb) in want.iter().enumerate() {
            for c in 0..3 {
                let ours = level(pixels[c * res * res + p]);
                worst = worst.max((ours - rgb[c].as_f64().unwrap() as f32).abs());
            }
        }
        // PNG: PIL rounds its horizontal pass to 8 bits, we do not (under 1.5 levels apart).
        // JPEG: two decoders' IDCTs differ by a few levels before any resize.
        let tolerance = if file.ends_with(".jpg") { 6.0 } else { 1.5 };
        assert!(
            worst <= tolerance,
            "{file}: {worst} levels from PIL's preprocessing"
        );
    }
    assert_eq!(
        seen.len(),
        4,
        "every file and both of b's captions: {seen:?}"
    );

    // The JPEG decoder against PIL's (libjpeg), pixel for pixel.
    let bytes = std::fs::read(fixture().join("a.jpg")).unwrap();
    let image = decode_rgb(&bytes, &fixture().join("a.jpg")).unwrap();
    assert_eq!((image.width(), image.height()), (21, 13));
    let pil = expected["a.jpg decoded"].as_array().unwrap();
    let worst = image
        .data()
        .chunks(3)
        .zip(pil)
        .flat_map(|(ours, theirs)| {
            (0..3).map(move |c| (ours[c] as f64 - theirs[c].as_f64().unwrap()).abs())
        })
        .fold(0.0, f64::max);
    eprintln!("JPEG decode: at most {worst} levels from PIL's");
    assert!(worst <= 4.0, "{worst}");

    // Another seed draws other examples.
    let other = Pretraining::open(&folder_section(&fixture()), &fixture(), &[], res, 8).unwrap();
    let differs = (0..10).any(|i| other.example(i).unwrap().0 != source.example(i).unwrap().0);
    assert!(differs);
}

/// A copy of the fixture folder with `metadata.jsonl` replaced.
fn folder_with(tag: &str, metadata: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tiller-pretrain-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for f in ["a.jpg", "c.png", "sub/b.png"] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    if let Some(m) = metadata {
        std::fs::write(dir.join("metadata.jsonl"), m).unwrap();
    }
    dir
}

#[test]
fn bad_folders_name_the_file_the_line_and_the_key() {
    let open = |dir: &Path, section: &PretrainSection| {
        Pretraining::open(section, dir, &[], 8, 0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let dir = folder_with("none", None);
    let e = open(&dir, &folder_section(&dir));
    assert!(
        e.contains("no metadata.jsonl") && e.contains("file_name"),
        "{e}"
    );
    std::fs::write(dir.join("metadata.csv"), "file_name,text\n").unwrap();
    let e = open(&dir, &folder_section(&dir));
    assert!(e.contains("metadata.csv is not read"), "{e}");

    let dir = folder_with(
        "caption",
        Some(
            "{\"file_name\": \"a.jpg\", \"text\": \"x\"}\n{\"file_name\": \"c.png\", \"prompt\": \"y\"}\n",
        ),
    );
    let e = open(&dir, &folder_section(&dir));
    assert!(
        e.contains("line 2") && e.contains("no caption `text`") && e.contains("prompt"),
        "{e}"
    );
    let mut by_prompt = folder_section(&dir);
    by_prompt.caption_column = "prompt".into();
    let e = open(&dir, &by_prompt);
    assert!(
        e.contains("line 1") && e.contains("no caption `prompt`"),
        "{e}"
    );

    let dir = folder_with(
        "missing",
        Some("{\"file_name\": \"gone.png\", \"text\": \"x\"}\n"),
    );
    let e = open(&dir, &folder_section(&dir));
    assert!(
        e.contains("line 1") && e.contains("gone.png does not exist"),
        "{e}"
    );

    let dir = folder_with(
        "json",
        Some("{\"file_name\": \"a.jpg\", \"text\": \"x\"}\nnot json\n"),
    );
    let e = open(&dir, &folder_section(&dir));
    assert!(e.contains("line 2: not JSON"), "{e}");

    let dir = folder_with("empty", Some("\n"));
    let e = open(&dir, &folder_section(&dir));
    assert!(e.contains("lists no images"), "{e}");

    // A corrupt image is found when drawn, and named.
    let dir = folder_with(
        "corrupt",
        Some("{\"file_name\": \"c.png\", \"text\": \"x\"}\n"),
    );
    std::fs::write(
        dir.join("c.png"),
        b"\x89PNG\r\n\x1a\n0000IHDR\0\0\0\x08\0\0\0\x08junk",
    )
    .unwrap();
    let source = Pretraining::open(&folder_section(&dir), &dir, &[], 8, 0).unwrap();
    let e = source.example(0).unwrap_err().to_string();
    assert!(e.contains("c.png") && e.contains("PNG"), "{e}");

    // The section's own checks name the field.
    let config = |extra: &str| -> String {
        let text = format!("method = \"refl\"\n{extra}");
        let c: AlignConfig = toml::from_str(&text).unwrap();
        c.validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = config("[pretrain]\nsource = \"folder\"\n");
    assert!(e.contains("pretrain.path"), "{e}");
    let e = config("[pretrain]\npath = \"data\"\n");
    assert!(e.contains("pretrain.path") && e.contains("testbed"), "{e}");
    let e = config("[pretrain]\nsource = \"store\"\npath = \"s\"\nsplit = \"val\"\n");
    assert!(e.contains("pretrain.split"), "{e}");
    assert!(
        toml::from_str::<AlignConfig>("method = \"refl\"\n[pretrain]\nsorce = \"folder\"\n")
            .is_err()
    );
    assert_eq!(
        config("[pretrain]\nsource = \"folder\"\npath = \"data\"\n"),
        ""
    );
}

#[test]
fn a_store_gives_the_images_of_its_split_with_their_prompts() {
    let dir = std::env::temp_dir().join(format!("tiller-pretrain-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut store = SqliteStore::open(&dir).unwrap();
    let prompt = |text: &str| Prompt {
        spec: PromptSpec::parse(text).unwrap(),
        text: text.into(),
    };
    let (train, test) = (prompt("a red circle"), prompt("a green square"));
    let render = RenderConfig::default();
    let mut images = Vec::new();
    let mut evaluations = Vec::new();
    for (p, seed) in [(&train, 1), (&train, 2), (&test, 3), (&test, 4)] {
        let image = render_prompt(p, &render, seed).unwrap().image;
        let png = tiller_testbed::image::encode_png(&image).unwrap();
        images.push(store.add_image(&png).unwrap());
        evaluations.push(Evaluator::default().evaluate(&image, &p.spec).unwrap());
    }
    let (p_train, p_test) = (
        PromptRecord::from_testbed(&train, Split::Train),
        PromptRecord::from_testbed(&test, Split::Test),
    );
    let mut panel = Panel::new(&PanelConfig::default(), 3).unwrap();
    let c = |i: usize| Candidate {
        image: &images[i].id,
        evaluation: &evaluations[i],
    };
    let feedback = vec![
        panel.compare(0, &p_train.id, c(0), c(1)).unwrap().into(),
        panel.label(0, &p_train.id, c(1)).unwrap().into(),
        panel.compare(0, &p_test.id, c(2), c(3)).unwrap().into(),
    ];
    store
        .write(&Batch {
            prompts: vec![p_train, p_test],
            annotators: panel.records(),
            feedback,
            ..Batch::default()
        })
        .unwrap();
    drop(store);

    let section = PretrainSection {
        source: PretrainData::Store,
        path: dir.display().to_string(),
        ..PretrainSection::default()
    };
    // Resolution 16 from the renderer's 32: every example goes through the resize.
    let source = Pretraining::open(&section, &dir, &[], 16, 0).unwrap();
    let store = SqliteStore::open(&dir).unwrap();
    let want: Vec<Vec<f32>> = images[..2]
        .iter()
        .map(|r| {
            let bytes = store.image_bytes(&r.id).unwrap();
            preprocess(&decode_rgb(&bytes, Path::new("x")).unwrap(), 16)
        })
        .collect();
    let mut hits = [0; 2];
    for i in 0..20 {
        let (text, pixels) = source.example(i).unwrap();
        assert_eq!(text, "a red circle", "only the train split's prompt");
        let k = want
            .iter()
            .position(|w| *w == pixels)
            .expect("a train image");
        hits[k] += 1;
    }
    assert!(
        hits.iter().all(|&h| h > 0),
        "both train images drawn: {hits:?}"
    );

    let e = Pretraining::open(
        &PretrainSection {
            path: "/nonexistent".into(),
            ..section.clone()
        },
        Path::new("/nonexistent"),
        &[],
        16,
        0,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not a preference store"), "{e}");
}
