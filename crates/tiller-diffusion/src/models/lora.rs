//! LoRA adapters for Tiller's models: attach, save and load in diffusers/PEFT or kohya naming,
//! merge.
//!
//! Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (arXiv:2106.09685).
//! A frozen projection `W` (torch layout `[d_out, d_in]`) becomes `W + (alpha / r) * B A` with
//! `A: [r, d_in]` and `B: [d_out, r]`. burn's [`LoraAdapter`] stores the transposes, because
//! burn's `Linear` weight is `[d_in, d_out]`: `a = A^T: [d_in, r]`, `b = B^T: [r, d_out]`, and the
//! effective weight is `base + scale * a @ b` with `scale = alpha / r`. The adapters are burn's
//! own reparameterisation, so a model keeps its type and forward code, only the factors train,
//! and [`merge_lora`] is burn's `materialize`.
//!
//! Files (safetensors, f32):
//! - [`LoraFormat::Peft`]: diffusers' `pytorch_lora_weights.safetensors`, which
//!   `pipe.load_lora_weights` and `UNet2DConditionModel.load_lora_adapter` read:
//!   `unet.<module>.lora_A.weight` `[r, d_in]`, `unet.<module>.lora_B.weight` `[d_out, r]`, and
//!   the PEFT `LoraConfig` (`r`, `lora_alpha`, `target_modules`, ...) as JSON under the metadata
//!   key `lora_adapter_metadata`, its keys prefixed `unet.` as diffusers' `save_lora_weights`
//!   writes them (diffusers/loaders/lora_base.py, `write_lora_layers`).
//! - [`LoraFormat::Kohya`]: sd-scripts / A1111 / ComfyUI:
//!   `lora_unet_<module, '.' -> '_'>.lora_down.weight` `[r, d_in]`, `.lora_up.weight`
//!   `[d_out, r]` and `.alpha` (a 0-dim tensor).
//!
//! Files name the UNet (`unet.`, `lora_unet_`): the UNet is the model Tiller adapts. All
//! adapters of one file share one rank and one alpha; files with per-module ranks or alphas
//! (PEFT's `rank_pattern`/`alpha_pattern`) are refused with a message saying so.

use crate::models::weights::{HostTensor, PathTracker, read_safetensors, write_safetensors};
use burn::module::{
    LoraAdapter, Module, ModuleMapper, ModuleVisitor, Param, ParamId, Reparameterizer,
};
use burn::tensor::{FloatDType, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;
use tiller_core::{Error, Result, SeededRng};

/// diffusers' safetensors metadata key for the adapter's PEFT `LoraConfig`.
pub const LORA_ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// The module prefix of UNet tensors in diffusers' pipeline-level LoRA files.
const PEFT_PREFIX: &str = "unet.";
/// Prefixes accepted when loading PEFT-style keys: diffusers' pipeline files and PEFT's own
/// `get_peft_model_state_dict` output. Keys without a prefix (`unet.save_lora_adapter`) are
/// accepted too.
const PEFT_LOAD_PREFIXES: [&str; 2] = ["unet.", "base_model.model."];
/// The module prefix of UNet tensors in kohya files.
const KOHYA_PREFIX: &str = "lora_unet_";

/// Most problems listed in one error.
const MAX_PROBLEMS: usize = 20;

/// Which Linear layers get adapters, and their rank and scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank `r` of the update `B A` (PEFT's `r`).
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / rank` (PEFT's `lora_alpha`).
    pub alpha: f64,
    /// Linear modules to adapt, matched against the end of their torch module path on whole
    /// segments: `to_q` matches `...attn1.to_q`, `to_out.0` matches `...attn2.to_out.0`, and a full
    /// path matches only itself (PEFT's rule for a list of `target_modules`).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// Rank 4 with alpha = rank (scale 1) on the attention projections: diffusers'
    /// `train_text_to_image_lora.py` defaults (`--rank 4`, `lora_alpha=args.rank`,
    /// `target_modules=["to_k", "to_q", "to_v", "to_out.0"]`).
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            target_modules: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl LoraConfig {
    /// Checks the rank, alpha and targets.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("rank", "must be at least 1"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::config(
                "alpha",
                format!("must be finite and positive, got {}", self.alpha),
            ));
        }
        if self.target_modules.is_empty() || self.target_modules.iter().any(|t| t.is_empty()) {
            return Err(Error::config(
                "target_modules",
                format!(
                    "must list module names such as [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"], \
                     got {:?}",
                    self.target_modules
                ),
            ));
        }
        Ok(())
    }
}

/// The key layout of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// diffusers/PEFT: `unet.<module>.lora_A.weight`, `.lora_B.weight`, alpha in the metadata.
    Peft,
    /// kohya sd-scripts: `lora_unet_<module_>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Peft => "peft",
            Self::Kohya => "kohya",
        })
    }
}

impl FromStr for LoraFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "peft" => Ok(Self::Peft),
            "kohya" => Ok(Self::Kohya),
            _ => Err(Error::invalid(format!(
                "unknown LoRA format `{s}`; valid: peft, kohya"
            ))),
        }
    }
}

/// Attaches LoRA adapters to every Linear whose torch module path ends with one of
/// `cfg.target_modules`, and freezes every other parameter (burn's LoRA contract: only the
/// factors train).
///
/// Initialisation follows PEFT's `LoraLayer.reset_lora_parameters` with `init_lora_weights=True`
/// (peft/tuners/lora/layer.py): `nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))`, which
/// for fan-in `d_in` is U(-1/sqrt(d_in), 1/sqrt(d_in)) (gain sqrt(2 / (1 + 5)) times
/// sqrt(3 / d_in)), and `nn.init.zeros_(lora_B.weight)`. B = 0, so the model computes the same
/// function as before. A is drawn on the host from `rng`, module by module in parameter-visit
/// order and row-major in burn's `[d_in, r]` layout, so a seed gives the same adapters on every
/// backend.
///
/// Fails if `cfg` is invalid, if the model already has adapters, or if no Linear matches.
pub fn attach_lora<M: Module>(model: M, cfg: &LoraConfig, rng: &mut SeededRng) -> Result<M> {
    cfg.validate()?;
    let scan = Scan::of(&model, false);
    scan.refuse_adapters("attach_lora")?;
    let mut factors = HashMap::new();
    for linear in &scan.linears {
        if !cfg
            .target_modules
            .iter()
            .any(|t| ends_with_segments(&linear.module, t))
        {
            continue;
        }
        let bound = 1.0 / (linear.d_in as f64).sqrt();
        let a = (0..linear.d_in * cfg.rank)
            .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
            .collect();
        let b = vec![0.0; cfg.rank * linear.d_out];
        factors.insert(linear.id, Factors { a, b });
    }
    if factors.is_empty() {
        let names: Vec<&str> = scan.linears.iter().map(|l| l.module.as_str()).collect();
        let shown = names.iter().take(8).copied().collect::<Vec<_>>().join(", ");
        return Err(Error::invalid(format!(
            "LoRA target_modules {:?} match no Linear layer of the model ({} Linear layers{}{})",
            cfg.target_modules,
            names.len(),
            if names.is_empty() { "" } else { ", e.g. " },
            shown
        )));
    }
    apply_factors(model, cfg.rank, cfg.alpha / cfg.rank as f64, factors)
}

/// The torch module paths of the Linear layers that carry an adapter, sorted.
pub fn lora_modules<M: Module>(model: &M) -> Vec<String> {
    let scan = Scan::of(model, false);
    let mut out: Vec<String> = scan
        .linears
        .into_iter()
        .filter(|l| l.adapted)
        .map(|l| l.module)
        .collect();
    out.sort();
    out
}

/// Merges every adapter into its weight (`base + scale * a @ b`): a dense model without adapters.
pub fn merge_lora<M: Module>(model: M) -> M {
    model.materialize()
}

/// Writes the model's adapters to `path` in `format` (f32 safetensors, atomically).
///
/// Fails if the model has no adapters, adapters on something other than a Linear weight, mixed
/// ranks or scales, or a non-finite factor.
pub fn save_lora<M: Module>(model: &M, path: &Path, format: LoraFormat) -> Result<()> {
    let scan = Scan::of(model, true);
    if !scan.foreign.is_empty() {
        return Err(Error::invalid(format!(
            "adapters on parameters that are not Linear weights cannot be saved: {}",
            scan.foreign.join(", ")
        )));
    }
    let adapters: Vec<(&LinearWeight, &HostTensor, &HostTensor)> = scan
        .linears
        .iter()
        .filter(|l| l.adapted)
        .map(|l| {
            let (a, b) = &scan.factors[&l.id];
            (l, a, b)
        })
        .collect();
    if adapters.is_empty() {
        return Err(Error::invalid(format!(
            "cannot write {}: the model has no LoRA adapters (attach_lora or load_lora first)",
            path.display()
        )));
    }

    let rank = adapters[0].1.shape[1];
    let mixed: Vec<String> = adapters
        .iter()
        .filter(|(_, a, _)| a.shape[1] != rank)
        .map(|(l, a, _)| format!("`{}` (rank {})", l.module, a.shape[1]))
        .collect();
    if !mixed.is_empty() {
        return Err(Error::invalid(format!(
            "adapters of different ranks are unsupported: `{}` has rank {rank}, but {}",
            adapters[0].0.module,
            cap(&mixed).join(", ")
        )));
    }
    let scales = adapter_scales(model, &scan);
    let scale = scales[&adapters[0].0.id];
    let mixed: Vec<String> = adapters
        .iter()
        .filter(|(l, _, _)| scales[&l.id] != scale)
        .map(|(l, _, _)| format!("`{}` (scale {})", l.module, scales[&l.id]))
        .collect();
    if !mixed.is_empty() {
        return Err(Error::invalid(format!(
            "adapters with different alphas are unsupported: `{}` has scale {scale}, but {}",
            adapters[0].0.module,
            cap(&mixed).join(", ")
        )));
    }
    // The scale is read back in f32 (see `adapter_scales`); alpha is written as the shortest
    // decimal of that f32 (`4`, not `4.0000001`), which is also what kohya's f32 `.alpha` holds.
    let alpha_f32 = scale * rank as f32;
    let alpha: f64 = alpha_f32
        .to_string()
        .parse()
        .expect("a float's Display parses");

    let mut tensors = BTreeMap::new();
    let mut kohya_names: HashMap<String, &str> = HashMap::new();
    for (linear, a, b) in &adapters {
        for (which, t) in [("a", a), ("b", b)] {
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "LoRA factor `{which}` of `{}`; not writing {}",
                    linear.module,
                    path.display()
                )));
            }
        }
        let down = transpose(a);
        let up = transpose(b);
        match format {
            LoraFormat::Peft => {
                let m = format!("{PEFT_PREFIX}{}", linear.module);
                tensors.insert(format!("{m}.lora_A.weight"), down);
                tensors.insert(format!("{m}.lora_B.weight"), up);
            }
            LoraFormat::Kohya => {
                let flat = linear.module.replace('.', "_");
                if let Some(other) = kohya_names.insert(flat.clone(), &linear.module) {
                    return Err(Error::invalid(format!(
                        "modules `{other}` and `{}` have the same kohya name `{flat}`; save as peft",
                        linear.module
                    )));
                }
                let m = format!("{KOHYA_PREFIX}{flat}");
                tensors.insert(format!("{m}.lora_down.weight"), down);
                tensors.insert(format!("{m}.lora_up.weight"), up);
                tensors.insert(
                    format!("{m}.alpha"),
                    HostTensor {
                        shape: vec![],
                        data: vec![alpha_f32],
                    },
                );
            }
        }
    }

    let modules: Vec<&str> = adapters.iter().map(|(l, _, _)| l.module.as_str()).collect();
    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    match format {
        LoraFormat::Peft => {
            // The fields of PEFT's `LoraConfig.to_dict()` that describe this adapter; diffusers
            // passes the dict to `LoraConfig(**...)`, so everything else keeps PEFT's defaults.
            // `target_modules` lists full paths (PEFT matches them exactly), as diffusers itself
            // does when it derives a config from a state dict (`get_peft_kwargs`).
            let p = PEFT_PREFIX;
            let config = serde_json::json!({
                format!("{p}r"): rank,
                format!("{p}lora_alpha"): alpha,
                format!("{p}target_modules"): modules,
                format!("{p}rank_pattern"): {},
                format!("{p}alpha_pattern"): {},
                format!("{p}lora_dropout"): 0.0,
                format!("{p}bias"): "none",
                format!("{p}init_lora_weights"): true,
                format!("{p}use_dora"): false,
                format!("{p}use_rslora"): false,
                format!("{p}peft_type"): "LORA",
            });
            let json = serde_json::to_string_pretty(&config).expect("JSON of plain values");
            metadata.insert(LORA_ADAPTER_METADATA_KEY.to_string(), json);
        }
        LoraFormat::Kohya => {
            // sd-scripts' descriptive keys (`train_network.py`); readers take alpha from the
            // `.alpha` tensors.
            metadata.insert("ss_network_module".into(), "networks.lora".into());
            metadata.insert("ss_network_dim".into(), rank.to_string());
            metadata.insert("ss_network_alpha".into(), alpha.to_string());
        }
    }
    write_safetensors(path, &tensors, metadata)
}

/// Reads a LoRA file (format detected from its keys) and attaches its adapters to `model`, which
/// must have none. Returns the adapted model, the file's config (`target_modules` lists the
/// adapted modules' full paths) and its format.
///
/// Loading is strict: a key naming a module the model lacks, a wrong shape, a factor without its
/// partner, mixed ranks or alphas, or a non-finite value is an error naming the file and the keys.
/// PEFT files take alpha from diffusers' `lora_adapter_metadata`, else alpha = rank (diffusers'
/// default); kohya files from the `.alpha` tensors, else alpha = rank (sd-scripts' default).
pub fn load_lora<M: Module>(model: M, path: &Path) -> Result<(M, LoraConfig, LoraFormat)> {
    let tensors = read_safetensors(path)?;
    let metadata = read_metadata(path)?;
    let scan = Scan::of(&model, false);
    scan.refuse_adapters("load_lora")?;
    let parsed = parse_file(&tensors, &metadata, &scan.linears);
    let bad = |problems: Vec<String>| {
        let n = problems.len();
        let more = if n > MAX_PROBLEMS {
            format!("\n  ... and {} more", n - MAX_PROBLEMS)
        } else {
            String::new()
        };
        Error::format(
            path,
            format!(
                "{n} LoRA problem(s):\n  {}{more}",
                cap(&problems).join("\n  ")
            ),
        )
    };
    let parsed = parsed.map_err(bad)?;
    let config = LoraConfig {
        rank: parsed.rank,
        alpha: parsed.alpha,
        target_modules: parsed.modules,
    };
    let model = apply_factors(
        model,
        parsed.rank,
        parsed.alpha / parsed.rank as f64,
        parsed.factors,
    )?;
    Ok((model, config, parsed.format))
}

// ---------------------------------------------------------------------------------------------
// Scanning a model
// ---------------------------------------------------------------------------------------------

/// A Linear weight of the model.
struct LinearWeight {
    /// Torch module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    module: String,
    /// The weight's parameter id (kept by the adapted base).
    id: ParamId,
    d_in: usize,
    d_out: usize,
    /// Whether it carries a LoRA adapter.
    adapted: bool,
}

/// What a visit of the model finds: its Linear weights, which are adapted, and optionally the
/// adapter factors (burn layout, keyed by the base weight's id).
struct Scan {
    linears: Vec<LinearWeight>,
    factors: HashMap<ParamId, (HostTensor, HostTensor)>,
    /// Torch names of adapted parameters that are not Linear weights.
    foreign: Vec<String>,
}

impl Scan {
    fn of<M: Module>(model: &M, with_values: bool) -> Self {
        struct Visitor {
            path: PathTracker,
            with_values: bool,
            /// The last base parameter visited: an adapter's factors follow their base.
            last: Option<(ParamId, String)>,
            linear_index: HashMap<ParamId, usize>,
            partial: HashMap<ParamId, (Option<HostTensor>, Option<HostTensor>)>,
            scan: Scan,
        }
        impl ModuleVisitor for Visitor {
            fn enter_module(&mut self, name: &str, container_type: &str) {
                self.path.enter(name, container_type);
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.exit();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let (name, linear_weight) = self.path.torch_name();
                let Some(which) = factor_name(&self.path) else {
                    if linear_weight && D == 2 {
                        let shape = param.lazy_shape();
                        self.linear_index.insert(param.id, self.scan.linears.len());
                        self.scan.linears.push(LinearWeight {
                            module: name.strip_suffix(".weight").unwrap_or(&name).to_string(),
                            id: param.id,
                            d_in: shape[0],
                            d_out: shape[1],
                            adapted: false,
                        });
                    }
                    self.last = Some((param.id, name));
                    return;
                };
                let Some((base_id, base_name)) = self.last.clone() else {
                    return;
                };
                match self.linear_index.get(&base_id) {
                    Some(&i) => self.scan.linears[i].adapted = true,
                    None => {
                        if which == 'a' {
                            self.scan.foreign.push(base_name);
                        }
                        return;
                    }
                }
                if self.with_values {
                    let t = param.val();
                    let shape = t.dims().to_vec();
                    let data = t
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .expect("f32 data");
                    let entry = self.partial.entry(base_id).or_default();
                    let value = Some(HostTensor { shape, data });
                    if which == 'a' {
                        entry.0 = value;
                    } else {
                        entry.1 = value;
                    }
                }
            }
        }
        let mut v = Visitor {
            path: PathTracker::default(),
            with_values,
            last: None,
            linear_index: HashMap::new(),
            partial: HashMap::new(),
            scan: Scan {
                linears: Vec::new(),
                factors: HashMap::new(),
                foreign: Vec::new(),
            },
        };
        model.visit(&mut v);
        for (id, (a, b)) in v.partial {
            if let (Some(a), Some(b)) = (a, b) {
                v.scan.factors.insert(id, (a, b));
            }
        }
        v.scan
    }

    fn refuse_adapters(&self, what: &str) -> Result<()> {
        let adapted: Vec<&str> = self
            .linears
            .iter()
            .filter(|l| l.adapted)
            .map(|l| l.module.as_str())
            .chain(self.foreign.iter().map(String::as_str))
            .collect();
        if adapted.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "{what} needs a model without LoRA adapters, but {} parameter(s) have one (e.g. `{}`); \
             pass the base model, or merge_lora first",
            adapted.len(),
            adapted[0]
        )))
    }
}

/// `Some('a')` / `Some('b')` when the tracker is at a LoRA adapter's factor.
fn factor_name(path: &PathTracker) -> Option<char> {
    let n = path.segments.len();
    if n < 2 || path.segments[n - 2] != "lora" || path.containers[n - 2] != "Reparameterization" {
        return None;
    }
    match path.segments[n - 1].as_str() {
        "a" => Some('a'),
        "b" => Some('b'),
        _ => None,
    }
}

/// Whether the dotted `module` path ends with the dotted `target` on a segment boundary.
fn ends_with_segments(module: &str, target: &str) -> bool {
    module == target
        || module
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// Each adapter's scale (`alpha / rank`), keyed by its base weight's id.
///
/// burn keeps the scale in the adapter, where visitors cannot read it, so it is measured: on a
/// copy of the model, each adapted base is set to zero and its factors to one-hot matrices
/// (`a[0][0] = b[0][0] = 1`), and the merged weight then holds exactly `scale` (as f32) at `[0][0]`.
fn adapter_scales<M: Module>(model: &M, scan: &Scan) -> HashMap<ParamId, f32> {
    struct Probe<'a> {
        path: PathTracker,
        bases: &'a HashMap<ParamId, ()>,
    }
    impl ModuleMapper for Probe<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let is_factor = factor_name(&self.path).is_some();
            if !is_factor && !self.bases.contains_key(&param.id) {
                return param;
            }
            let shape = param.lazy_shape();
            let mut data = vec![0f32; shape.num_elements()];
            if is_factor {
                data[0] = 1.0;
            }
            let value = Tensor::<D>::from_data(TensorData::new(data, shape), &param.lazy_device());
            let id = param.id;
            param.transform_for_load(value, id)
        }
    }
    let bases: HashMap<ParamId, ()> = scan
        .linears
        .iter()
        .filter(|l| l.adapted)
        .map(|l| (l.id, ()))
        .collect();
    let merged = model
        .clone()
        .map(&mut Probe {
            path: PathTracker::default(),
            bases: &bases,
        })
        .materialize();

    struct Reader<'a> {
        bases: &'a HashMap<ParamId, ()>,
        out: HashMap<ParamId, f32>,
    }
    impl ModuleVisitor for Reader<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D == 2 && self.bases.contains_key(&param.id) {
                let corner = param.val().slice([0..1, 0..1]);
                let v = corner
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .expect("f32 data")[0];
                self.out.insert(param.id, v);
            }
        }
    }
    let mut reader = Reader {
        bases: &bases,
        out: HashMap::new(),
    };
    merged.visit(&mut reader);
    reader.out
}

// ---------------------------------------------------------------------------------------------
// Attaching given factors
// ---------------------------------------------------------------------------------------------

/// Host values of one adapter, burn layout: `a: [d_in, r]`, `b: [r, d_out]`, row-major.
struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
}

/// burn's `Lora` reparameteriser with the factors given instead of drawn on the device: every
/// parameter is frozen, the selected weights get a [`LoraAdapter`] holding `factors`.
struct GivenLora<'a> {
    rank: usize,
    scale: f64,
    factors: &'a mut HashMap<ParamId, Factors>,
}

impl Reparameterizer for GivenLora<'_> {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        _path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        let base = param.set_require_grad(false);
        if D != 2 {
            return (base, None);
        }
        let Some(f) = self.factors.remove(&base.id) else {
            return (base, None);
        };
        let shape = base.lazy_shape();
        let (d_in, d_out) = (shape[0], shape[1]);
        let device = base.lazy_device();
        // As burn's `Lora`: the factors take the base's float precision, and live in persistent
        // memory like every parameter.
        let base_dtype = base.val().dtype();
        let dtype = base_dtype.is_float().then(|| FloatDType::from(base_dtype));
        let rank = self.rank;
        let (a, b) = device.memory_persistent_allocations((), |_| {
            let a = Tensor::<2>::from_data(TensorData::new(f.a.clone(), [d_in, rank]), &device);
            let b = Tensor::<2>::from_data(TensorData::new(f.b.clone(), [rank, d_out]), &device);
            match dtype {
                Some(dtype) if dtype != FloatDType::F32 => (a.cast(dtype), b.cast(dtype)),
                _ => (a, b),
            }
        });
        let adapter = LoraAdapter {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scale: self.scale,
        };
        (base, Some(adapter))
    }
}

fn apply_factors<M: Module>(
    model: M,
    rank: usize,
    scale: f64,
    mut factors: HashMap<ParamId, Factors>,
) -> Result<M> {
    let model = model.apply_reparameterization(GivenLora {
        rank,
        scale,
        factors: &mut factors,
    });
    if !factors.is_empty() {
        return Err(Error::invalid(format!(
            "{} LoRA adapter(s) found no 2-D weight to attach to (internal error)",
            factors.len()
        )));
    }
    Ok(model)
}

// ---------------------------------------------------------------------------------------------
// Combining several models' adapters (expert merging)
// ---------------------------------------------------------------------------------------------

/// One adapter's update as host values, burn layout: `a: [d_in, rank]`, `b: [rank, d_out]`,
/// row-major, with the adapter's scale folded into `b`, so the update is exactly `a @ b`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterUpdate {
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A model's LoRA adapters by torch module path, with each adapted weight's parameter id (the
/// base keeps it, so it also names the weight in a merged copy of the model).
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    pub modules: BTreeMap<String, (ParamId, AdapterUpdate)>,
}

/// Reads `model`'s adapters. Fails if it has none, or adapters on something other than a Linear.
pub fn adapter_set<M: Module>(model: &M) -> Result<AdapterSet> {
    let scan = Scan::of(model, true);
    if !scan.foreign.is_empty() {
        return Err(Error::invalid(format!(
            "adapters on parameters that are not Linear weights: {}",
            scan.foreign.join(", ")
        )));
    }
    let scales = adapter_scales(model, &scan);
    let mut set = AdapterSet::default();
    for l in scan.linears.iter().filter(|l| l.adapted) {
        let (a, b) = &scan.factors[&l.id];
        let rank = a.shape[1];
        let scale = scales[&l.id];
        set.modules.insert(
            l.module.clone(),
            (
                l.id,
                AdapterUpdate {
                    d_in: l.d_in,
                    d_out: l.d_out,
                    rank,
                    a: a.data.clone(),
                    b: b.data.iter().map(|v| v * scale).collect(),
                },
            ),
        );
    }
    if set.modules.is_empty() {
        return Err(Error::invalid("the model has no LoRA adapters"));
    }
    Ok(set)
}

/// Attaches to `model` (which has no adapters) one adapter per module of the experts, all of
/// which adapt the same modules with the same rank: module `m` gets rank `N r`,
/// `a = [a_1 | ... | a_N]` and `b = [diag(g_1) b_1; ...]` column-gated, so its update is
/// `sum_e a_e b_e diag(gates(e, m))`, exactly; scale 1 (alpha = rank). `gates(e, m)` gives one
/// weight per output unit of module `m` for expert `e` (1/N everywhere: the average; one-hot per
/// unit: a selection).
pub fn attach_combination<M: Module>(
    model: M,
    experts: &[AdapterSet],
    gates: &dyn Fn(usize, &str) -> Vec<f32>,
) -> Result<M> {
    let Some(first) = experts.first() else {
        return Err(Error::invalid("no adapters to combine"));
    };
    let scan = Scan::of(&model, false);
    scan.refuse_adapters("attach_combination")?;
    let ids: HashMap<&str, &LinearWeight> = scan
        .linears
        .iter()
        .map(|l| (l.module.as_str(), l))
        .collect();
    let rank = first
        .modules
        .values()
        .next()
        .map(|(_, u)| u.rank)
        .unwrap_or(0);
    for (e, set) in experts.iter().enumerate() {
        let names: Vec<&String> = set.modules.keys().collect();
        let want: Vec<&String> = first.modules.keys().collect();
        if names != want {
            let odd = names
                .iter()
                .find(|n| !first.modules.contains_key(n.as_str()))
                .or_else(|| want.iter().find(|n| !set.modules.contains_key(n.as_str())));
            return Err(Error::invalid(format!(
                "adapter {e} adapts other modules than adapter 0 (e.g. `{}`); experts must \
                 adapt the same modules",
                odd.map(|s| s.as_str()).unwrap_or("?")
            )));
        }
        if let Some((m, (_, u))) = set.modules.iter().find(|(_, (_, u))| u.rank != rank) {
            return Err(Error::invalid(format!(
                "adapter {e} has rank {} at `{m}`, adapter 0 rank {rank}; experts must share one rank",
                u.rank
            )));
        }
    }
    let n = experts.len();
    let mut factors = HashMap::new();
    for (module, (_, u0)) in &first.modules {
        let Some(linear) = ids.get(module.as_str()) else {
            return Err(Error::invalid(format!(
                "the model has no Linear `{module}` to attach a merged adapter to"
            )));
        };
        let (d_in, d_out) = (u0.d_in, u0.d_out);
        if (linear.d_in, linear.d_out) != (d_in, d_out) {
            return Err(Error::invalid(format!(
                "`{module}` is {}x{} in the model, {d_in}x{d_out} in the adapters",
                linear.d_in, linear.d_out
            )));
        }
        let total = n * rank;
        let mut a = vec![0f32; d_in * total];
        let mut b = vec![0f32; total * d_out];
        for (e, set) in experts.iter().enumerate() {
            let u = &set.modules[module].1;
            if (u.d_in, u.d_out) != (d_in, d_out) {
                return Err(Error::invalid(format!(
                    "`{module}` is {}x{} in adapter {e}, {d_in}x{d_out} in adapter 0",
                    u.d_in, u.d_out
                )));
            }
            let g = gates(e, module);
            if g.len() != d_out {
                return Err(Error::invalid(format!(
                    "{} gates for `{module}`, which has {d_out} output units",
                    g.len()
                )));
            }
            for i in 0..d_in {
                for r in 0..rank {
                    a[i * total + e * rank + r] = u.a[i * rank + r];
                }
            }
            for r in 0..rank {
                for j in 0..d_out {
                    b[(e * rank + r) * d_out + j] = u.b[r * d_out + j] * g[j];
                }
            }
        }
        factors.insert(linear.id, Factors { a, b });
    }
    apply_factors(model, n * rank, 1.0, factors)
}

// ---------------------------------------------------------------------------------------------
// Reading files
// ---------------------------------------------------------------------------------------------

/// The `__metadata__` of a safetensors file (its header is JSON after an 8-byte length).
fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(Error::format(path, "safetensors header larger than 100 MB"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::format(path, format!("safetensors header: {e}")))?;
    let mut out = HashMap::new();
    if let Some(m) = header.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}

/// One module's tensors in a file: (key, tensor) of each part.
#[derive(Default)]
struct Entry<'a> {
    down: Option<(&'a str, &'a HostTensor)>,
    up: Option<(&'a str, &'a HostTensor)>,
    alpha: Option<(&'a str, &'a HostTensor)>,
}

/// A file checked against the model, ready to attach.
struct Parsed {
    format: LoraFormat,
    rank: usize,
    alpha: f64,
    modules: Vec<String>,
    factors: HashMap<ParamId, Factors>,
}

/// Matches a file's tensors to the model's Linear layers, collecting every problem.
fn parse_file(
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &HashMap<String, String>,
    linears: &[LinearWeight],
) -> std::result::Result<Parsed, Vec<String>> {
    let mut problems = Vec::new();
    let by_module: HashMap<&str, &LinearWeight> =
        linears.iter().map(|l| (l.module.as_str(), l)).collect();
    // kohya names replace every '.' by '_', which loses where the dots were; map back from the
    // model's own module names, never by guessing.
    let mut by_kohya: HashMap<String, Option<&LinearWeight>> = HashMap::new();
    for l in linears {
        by_kohya
            .entry(l.module.replace('.', "_"))
            .and_modify(|e| *e = None)
            .or_insert(Some(l));
    }

    let mut peft_keys = Vec::new();
    let mut kohya_keys = Vec::new();
    // Entries by module path (sorted, so errors and ranks read in a stable order).
    let mut entries: BTreeMap<&str, Entry> = BTreeMap::new();
    for (key, tensor) in tensors {
        if let Some((module, part)) = peft_key(key) {
            peft_keys.push(key.as_str());
            let Some(linear) = by_module.get(module) else {
                problems.push(format!(
                    "`{key}`: the model has no Linear `{module}` (shape {:?})",
                    tensor.shape
                ));
                continue;
            };
            let e = entries.entry(linear.module.as_str()).or_default();
            match part {
                Part::Down => e.down = Some((key, tensor)),
                Part::Up => e.up = Some((key, tensor)),
                Part::Alpha => unreachable!("PEFT keys carry no alpha"),
            }
        } else if let Some((flat, part)) = kohya_key(key) {
            kohya_keys.push(key.as_str());
            let linear = match by_kohya.get(flat) {
                Some(Some(l)) => l,
                Some(None) => {
                    problems.push(format!(
                        "`{key}`: `{flat}` is the kohya name of more than one module of the model"
                    ));
                    continue;
                }
                None => {
                    problems.push(format!(
                        "`{key}`: the model has no Linear whose kohya name is `{flat}` (shape {:?})",
                        tensor.shape
                    ));
                    continue;
                }
            };
            let e = entries.entry(linear.module.as_str()).or_default();
            match part {
                Part::Down => e.down = Some((key, tensor)),
                Part::Up => e.up = Some((key, tensor)),
                Part::Alpha => e.alpha = Some((key, tensor)),
            }
        } else {
            problems.push(format!(
                "`{key}` is not a LoRA tensor of the UNet (expected \
                 `unet.<module>.lora_A.weight` / `.lora_B.weight`, or \
                 `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`)"
            ));
        }
    }
    let format = match (peft_keys.is_empty(), kohya_keys.is_empty()) {
        (false, true) => LoraFormat::Peft,
        (true, false) => LoraFormat::Kohya,
        (false, false) => {
            problems.push(format!(
                "the file mixes PEFT keys (e.g. `{}`) and kohya keys (e.g. `{}`)",
                peft_keys[0], kohya_keys[0]
            ));
            LoraFormat::Peft
        }
        (true, true) => {
            if problems.is_empty() {
                problems.push("the file holds no tensors".into());
            }
            return Err(problems);
        }
    };
    let (down_suffix, up_suffix) = match format {
        LoraFormat::Peft => ("lora_A.weight", "lora_B.weight"),
        LoraFormat::Kohya => ("lora_down.weight", "lora_up.weight"),
    };

    // The rank is the first module's; every other must agree.
    let first_rank = entries.iter().find_map(|(m, e)| {
        e.down
            .filter(|(_, t)| t.shape.len() == 2)
            .map(|(_, t)| (*m, t.shape[0]))
    });
    let rank = first_rank.map_or(0, |(_, r)| r);
    if rank == 0 && !entries.is_empty() {
        problems.push("no usable down factor, so the rank is unknown".into());
    }
    let mut mixed_ranks = Vec::new();
    let mut alphas: Vec<(&str, &str, f32)> = Vec::new();
    let mut factors = HashMap::new();
    let mut modules = Vec::new();
    for (module, e) in &entries {
        let linear = by_module[module];
        let (d_in, d_out) = (linear.d_in, linear.d_out);
        let (down, up) = match (e.down, e.up) {
            (Some(d), Some(u)) => (d, u),
            (Some((key, _)), None) | (None, Some((key, _))) => {
                let partner = if e.down.is_some() {
                    up_suffix
                } else {
                    down_suffix
                };
                problems.push(format!(
                    "`{key}` has no partner `{partner}` for module `{module}`"
                ));
                continue;
            }
            (None, None) => {
                let key = e.alpha.map_or("?", |(k, _)| k);
                problems.push(format!(
                    "`{key}`: an alpha without `{down_suffix}` and `{up_suffix}` for `{module}`"
                ));
                continue;
            }
        };
        let mut ok = true;
        let r = if down.1.shape.len() == 2 {
            down.1.shape[0]
        } else {
            rank
        };
        if r != rank && down.1.shape.len() == 2 {
            mixed_ranks.push(format!("`{}` has rank {r}", down.0));
            ok = false;
        }
        if down.1.shape != [r, d_in] {
            problems.push(format!(
                "tensor `{}` has shape {:?}, expected [{r}, {d_in}]",
                down.0, down.1.shape
            ));
            ok = false;
        }
        if up.1.shape != [d_out, r] {
            problems.push(format!(
                "tensor `{}` has shape {:?}, expected [{d_out}, {r}]",
                up.0, up.1.shape
            ));
            ok = false;
        }
        for (key, t) in [Some(down), Some(up), e.alpha].into_iter().flatten() {
            if let Some(v) = t.data.iter().find(|v| !v.is_finite()) {
                problems.push(format!("tensor `{key}` holds a non-finite value ({v})"));
                ok = false;
            }
        }
        if let Some((key, t)) = e.alpha {
            if t.data.len() != 1 {
                problems.push(format!(
                    "tensor `{key}` has shape {:?}, expected [] (one value)",
                    t.shape
                ));
                ok = false;
            } else if t.data[0].is_finite() {
                alphas.push((module, key, t.data[0]));
            }
        }
        if !ok {
            continue;
        }
        modules.push(module.to_string());
        factors.insert(
            linear.id,
            Factors {
                a: transpose(down.1).data,
                b: transpose(up.1).data,
            },
        );
    }
    if !mixed_ranks.is_empty() {
        let (m, r) = first_rank.expect("a rank exists when ranks differ");
        problems.push(format!(
            "adapters of different ranks are unsupported: `{m}` has rank {r}, but {}",
            cap(&mixed_ranks).join(", ")
        ));
    }

    let alpha = match format {
        LoraFormat::Kohya => {
            // sd-scripts: a module saved without `.alpha` has alpha = rank.
            let present: BTreeSet<u32> = alphas.iter().map(|(_, _, a)| a.to_bits()).collect();
            let missing = entries.len() - alphas.len();
            let values: Vec<f32> = present.iter().map(|b| f32::from_bits(*b)).collect();
            if values.len() > 1 || (values.len() == 1 && missing > 0 && values[0] != rank as f32) {
                let listed: Vec<String> = alphas
                    .iter()
                    .map(|(_, k, a)| format!("`{k}` = {a}"))
                    .collect();
                problems.push(format!(
                    "adapters with different alphas are unsupported: {}{}",
                    cap(&listed).join(", "),
                    if missing > 0 {
                        format!(" ({missing} module(s) without `.alpha`, i.e. alpha = rank)")
                    } else {
                        String::new()
                    }
                ));
            }
            values.first().map_or(rank as f64, |a| {
                a.to_string().parse().expect("a float's Display parses")
            })
        }
        LoraFormat::Peft => match peft_metadata_alpha(metadata, rank) {
            Ok(a) => a.unwrap_or(rank as f64),
            Err(p) => {
                problems.push(p);
                rank as f64
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    modules.sort();
    Ok(Parsed {
        format,
        rank,
        alpha,
        modules,
        factors,
    })
}

enum Part {
    Down,
    Up,
    Alpha,
}

/// `(module, part)` of a PEFT key, prefix removed.
fn peft_key(key: &str) -> Option<(&str, Part)> {
    let (module, part) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
        (m, Part::Down)
    } else if let Some(m) = key.strip_suffix(".lora_B.weight") {
        (m, Part::Up)
    } else {
        return None;
    };
    let module = PEFT_LOAD_PREFIXES
        .iter()
        .find_map(|p| module.strip_prefix(p))
        .unwrap_or(module);
    Some((module, part))
}

/// `(flattened module, part)` of a kohya key, prefix removed.
fn kohya_key(key: &str) -> Option<(&str, Part)> {
    let rest = key.strip_prefix(KOHYA_PREFIX)?;
    if let Some(m) = rest.strip_suffix(".lora_down.weight") {
        Some((m, Part::Down))
    } else if let Some(m) = rest.strip_suffix(".lora_up.weight") {
        Some((m, Part::Up))
    } else {
        rest.strip_suffix(".alpha").map(|m| (m, Part::Alpha))
    }
}

/// alpha from diffusers' `lora_adapter_metadata` (keys with or without the `unet.` prefix), or
/// `None` when the file has none. Per-module patterns and a disagreeing `r` are errors.
fn peft_metadata_alpha(
    metadata: &HashMap<String, String>,
    rank: usize,
) -> std::result::Result<Option<f64>, String> {
    let Some(raw) = metadata.get(LORA_ADAPTER_METADATA_KEY) else {
        return Ok(None);
    };
    let what = format!("metadata `{LORA_ADAPTER_METADATA_KEY}`");
    let config: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("{what} is not JSON: {e}"))?;
    let config = config
        .as_object()
        .ok_or_else(|| format!("{what} is not a JSON object"))?;
    let field = |name: &str| {
        config
            .get(&format!("{PEFT_PREFIX}{name}"))
            .or_else(|| config.get(name))
    };
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if let Some(p) = field(pattern).and_then(|p| p.as_object())
            && !p.is_empty()
        {
            return Err(format!(
                "{what} has a non-empty `{pattern}`: adapters with per-module ranks or alphas \
                 are unsupported"
            ));
        }
    }
    if let Some(r) = field("r")
        && r.as_u64() != Some(rank as u64)
    {
        return Err(format!(
            "{what} says r = {r}, but the tensors have rank {rank}"
        ));
    }
    match field("lora_alpha") {
        None => Ok(None),
        Some(a) => match a.as_f64() {
            Some(a) if a.is_finite() && a > 0.0 => Ok(Some(a)),
            _ => Err(format!(
                "{what} has `lora_alpha` = {a}; expected a positive number"
            )),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// The transpose of a 2-D host tensor.
fn transpose(t: &HostTensor) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let mut data = vec![0f32; t.data.len()];
    for i in 0..rows {
        for j in 0..cols {
            data[j * rows + i] = t.data[i * cols + j];
        }
    }
    HostTensor {
        shape: vec![cols, rows],
        data,
    }
}

/// At most [`MAX_PROBLEMS`] items of a list.
fn cap(items: &[String]) -> Vec<String> {
    items.iter().take(MAX_PROBLEMS).cloned().collect()
}
