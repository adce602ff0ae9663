//! Input statistics of a model's Linear layers over a forward computation, for data-aware
//! adapter merging (SafetyDPO's Co-Merge picks, per output unit, the expert whose update is most
//! active on the inputs it sees).
//!
//! [`record`] runs a closure and returns, for every observed Linear (keyed by its weight's
//! [`ParamId`], which an attached LoRA adapter keeps), the Gram matrix `X^T X` of the rows it was
//! given (every token of every batch item, flattened to `[n, d_in]`) and `n`. With those, the mean
//! squared output of any update `D` (`[d_in, d_out]`, burn's layout) on the same inputs is
//! `diag(D^T G D) / n`, computed without the inputs themselves ([`InputMoments::mean_square`]).
//!
//! The layers call [`observe`] before their projections (attention `to_q`/`to_k`/`to_v`/`to_out.0`,
//! the feed-forward's two Linears and a Linear `proj_in`/`proj_out`); outside [`record`] it is one
//! thread-local flag read. Recording is per thread: run the closure on the calling thread.

use burn::module::ParamId;
use burn::nn::Linear;
use burn::tensor::Tensor;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use tiller_core::{Error, Result};

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static SEEN: RefCell<HashMap<ParamId, (Tensor<2>, usize)>> = RefCell::new(HashMap::new());
}

/// The inputs one Linear saw: `gram = X^T X` (`d_in x d_in`, row-major, f64) over `rows` rows.
#[derive(Debug, Clone, PartialEq)]
pub struct InputMoments {
    pub d_in: usize,
    pub rows: usize,
    pub gram: Vec<f64>,
}

impl InputMoments {
    /// The mean over the recorded rows of each output unit's square under the low-rank update
    /// `D = a @ b` (burn layout: `a: [d_in, r]`, `b: [r, d_out]`, row-major):
    /// `(b^T (a^T G a) b)_jj / rows` for every `j < d_out`, in O(d_in^2 r) rather than
    /// O(d_in^2 d_out).
    pub fn mean_square(&self, a: &[f32], b: &[f32], rank: usize) -> Result<Vec<f64>> {
        let d = self.d_in;
        if rank == 0 || a.len() != d * rank || !b.len().is_multiple_of(rank) {
            return Err(Error::invalid(format!(
                "an update of rank {rank} with factors of {} and {} values does not fit inputs of \
                 width {d}",
                a.len(),
                b.len()
            )));
        }
        if self.rows == 0 {
            return Err(Error::invalid("no inputs were recorded"));
        }
        let d_out = b.len() / rank;
        // ga = G a: [d, r]
        let mut ga = vec![0f64; d * rank];
        for i in 0..d {
            for k in 0..d {
                let g = self.gram[i * d + k];
                if g == 0.0 {
                    continue;
                }
                for r in 0..rank {
                    ga[i * rank + r] += g * a[k * rank + r] as f64;
                }
            }
        }
        // m = a^T G a: [r, r]
        let mut m = vec![0f64; rank * rank];
        for i in 0..d {
            for p in 0..rank {
                let ap = a[i * rank + p] as f64;
                for q in 0..rank {
                    m[p * rank + q] += ap * ga[i * rank + q];
                }
            }
        }
        let mut out = vec![0f64; d_out];
        for (j, o) in out.iter_mut().enumerate() {
            let mut s = 0f64;
            for p in 0..rank {
                let bp = b[p * d_out + j] as f64;
                for q in 0..rank {
                    s += bp * m[p * rank + q] * b[q * d_out + j] as f64;
                }
            }
            *o = s / self.rows as f64;
        }
        Ok(out)
    }
}

/// Records the inputs `linear` is about to be given, when a [`record`] is running on this thread.
pub fn observe<const D: usize>(linear: &Linear, x: &Tensor<D>) {
    if !ACTIVE.with(Cell::get) {
        return;
    }
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims.iter().product::<usize>() / d_in.max(1);
    let flat: Tensor<2> = x.clone().detach().reshape([rows, d_in]);
    let gram = flat.clone().transpose().matmul(flat);
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        match seen.remove(&linear.weight.id) {
            Some((g, n)) => seen.insert(linear.weight.id, (g + gram, n + rows)),
            None => seen.insert(linear.weight.id, (gram, rows)),
        };
    });
}

/// Runs `f` with recording on and returns its result with the moments of every Linear observed
/// during it. Recordings do not nest.
pub fn record<R>(f: impl FnOnce() -> R) -> Result<(R, HashMap<ParamId, InputMoments>)> {
    if ACTIVE.with(Cell::get) {
        return Err(Error::invalid("probe::record does not nest"));
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(false));
            SEEN.with(|s| s.borrow_mut().clear());
        }
    }
    SEEN.with(|s| s.borrow_mut().clear());
    ACTIVE.with(|a| a.set(true));
    let reset = Reset;
    let out = f();
    let seen = SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()));
    drop(reset);
    let mut moments = HashMap::new();
    for (id, (gram, rows)) in seen {
        let d_in = gram.dims()[0];
        let gram: Vec<f64> = gram
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .map_err(|e| Error::invalid(format!("reading a Gram matrix: {e:?}")))?;
        if gram.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(
                "the inputs of a Linear layer during recording".into(),
            ));
        }
        moments.insert(id, InputMoments { d_in, rows, gram });
    }
    Ok((out, moments))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, TensorData};

    /// The Gram matrix of two calls is `X^T X` of their rows stacked, and `mean_square` equals
    /// the mean of the update's squared outputs computed directly.
    #[test]
    fn moments_give_the_mean_square_output_of_an_update() {
        let device = Device::default();
        let lin = LinearConfig::new(3, 2).init(&device);
        let x1: Vec<f32> = vec![1.0, 2.0, -1.0, 0.5, 0.0, 3.0];
        let x2: Vec<f32> = vec![-2.0, 1.0, 1.0];
        let ((), m) = record(|| {
            observe(
                &lin,
                &Tensor::<3>::from_data(TensorData::new(x1.clone(), [1, 2, 3]), &device),
            );
            observe(
                &lin,
                &Tensor::<2>::from_data(TensorData::new(x2.clone(), [1, 3]), &device),
            );
        })
        .unwrap();
        let m = &m[&lin.weight.id];
        assert_eq!((m.d_in, m.rows), (3, 3));
        let rows: Vec<&[f32]> = x1.chunks(3).chain(x2.chunks(3)).collect();
        for i in 0..3 {
            for k in 0..3 {
                let want: f64 = rows.iter().map(|r| r[i] as f64 * r[k] as f64).sum();
                assert!((m.gram[i * 3 + k] - want).abs() < 1e-5);
            }
        }
        // a: [3, 1], b: [1, 2]: D = a b; outputs x D.
        let a = [1.0f32, -1.0, 2.0];
        let b = [0.5f32, -3.0];
        let got = m.mean_square(&a, &b, 1).unwrap();
        for (j, g) in got.iter().enumerate() {
            let want: f64 = rows
                .iter()
                .map(|r| {
                    let xa: f64 = (0..3).map(|i| r[i] as f64 * a[i] as f64).sum();
                    (xa * b[j] as f64).powi(2)
                })
                .sum::<f64>()
                / 3.0;
            assert!((g - want).abs() < 1e-4, "unit {j}: {g} vs {want}");
        }
        // Outside a recording nothing is kept.
        observe(
            &lin,
            &Tensor::<2>::from_data(TensorData::new(x2, [1, 3]), &device),
        );
        let ((), empty) = record(|| ()).unwrap();
        assert!(empty.is_empty());
    }
}
