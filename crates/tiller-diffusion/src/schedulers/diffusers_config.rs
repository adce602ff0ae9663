//! Reading diffusers' `scheduler_config.json` into a [`SchedulerConfig`].
//!
//! Every key diffusers may write is listed with what we do with it: pass it to our config (same
//! name), drop it because the feature it tunes is off, or require the value that keeps an
//! unimplemented feature off. Anything else is an error naming the key, never silently ignored.

use std::path::Path;

use serde_json::{Map, Value};
use tiller_core::{Error, Result};

use super::{SchedulerConfig, SchedulerKind};

/// What to do with one diffusers key.
enum Rule {
    /// A field of our config with the same name and meaning.
    Ours,
    /// Only read by a feature that is off (and must stay off, by another rule): dropped.
    Inert,
    /// Switches on a feature we do not implement; only `false` is accepted. The text says which.
    MustBeFalse(&'static str),
    /// Same, for a feature that is off when the value is `null`.
    MustBeNull(&'static str),
}

const DISCRETE_RULES: &[(&str, Rule)] = &[
    ("num_train_timesteps", Rule::Ours),
    ("beta_start", Rule::Ours),
    ("beta_end", Rule::Ours),
    ("beta_schedule", Rule::Ours),
    ("prediction_type", Rule::Ours),
    ("timestep_spacing", Rule::Ours),
    ("steps_offset", Rule::Ours),
    ("clip_sample", Rule::Ours),
    ("clip_sample_range", Rule::Ours),
    ("rescale_betas_zero_snr", Rule::Ours),
    (
        "trained_betas",
        Rule::MustBeNull("explicit trained_betas are not supported"),
    ),
    (
        "thresholding",
        Rule::MustBeFalse("dynamic thresholding (Imagen) is not implemented"),
    ),
    ("dynamic_thresholding_ratio", Rule::Inert),
    ("sample_max_value", Rule::Inert),
];

const DDIM_RULES: &[(&str, Rule)] = &[("set_alpha_to_one", Rule::Ours)];

const DDPM_RULES: &[(&str, Rule)] = &[("variance_type", Rule::Ours)];

const FLOW_MATCH_RULES: &[(&str, Rule)] = &[
    ("num_train_timesteps", Rule::Ours),
    ("shift", Rule::Ours),
    (
        "use_dynamic_shifting",
        Rule::MustBeFalse("resolution-dependent shifting is not implemented"),
    ),
    (
        "invert_sigmas",
        Rule::MustBeFalse("inverted sigmas are not implemented"),
    ),
    (
        "shift_terminal",
        Rule::MustBeNull("stretching the schedule to a terminal shift is not implemented"),
    ),
    (
        "use_karras_sigmas",
        Rule::MustBeFalse("Karras sigmas are not implemented"),
    ),
    (
        "use_exponential_sigmas",
        Rule::MustBeFalse("exponential sigmas are not implemented"),
    ),
    (
        "use_beta_sigmas",
        Rule::MustBeFalse("beta sigmas are not implemented"),
    ),
    (
        "stochastic_sampling",
        Rule::MustBeFalse(
            "diffusers' stochastic sampling is not implemented; use `sde` for the Flow-GRPO SDE",
        ),
    ),
    ("base_shift", Rule::Inert),
    ("max_shift", Rule::Inert),
    ("base_image_seq_len", Rule::Inert),
    ("max_image_seq_len", Rule::Inert),
    ("time_shift_type", Rule::Inert),
];

/// Keys of other diffusers schedulers in the DDPM family, dropped when a config is read as
/// another scheduler ([`SchedulerConfig::from_diffusers_json_as`]), as diffusers' `from_config`
/// drops them.
/// The Euler schedulers' keys (SDXL ships `EulerDiscreteScheduler`) tune their own sigma grid, not
/// the noise schedule, so they are dropped too; `timestep_type` is checked instead, because
/// `continuous` timesteps would change what the model is fed.
const OTHER_SCHEDULER_KEYS: &[&str] = &[
    "skip_prk_steps",
    "set_alpha_to_one",
    "variance_type",
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "final_sigmas_type",
];

const CLASS_NAMES: &[(&str, SchedulerKind)] = &[
    ("DDPMScheduler", SchedulerKind::Ddpm),
    ("DDIMScheduler", SchedulerKind::Ddim),
    ("FlowMatchEulerDiscreteScheduler", SchedulerKind::FlowMatch),
];

/// Reads `path`; `forced` reads it as that scheduler whatever its `_class_name`.
pub(super) fn load(path: &Path, forced: Option<SchedulerKind>) -> Result<SchedulerConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
    parse(value, forced).map_err(|message| Error::format(path, message))
}

/// The config in `value`, or a message naming the offending key.
fn parse(
    value: Value,
    forced: Option<SchedulerKind>,
) -> std::result::Result<SchedulerConfig, String> {
    let Value::Object(map) = value else {
        return Err("expected a JSON object".to_string());
    };
    let class = map.get("_class_name").and_then(Value::as_str);
    let kind = match (forced, class) {
        (Some(kind), _) => kind,
        (None, Some(class)) => CLASS_NAMES
            .iter()
            .find(|(name, _)| *name == class)
            .map(|(_, kind)| *kind)
            .ok_or_else(|| {
                format!(
                    "`_class_name` {class} is not supported; supported: {}. A config of another \
                     scheduler (e.g. Stable Diffusion 1.x's PNDMScheduler) can be read as one of \
                     these with SchedulerConfig::from_diffusers_json_as",
                    class_list()
                )
            })?,
        (None, None) => {
            return Err(format!(
                "no `_class_name`; expected one of {}, or read it with \
                 SchedulerConfig::from_diffusers_json_as",
                class_list()
            ));
        }
    };

    let rules = rules(kind);
    let mut ours = Map::new();
    for (key, value) in map {
        if key.starts_with('_') {
            continue;
        }
        match rules
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, rule)| rule)
        {
            Some(Rule::Ours) => {
                ours.insert(key, value);
            }
            Some(Rule::Inert) => {}
            Some(Rule::MustBeFalse(why)) => {
                if value != Value::Bool(false) {
                    return Err(format!(
                        "key `{key}` is {value}; only false is supported: {why}"
                    ));
                }
            }
            Some(Rule::MustBeNull(why)) => {
                if !value.is_null() {
                    return Err(format!(
                        "key `{key}` is {value}; only null is supported: {why}"
                    ));
                }
            }
            None if forced.is_some() && OTHER_SCHEDULER_KEYS.contains(&key.as_str()) => {}
            None if forced.is_some() && key == "timestep_type" => {
                if value != "discrete" {
                    return Err(format!(
                        "key `timestep_type` is {value}; only \"discrete\" timesteps can be \
                         read as another scheduler's"
                    ));
                }
            }
            None => {
                let known: Vec<&str> = rules.iter().map(|(name, _)| *name).collect();
                return Err(format!(
                    "key `{key}` is not supported for {kind:?}; known keys: {}",
                    known.join(", ")
                ));
            }
        }
    }

    let tag = match kind {
        SchedulerKind::Ddpm => "ddpm",
        SchedulerKind::Ddim => "ddim",
        SchedulerKind::FlowMatch => "flow_match",
    };
    let with_tag = |mut fields: Map<String, Value>| {
        fields.insert("type".to_string(), Value::String(tag.to_string()));
        serde_json::from_value::<SchedulerConfig>(Value::Object(fields))
    };
    with_tag(ours.clone()).map_err(|error| {
        // serde's message says what is wrong but not always where: find the key that fails on
        // its own (every field has a default, so a single key deserializes if its value is fine).
        let culprit = ours
            .iter()
            .find(|(key, value)| {
                with_tag(Map::from_iter([((*key).clone(), (*value).clone())])).is_err()
            })
            .map(|(key, _)| key.clone());
        match culprit {
            Some(key) => format!("key `{key}`: {error}"),
            None => error.to_string(),
        }
    })
}

fn rules(kind: SchedulerKind) -> Vec<&'static (&'static str, Rule)> {
    match kind {
        SchedulerKind::Ddpm => DISCRETE_RULES.iter().chain(DDPM_RULES).collect(),
        SchedulerKind::Ddim => DISCRETE_RULES.iter().chain(DDIM_RULES).collect(),
        SchedulerKind::FlowMatch => FLOW_MATCH_RULES.iter().collect(),
    }
}

fn class_list() -> String {
    CLASS_NAMES
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The diffusers `scheduler_config.json` for `config`: our fields under diffusers' names plus
/// `_class_name`. Tiller-only settings that diffusers passes to `step()` instead (DDIM's `eta`,
/// the flow SDE's noise level) are not part of diffusers' config and are left out.
pub(super) fn to_json(config: &SchedulerConfig) -> Value {
    let (class, value) = match config {
        SchedulerConfig::Ddpm(c) => ("DDPMScheduler", serde_json::to_value(c)),
        SchedulerConfig::Ddim(c) => ("DDIMScheduler", serde_json::to_value(c)),
        SchedulerConfig::FlowMatch(c) => {
            ("FlowMatchEulerDiscreteScheduler", serde_json::to_value(c))
        }
    };
    let mut map: Map<String, Value> = match value {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    map.remove("eta");
    map.remove("sde");
    map.insert("_class_name".into(), Value::String(class.into()));
    Value::Object(map)
}
