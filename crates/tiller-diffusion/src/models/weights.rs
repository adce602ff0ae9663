//! Reading and writing module weights as safetensors in diffusers/transformers naming.
//!
//! burn names a parameter by its field path (`down_blocks.0.resnets.1.conv1.weight`); diffusers
//! uses the same path with three differences this module bridges:
//! - burn's `Linear` stores its weight `[in, out]`, PyTorch `[out, in]`: transposed on the way in and out;
//! - burn's norms call their affine parameters `gamma`/`beta`, PyTorch `weight`/`bias`;
//! - a field cannot be named `net.0`, so `FeedForward` uses `net_0`/`net_2` (renamed here), and enum
//!   variants (`Projection::Conv`) do not appear in paths.
//!
//! Loading is strict: every parameter of the module must be in the file with the expected shape, and
//! every tensor in the file must be used, except known non-parameter buffers such as CLIP's
//! `position_ids`. Errors name each offending tensor and the expected shape.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use tiller_core::{Error, Result};

/// Buffers that PyTorch checkpoints may contain but that are not parameters here.
const IGNORED_BUFFERS: &[&str] = &[
    "text_model.embeddings.position_ids",
    "vision_model.embeddings.position_ids",
];

/// A tensor read from a file, converted to f32.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads every tensor of a safetensors file as f32 (from f32, f16, bf16, f64, i64 or i32).
///
/// Pickle checkpoints (`.bin`, `.ckpt`, `.pt`, `.pth`) are refused: they can run arbitrary code
/// when loaded and Tiller does not read them.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    refuse_pickle(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = decode(view.dtype(), view.data()).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; expected F32, F16, BF16, F64, I64 or I32",
                    view.dtype()
                ),
            )
        })?;
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Refuses pickle-based checkpoint formats with a message on how to convert them.
pub fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "bin" | "ckpt" | "pt" | "pth" | "pkl") {
        return Err(Error::format(
            path,
            "pickle checkpoints are not loaded (they can execute code). Convert to safetensors \
             first, e.g. in Python: `model = X.from_pretrained(dir); model.save_pretrained(out, \
             safe_serialization=True)`, or `safetensors.torch.save_file(torch.load(path), \
             'model.safetensors')` for a plain state dict",
        ));
    }
    Ok(())
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        // Integer tensors (token ids, timesteps) are read as f32: exact below 2^24, which covers
        // every vocabulary and timestep Tiller meets.
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        _ => return None,
    })
}

/// Tracks the PyTorch-style name of the parameter being visited or mapped.
#[derive(Default)]
pub(crate) struct PathTracker {
    pub(crate) segments: Vec<String>,
    /// The container type of each segment ("Struct:Linear", "Vec", "Enum:Projection").
    pub(crate) containers: Vec<String>,
}

impl PathTracker {
    pub(crate) fn enter(&mut self, name: &str, container: &str) {
        self.segments.push(name.to_string());
        self.containers.push(container.to_string());
    }

    pub(crate) fn exit(&mut self) {
        self.segments.pop();
        self.containers.pop();
    }

    /// The torch name of the current parameter and whether it is a `Linear` weight (transposed).
    pub(crate) fn torch_name(&self) -> (String, bool) {
        let mut parts: Vec<String> = Vec::with_capacity(self.segments.len());
        for (seg, container) in self.segments.iter().zip(&self.containers) {
            if container.starts_with("Enum:") {
                continue; // enum variant names are not part of diffusers paths
            }
            let is_norm = matches!(container.as_str(), "Struct:GroupNorm" | "Struct:LayerNorm");
            let seg = match (seg.as_str(), is_norm) {
                ("gamma", true) => "weight".to_string(),
                ("beta", true) => "bias".to_string(),
                ("net_0", _) => "net.0".to_string(),
                ("net_2", _) => "net.2".to_string(),
                _ => seg.clone(),
            };
            parts.push(seg);
        }
        let linear_weight = self.containers.last().map(String::as_str) == Some("Struct:Linear")
            && self.segments.last().map(String::as_str) == Some("weight");
        (parts.join("."), linear_weight)
    }
}

/// Lists every parameter of a module with its torch name and torch-layout shape.
pub fn parameter_shapes<M: Module>(module: &M) -> Vec<(String, Vec<usize>)> {
    struct Lister {
        path: PathTracker,
        out: Vec<(String, Vec<usize>)>,
    }
    impl ModuleVisitor for Lister {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let (name, transposed) = self.path.torch_name();
            let mut shape = param.lazy_shape().to_vec();
            if transposed {
                shape.reverse();
            }
            self.out.push((name, shape));
        }
    }
    let mut l = Lister {
        path: PathTracker::default(),
        out: Vec::new(),
    };
    module.visit(&mut l);
    l.out
}

/// Replaces every parameter of `module` with the tensor of the same torch name in `tensors`.
///
/// `source` names the file in errors. Fails, naming every problem (up to 20), if a parameter is
/// missing or has the wrong shape, or if the file has tensors the module does not use.
pub fn load_into<M: Module>(
    module: M,
    tensors: &BTreeMap<String, HostTensor>,
    source: &Path,
) -> Result<M> {
    struct Loader<'a> {
        path: PathTracker,
        tensors: &'a BTreeMap<String, HostTensor>,
        used: HashSet<String>,
        problems: Vec<String>,
    }
    impl ModuleMapper for Loader<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (name, transposed) = self.path.torch_name();
            let mut expected = param.lazy_shape().to_vec();
            if transposed {
                expected.reverse();
            }
            let Some(t) = self.tensors.get(&name) else {
                self.problems.push(format!(
                    "missing tensor `{name}` (expected shape {expected:?})"
                ));
                return param;
            };
            self.used.insert(name.clone());
            if t.shape != expected {
                self.problems.push(format!(
                    "tensor `{name}` has shape {:?}, expected {expected:?}",
                    t.shape
                ));
                return param;
            }
            let device = param.lazy_device();
            let mut value =
                Tensor::<D>::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &device);
            if transposed {
                // Materialised in burn's layout, not left as a transposed view: a checkpoint
                // record reloads contiguous tensors, and matmul rounding depends on the layout,
                // so a resumed run would otherwise differ from an uninterrupted one in the last
                // bits.
                value = Tensor::<D>::from_data(value.transpose().into_data(), &device);
            }
            let id = param.id;
            param.transform_for_load(value, id)
        }
    }
    let mut loader = Loader {
        path: PathTracker::default(),
        tensors,
        used: HashSet::new(),
        problems: Vec::new(),
    };
    let module = module.map(&mut loader);
    let mut problems = loader.problems;
    for name in tensors.keys() {
        if !loader.used.contains(name) && !IGNORED_BUFFERS.contains(&name.as_str()) {
            problems.push(format!(
                "unexpected tensor `{name}` (shape {:?}): the model config has no such parameter",
                tensors[name].shape
            ));
        }
    }
    if problems.is_empty() {
        Ok(module)
    } else {
        let n = problems.len();
        problems.truncate(20);
        let more = if n > 20 {
            format!("\n  ... and {} more", n - 20)
        } else {
            String::new()
        };
        Err(Error::format(
            source,
            format!(
                "{n} weight problem(s) (does config.json match the weights?):\n  {}{more}",
                problems.join("\n  ")
            ),
        ))
    }
}

/// Collects every parameter as an f32 host tensor under its torch name, in torch layout.
pub fn collect_tensors<M: Module>(module: &M) -> BTreeMap<String, HostTensor> {
    struct Collector {
        path: PathTracker,
        out: BTreeMap<String, HostTensor>,
    }
    impl ModuleVisitor for Collector {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let (name, transposed) = self.path.torch_name();
            let mut t = param.val();
            if transposed {
                t = t.transpose();
            }
            let shape = t.dims().to_vec();
            let data = t
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data");
            self.out.insert(name, HostTensor { shape, data });
        }
    }
    let mut c = Collector {
        path: PathTracker::default(),
        out: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.out
}

/// Writes tensors as an f32 safetensors file, atomically (a temporary file renamed into place), so
/// an interrupted save never leaves a truncated file where a good one was.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    struct F32View<'a>(&'a HostTensor);
    impl safetensors::View for F32View<'_> {
        fn dtype(&self) -> Dtype {
            Dtype::F32
        }
        fn shape(&self) -> &[usize] {
            &self.0.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Owned(self.0.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
        fn data_len(&self) -> usize {
            self.0.data.len() * 4
        }
    }
    let bytes = safetensors::serialize(
        tensors.iter().map(|(k, v)| (k.as_str(), F32View(v))),
        Some(metadata),
    )
    .map_err(|e| Error::format(path, format!("cannot serialise: {e}")))?;
    atomic_write(path, &bytes)
}

pub use tiller_core::fs::atomic_write;

/// Converts a host tensor to a device tensor of rank `D`.
pub fn to_device<const D: usize>(t: &HostTensor, device: &Device) -> Result<Tensor<D>> {
    if t.shape.len() != D {
        return Err(Error::invalid(format!(
            "expected a rank-{D} tensor, found shape {:?}",
            t.shape
        )));
    }
    Ok(Tensor::from_data(
        TensorData::new(t.data.clone(), t.shape.clone()),
        device,
    ))
}

/// The gradient of every parameter that has one in `grads`, under its torch name and in torch layout.
pub fn collect_gradients<M: Module>(
    module: &M,
    grads: &burn::tensor::Gradients,
) -> BTreeMap<String, HostTensor> {
    struct GradCollector<'a> {
        path: PathTracker,
        grads: &'a burn::tensor::Gradients,
        out: BTreeMap<String, HostTensor>,
    }
    impl ModuleVisitor for GradCollector<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let (name, transposed) = self.path.torch_name();
            if let Some(mut g) = param.val().grad(self.grads) {
                if transposed {
                    g = g.transpose();
                }
                let shape = g.dims().to_vec();
                let data = g
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .expect("f32 data");
                self.out.insert(name, HostTensor { shape, data });
            }
        }
    }
    let mut c = GradCollector {
        path: PathTracker::default(),
        grads,
        out: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.out
}
