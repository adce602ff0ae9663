//! Building tensors from literal values and reading them back, in either float precision.

use burn::tensor::{DType, Device, Tensor, TensorData};

/// A float32 tensor of `shape` holding `values` (row-major).
pub fn tensor_f32<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Tensor::from_data(TensorData::new(data, shape), (device, DType::F32))
}

/// A float64 tensor of `shape` holding `values` (row-major), for finite-difference checks.
pub fn tensor_f64<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), shape),
        (device, DType::F64),
    )
}

/// All values of a float tensor as f64, row-major.
pub fn to_vec_f64<const D: usize>(tensor: &Tensor<D>) -> Vec<f64> {
    tensor
        .try_to_vec_as::<f64>()
        .unwrap_or_else(|e| panic!("reading a tensor back failed: {e}"))
}
