//! `tiller reward pretrain`, `tiller reward train` and `tiller reward eval`: reward models from the
//! preference store (optionally on contrastively pretrained towers), and how close they get to the
//! annotators and to the truth. Also the `--reward` flag's parser that
//! `sample` and `eval` use for best-of-N.

use crate::args::load_reward;
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use tiller_core::SeededRng;
use tiller_diffusion::models::clip::{ClipTextConfig, ClipTextModel};
use tiller_feedback::annotator::{TasteWeights, utility};
use tiller_feedback::{FactorLabel, ImageId, PreferenceStore, PromptId, Query, Split, SqliteStore};
use tiller_reward::ensemble::{KIND, RewardEnsemble, RewardModelConfig};
use tiller_reward::fusion::{
    FUSION_FILE, FUSION_KIND, Fusion, FusionConfig, FusionPart, PartScore, PartScorer,
    part_statistics,
};
use tiller_reward::metrics::{calibration, pairwise_accuracy, pearson, spearman};
use tiller_reward::pretrain::{batch_retrieval, caption_pairs, minimal_pair_accuracy};
use tiller_reward::rewards::factor_targets;
use tiller_reward::{
    FACTORS, FeedbackItem, FeedbackSet, GoldReward, LearnedReward, PairLabel, PretrainConfig,
    RegionLabel, Reward, RewardNet, RewardNetConfig, RewardTrainConfig, TextPool,
    renderer_captions, train_ensemble_from,
};
use tiller_testbed::image::decode_png;
use tiller_testbed::prompts::{is_held_out, mirror_prompt};
use tiller_testbed::{Image, PromptSpec, RenderConfig, Task, Tokenizer};

/// The network section of a reward config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetSection {
    /// Channels of the first image convolution (default 16).
    pub image_channels: Option<usize>,
    /// Width of the joint MLP (default 128).
    pub hidden: Option<usize>,
    /// The text tower; taken from `base` when that is set.
    pub text_encoder: Option<ClipTextConfig>,
    /// Cross-attention over the prompt's tokens at the last image level (default false).
    pub cross_attention: Option<bool>,
    /// The prompt summary: `eos` (CLIP's pooled output, default) or `mean` (mean token state).
    pub text_pool: Option<TextPool>,
    /// A region head trained from region marks (default false).
    pub region_head: Option<bool>,
    /// The towers' caption match (cosine, learned scale) added to the reward (default false).
    pub caption_match: Option<bool>,
}

/// `configs/reward-testbed.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardFile {
    /// A pipeline folder whose text encoder initialises every member's text tower.
    pub base: Option<PathBuf>,
    /// Ensemble members.
    pub members: usize,
    #[serde(default)]
    pub net: NetSection,
    #[serde(default)]
    pub train: RewardTrainConfig,
    /// Folders written by `tiller reward pretrain`: one (every member starts from its
    /// contrastively pretrained image and text towers) or a list with one per member (towers
    /// pretrained with different seeds: members then differ by initialisation, as a deep
    /// ensemble's do). The heads are each member's own.
    #[serde(default)]
    pub init: Option<TowerInit>,
    /// Contrastive image-text pretraining, used by `tiller reward pretrain`.
    #[serde(default)]
    pub pretrain: PretrainConfig,
    #[serde(default = "cpu")]
    pub device: String,
}

fn cpu() -> String {
    "cpu".into()
}

#[derive(Args)]
pub struct TrainArgs {
    #[arg(long, default_value = "configs/reward-testbed.toml")]
    pub config: PathBuf,
    /// The preference store (its train split is used).
    #[arg(long)]
    pub store: PathBuf,
    /// The reward model folder to write; must not exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Override a config value, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Args)]
pub struct PretrainArgs {
    #[arg(long, default_value = "configs/reward-testbed.toml")]
    pub config: PathBuf,
    /// The folder to write (a one-member reward model holding the pretrained towers); must not
    /// exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Override a config value, e.g. `--set pretrain.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

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
            anyhow::bail!(
                "a region mark on image {} is {}x{}, the image {}x{}",
                m.image.0,
                m.mask.width(),
                m.mask.height(),
                im.width(),
                im.height()
            );
        }
        out.set.regions.push(RegionLabel {
            item: i,
            factor: factor_index(m.factor),
            mask: m.mask.to_bools(),
        });
    }
    Ok(out)
}

/// The preference store at `path`, which must exist (opening a store creates a missing one).
fn open_existing_store(path: &Path, flag: &str) -> Result<SqliteStore> {
    if !path.join("preferences.sqlite").is_file() {
        bail!(
            "{flag} {}: no preference store there (no preferences.sqlite)",
            path.display()
        );
    }
    Ok(SqliteStore::open(path)?)
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

/// The network a reward config describes, and the text encoder of its `base` when it names one.
fn resolve_net(
    file: &RewardFile,
    config_path: &Path,
    device: &Device,
) -> Result<(RewardNetConfig, Option<ClipTextModel>)> {
    let (text_config, text_init): (ClipTextConfig, Option<ClipTextModel>) = match &file.base {
        Some(base) => {
            let base = &crate::shipped::resolve(base);
            let (c, m) =
                tiller_diffusion::models::load_clip_text(&base.join("text_encoder"), None, device)
                    .with_context(|| {
                        format!("base = {}: loading its text encoder", base.display())
                    })?;
            (c, Some(m))
        }
        None => (
            file.net.text_encoder.clone().with_context(|| {
                format!(
                    "{}: set `base` (a pipeline folder) or [net.text_encoder]",
                    config_path.display()
                )
            })?,
            None,
        ),
    };
    let mut net = RewardNetConfig::new(text_config);
    if let Some(c) = file.net.image_channels {
        net.image_channels = c;
    }
    if let Some(h) = file.net.hidden {
        net.hidden = h;
    }
    if let Some(p) = file.net.text_pool {
        net.text_pool = p;
    }
    if let Some(x) = file.net.cross_attention {
        net.cross_attention = x;
    }
    if let Some(x) = file.net.region_head {
        net.region_head = x;
    }
    if let Some(x) = file.net.caption_match {
        net.caption_match = x;
    }
    Ok((net, text_init))
}

/// Writes `model` into a temporary sibling of `out` with `extra` files, then renames it: a crash
/// leaves no half model at `out`.
fn write_model_folder(
    out: &Path,
    model: &RewardEnsemble,
    config: &RewardModelConfig,
    extra: &[(&str, &[u8])],
) -> Result<()> {
    let tmp = out.with_file_name(format!(
        ".{}.tmp",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("reward")
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    model.save(&tmp, config)?;
    for (name, bytes) in extra {
        tiller_core::fs::atomic_write(&tmp.join(name), bytes)?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("moving the model to {}", out.display()))
}

/// `tiller reward pretrain`: CLIP-style contrastive pretraining of the reward network's image
/// and text towers on the training renderer's drawings of training-split prompts (no feedback,
/// no gold evaluator), written as a one-member reward model folder that `init` in a reward config
/// starts every member from.
pub fn pretrain(args: PretrainArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let (file, resolved): (RewardFile, String) =
        tiller_core::config::from_toml_file_with_overrides(
            &crate::shipped::resolve(&args.config),
            &args.overrides,
        )?;
    let device = tiller_core::device::parse_device(&file.device)?;
    let (net_config, text_init) = resolve_net(&file, &args.config, &device)?;
    device.seed(file.pretrain.seed);
    let mut net = net_config.init(&device)?;
    if let Some(t) = text_init {
        net.text_encoder = t;
    }
    let tokenizer = Tokenizer::shapes();
    let render = RenderConfig::default();
    let p = &file.pretrain;
    let draw = |split: tiller_testbed::Split, n: usize, rng: &mut SeededRng| {
        renderer_captions(&Task::ALL, split, n, false, rng, &tokenizer, &render)
    };
    // Training drawings use `[pretrain.render]`; the measurements below the default renderer, so
    // that runs with different training renderings are measured alike.
    let mut batch = |n: usize, rng: &mut SeededRng| {
        renderer_captions(
            &Task::ALL,
            tiller_testbed::Split::Train,
            n,
            p.hard_negatives,
            rng,
            &tokenizer,
            &p.render,
        )
    };
    eprintln!(
        "reward pretrain: {} updates of {} captioned renderer drawings (training-split prompts{}), temperature {}",
        p.steps,
        p.batch_size,
        if p.hard_negatives {
            ", half of them minimal edits of the other half"
        } else {
            ""
        },
        p.temperature
    );
    let mut progress = tiller_engine::progress::Progress::new("pretrain", 0, p.steps as u64);
    let mut log = String::new();
    let (mut loss_avg, mut acc_avg) = (f64::NAN, f64::NAN);
    let net = tiller_reward::pretrain(net, p, &mut batch, &device, &mut |s, l, a| {
        // Exponential moving averages for the progress line; every step goes to the log.
        let k = 0.05;
        loss_avg = if loss_avg.is_nan() {
            l
        } else {
            loss_avg + k * (l - loss_avg)
        };
        acc_avg = if acc_avg.is_nan() {
            a
        } else {
            acc_avg + k * (a - acc_avg)
        };
        log.push_str(&format!(
            "{{\"step\":{s},\"loss\":{l:.6},\"retrieval_accuracy\":{a:.4}}}\n"
        ));
        progress.update(
            s as u64,
            &format!("loss {loss_avg:.4} in-batch retrieval {acc_avg:.3}"),
        );
    })?;
    // Retrieval on fresh drawings, in batches of the training size: of training-split meanings,
    // and of held-out ones (test-split prompts: unseen colour-shape pairs, counts, relations).
    let retrieval = |split: tiller_testbed::Split, seed: u64| -> Result<f64> {
        let mut rng = SeededRng::new(seed);
        let mut sum = 0.0;
        let batches = 8;
        for _ in 0..batches {
            let items = draw(split, p.batch_size, &mut rng)?;
            sum += batch_retrieval(&net, &items, &device)?;
        }
        Ok(sum / batches as f64)
    };
    let seen = retrieval(tiller_testbed::Split::Train, p.seed.wrapping_add(1_000_003))?;
    let unseen = retrieval(tiller_testbed::Split::Test, p.seed.wrapping_add(2_000_003))?;
    // Minimal pairs (a prompt and a one-binding edit, each drawn): does each image prefer its own
    // caption, and each caption its own image?
    let pairs = |split: tiller_testbed::Split, seed: u64| -> Result<(f64, f64)> {
        let mut rng = SeededRng::new(seed);
        let pairs = caption_pairs(&Task::ALL, split, 512, &mut rng, &tokenizer, &render)?;
        Ok(minimal_pair_accuracy(&net, &pairs, &device)?)
    };
    let (seen_image, seen_text) =
        pairs(tiller_testbed::Split::Train, p.seed.wrapping_add(3_000_003))?;
    let (unseen_image, unseen_text) =
        pairs(tiller_testbed::Split::Test, p.seed.wrapping_add(4_000_003))?;
    let summary = serde_json::json!({
        "steps": p.steps,
        "batch_size": p.batch_size,
        "hard_negatives": p.hard_negatives,
        "retrieval_train_prompts": seen,
        "retrieval_test_prompts": unseen,
        "minimal_pairs_image_train_prompts": seen_image,
        "minimal_pairs_text_train_prompts": seen_text,
        "minimal_pairs_image_test_prompts": unseen_image,
        "minimal_pairs_text_test_prompts": unseen_text,
    });
    let config = RewardModelConfig {
        kind: KIND.into(),
        members: 1,
        net: net_config,
    };
    let model = RewardEnsemble { members: vec![net] };
    write_model_folder(
        &args.out,
        &model,
        &config,
        &[
            ("pretrain.toml", resolved.as_bytes()),
            ("pretrain.jsonl", log.as_bytes()),
            ("pretrain.json", summary.to_string().as_bytes()),
        ],
    )?;
    println!(
        "pretrained towers written to {} (training loss {loss_avg:.4}); in-batch retrieval accuracy on {} fresh drawings: {seen:.3} for training prompts, {unseen:.3} for held-out (test-split) prompts; minimal pairs (512 each, image / text side): {seen_image:.3} / {seen_text:.3} for training prompts, {unseen_image:.3} / {unseen_text:.3} for held-out prompts",
        args.out.display(),
        8 * p.batch_size
    );
    Ok(())
}

/// The pretrained towers of `init` (a `tiller reward pretrain` folder), checked against `net`.
fn load_towers(init: &Path, net: &RewardNetConfig, device: &Device) -> Result<RewardNet> {
    let (c, model) = RewardEnsemble::load(init, device)
        .with_context(|| format!("init = {}: not a pretrained reward folder", init.display()))?;
    let same_text = c.net.text_encoder == net.text_encoder;
    if !same_text || c.net.image_channels != net.image_channels || c.net.hidden != net.hidden {
        bail!(
            "init = {}: its towers have image_channels {}, hidden {}; this config has image_channels {}, hidden {}{}",
            init.display(),
            c.net.image_channels,
            c.net.hidden,
            net.image_channels,
            net.hidden,
            if same_text {
                ""
            } else {
                ", and the text encoders differ"
            },
        );
    }
    model
        .members
        .into_iter()
        .next()
        .with_context(|| format!("init = {}: no member", init.display()))
}

/// `init` in a reward config: one folder of pretrained towers, or one per member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TowerInit {
    One(PathBuf),
    PerMember(Vec<PathBuf>),
}

impl TowerInit {
    fn folders(&self) -> &[PathBuf] {
        match self {
            TowerInit::One(p) => std::slice::from_ref(p),
            TowerInit::PerMember(v) => v,
        }
    }
}

pub fn train(args: TrainArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let (file, resolved): (RewardFile, String) =
        tiller_core::config::from_toml_file_with_overrides(
            &crate::shipped::resolve(&args.config),
            &args.overrides,
        )?;
    let device = tiller_core::device::parse_device(&file.device)?;
    let (net, text_init) = resolve_net(&file, &args.config, &device)?;
    let towers = match &file.init {
        Some(init) => {
            // The count against the members is checked where the towers are used
            // (`train_ensemble_from`); an empty list would silently mean no towers.
            if init.folders().is_empty() {
                bail!(
                    "init: an empty list; give one folder of pretrained towers (shared by every member) or one per member"
                );
            }
            init.folders()
                .iter()
                .map(|f| load_towers(f, &net, &device))
                .collect::<Result<Vec<_>>>()?
        }
        None => Vec::new(),
    };
    let config = RewardModelConfig {
        kind: KIND.into(),
        members: file.members,
        net,
    };
    let tokenizer = Tokenizer::shapes();
    let store = SqliteStore::open(&args.store)?;
    let data = read_feedback(&store, Split::Train, &tokenizer)?;
    eprintln!(
        "reward train: {} members x {} steps on {} comparisons, {} likes, {} ratings, {} reasons, {} region marks{} ({} images)",
        config.members,
        file.train.steps,
        data.set.pairs.len(),
        data.set.likes.len(),
        data.set.ratings.len(),
        data.set.reasons.len(),
        data.set.regions.len(),
        if config.net.region_head || data.set.regions.is_empty() {
            ""
        } else {
            " (unused: no net.region_head)"
        },
        data.set.items.len()
    );
    let mut progress = tiller_engine::progress::Progress::new(
        "reward",
        0,
        (file.train.steps * config.members) as u64,
    );
    let steps = file.train.steps;
    let mut last = f64::NAN;
    let model = train_ensemble_from(
        &config,
        &file.train,
        &data.set,
        text_init.as_ref(),
        &towers,
        &device,
        &mut |m, s, l| {
            last = l;
            progress.update((m * steps + s) as u64, &format!("member {m} loss {l:.4}"));
        },
    )?;
    write_model_folder(
        &args.out,
        &model,
        &config,
        &[("train.toml", resolved.as_bytes())],
    )?;
    println!(
        "reward model written to {} (last loss {last:.4})",
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct FuseArgs {
    /// A part: a reward model folder (its reward) or `caption-match:<folder>` (its towers'
    /// caption match). Repeat for each part.
    #[arg(long = "part", required = true)]
    pub parts: Vec<String>,
    /// Each part's weight, in the parts' order (default 1 each).
    #[arg(long = "weight")]
    pub weights: Vec<f64>,
    /// The store whose images and prompts the statistics are taken over (no label is read).
    #[arg(long)]
    pub store: PathBuf,
    /// The store's split to take them over.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// The fusion folder to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `tiller reward fuse`: a fusion folder ([`Fusion`]) whose parts are standardised by their mean
/// and standard deviation over a store's images, label-free, then summed with weights. The
/// parts' folders are copied in, so the fusion stands alone; `--reward` and `reward eval` load
/// it like a reward model folder.
pub fn fuse(args: FuseArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let weights = if args.weights.is_empty() {
        vec![1.0; args.parts.len()]
    } else {
        args.weights.clone()
    };
    if weights.len() != args.parts.len() {
        bail!(
            "--weight given {} times for {} --part: give one per part or none",
            weights.len(),
            args.parts.len()
        );
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        bail!("--weight {w} is not a finite number");
    }
    let split = Split::parse(&args.split)?;
    let device = tiller_core::device::parse_device(&args.device)?;
    let tokenizer = Tokenizer::shapes();
    let data = read_feedback(
        &open_existing_store(&args.store, "--store")?,
        split,
        &tokenizer,
    )?;
    if data.set.items.len() < 2 {
        bail!(
            "--store {}: {} images on {} prompts, too few to standardise by",
            args.store.display(),
            data.set.items.len(),
            split.name()
        );
    }
    let images: Vec<Image> = data.set.items.iter().map(|i| i.image.clone()).collect();
    let texts: Vec<String> = data.prompts.iter().map(|(t, _)| t.clone()).collect();
    let tmp = args.out.with_file_name(format!(
        ".{}.tmp",
        args.out
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("fusion")
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let built = fuse_into(
        &tmp,
        &args,
        &weights,
        (&images, &texts),
        &tokenizer,
        &device,
    );
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let config = built?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("moving the fusion to {}", args.out.display()))?;
    println!(
        "fusion of {} parts written to {} (standardised on {})",
        config.parts.len(),
        args.out.display(),
        config.standardised_on
    );
    Ok(())
}

/// Scores the images by every part, copies the parts into `tmp` and writes its `fusion.json`.
fn fuse_into(
    tmp: &Path,
    args: &FuseArgs,
    weights: &[f64],
    (images, texts): (&[Image], &[String]),
    tokenizer: &Tokenizer,
    device: &Device,
) -> Result<FusionConfig> {
    let mut parts = Vec::new();
    for (k, (spec, weight)) in args.parts.iter().zip(weights).enumerate() {
        let (folder, score) = match spec.strip_prefix("caption-match:") {
            Some(f) => (Path::new(f), PartScore::CaptionMatch),
            None => (Path::new(spec.as_str()), PartScore::Reward),
        };
        let scorer = PartScorer::load(folder, score, tokenizer.clone(), device)
            .with_context(|| format!("--part {spec}"))?;
        let raw = scorer.reward().score(images, texts)?;
        let (mean, std) = part_statistics(&raw).with_context(|| format!("--part {spec}"))?;
        let name = format!("part-{k}");
        copy_files(folder, &tmp.join(&name)).with_context(|| format!("--part {spec}"))?;
        println!("{spec}: mean {mean:.4}, std {std:.4}, weight {weight}");
        parts.push(FusionPart {
            folder: name,
            score,
            weight: *weight,
            mean,
            std,
        });
    }
    let config = FusionConfig {
        kind: FUSION_KIND.into(),
        parts,
        standardised_on: format!(
            "{}, {} split, {} images",
            args.store.display(),
            args.split,
            images.len()
        ),
    };
    config.validate()?;
    tiller_core::fs::atomic_write(
        &tmp.join(FUSION_FILE),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    Ok(config)
}

/// Copies the regular files of `from` into a new folder `to`.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if path.is_file() {
            let target = to.join(path.file_name().expect("a file has a name"));
            std::fs::copy(&path, &target)
                .with_context(|| format!("copying {} to {}", path.display(), target.display()))?;
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// The reward model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The preference store.
    #[arg(long)]
    pub store: PathBuf,
    /// The split to evaluate on (held-out prompts: `test`).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write one JSON line per comparison here (prompt, task, both images' reward, spread,
    /// caption match, gold reward and median utility, the label, whether content differs), for
    /// analyses of your own.
    #[arg(long)]
    pub comparisons: Option<PathBuf>,
    /// Keep only the comparisons whose prompt, and its mirror image, never occurs in this store
    /// (the reward's training store): held-out prompts of the training distribution, where
    /// `--split test` holds out prompt types.
    #[arg(long)]
    pub unseen_in: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// What `reward eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RewardReport {
    pub model: String,
    pub split: String,
    pub comparisons: usize,
    /// With `--unseen-in`: that store, and how many of the split's comparisons it removed (their
    /// prompt or its mirror image occurs there).
    pub unseen_in: Option<String>,
    pub seen_comparisons_removed: usize,
    /// Held-out pairwise accuracy on the annotators' non-tie comparisons.
    pub pairwise_accuracy: Option<f64>,
    /// Inter-annotator agreement measured when the split was collected (the ceiling).
    pub annotator_agreement: Option<f64>,
    /// References on the same comparisons: the pairwise accuracy of the gold reward and of the
    /// median annotator's utility used as rewards (what knowing the truth would give).
    pub gold_pairwise_accuracy: Option<f64>,
    pub utility_pairwise_accuracy: Option<f64>,
    /// Expected calibration error and Brier score of σ(r_a - r_b).
    pub ece: f64,
    pub brier: f64,
    pub images: usize,
    /// Spearman correlation of the reward with the gold reward and with the median annotator's
    /// utility, over the split's images.
    pub spearman_gold: Option<f64>,
    pub spearman_utility: Option<f64>,
    /// Pearson correlation of each factor's probability with the gold factor score.
    pub factor_correlation: Vec<(String, Option<f64>)>,
    /// The ensemble's mean standard deviation over the split's images.
    pub mean_uncertainty: f64,
    /// The same over the images whose prompt's meaning is a held-out combination (only the test
    /// split has them) and over the rest (meanings the training split has): the issue's
    /// uncertainty check compares the first on `--split test` with the second on fresh
    /// training-split images.
    pub mean_uncertainty_held_out_types: Option<f64>,
    pub mean_uncertainty_training_types: Option<f64>,
    /// The pairwise accuracies by the compared prompt's task: where the reward fails.
    pub per_task: Vec<TaskPairwise>,
    /// The same by what separates the two images in the gold evaluator: `content differs`
    /// (the median annotator's prompt and mark factors score them differently) or `looks only`
    /// (only border, background, edges and balance do).
    pub per_difference: Vec<TaskPairwise>,
    /// The towers' caption match (cosine of image and prompt embeddings, the contrastive
    /// pretraining objective; not the reward) used as the reward: its pairwise accuracy on the
    /// same comparisons and its Spearman correlation with the gold reward.
    pub caption_match_pairwise_accuracy: Option<f64>,
    pub caption_match_spearman_gold: Option<f64>,
}

/// Pairwise accuracy (non-tie) of the reward and the two references on one task's comparisons.
#[derive(Debug, Clone, Serialize)]
pub struct TaskPairwise {
    pub task: String,
    pub comparisons: usize,
    pub pairwise_accuracy: Option<f64>,
    pub gold_pairwise_accuracy: Option<f64>,
    pub utility_pairwise_accuracy: Option<f64>,
    pub caption_match_pairwise_accuracy: Option<f64>,
}

pub fn eval(args: EvalArgs) -> Result<RewardReport> {
    let split = Split::parse(&args.split)?;
    let device = tiller_core::device::parse_device(&args.device)?;
    let tokenizer = Tokenizer::shapes();
    let fusion = if Fusion::is_fusion(&args.model) {
        Some(
            Fusion::load(&args.model, tokenizer.clone(), &device)
                .with_context(|| format!("--model {}", args.model.display()))?,
        )
    } else {
        None
    };
    let single;
    // A fusion's spread and factor columns are its main part's (the first learned reward), its
    // caption-match column its first caption-match part's.
    let (reward, matcher) = match &fusion {
        Some(f) => {
            let main = f.main_part().1;
            (
                main.learned(),
                f.caption_match_part().unwrap_or(main).learned(),
            )
        }
        None => {
            single = LearnedReward::load(&args.model, tokenizer.clone(), &device)
                .with_context(|| format!("--model {}", args.model.display()))?;
            (&single, &single)
        }
    };
    let store = open_existing_store(&args.store, "--store")?;
    let mut data = read_feedback(&store, split, &tokenizer)?;
    let total = data.set.pairs.len();
    if let Some(path) = &args.unseen_in {
        let seen: HashSet<String> = open_existing_store(path, "--unseen-in")?
            .prompts(None)?
            .into_iter()
            .flat_map(|p| [mirror_prompt(&p.text), p.text])
            .collect();
        data = data.retain_prompts(|text| !seen.contains(text));
        if data.set.pairs.is_empty() {
            bail!(
                "--unseen-in {}: every one of the {total} {} comparisons in {} is on a prompt that store holds",
                path.display(),
                split.name(),
                args.store.display()
            );
        }
    }
    if data.set.items.is_empty() {
        bail!(
            "the store {} has no feedback on {} prompts; collect some with `tiller feedback collect --split {}`",
            args.store.display(),
            split.name(),
            split.name()
        );
    }
    let images: Vec<Image> = data.set.items.iter().map(|i| i.image.clone()).collect();
    let texts: Vec<String> = data.prompts.iter().map(|(t, _)| t.clone()).collect();
    let mut scored = reward.score_with_uncertainty(&images, &texts)?;
    let matched = matcher.caption_match(&images, &texts)?;
    if let Some(f) = &fusion {
        scored.mean = f.score(&images, &texts)?;
        // The main part's spread on the fused scale.
        let (part, _) = f.main_part();
        if part.score == PartScore::Reward {
            for s in &mut scored.std {
                *s *= part.weight.abs() / part.std;
            }
        }
    }
    // Each comparison as (score of a, score of b, target) under a per-image score.
    let labelled_by = |score: &[f64]| -> Vec<(f64, f64, f64)> {
        data.set
            .pairs
            .iter()
            .map(|p| (score[p.a], score[p.b], p.target))
            .collect()
    };
    let labelled = labelled_by(&scored.mean);
    let cal = calibration(&labelled, 10);
    let gold = GoldReward::default();
    let median = TasteWeights::default();
    let content_only = TasteWeights {
        border: 0.0,
        clean_background: 0.0,
        balance: 0.0,
        crisp_edges: 0.0,
        ..median.clone()
    };
    let (mut g, mut u, mut targets, mut tasks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut content = Vec::new();
    let (mut std_held_out, mut std_training) = (Vec::new(), Vec::new());
    for (img, (text, spec)) in images.iter().zip(&data.prompts) {
        let spec = match spec {
            Some(s) => s.clone(),
            None => PromptSpec::parse(text)?,
        };
        tasks.push(spec.tag.name());
        let std = scored.std[tasks.len() - 1];
        if is_held_out(&spec) {
            std_held_out.push(std);
        } else {
            std_training.push(std);
        }
        let e = gold.evaluator.evaluate(img, &spec)?;
        g.push(gold.weights.of(&e));
        u.push(utility(&median, &e)?);
        content.push(utility(&content_only, &e)?);
        targets.push(factor_targets(&e));
    }
    let factor_correlation = FACTORS
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let pred: Vec<f64> = scored.factors.iter().map(|f| f[k]).collect();
            let truth: Vec<f64> = targets.iter().map(|t| t[k]).collect();
            (name.to_string(), pearson(&pred, &truth))
        })
        .collect();
    let mut task_names: Vec<&str> = tasks.clone();
    task_names.sort_unstable();
    task_names.dedup();
    // Pairwise accuracies of the reward, the two references and the caption match on the
    // comparisons that `keep` selects.
    let subset = |name: &str, keep: &dyn Fn(&PairLabel) -> bool| {
        let of = |score: &[f64]| -> Vec<(f64, f64, f64)> {
            data.set
                .pairs
                .iter()
                .filter(|p| keep(p))
                .map(|p| (score[p.a], score[p.b], p.target))
                .collect()
        };
        let mine = of(&scored.mean);
        TaskPairwise {
            task: name.to_string(),
            comparisons: mine.len(),
            pairwise_accuracy: pairwise_accuracy(&mine),
            gold_pairwise_accuracy: pairwise_accuracy(&of(&g)),
            utility_pairwise_accuracy: pairwise_accuracy(&of(&u)),
            caption_match_pairwise_accuracy: pairwise_accuracy(&of(&matched)),
        }
    };
    let per_task = task_names
        .into_iter()
        .map(|task| subset(task, &|p: &PairLabel| tasks[p.a] == task))
        .collect();
    let differs = |p: &PairLabel| (content[p.a] - content[p.b]).abs() > 1e-9;
    let per_difference = vec![
        subset("content differs", &differs),
        subset("looks only", &|p: &PairLabel| !differs(p)),
    ];
    let agreement_path = args.store.join(format!("agreement-{}.json", split.name()));
    let annotator_agreement = std::fs::read_to_string(&agreement_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("agreement").and_then(|a| a.as_f64()));
    let report = RewardReport {
        model: args.model.display().to_string(),
        split: split.name().to_string(),
        comparisons: labelled.len(),
        unseen_in: args.unseen_in.as_ref().map(|p| p.display().to_string()),
        seen_comparisons_removed: total - labelled.len(),
        pairwise_accuracy: pairwise_accuracy(&labelled),
        annotator_agreement,
        gold_pairwise_accuracy: pairwise_accuracy(&labelled_by(&g)),
        utility_pairwise_accuracy: pairwise_accuracy(&labelled_by(&u)),
        ece: cal.ece,
        brier: cal.brier,
        images: images.len(),
        spearman_gold: spearman(&scored.mean, &g),
        spearman_utility: spearman(&scored.mean, &u),
        factor_correlation,
        mean_uncertainty: scored.std.iter().sum::<f64>() / scored.std.len().max(1) as f64,
        mean_uncertainty_held_out_types: mean_of(&std_held_out),
        mean_uncertainty_training_types: mean_of(&std_training),
        per_task,
        per_difference,
        caption_match_pairwise_accuracy: pairwise_accuracy(&labelled_by(&matched)),
        caption_match_spearman_gold: spearman(&matched, &g),
    };
    println!("{}", markdown(&report));
    if let Some(path) = &args.comparisons {
        let mut lines = String::new();
        for p in &data.set.pairs {
            let side = |i: usize| {
                serde_json::json!({
                    "reward": scored.mean[i],
                    "std": scored.std[i],
                    "caption_match": matched[i],
                    "gold": g[i],
                    "utility": u[i],
                })
            };
            let line = serde_json::json!({
                "prompt": texts[p.a],
                "task": tasks[p.a],
                "a": side(p.a),
                "b": side(p.b),
                "target": p.target,
                "content_differs": differs(p),
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        tiller_core::fs::atomic_write(path, lines.as_bytes())?;
    }
    if let Some(out) = &args.out {
        tiller_core::fs::atomic_write(out, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(report)
}

fn mean_of(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.3}"))
}

/// The report as Markdown tables.
pub fn markdown(r: &RewardReport) -> String {
    let mut s = format!(
        "# Reward model `{}` on {} feedback\n\n| metric | value |\n|---|---|\n| comparisons | {} |\n| pairwise accuracy (non-tie) | {} |\n| annotator agreement (ceiling) | {} |\n| gold reward / median utility as the reward (references) | {} / {} |\n| calibration ECE / Brier | {:.3} / {:.3} |\n| images | {} |\n| Spearman with gold reward | {} |\n| Spearman with median annotator utility | {} |\n| mean ensemble std: all / held-out prompt types / training prompt types | {:.4} / {} / {} |\n| the towers' caption match as the reward: pairwise / Spearman with gold | {} / {} |\n\n",
        r.model,
        r.split,
        r.comparisons,
        fmt(r.pairwise_accuracy),
        fmt(r.annotator_agreement),
        fmt(r.gold_pairwise_accuracy),
        fmt(r.utility_pairwise_accuracy),
        r.ece,
        r.brier,
        r.images,
        fmt(r.spearman_gold),
        fmt(r.spearman_utility),
        r.mean_uncertainty,
        fmt(r.mean_uncertainty_held_out_types),
        fmt(r.mean_uncertainty_training_types),
        fmt(r.caption_match_pairwise_accuracy),
        fmt(r.caption_match_spearman_gold)
    );
    if let Some(store) = &r.unseen_in {
        s.push_str(&format!(
            "Only prompts unseen in {store}: {} comparisons on prompts it holds removed.\n\n",
            r.seen_comparisons_removed
        ));
    }
    s.push_str("| factor | Pearson r with gold |\n|---|---|\n");
    for (name, c) in &r.factor_correlation {
        s.push_str(&format!("| {name} | {} |\n", fmt(*c)));
    }
    s.push_str("\n| comparisons of | comparisons | pairwise accuracy | gold reward | median utility | caption match |\n|---|---|---|---|---|---|\n");
    for t in r.per_task.iter().chain(&r.per_difference) {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            t.task,
            t.comparisons,
            fmt(t.pairwise_accuracy),
            fmt(t.gold_pairwise_accuracy),
            fmt(t.utility_pairwise_accuracy),
            fmt(t.caption_match_pairwise_accuracy)
        ));
    }
    s
}

#[derive(Args)]
pub struct ScoreArgs {
    /// A JSONL manifest, one `{"image": "<png path>", "prompt": "<text>"}` per line; relative image
    /// paths are relative to the manifest's folder.
    #[arg(long)]
    pub manifest: PathBuf,
    /// The reward: `gold`, `jpeg`, a reward model folder, a fusion folder or
    /// `caption-match:<folder>`.
    #[arg(long, default_value = "gold")]
    pub reward: String,
    /// Where to write the scores, one `{"image", "prompt", "reward"}` line per manifest line
    /// (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestLine {
    image: PathBuf,
    prompt: String,
}

/// `tiller reward score`: scores PNG images with any reward, as the alignment loop would (the
/// images of another program, e.g. a reference implementation's rollouts). A non-finite score is
/// an error naming the image.
pub fn score(args: ScoreArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("--manifest {}", args.manifest.display()))?;
    let root = args.manifest.parent().unwrap_or(Path::new("."));
    let mut lines = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let l: ManifestLine = serde_json::from_str(line).with_context(|| {
            format!(
                "--manifest {} line {}: expected {{\"image\", \"prompt\"}}",
                args.manifest.display(),
                i + 1
            )
        })?;
        lines.push(l);
    }
    let images = lines
        .iter()
        .map(|l| {
            let path = root.join(&l.image);
            tiller_testbed::image::read_png(&path)
                .with_context(|| format!("image {}", path.display()))
        })
        .collect::<Result<Vec<Image>>>()?;
    let prompts: Vec<String> = lines.iter().map(|l| l.prompt.clone()).collect();
    let device = tiller_core::device::parse_device(&args.device)?;
    let reward = load_reward(&args.reward, &Tokenizer::shapes(), &device)?;
    let scores = reward.score(&images, &prompts)?;
    let mut out = String::new();
    for (l, s) in lines.iter().zip(&scores) {
        if !s.is_finite() {
            bail!(
                "reward `{}` gave {s} for image {}",
                reward.name(),
                l.image.display()
            );
        }
        out.push_str(&serde_json::to_string(
            &serde_json::json!({ "image": l.image, "prompt": l.prompt, "reward": s }),
        )?);
        out.push('\n');
    }
    tiller_core::fs::atomic_write(&args.out, out.as_bytes())?;
    Ok(())
}
