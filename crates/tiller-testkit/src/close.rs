//! `assert_close(actual, expected, rtol, atol)`: element-wise |a - e| <= atol + rtol * |e|, with a
//! failure message that names the worst element by flat and multi-dimensional index.

use burn::tensor::{Tensor, TensorData};

/// Anything `assert_close` compares: values as f64, row-major, and the shape when known.
pub trait Values {
    /// All values, row-major, as f64.
    fn values(&self) -> Vec<f64>;
    /// The shape, when there is one, to report a multi-dimensional index.
    fn shape(&self) -> Option<Vec<usize>> {
        None
    }
}

impl Values for f64 {
    fn values(&self) -> Vec<f64> {
        vec![*self]
    }
}

impl Values for [f64] {
    fn values(&self) -> Vec<f64> {
        self.to_vec()
    }
}

impl Values for [f32] {
    fn values(&self) -> Vec<f64> {
        self.iter().map(|&v| f64::from(v)).collect()
    }
}

impl<const N: usize> Values for [f64; N] {
    fn values(&self) -> Vec<f64> {
        self.to_vec()
    }
}

impl Values for Vec<f64> {
    fn values(&self) -> Vec<f64> {
        self.clone()
    }
}

impl Values for Vec<f32> {
    fn values(&self) -> Vec<f64> {
        self.as_slice().values()
    }
}

impl Values for TensorData {
    fn values(&self) -> Vec<f64> {
        self.iter::<f64>().collect()
    }
}

impl<const D: usize> Values for Tensor<D> {
    fn values(&self) -> Vec<f64> {
        crate::to_vec_f64(self)
    }
    fn shape(&self) -> Option<Vec<usize>> {
        Some(self.dims().to_vec())
    }
}

impl<T: Values + ?Sized> Values for &T {
    fn values(&self) -> Vec<f64> {
        (**self).values()
    }
    fn shape(&self) -> Option<Vec<usize>> {
        (**self).shape()
    }
}

/// Checks |actual - expected| <= atol + rtol * |expected| element-wise.
///
/// NaN anywhere fails. On failure the message counts the offending elements and names the worst
/// one (largest excess over its allowance) with its value on both sides.
pub fn check_close(
    actual: impl Values,
    expected: impl Values,
    rtol: f64,
    atol: f64,
) -> Result<(), String> {
    let shape = actual.shape().or_else(|| expected.shape());
    let (a, e) = (actual.values(), expected.values());
    if a.len() != e.len() {
        return Err(format!(
            "length mismatch: actual has {} elements, expected {}",
            a.len(),
            e.len()
        ));
    }
    let mut failures = 0usize;
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        let allowed = atol + rtol * y.abs();
        let err = (x - y).abs();
        let close = err <= allowed; // false when either value is NaN
        if !close {
            failures += 1;
            let excess = if err.is_nan() {
                f64::INFINITY
            } else {
                err - allowed
            };
            if worst.is_none_or(|(_, w)| excess > w) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => {
            let at = match &shape {
                Some(s) if s.iter().product::<usize>() == a.len() => {
                    format!("{i} {:?}", unravel(i, s))
                }
                _ => i.to_string(),
            };
            Err(format!(
                "{failures} of {} elements not close (rtol {rtol:e}, atol {atol:e}); worst at index \
                 {at}: actual {}, expected {} (abs err {:e}, allowed {:e})",
                a.len(),
                a[i],
                e[i],
                (a[i] - e[i]).abs(),
                atol + rtol * e[i].abs()
            ))
        }
    }
}

/// Panics with [`check_close`]'s message when the values are not close.
#[track_caller]
pub fn assert_close(actual: impl Values, expected: impl Values, rtol: f64, atol: f64) {
    if let Err(message) = check_close(actual, expected, rtol, atol) {
        panic!("assert_close failed: {message}");
    }
}

/// Row-major flat index to a multi-dimensional one.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        *slot = flat % dim;
        flat /= dim;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_pass_and_tolerances_combine() {
        assert_close([1.0, 2.0], [1.0, 2.0], 0.0, 0.0);
        // |2.1 - 2| = 0.1 <= 0.05 + 0.05 * 2
        assert_close([1.0, 2.1], [1.0, 2.0], 0.05, 0.05);
    }

    #[test]
    fn message_names_the_worst_element_with_its_multi_index() {
        let device = burn::tensor::Device::flex();
        let actual = crate::tensor_f32(&[0.0, 1.0, 2.0, 3.5, 4.0, 5.2], [2, 3], &device);
        let err = check_close(&actual, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 0.0, 1e-3).unwrap_err();
        assert!(err.starts_with("2 of 6 elements"), "{err}");
        assert!(err.contains("index 3 [1, 0]"), "{err}");
        assert!(err.contains("actual 3.5, expected 3"), "{err}");
    }

    #[test]
    fn nan_and_length_mismatch_fail() {
        assert!(check_close([f64::NAN], [f64::NAN], 1.0, 1.0).is_err());
        assert!(check_close([1.0], [1.0, 2.0], 1.0, 1.0).is_err());
    }

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(0, &[2, 3, 4]), vec![0, 0, 0]);
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
        assert_eq!(unravel(5, &[2, 3, 4]), vec![0, 1, 1]);
    }
}
