//! Dataset loaders on small synthetic fixtures written here: Pick-a-Pic parquet (labels, ties,
//! skipped rows, nanosecond timestamps, missing columns, NaN), CoProV2 parquet (image paths or
//! bytes, integer labels), HPDv2 JSON (both path spellings,
//! train one-hot and test ranks), ImageRewardDB JSON and parquet (ranks and ratings), and ingestion
//! into the store.

mod common;

use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::path::Path;
use std::sync::Arc;
use tiller_feedback::loaders::coprov2::{CoProOptions, load_coprov2};
use tiller_feedback::loaders::hpdv2::{HpdOptions, load_hpdv2};
use tiller_feedback::loaders::imagereward::{
    ImageRewardOptions, load_imagereward_json, load_imagereward_parquet,
};
use tiller_feedback::loaders::pickapic::{PickAPicOptions, load_pickapic};
use tiller_feedback::{
    Choice, Feedback, ImageId, PreferenceStore, PromptId, Query, Source, Split, SqliteStore, ingest,
};

/// A parquet column for the fixture writer.
enum Col {
    Str(&'static str, Vec<String>),
    Bytes(&'static str, Vec<Vec<u8>>),
    F64(&'static str, Vec<f64>),
    Bool(&'static str, Vec<bool>),
    I64(&'static str, Vec<i64>),
    /// INT64 nanoseconds since the epoch, as pandas writes `timestamp[ns]`.
    Nanos(&'static str, Vec<i64>),
}

fn write_parquet(path: &Path, cols: Vec<Col>) {
    let fields: Vec<String> = cols
        .iter()
        .map(|c| match c {
            Col::Str(n, _) => format!("REQUIRED BYTE_ARRAY {n} (UTF8);"),
            Col::Bytes(n, _) => format!("REQUIRED BYTE_ARRAY {n};"),
            Col::F64(n, _) => format!("REQUIRED DOUBLE {n};"),
            Col::Bool(n, _) => format!("REQUIRED BOOLEAN {n};"),
            Col::I64(n, _) => format!("REQUIRED INT64 {n};"),
            Col::Nanos(n, _) => format!("REQUIRED INT64 {n} (TIMESTAMP(NANOS,true));"),
        })
        .collect();
    let schema = parse_message_type(&format!("message schema {{ {} }}", fields.join(" "))).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    for c in &cols {
        let mut w = rg.next_column().unwrap().unwrap();
        match c {
            Col::Str(_, v) => {
                let v: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(s.as_str())).collect();
                w.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            Col::Bytes(_, v) => {
                let v: Vec<ByteArray> = v.iter().map(|b| ByteArray::from(b.clone())).collect();
                w.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            Col::F64(_, v) => {
                w.typed::<DoubleType>().write_batch(v, None, None).unwrap();
            }
            Col::Bool(_, v) => {
                w.typed::<BoolType>().write_batch(v, None, None).unwrap();
            }
            Col::I64(_, v) | Col::Nanos(_, v) => {
                w.typed::<Int64Type>().write_batch(v, None, None).unwrap();
            }
        }
        w.close().unwrap();
    }
    rg.close().unwrap();
    writer.close().unwrap();
}

/// Distinct PNGs: flawless renders of "a red circle" with different seeds.
fn pngs(n: usize) -> Vec<Vec<u8>> {
    let p = common::prompt("a red circle");
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut seed = 0;
    while out.len() < n {
        let (_, png, _) = common::flawless(&p, seed);
        if !out.contains(&png) {
            out.push(png);
        }
        seed += 1;
    }
    out
}

fn choices(feedback: &[Feedback]) -> Vec<(ImageId, ImageId, Choice)> {
    feedback
        .iter()
        .filter_map(|f| match f {
            Feedback::Comparison(c) => Some((c.image_a.clone(), c.image_b.clone(), c.choice)),
            _ => None,
        })
        .collect()
}

fn pickapic_columns(images: &[Vec<u8>], label_0: Vec<f64>) -> Vec<Col> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let i = |k: usize| images[k].clone();
    // Row 3 is unlabelled and row 4 shows one image twice: both are skipped.
    vec![
        Col::Str(
            "caption",
            s(&["a cat", "a cat", "a dog", "a fox", "an owl"]),
        ),
        Col::Bytes("jpg_0", vec![i(0), i(0), i(2), i(0), i(1)]),
        Col::Bytes("jpg_1", vec![i(1), i(2), i(3), i(3), i(1)]),
        Col::F64("label_1", label_0.iter().map(|l| 1.0 - l).collect()),
        Col::F64("label_0", label_0),
        Col::Bool("has_label", vec![true, true, true, false, true]),
        Col::I64("user_id", vec![17, 17, 4, 4, 4]),
        // 2023-05-01T00:00:00.123456789Z
        Col::Nanos("created_at", vec![1_682_899_200_123_456_789; 5]),
        Col::Str("model_0", s(&["m"; 5])),
    ]
}

#[test]
fn pickapic_labels_ties_and_skipped_rows() {
    let dir = common::tempdir();
    let images = pngs(4);
    let path = dir.path().join("train-00000-of-00001.parquet");
    write_parquet(
        &path,
        pickapic_columns(&images, vec![1.0, 0.0, 0.5, 1.0, 1.0]),
    );
    let imported = load_pickapic(&path, &PickAPicOptions::v2(Split::Train)).unwrap();
    let id = |i: usize| ImageId::of_bytes(&images[i]);
    assert_eq!(
        choices(&imported.feedback),
        vec![
            (id(0), id(1), Choice::A),
            (id(0), id(2), Choice::B),
            (id(2), id(3), Choice::Tie),
        ]
    );
    assert_eq!(imported.skipped, 2);
    assert_eq!(imported.prompts.len(), 2);
    assert_eq!(imported.prompts[0].id, PromptId::of(Split::Train, "a cat"));
    // Four distinct images; the skipped rows add no image, prompt or annotator.
    assert_eq!(imported.images.len(), 4);
    let names: Vec<&str> = imported
        .annotators
        .iter()
        .map(|a| a.id.0.as_str())
        .collect();
    assert_eq!(names, ["pickapic_v2/user/17", "pickapic_v2/user/4"]);
    let p = imported.feedback[0].provenance();
    assert_eq!(p.time_ms, Some(1_682_899_200_123));
    assert_eq!(
        p.source,
        Source::Dataset {
            name: "pickapic_v2".into()
        }
    );

    let mut store = SqliteStore::open(dir.path().join("store")).unwrap();
    ingest(&mut store, &imported).unwrap();
    let c = store.counts().unwrap();
    assert_eq!(
        (c.prompts, c.images, c.annotators, c.comparisons),
        (2, 4, 2, 3)
    );
    assert_eq!(
        store.feedback(&Query::default()).unwrap(),
        imported.feedback
    );
    assert_eq!(store.image_bytes(&id(3)).unwrap(), images[3]);
    // Ingesting twice appends the feedback again but stores each prompt, image and user once.
    ingest(&mut store, &imported).unwrap();
    let c = store.counts().unwrap();
    assert_eq!(
        (c.prompts, c.images, c.annotators, c.comparisons),
        (2, 4, 2, 6)
    );
}

#[test]
fn pickapic_errors_name_the_column_the_file_and_the_row() {
    let dir = common::tempdir();
    let images = pngs(4);
    let path = dir.path().join("no_label.parquet");
    let cols: Vec<Col> = pickapic_columns(&images, vec![1.0; 5])
        .into_iter()
        .filter(|c| !matches!(c, Col::F64("label_0", _)))
        .collect();
    write_parquet(&path, cols);
    let e = load_pickapic(&path, &PickAPicOptions::v2(Split::Train))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no_label.parquet") && e.contains("missing required column `label_0`"),
        "{e}"
    );
    assert!(
        e.contains("caption, jpg_0"),
        "lists the columns present: {e}"
    );

    let path = dir.path().join("nan.parquet");
    write_parquet(
        &path,
        pickapic_columns(&images, vec![1.0, f64::NAN, 0.5, 1.0, 1.0]),
    );
    let e = load_pickapic(&path, &PickAPicOptions::v2(Split::Train)).unwrap_err();
    assert!(matches!(e, tiller_core::Error::NonFinite(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("nan.parquet") && e.contains("row 1") && e.contains("label_0"),
        "{e}"
    );

    let path = dir.path().join("odd.parquet");
    write_parquet(
        &path,
        pickapic_columns(&images, vec![1.0, 0.7, 0.5, 1.0, 1.0]),
    );
    let e = load_pickapic(&path, &PickAPicOptions::v2(Split::Train))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row 1, column `label_0`") && e.contains("got 0.7"),
        "{e}"
    );

    std::fs::write(dir.path().join("junk.parquet"), b"not parquet").unwrap();
    let e = load_pickapic(
        &dir.path().join("junk.parquet"),
        &PickAPicOptions::v2(Split::Train),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("junk.parquet") && e.contains("not a readable parquet file"),
        "{e}"
    );
}

fn write_images(root: &Path, names: &[&str]) -> Vec<ImageId> {
    std::fs::create_dir_all(root).unwrap();
    let images = pngs(names.len());
    names
        .iter()
        .zip(&images)
        .map(|(n, png)| {
            std::fs::write(root.join(n), png).unwrap();
            ImageId::of_bytes(png)
        })
        .collect()
}

#[test]
fn hpdv2_train_and_test_with_both_key_spellings() {
    let dir = common::tempdir();
    let train_root = dir.path().join("HPD/train");
    let ids = write_images(&train_root, &["0.jpg", "1.jpg", "2.jpg"]);
    let train = dir.path().join("HPD/train.json");
    std::fs::write(
        &train,
        r#"[
          {"human_preference": [0, 1], "prompt": "a cat", "file_path": ["0.jpg", "1.jpg"], "user_hash": "u1"},
          {"human_preference": [1, 0, 0], "prompt": "a dog", "image_path": ["2.jpg", "0.jpg", "1.jpg"], "user_hash": "u2", "extra": 5}
        ]"#,
    )
    .unwrap();
    let imported = load_hpdv2(&train, &HpdOptions::new(Split::Train, &train_root)).unwrap();
    assert_eq!(
        choices(&imported.feedback),
        vec![
            (ids[0].clone(), ids[1].clone(), Choice::B),
            (ids[2].clone(), ids[0].clone(), Choice::A),
            (ids[2].clone(), ids[1].clone(), Choice::A),
        ]
    );
    assert_eq!(
        imported.feedback[2].provenance().annotator.0,
        "hpdv2/user/u2"
    );

    let test = dir.path().join("HPD/test.json");
    std::fs::write(
        &test,
        r#"[{"prompt": "a fox", "image_path": ["0.jpg", "1.jpg", "2.jpg"], "rank": [1.5, 1.5, 3.0],
             "raw_annotation": [{"rank": [1, 2, 3], "user_hash": "a"}, {"rank": [2, 1, 3], "user_hash": "b"}]}]"#,
    )
    .unwrap();
    let imported = load_hpdv2(&test, &HpdOptions::new(Split::Test, &train_root)).unwrap();
    // Per annotator, pairs (0,1), (0,2), (1,2): a says A, A, A; b says B, A, A.
    let got: Vec<(String, Choice)> = imported
        .feedback
        .iter()
        .map(|f| match f {
            Feedback::Comparison(c) => (c.provenance.annotator.0.clone(), c.choice),
            _ => panic!(),
        })
        .collect();
    let want: Vec<(String, Choice)> = [
        ("a", Choice::A),
        ("a", Choice::A),
        ("a", Choice::A),
        ("b", Choice::B),
        ("b", Choice::A),
        ("b", Choice::A),
    ]
    .iter()
    .map(|(u, c)| (format!("hpdv2/user/{u}"), *c))
    .collect();
    assert_eq!(got, want);

    // Without raw annotations the averaged rank is used: 1.5 = 1.5 is a tie.
    std::fs::write(
        &test,
        r#"[{"prompt": "a fox", "image_path": ["0.jpg", "1.jpg", "2.jpg"], "rank": [1.5, 1.5, 3.0]}]"#,
    )
    .unwrap();
    let imported = load_hpdv2(&test, &HpdOptions::new(Split::Test, &train_root)).unwrap();
    let got: Vec<Choice> = choices(&imported.feedback)
        .into_iter()
        .map(|c| c.2)
        .collect();
    assert_eq!(got, [Choice::Tie, Choice::A, Choice::A]);

    let mut store = SqliteStore::open(dir.path().join("store")).unwrap();
    ingest(&mut store, &imported).unwrap();
    assert_eq!(store.counts().unwrap().comparisons, 3);

    for (json, want) in [
        (
            r#"[{"prompt": "x", "human_preference": [1, 0]}]"#,
            "neither `image_path` nor `file_path`",
        ),
        (
            r#"[{"prompt": "x", "image_path": ["0.jpg", "1.jpg"], "human_preference": [1, 1]}]"#,
            "one-hot",
        ),
        (
            r#"[{"prompt": "x", "image_path": ["0.jpg", "1.jpg"]}]"#,
            "has none of",
        ),
        (
            r#"[{"prompt": "x", "image_path": ["0.jpg", "9.jpg"], "rank": [1, 2]}]"#,
            "9.jpg",
        ),
    ] {
        std::fs::write(&test, json).unwrap();
        let e = load_hpdv2(&test, &HpdOptions::new(Split::Test, &train_root))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn imagereward_json_and_parquet_agree() {
    let dir = common::tempdir();
    let root = dir.path().join("ImageRewardDB");
    let shard = root.join("images/train/train_1");
    let names = ["a.webp", "b.webp", "c.webp", "d.webp"];
    let ids = write_images(&shard, &names);
    let rel = |n: &str| format!("images/train/train_1/{n}");
    let json = serde_json::json!([
        {"image_path": rel("a.webp"), "prompt_id": "p1", "prompt": "a cat", "classification": "x",
         "image_amount_in_total": 3, "rank": 2, "overall_rating": 5, "image_text_alignment_rating": 4, "fidelity_rating": 3},
        {"image_path": rel("b.webp"), "prompt_id": "p1", "prompt": "a cat", "rank": 1, "overall_rating": 7},
        {"image_path": rel("d.webp"), "prompt_id": "p2", "prompt": "a dog", "rank": 1, "overall_rating": 2},
        {"image_path": rel("c.webp"), "prompt_id": "p1", "prompt": "a cat", "rank": 2, "overall_rating": 1}
    ]);
    let json_path = shard.join("train_1.json");
    std::fs::write(&json_path, json.to_string()).unwrap();
    let options = ImageRewardOptions::new(Split::Train, &root);
    let from_json = load_imagereward_json(&json_path, &options).unwrap();
    // Prompt p1 has images a, b, c with ranks 2, 1, 2: (a,b) -> B, (a,c) -> tie, (b,c) -> A.
    assert_eq!(
        choices(&from_json.feedback),
        vec![
            (ids[0].clone(), ids[1].clone(), Choice::B),
            (ids[0].clone(), ids[2].clone(), Choice::Tie),
            (ids[1].clone(), ids[2].clone(), Choice::A),
        ]
    );
    // Stars = round(1 + (r - 1) * 4 / 6): 5 -> 3.67 -> 4, 7 -> 5, 1 -> 1, 2 -> 1.67 -> 2.
    let stars: Vec<(u8, f64)> = from_json
        .feedback
        .iter()
        .filter_map(|f| match f {
            Feedback::Rating(r) => Some((r.stars.get(), r.score.unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(stars, [(4, 5.0), (5, 7.0), (1, 1.0), (2, 2.0)]);

    let pq = root.join("metadata-train.parquet");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let parquet_cols = |rating: Vec<f64>| {
        vec![
            Col::Str(
                "image_path",
                vec![rel("a.webp"), rel("b.webp"), rel("d.webp"), rel("c.webp")],
            ),
            Col::Str("prompt_id", s(&["p1", "p1", "p2", "p1"])),
            Col::Str("prompt", s(&["a cat", "a cat", "a dog", "a cat"])),
            Col::I64("rank", vec![2, 1, 1, 2]),
            Col::F64("overall_rating", rating),
        ]
    };
    write_parquet(&pq, parquet_cols(vec![5.0, 7.0, 2.0, 1.0]));
    let from_parquet = load_imagereward_parquet(&pq, &options).unwrap();
    assert_eq!(from_parquet, from_json);

    let mut store = SqliteStore::open(dir.path().join("store")).unwrap();
    ingest(&mut store, &from_parquet).unwrap();
    let c = store.counts().unwrap();
    assert_eq!(
        (c.prompts, c.images, c.comparisons, c.ratings),
        (2, 4, 3, 4)
    );

    write_parquet(&pq, parquet_cols(vec![5.0, f64::NAN, 2.0, 1.0]));
    let e = load_imagereward_parquet(&pq, &options)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("non-finite") && e.contains("row 1") && e.contains("overall_rating"),
        "{e}"
    );
    write_parquet(&pq, parquet_cols(vec![5.0, 9.0, 2.0, 1.0]));
    let e = load_imagereward_parquet(&pq, &options)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be in [1, 7], got 9"), "{e}");
}

/// CoProV2's released layout: `jpg_*` are paths under the dataset root and `label_0` an int64;
/// the same pairs with the images inline (Pick-a-Pic's layout) read the same; a bad label, a
/// missing image file and a missing column are errors naming the file, row and column.
#[test]
fn coprov2_pairs_from_paths_or_bytes() {
    let dir = common::tempdir();
    let root = dir.path().join("CoProv2");
    let names = [
        "images/0000000_0.png",
        "images/0000000_1.png",
        "images/0000001_0.png",
    ];
    std::fs::create_dir_all(root.join("images")).unwrap();
    let ids = write_images(&root, &names);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // Synthetic, benign prompts (the dataset's own text stays out of the repository).
    let captions = s(&[
        "a harmless red circle",
        "a harmless red circle",
        "a calm blue square",
    ]);
    let path = dir.path().join("train.parquet");
    write_parquet(
        &path,
        vec![
            Col::Str("caption", captions.clone()),
            Col::Str("jpg_0", s(&[names[0], names[1], names[2]])),
            Col::Str("jpg_1", s(&[names[1], names[0], names[2]])),
            Col::I64("label_0", vec![1, 0, 1]),
            Col::Str("image", s(&["x", "y", "z"])),
        ],
    );
    let options = CoProOptions::new(Split::Train, &root);
    let imported = load_coprov2(&path, &options).unwrap();
    assert_eq!(
        choices(&imported.feedback),
        vec![
            (ids[0].clone(), ids[1].clone(), Choice::A),
            (ids[1].clone(), ids[0].clone(), Choice::B),
        ]
    );
    // The third row shows one image twice.
    assert_eq!(imported.skipped, 1);
    assert_eq!(imported.prompts.len(), 1);
    assert_eq!(imported.annotators[0].id.0, "coprov2/anonymous");

    let bytes: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(root.join(n)).unwrap())
        .collect();
    let inline = dir.path().join("inline.parquet");
    write_parquet(
        &inline,
        vec![
            Col::Str("caption", captions.clone()),
            Col::Bytes(
                "jpg_0",
                vec![bytes[0].clone(), bytes[1].clone(), bytes[2].clone()],
            ),
            Col::Bytes(
                "jpg_1",
                vec![bytes[1].clone(), bytes[0].clone(), bytes[2].clone()],
            ),
            Col::F64("label_0", vec![1.0, 0.0, 1.0]),
        ],
    );
    let again = load_coprov2(&inline, &options).unwrap();
    assert_eq!(choices(&again.feedback), choices(&imported.feedback));

    let mut store = SqliteStore::open(dir.path().join("store")).unwrap();
    ingest(&mut store, &imported).unwrap();
    let c = store.counts().unwrap();
    assert_eq!((c.prompts, c.images, c.comparisons), (1, 2, 2));

    let bad = dir.path().join("bad.parquet");
    write_parquet(
        &bad,
        vec![
            Col::Str("caption", captions.clone()),
            Col::Str("jpg_0", s(&[names[0], names[1], names[2]])),
            Col::Str("jpg_1", s(&[names[1], names[0], names[0]])),
            Col::I64("label_0", vec![1, 2, 1]),
        ],
    );
    let e = load_coprov2(&bad, &options).unwrap_err().to_string();
    assert!(
        e.contains("bad.parquet") && e.contains("row 1, column `label_0`") && e.contains("got 2"),
        "{e}"
    );
    let missing = dir.path().join("missing.parquet");
    write_parquet(
        &missing,
        vec![
            Col::Str("caption", captions.clone()),
            Col::Str("jpg_0", s(&[names[0], "images/gone.png", names[2]])),
            Col::Str("jpg_1", s(&[names[1], names[0], names[0]])),
            Col::I64("label_0", vec![1, 1, 1]),
        ],
    );
    let e = load_coprov2(&missing, &options).unwrap_err().to_string();
    assert!(
        e.contains("row 1, column `jpg_0`") && e.contains("images/gone.png"),
        "{e}"
    );
    let no_label = dir.path().join("no_label.parquet");
    write_parquet(
        &no_label,
        vec![
            Col::Str("caption", captions),
            Col::Str("jpg_0", s(&[names[0], names[1], names[2]])),
            Col::Str("jpg_1", s(&[names[1], names[0], names[0]])),
        ],
    );
    let e = load_coprov2(&no_label, &options).unwrap_err().to_string();
    assert!(e.contains("missing required column `label_0`"), "{e}");
}
