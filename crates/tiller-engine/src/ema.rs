//! Exponential moving average of parameters, as diffusers' `EMAModel`: after each optimizer step,
//! `ema = d * ema + (1 - d) * param` with the effective decay `d = min(decay, (1 + n) / (10 + n))`
//! for the n-th update (diffusers' default warm-up, `use_ema_warmup = False`), so early averages are
//! not dominated by the random initialisation.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use std::collections::HashMap;

/// The averaged copy of a model (without autodiff) and its update count.
#[derive(Debug, Clone)]
pub struct Ema<M: Module> {
    model: M,
    decay: f64,
    updates: u64,
}

impl<M: Module> Ema<M> {
    /// Starts the average at the current parameters of `model`.
    pub fn new(model: &M, decay: f64) -> Self {
        Self {
            model: model.valid(),
            decay,
            updates: 0,
        }
    }

    /// Restores an average saved earlier (after `updates` updates).
    pub fn restore(model: M, decay: f64, updates: u64) -> Self {
        Self {
            model: model.valid(),
            decay,
            updates,
        }
    }

    /// The decay used for the next update.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// Moves the average toward `model`'s parameters (matched by parameter id).
    pub fn update(&mut self, model: &M) {
        // Parameters are collected flattened (the map cannot be generic over rank) and stay on
        // their device; only the graph is dropped.
        struct Collect(HashMap<ParamId, Tensor<1>>);
        impl ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let t = param.val().inner();
                let n = t.shape().num_elements();
                self.0.insert(param.id, t.reshape([n]));
            }
        }
        struct Blend {
            current: HashMap<ParamId, Tensor<1>>,
            d: f64,
        }
        impl ModuleMapper for Blend {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let Some(cur) = self.current.remove(&param.id) else {
                    return param;
                };
                let d = self.d;
                param.map(|ema| {
                    let shape: [usize; D] = ema.dims();
                    let cur = cur.to_device(&ema.device()).reshape(shape);
                    ema * d + cur * (1.0 - d)
                })
            }
        }
        let mut c = Collect(HashMap::new());
        model.visit(&mut c);
        let d = self.current_decay();
        let mut blend = Blend { current: c.0, d };
        self.model = self.model.clone().map(&mut blend);
        self.updates += 1;
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Device;

    fn weight(m: &Linear) -> Vec<f32> {
        m.weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    #[test]
    fn follows_diffusers_decay_warmup() {
        let device = Device::flex();
        let m0 = LinearConfig::new(2, 2).init(&device);
        let mut ema = Ema::new(&m0, 0.999);
        // Replace the live weights by w0 + 1 everywhere.
        let w0 = weight(&m0);
        let m1 = m0.clone().map(&mut AddOne);
        // First update: d = min(0.999, 1/10) = 0.1, so ema = 0.1 w0 + 0.9 (w0 + 1) = w0 + 0.9.
        ema.update(&m1);
        for (e, w) in weight(ema.model()).iter().zip(&w0) {
            assert!((e - (w + 0.9)).abs() < 1e-6);
        }
        // Second: d = 2/11; ema = d (w0 + 0.9) + (1 - d)(w0 + 1) = w0 + 1 - 0.1 d.
        ema.update(&m1);
        let d = 2.0f32 / 11.0;
        for (e, w) in weight(ema.model()).iter().zip(&w0) {
            assert!((e - (w + 1.0 - 0.1 * d)).abs() < 1e-6);
        }
        assert_eq!(ema.updates(), 2);
    }

    struct AddOne;
    impl ModuleMapper for AddOne {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| t + 1.0)
        }
    }
}
