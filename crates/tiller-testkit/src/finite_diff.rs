//! Central finite differences in f64, for checking hand-derived and autodiff gradients.
//!
//! The central difference (f(x + h e_i) - f(x - h e_i)) / 2h has error O(h^2 f'''), so with
//! h = 1e-6 in f64 the truncation error is about 1e-12 times the third derivative and the rounding
//! error about 1e-16 |f| / 1e-6 = 1e-10 |f|: comparisons at 1e-6 relative are safe for smooth
//! functions of moderate size.

use crate::close::check_close;

/// Default step for [`central_difference`] in f64.
pub const DEFAULT_STEP: f64 = 1e-6;

/// d f / d x_i for every i, by central differences with step `h`.
pub fn central_difference(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + h;
            let up = f(&probe);
            probe[i] = x[i] - h;
            let down = f(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Asserts that `gradient` matches the central difference of `f` at `x` (step
/// [`DEFAULT_STEP`]) within `rtol`/`atol`; `what` names the gradient in the failure message.
#[track_caller]
pub fn assert_gradient_matches(
    what: &str,
    f: impl Fn(&[f64]) -> f64,
    x: &[f64],
    gradient: &[f64],
    rtol: f64,
    atol: f64,
) {
    let numeric = central_difference(f, x, DEFAULT_STEP);
    if let Err(message) = check_close(gradient, numeric.as_slice(), rtol, atol) {
        panic!("gradient of {what} does not match finite differences: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_polynomial_gradient() {
        // f(x, y) = x^3 y + 2y, so df/dx = 3x^2 y and df/dy = x^3 + 2.
        let f = |v: &[f64]| v[0].powi(3) * v[1] + 2.0 * v[1];
        let x = [1.5, -0.5];
        assert_gradient_matches(
            "x^3 y + 2y",
            f,
            &x,
            &[3.0 * 2.25 * -0.5, 3.375 + 2.0],
            1e-7,
            1e-9,
        );
    }

    #[test]
    #[should_panic(expected = "does not match")]
    fn a_wrong_gradient_fails() {
        assert_gradient_matches("x^2", |v| v[0] * v[0], &[3.0], &[5.0], 1e-6, 1e-9);
    }
}
