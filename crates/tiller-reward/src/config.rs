//! A reward config file (`configs/reward-testbed.toml`): the ensemble's network, its training,
//! the towers it starts from and the contrastive pretraining of those towers.

use crate::{
    PretrainConfig, RewardEnsemble, RewardNet, RewardNetConfig, RewardTrainConfig, TextPool,
};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tiller_core::error::Context;
use tiller_core::{Error, Result};
use tiller_diffusion::models::clip::{ClipTextConfig, ClipTextModel};

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

/// A reward config file.
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

/// `init` in a reward config: one folder of pretrained towers, or one per member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TowerInit {
    One(PathBuf),
    PerMember(Vec<PathBuf>),
}

impl TowerInit {
    /// The folders, in member order (one shared by all when there is one).
    pub fn folders(&self) -> &[PathBuf] {
        match self {
            TowerInit::One(p) => std::slice::from_ref(p),
            TowerInit::PerMember(v) => v,
        }
    }
}

impl RewardFile {
    /// Reads a config file with `KEY=VALUE` overrides applied; also returns the resolved TOML
    /// (what a model folder records as its training config).
    pub fn read(path: &Path, overrides: &[String]) -> Result<(RewardFile, String)> {
        tiller_core::config::from_toml_file_with_overrides(path, overrides)
    }

    /// Every path the file names (`base`, `init`), passed through `locate` (the binary's search
    /// for shipped assets).
    pub fn locate_paths(&mut self, locate: &dyn Fn(&Path) -> PathBuf) {
        if let Some(base) = &mut self.base {
            *base = locate(base);
        }
        match &mut self.init {
            Some(TowerInit::One(p)) => *p = locate(p),
            Some(TowerInit::PerMember(v)) => v.iter_mut().for_each(|p| *p = locate(p)),
            None => {}
        }
    }

    /// The network the file describes, and the text encoder of its `base` when it names one.
    pub fn network(&self, device: &Device) -> Result<(RewardNetConfig, Option<ClipTextModel>)> {
        let (text_config, text_init) = match &self.base {
            Some(base) => {
                let (c, m) = tiller_diffusion::models::load_clip_text(
                    &base.join("text_encoder"),
                    None,
                    device,
                )
                .with_context(|| format!("base = {}: loading its text encoder", base.display()))?;
                (c, Some(m))
            }
            None => (
                self.net.text_encoder.clone().ok_or_else(|| {
                    Error::config(
                        "base",
                        "set `base` (a pipeline folder) or [net.text_encoder]",
                    )
                })?,
                None,
            ),
        };
        let mut net = RewardNetConfig::new(text_config);
        let n = &self.net;
        net.image_channels = n.image_channels.unwrap_or(net.image_channels);
        net.hidden = n.hidden.unwrap_or(net.hidden);
        net.text_pool = n.text_pool.unwrap_or(net.text_pool);
        net.cross_attention = n.cross_attention.unwrap_or(net.cross_attention);
        net.region_head = n.region_head.unwrap_or(net.region_head);
        net.caption_match = n.caption_match.unwrap_or(net.caption_match);
        Ok((net, text_init))
    }

    /// The pretrained towers `init` names (none without it), each checked against `net`. Their
    /// count against the members is checked where they are used ([`crate::train_ensemble_from`]).
    pub fn towers(&self, net: &RewardNetConfig, device: &Device) -> Result<Vec<RewardNet>> {
        let Some(init) = &self.init else {
            return Ok(Vec::new());
        };
        if init.folders().is_empty() {
            return Err(Error::config(
                "init",
                "an empty list; give one folder of pretrained towers (shared by every member) or one per member",
            ));
        }
        init.folders()
            .iter()
            .map(|f| load_towers(f, net, device))
            .collect()
    }
}

/// The pretrained towers of `init` (a `tiller reward pretrain` folder), checked against `net`.
fn load_towers(init: &Path, net: &RewardNetConfig, device: &Device) -> Result<RewardNet> {
    let (c, model) = RewardEnsemble::load(init, device)
        .with_context(|| format!("init = {}: not a pretrained reward folder", init.display()))?;
    let same_text = c.net.text_encoder == net.text_encoder;
    if !same_text || c.net.image_channels != net.image_channels || c.net.hidden != net.hidden {
        return Err(Error::config(
            "init",
            format!(
                "{}: its towers have image_channels {}, hidden {}; this config has image_channels {}, hidden {}{}",
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
            ),
        ));
    }
    model
        .members
        .into_iter()
        .next()
        .with_context(|| format!("init = {}: no member", init.display()))
}
