//! A preference store's feedback as reward-model training examples: every comparison, like,
//! rating, reason and region mark of one split, with each image decoded and each prompt
//! tokenised once.

use crate::{FACTORS, FeedbackItem, FeedbackSet, PairLabel, RegionLabel};
use std::collections::HashMap;
use std::path::Path;
use tiller_core::error::Context;
use tiller_core::{Error, Result};
use tiller_feedback::{FactorLabel, ImageId, PreferenceStore, PromptId, Query, Split, SqliteStore};
use tiller_testbed::image::decode_png;
use tiller_testbed::prompts::{is_held_out, mirror_prompt};
use tiller_testbed::{PromptSpec, Tokenizer};

/// The store's feedback on one split, as training examples.
pub struct StoreFeedback {
    pub set: FeedbackSet,
    /// (prompt id, image id) of each item.
    pub keys: Vec<(PromptId, ImageId)>,
    /// Prompt text and meaning of each item.
    pub prompts: Vec<(String, Option<PromptSpec>)>,
}

/// The reason labels' factor, in [`FACTORS`]' order.
fn factor_index(label: FactorLabel) -> usize {
    let name = match label {
        FactorLabel::MissingObject => "presence",
        FactorLabel::WrongCount => "count",
        FactorLabel::WrongColor => "color",
        FactorLabel::WrongPosition => "position",
        FactorLabel::WrongBinding => "binding",
        FactorLabel::ForbiddenMark => "no_mark",
        FactorLabel::Border => "border",
        FactorLabel::NoisyBackground => "clean_background",
        FactorLabel::Blurry => "crisp_edges",
        FactorLabel::Unbalanced => "balance",
    };
    FACTORS
        .iter()
        .position(|f| *f == name)
        .expect("every label has a factor")
}

/// Reads every comparison, like, rating, reason and region mark of `split` into a [`FeedbackSet`].
pub fn read_feedback(
    store: &SqliteStore,
    split: Split,
    tokenizer: &Tokenizer,
) -> Result<StoreFeedback> {
    let mut out = StoreFeedback {
        set: FeedbackSet::default(),
        keys: Vec::new(),
        prompts: Vec::new(),
    };
    let mut index: HashMap<(PromptId, ImageId), usize> = HashMap::new();
    type Cached = (String, Option<PromptSpec>, Vec<i64>, Option<Vec<i64>>);
    let mut prompt_cache: HashMap<PromptId, Cached> = HashMap::new();
    let mut item = |out: &mut StoreFeedback, p: &PromptId, im: &ImageId| -> Result<usize> {
        if let Some(&i) = index.get(&(p.clone(), im.clone())) {
            return Ok(i);
        }
        if !prompt_cache.contains_key(p) {
            let rec = store
                .prompt(p)?
                .with_context(|| format!("feedback names prompt {} which is not stored", p.0))?;
            let encode = |text: &str| -> Result<Vec<i64>> {
                Ok(tokenizer.encode(text)?.into_iter().map(i64::from).collect())
            };
            let ids = encode(&rec.text)?;
            // The mirrored prompt, unless its meaning is one the test split holds out (so that
            // mirroring never shows the reward model a held-out combination).
            let mirrored = mirror_prompt(&rec.text);
            let mirror_ids = match PromptSpec::parse(&mirrored) {
                Ok(spec) if !is_held_out(&spec) => Some(encode(&mirrored)?),
                _ => None,
            };
            prompt_cache.insert(p.clone(), (rec.text, rec.spec, ids, mirror_ids));
        }
        let (text, spec, ids, mirror_ids) = prompt_cache[p].clone();
        let bytes = store.image_bytes(im)?;
        let image = decode_png(&bytes, Path::new(&im.0))?;
        let i = out.set.items.len();
        out.set.items.push(FeedbackItem {
            ids,
            image,
            mirror_ids,
        });
        out.keys.push((p.clone(), im.clone()));
        out.prompts.push((text, spec));
        index.insert((p.clone(), im.clone()), i);
        Ok(i)
    };
    let q = Query::default().in_split(split);
    for c in store.comparisons(&q)? {
        let a = item(&mut out, &c.prompt, &c.image_a)?;
        let b = item(&mut out, &c.prompt, &c.image_b)?;
        let target = match c.choice {
            tiller_feedback::Choice::A => 1.0,
            tiller_feedback::Choice::B => 0.0,
            tiller_feedback::Choice::Tie => 0.5,
        };
        out.set.pairs.push(PairLabel { a, b, target });
    }
    for l in store.labels(&q)? {
        let i = item(&mut out, &l.prompt, &l.image)?;
        out.set.likes.push((i, l.like));
    }
    for r in store.ratings(&q)? {
        let i = item(&mut out, &r.prompt, &r.image)?;
        out.set.ratings.push((i, r.stars.get()));
    }
    for r in store.reasons(&q)? {
        let i = item(&mut out, &r.prompt, &r.image)?;
        let mut targets: Vec<(usize, f64)> = (0..FACTORS.len()).map(|k| (k, 1.0)).collect();
        for f in &r.factors {
            targets[factor_index(*f)].1 = 0.0;
        }
        out.set.reasons.push((i, targets));
    }
    for m in store.region_marks(&q)? {
        let i = item(&mut out, &m.prompt, &m.image)?;
        let im = &out.set.items[i].image;
        if (m.mask.width() as usize, m.mask.height() as usize) != (im.width(), im.height()) {
            return Err(Error::invalid(format!(
                "a region mark on image {} is {}x{}, the image {}x{}",
                m.image.0,
                m.mask.width(),
                m.mask.height(),
                im.width(),
                im.height()
            )));
        }
        out.set.regions.push(RegionLabel {
            item: i,
            factor: factor_index(m.factor),
            mask: m.mask.to_bools(),
        });
    }
    Ok(out)
}

/// The preference store at `path`, which must exist (opening a store creates a missing one);
/// `what` names it in the error (a flag or a config key).
pub fn open_existing(path: &Path, what: &str) -> Result<SqliteStore> {
    if !path.join("preferences.sqlite").is_file() {
        return Err(Error::invalid(format!(
            "{what} {}: no preference store there (no preferences.sqlite)",
            path.display()
        )));
    }
    SqliteStore::open(path)
}

impl StoreFeedback {
    /// Only the feedback on items whose prompt text `keep` accepts, re-indexed.
    pub fn retain_prompts(self, keep: impl Fn(&str) -> bool) -> StoreFeedback {
        let StoreFeedback { set, keys, prompts } = self;
        let FeedbackSet {
            items,
            pairs,
            likes,
            ratings,
            reasons,
            regions,
        } = set;
        let mut index = vec![None; items.len()];
        let mut out = StoreFeedback {
            set: FeedbackSet::default(),
            keys: Vec::new(),
            prompts: Vec::new(),
        };
        for (i, ((item, key), prompt)) in items.into_iter().zip(keys).zip(prompts).enumerate() {
            if keep(&prompt.0) {
                index[i] = Some(out.set.items.len());
                out.set.items.push(item);
                out.keys.push(key);
                out.prompts.push(prompt);
            }
        }
        out.set.pairs = pairs
            .into_iter()
            .filter_map(|p| {
                Some(PairLabel {
                    a: index[p.a]?,
                    b: index[p.b]?,
                    target: p.target,
                })
            })
            .collect();
        out.set.likes = reindexed(likes, &index);
        out.set.ratings = reindexed(ratings, &index);
        out.set.reasons = reindexed(reasons, &index);
        out.set.regions = regions
            .into_iter()
            .filter_map(|r| {
                Some(RegionLabel {
                    item: index[r.item]?,
                    ..r
                })
            })
            .collect();
        out
    }
}

/// The `(item, label)` records whose item is kept, under the items' new indices.
fn reindexed<T>(records: Vec<(usize, T)>, index: &[Option<usize>]) -> Vec<(usize, T)> {
    records
        .into_iter()
        .filter_map(|(i, x)| Some((index[i]?, x)))
        .collect()
}
