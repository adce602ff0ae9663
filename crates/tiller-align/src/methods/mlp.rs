//! The small network two methods train beside the policy: TDPO-R's critic
//! (`tdpo_pytorch/critic_model.py::MLP`) and SEIKO's surrogate reward (`aesthetic_scorer.py::
//! MLPDiff`). Both copy the LAION aesthetic head: `in -> 1024 -> 128 -> 64 -> 16 -> 1`, no
//! activations, dropout 0.2, 0.2, 0.1 after the first three layers while training. It keeps its
//! own Adam(W) moments as tensors so that a neuron reset can zero single neurons' moments
//! (`neuron_recycler.py::_reset_optimizer_moments`), which a module optimizer's record does not
//! expose. Also here: the image embedding both methods read on the testbed.

use burn::tensor::module::adaptive_avg_pool2d;
use burn::tensor::{Device, Tensor, TensorData};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::weights::{HostTensor, read_safetensors, write_safetensors};

/// The hidden widths and the dropout after the first three layers.
pub const WIDTHS: [usize; 4] = [1024, 128, 64, 16];
const DROPOUT: [f64; 3] = [0.2, 0.2, 0.1];
const BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;

/// Images [N, C, H, W] (a final sample or the model's estimate of x_0) as an embedding
/// [N, C * g * g]: clamped to [-1, 1], average-pooled to `grid` x `grid`, each row scaled to unit
/// length (the references L2-normalise their CLIP embeddings). Differentiable.
pub fn embed(x0: Tensor<4>, grid: usize) -> Tensor<2> {
    let [n, c, _, _] = x0.dims();
    let pooled =
        adaptive_avg_pool2d(x0.clamp(-1.0, 1.0), [grid, grid]).reshape([n, c * grid * grid]);
    let norm = pooled
        .clone()
        .powi_scalar(2)
        .sum_dim(1)
        .sqrt()
        .clamp_min(1e-12);
    pooled / norm
}

/// How the weights start.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Weights from N(0, std^2), biases 0 (TDPO's critic: std = 1 / (in + 1)).
    Normal(f32),
    /// PyTorch's `nn.Linear` default: weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    Torch,
}

/// Adam's settings: PyTorch's `AdamW` (decoupled decay; 0 is `Adam`), an optional global
/// gradient-norm clip (`clip_grad_norm_`).
#[derive(Debug, Clone, Copy)]
pub struct Adam {
    pub lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
}

/// The network and its Adam state, on the plain device. `params` are `[w_0, b_0, ..., w_4, b_4]`,
/// each weight `[in, out]`, each bias `[1, out]`.
pub struct Mlp {
    pub params: Vec<Tensor<2>>,
    m: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
    /// Adam steps taken (bias correction; a neuron reset keeps it, as PyTorch's state does).
    pub t: u64,
    pub input: usize,
}

/// The parameters' shapes for an input of `input` values.
pub fn shapes(input: usize) -> Vec<[usize; 2]> {
    let mut dims = vec![input];
    dims.extend(WIDTHS);
    dims.push(1);
    dims.windows(2)
        .flat_map(|w| [[w[0], w[1]], [1, w[1]]])
        .collect()
}

pub(crate) fn host(t: &Tensor<2>) -> Result<Vec<f32>> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::invalid(format!("{e:?}")))
}

fn device_tensor(v: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

impl Mlp {
    pub fn new(input: usize, init: Init, rng: &mut SeededRng, device: &Device) -> Self {
        let shapes = shapes(input);
        let params = shapes
            .iter()
            .copied()
            .enumerate()
            .map(|(k, s)| {
                let n = s[0] * s[1];
                let v = match init {
                    Init::Normal(std) if k % 2 == 0 => {
                        rng.normal_vec(n).into_iter().map(|z| z * std).collect()
                    }
                    Init::Normal(_) => vec![0.0; n],
                    Init::Torch => {
                        // The fan-in of a bias is its layer's input width.
                        let fan_in = shapes[k - k % 2][0];
                        let bound = 1.0 / (fan_in as f64).sqrt();
                        (0..n)
                            .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                            .collect()
                    }
                };
                device_tensor(v, s, device)
            })
            .collect::<Vec<_>>();
        let zeros = || params.iter().map(|p| p.zeros_like()).collect::<Vec<_>>();
        Self {
            m: zeros(),
            v: zeros(),
            params,
            t: 0,
            input,
        }
    }

    /// The output [N] and each hidden layer's output [N, width] of parameters `params` on `e`
    /// [N, in] (plain or autodiff, as `e`); `dropout` draws the training masks.
    pub fn forward(
        params: &[Tensor<2>],
        e: Tensor<2>,
        mut dropout: Option<&mut SeededRng>,
    ) -> (Tensor<1>, Vec<Tensor<2>>) {
        let n = e.dims()[0];
        let mut h = e;
        let mut hidden = Vec::new();
        for l in 0..params.len() / 2 {
            h = h.matmul(params[2 * l].clone()) + params[2 * l + 1].clone();
            if l < WIDTHS.len() {
                hidden.push(h.clone());
            }
            if let (Some(rng), Some(&p)) = (dropout.as_deref_mut(), DROPOUT.get(l)) {
                let [rows, cols] = h.dims();
                let keep = (1.0 / (1.0 - p)) as f32;
                let mask: Vec<f32> = (0..rows * cols)
                    .map(|_| if rng.uniform() < p { 0.0 } else { keep })
                    .collect();
                h = h.clone() * device_tensor(mask, [rows, cols], &h.device());
            }
        }
        (h.reshape([n]), hidden)
    }

    /// The parameters as autodiff leaves that keep their gradients.
    pub fn leaves(&self) -> Vec<Tensor<2>> {
        self.params
            .iter()
            .map(|p| p.clone().autodiff().require_grad())
            .collect()
    }

    /// The output on `e` [N, in] (plain) without a graph or dropout.
    pub fn values(&self, e: Tensor<2>) -> Result<Vec<f64>> {
        let (v, _) = Self::forward(&self.params, e, None);
        Ok(crate::methods::ddpo::to_f32(v)?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// The gradients of `loss` (an autodiff scalar built from `leaves`) for each parameter.
    pub fn gradients(leaves: &[Tensor<2>], loss: &Tensor<1>) -> Result<Vec<Tensor<2>>> {
        let grads = loss.backward();
        leaves
            .iter()
            .map(|p| {
                p.grad(&grads)
                    .ok_or_else(|| Error::invalid("a network parameter has no gradient"))
            })
            .collect()
    }

    /// One Adam(W) step with gradients `g` (PyTorch's update and `clip_grad_norm_`'s clip);
    /// returns the gradients' norm before clipping.
    pub fn step(&mut self, mut g: Vec<Tensor<2>>, adam: &Adam) -> f64 {
        let norm = g
            .iter()
            .map(|t| t.clone().powi_scalar(2).sum().into_scalar::<f64>())
            .sum::<f64>()
            .sqrt();
        if let Some(max) = adam.max_grad_norm {
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                g = g.into_iter().map(|t| t * coef).collect();
            }
        }
        self.t += 1;
        let (b1, b2) = BETAS;
        let (bc1, bc2) = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
        for (k, g) in g.into_iter().enumerate() {
            let p = self.params[k].clone() * (1.0 - adam.lr * adam.weight_decay);
            let m = self.m[k].clone() * b1 + g.clone() * (1.0 - b1);
            let v = self.v[k].clone() * b2 + g.powi_scalar(2) * (1.0 - b2);
            let denom = (v.clone() / bc2).sqrt() + ADAM_EPS;
            self.params[k] = p - m.clone() / denom * (adam.lr / bc1);
            self.m[k] = m;
            self.v[k] = v;
        }
        norm
    }

    /// A fresh optimizer: zero moments, no steps (a new `torch.optim.Adam` on the same weights).
    pub fn reset_optimizer(&mut self) {
        self.m = self.params.iter().map(|p| p.zeros_like()).collect();
        self.v = self.m.clone();
        self.t = 0;
    }

    /// Each hidden neuron's normalised score on `e` (the batch mean of its ReLU'd output over its
    /// layer's mean score, `neuron_recycler.py::_get_neuron_masks`), per hidden layer.
    pub fn scores(&self, e: Tensor<2>) -> Result<Vec<Vec<f64>>> {
        let (_, hidden) = Self::forward(&self.params, e, None);
        hidden
            .into_iter()
            .map(|h| {
                let [n, width] = h.dims();
                let mean = h.clamp_min(0.0).sum_dim(0).reshape([1, width]) / n as f64;
                let s: Vec<f64> = host(&mean)?.into_iter().map(f64::from).collect();
                let layer = s.iter().sum::<f64>() / width as f64;
                Ok(s.into_iter().map(|x| x / (layer + 1e-9)).collect())
            })
            .collect()
    }

    /// Redraws the neurons `masks` marks, per hidden layer: their incoming weights (N(0, std^2)),
    /// biases (0) and outgoing weights (the same normal), and zeroes those entries' Adam moments
    /// (`_reset_masked_neurons`, `_reset_optimizer_moments`). Returns how many were reset.
    pub fn reset(&mut self, masks: &[Vec<bool>], std: f32, rng: &mut SeededRng) -> Result<usize> {
        let device = self.params[0].device();
        let shapes = shapes(self.input);
        let mut hosts: Vec<[Vec<f32>; 3]> = (0..self.params.len())
            .map(|k| Ok([host(&self.params[k])?, host(&self.m[k])?, host(&self.v[k])?]))
            .collect::<Result<_>>()?;
        let mut count = 0;
        for (l, mask) in masks.iter().enumerate() {
            let (w_in, b_in, w_out) = (2 * l, 2 * l + 1, 2 * l + 2);
            let [rows_in, cols_in] = shapes[w_in];
            let [_, cols_out] = shapes[w_out];
            for (j, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
                count += 1;
                // Incoming: column j of w_l [in, out] and b_l[j].
                for r in 0..rows_in {
                    let at = r * cols_in + j;
                    hosts[w_in][0][at] = rng.normal_vec(1)[0] * std;
                    hosts[w_in][1][at] = 0.0;
                    hosts[w_in][2][at] = 0.0;
                }
                for x in &mut hosts[b_in] {
                    x[j] = 0.0;
                }
                // Outgoing: row j of w_{l+1} [out, next].
                for c in 0..cols_out {
                    let at = j * cols_out + c;
                    hosts[w_out][0][at] = rng.normal_vec(1)[0] * std;
                    hosts[w_out][1][at] = 0.0;
                    hosts[w_out][2][at] = 0.0;
                }
            }
        }
        for (k, [p, m, v]) in hosts.into_iter().enumerate() {
            self.params[k] = device_tensor(p, shapes[k], &device);
            self.m[k] = device_tensor(m, shapes[k], &device);
            self.v[k] = device_tensor(v, shapes[k], &device);
        }
        Ok(count)
    }

    /// The weights and moments as named tensors, under `prefix` (`<prefix>param.<k>`, ...).
    pub fn tensors(&self, prefix: &str, out: &mut BTreeMap<String, HostTensor>) -> Result<()> {
        for (kind, list) in [
            ("param", &self.params),
            ("exp_avg", &self.m),
            ("exp_avg_sq", &self.v),
        ] {
            for (k, t) in list.iter().enumerate() {
                out.insert(
                    format!("{prefix}{kind}.{k}"),
                    HostTensor {
                        shape: t.dims().to_vec(),
                        data: host(t)?,
                    },
                );
            }
        }
        Ok(())
    }

    /// The network [`Self::tensors`] wrote under `prefix` into `tensors` (read from `path`).
    pub fn from_tensors(
        tensors: &mut BTreeMap<String, HostTensor>,
        prefix: &str,
        path: &Path,
        input: usize,
        t: u64,
        device: &Device,
    ) -> Result<Self> {
        let shapes = shapes(input);
        let mut take = |kind: &str| -> Result<Vec<Tensor<2>>> {
            shapes
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let name = format!("{prefix}{kind}.{k}");
                    let h = tensors
                        .remove(&name)
                        .ok_or_else(|| Error::format(path, format!("no tensor `{name}`")))?;
                    if h.shape != s.as_slice() {
                        return Err(Error::format(
                            path,
                            format!("`{name}` has shape {:?}, expected {s:?}", h.shape),
                        ));
                    }
                    Ok(device_tensor(h.data, *s, device))
                })
                .collect()
        };
        Ok(Self {
            params: take("param")?,
            m: take("exp_avg")?,
            v: take("exp_avg_sq")?,
            t,
            input,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        self.tensors("", &mut tensors)?;
        let metadata = HashMap::from([
            ("adam_step".to_string(), self.t.to_string()),
            ("input".to_string(), self.input.to_string()),
        ]);
        write_safetensors(path, &tensors, metadata)
    }

    pub fn load(path: &Path, input: usize, t: u64, device: &Device) -> Result<Self> {
        let mut tensors = read_safetensors(path)?;
        Self::from_tensors(&mut tensors, "", path, input, t, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rng: &mut SeededRng, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(rng.normal_vec(rows * cols), [rows, cols]),
            device,
        )
    }

    /// A mean-squared-error step on `e` towards `y`, through the public path.
    fn mse_step(net: &mut Mlp, e: &Tensor<2>, y: &[f32], adam: &Adam) -> f64 {
        let ad = e.device().autodiff();
        let leaves = net.leaves();
        let (v, _) = Mlp::forward(&leaves, e.clone().autodiff(), None);
        let target = Tensor::<1>::from_data(TensorData::new(y.to_vec(), [y.len()]), &ad);
        let loss = (v - target).powi_scalar(2).mean();
        let g = Mlp::gradients(&leaves, &loss).unwrap();
        net.step(g, adam)
    }

    /// A reset redraws exactly the masked neurons' incoming and outgoing weights, zeroes their
    /// biases and their Adam moments, and leaves everything else as it was.
    #[test]
    fn reset_touches_only_the_masked_neurons() {
        let device = Device::default();
        let mut rng = SeededRng::new(5);
        let mut net = Mlp::new(4, Init::Torch, &mut rng, &device);
        let e = matrix(&mut rng, 3, 4, &device);
        let adam = Adam {
            lr: 1e-3,
            weight_decay: 0.0,
            max_grad_norm: None,
        };
        // Two Adam steps give every entry non-zero moments.
        for _ in 0..2 {
            mse_step(&mut net, &e, &[1.0, -1.0, 0.5], &adam);
        }
        let snapshot = |net: &Mlp| -> Vec<[Vec<f32>; 3]> {
            (0..net.params.len())
                .map(|k| {
                    [
                        host(&net.params[k]).unwrap(),
                        host(&net.m[k]).unwrap(),
                        host(&net.v[k]).unwrap(),
                    ]
                })
                .collect()
        };
        let before = snapshot(&net);
        let mut masks: Vec<Vec<bool>> = WIDTHS.iter().map(|&w| vec![false; w]).collect();
        masks[1][7] = true;
        assert_eq!(net.reset(&masks, 0.2, &mut rng).unwrap(), 1);
        let after = snapshot(&net);
        let shapes = shapes(4);
        for k in 0..net.params.len() {
            let [_, cols] = shapes[k];
            for at in 0..after[k][0].len() {
                let (r, c) = (at / cols, at % cols);
                // Layer 1's column 7 (w_1, b_1) is incoming; layer 2's row 7 (w_2) outgoing.
                let touched = ((k == 2 || k == 3) && c == 7) || (k == 4 && r == 7);
                if touched {
                    assert_eq!((after[k][1][at], after[k][2][at]), (0.0, 0.0), "{k}[{at}]");
                    if k == 3 {
                        assert_eq!(after[k][0][at], 0.0, "bias");
                    } else {
                        assert_ne!(after[k][0][at], before[k][0][at], "redrawn {k}[{at}]");
                    }
                } else {
                    for x in 0..3 {
                        assert_eq!(after[k][x][at], before[k][x][at], "untouched {k}[{at}]");
                    }
                }
            }
        }
    }

    /// The first Adam(W) step against PyTorch's rule worked by hand: bias-corrected moments of
    /// one gradient give every parameter `p (1 - lr wd) - lr g / (|g| + eps)`, after the clip.
    #[test]
    fn first_step_is_pytorchs_adamw() {
        let device = Device::default();
        let mut rng = SeededRng::new(11);
        let mut net = Mlp::new(3, Init::Normal(0.25), &mut rng, &device);
        let e = matrix(&mut rng, 2, 3, &device);
        let adam = Adam {
            lr: 1e-2,
            weight_decay: 1e-4,
            max_grad_norm: Some(1e-3),
        };
        let before: Vec<Vec<f32>> = net.params.iter().map(|p| host(p).unwrap()).collect();
        let leaves = net.leaves();
        let (v, _) = Mlp::forward(&leaves, e.clone().autodiff(), None);
        let ad = device.autodiff();
        let target = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &ad);
        let g: Vec<Vec<f32>> = Mlp::gradients(&leaves, &(v - target).powi_scalar(2).mean())
            .unwrap()
            .iter()
            .map(|t| host(t).unwrap())
            .collect();
        let norm = g
            .iter()
            .flatten()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        let coef = (1e-3 / (norm + 1e-6)).min(1.0);
        assert!(coef < 1.0, "the clip applies here ({norm})");
        let seen = mse_step(&mut net, &e, &[1.0, 2.0], &adam);
        assert!((seen - norm).abs() < 1e-6 * (1.0 + norm));
        for k in 0..before.len() {
            let after = host(&net.params[k]).unwrap();
            for at in 0..after.len() {
                let gi = f64::from(g[k][at]) * coef;
                let p = f64::from(before[k][at]) * (1.0 - 1e-2 * 1e-4);
                let want = p - 1e-2 * gi / (gi.abs() + 1e-8);
                assert!(
                    (f64::from(after[at]) - want).abs() < 1e-6,
                    "param {k}[{at}]"
                );
            }
        }
    }

    /// PyTorch's default `nn.Linear` initialisation bounds every weight and bias by
    /// 1/sqrt(fan_in); the normal one zeroes biases.
    #[test]
    fn initialisations() {
        let device = Device::default();
        let mut rng = SeededRng::new(2);
        let net = Mlp::new(9, Init::Torch, &mut rng, &device);
        for (k, p) in net.params.iter().enumerate() {
            let fan_in = shapes(9)[k - k % 2][0] as f32;
            let v = host(p).unwrap();
            assert!(v.iter().all(|x| x.abs() <= 1.0 / fan_in.sqrt()), "{k}");
            assert!(v.iter().any(|x| *x != 0.0), "{k}");
        }
        let net = Mlp::new(9, Init::Normal(0.1), &mut rng, &device);
        assert!(host(&net.params[1]).unwrap().iter().all(|x| *x == 0.0));
    }

    /// The weights and moments round-trip through the file exactly.
    #[test]
    fn save_and_load_round_trip() {
        let device = Device::default();
        let mut rng = SeededRng::new(8);
        let mut net = Mlp::new(5, Init::Torch, &mut rng, &device);
        let e = matrix(&mut rng, 4, 5, &device);
        let adam = Adam {
            lr: 1e-3,
            weight_decay: 0.0,
            max_grad_norm: None,
        };
        mse_step(&mut net, &e, &[0.0, 1.0, 2.0, 3.0], &adam);
        let dir = std::env::temp_dir().join(format!("tiller-mlp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net.safetensors");
        net.save(&path).unwrap();
        let mut back = Mlp::load(&path, 5, net.t, &device).unwrap();
        for k in 0..net.params.len() {
            assert_eq!(
                host(&net.params[k]).unwrap(),
                host(&back.params[k]).unwrap()
            );
            assert_eq!(host(&net.v[k]).unwrap(), host(&back.v[k]).unwrap());
        }
        // The next steps agree too.
        mse_step(&mut net, &e, &[0.0, 1.0, 2.0, 3.0], &adam);
        mse_step(&mut back, &e, &[0.0, 1.0, 2.0, 3.0], &adam);
        assert_eq!(
            host(&net.params[0]).unwrap(),
            host(&back.params[0]).unwrap()
        );
        let e = Mlp::load(&path, 6, 1, &device).err().unwrap().to_string();
        assert!(e.contains("shape") && e.contains("net.safetensors"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The embedding pools, clamps and normalises: a constant image of value 3 (clamped to 1) is
    /// the uniform unit vector.
    #[test]
    fn embedding_of_a_constant_image() {
        let device = Device::default();
        let x = Tensor::<4>::full([2, 3, 8, 8], 3.0, &device);
        let e = host(&embed(x, 2)).unwrap();
        let want = 1.0 / 12f32.sqrt();
        assert_eq!(e.len(), 2 * 12);
        assert!(e.iter().all(|v| (v - want).abs() < 1e-6), "{e:?}");
    }
}
