//! Every method in the registry has a testbed preset, `configs/<name>-testbed.toml`, that parses
//! (overrides of the defaults only), names that method and passes validation; and a preset's
//! `method` section rejects what it should.

use std::path::Path;
use tiller_align::{AlignConfig, Method};

fn preset(name: &str) -> std::path::PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../../configs")
        .join(format!("{name}-testbed.toml"))
}

#[test]
fn every_method_has_a_preset_that_validates() {
    for &name in Method::NAMES {
        let path = preset(name);
        let (config, _): (AlignConfig, String) =
            tiller_core::config::from_toml_file_with_overrides(&path, &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(config.method.name(), name, "{}", path.display());
        config
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn the_method_section_is_one_method_by_name() {
    let parse = |text: &str| toml::from_str::<AlignConfig>(text).map_err(|e| e.to_string());
    // The short form gives the paper's defaults; the table form overrides them.
    let short = parse("method = \"ddpo\"").unwrap();
    assert_eq!(short.method, Method::defaults("ddpo").unwrap());
    let table = parse("[method.ddpo]\nclip_range = 0.01").unwrap();
    let Method::Ddpo(d) = &table.method else {
        panic!("{table:?}")
    };
    assert_eq!(d.clip_range, 0.01);
    // A resolved config (what a run folder keeps) reads back as itself.
    let again = parse(&toml::to_string(&table).unwrap()).unwrap();
    assert_eq!(again, table);
    // Unknown names list the valid ones; unknown keys name themselves; two methods are refused.
    let e = parse("method = \"ppo\"").unwrap_err();
    assert!(e.contains("ppo") && e.contains(&Method::names()), "{e}");
    let e = parse("[method.ddpo]\nclip = 0.01").unwrap_err();
    assert!(e.contains("clip") && e.contains("clip_range"), "{e}");
    let e = parse("[method.ddpo]\n[method.dpok]").unwrap_err();
    assert!(e.contains("two methods"), "{e}");
    // A method's own checks name its field.
    let c = parse("[method.dpok]\nratio_clip = 0").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("method.dpok.ratio_clip"), "{e}");
    // Preference methods never train on the held-out test split.
    for m in ["diffusion-dpo", "diffusion-kto", "safety-dpo"] {
        let c = parse(&format!("[method.{m}]\nsplit = \"test\"")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains(&format!("method.{m}.split")) && e.contains("held out"),
            "{e}"
        );
    }
    // And the loop's checks defer to the method: Diffusion-KTO has no per-step KL.
    let c = parse("method = \"diffusion-kto\"\n[train]\nkl_weight = 0.1").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("train.kl_weight"), "{e}");
}
