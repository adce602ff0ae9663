//! Device selection by name, the one place hardware is chosen.

use crate::{Error, Result};
use burn::tensor::Device;

/// Parses a device name: `cpu` (burn's pure-Rust `flex` backend); with the `cuda` feature,
/// `cuda` / `cuda:N`; with the `vulkan` feature, `vulkan` (wgpu's preferred adapter, on Vulkan)
/// / `vulkan:N` (the N-th discrete GPU).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        #[cfg(feature = "cuda")]
        n if n.starts_with("cuda:") => {
            let index: usize = n[5..].parse().map_err(|_| {
                Error::invalid(format!(
                    "device `{name}`: expected cuda:N with N an integer"
                ))
            })?;
            Ok(Device::cuda(index))
        }
        n if n.starts_with("cuda") => Err(Error::invalid(format!(
            "device `{name}`: this build has no CUDA support; rebuild with `--features cuda`"
        ))),
        #[cfg(feature = "vulkan")]
        "vulkan" => Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "vulkan")]
        n if n.starts_with("vulkan:") => {
            let index: usize = n[7..].parse().map_err(|_| {
                Error::invalid(format!(
                    "device `{name}`: expected vulkan:N with N an integer"
                ))
            })?;
            Ok(Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(index)))
        }
        n if n.starts_with("vulkan") => Err(Error::invalid(format!(
            "device `{name}`: this build has no Vulkan support; rebuild with `--features vulkan`"
        ))),
        _ => Err(Error::invalid(format!(
            "unknown device `{name}`; valid devices: cpu{}{}",
            if cfg!(feature = "cuda") {
                ", cuda, cuda:N"
            } else {
                ""
            },
            if cfg!(feature = "vulkan") {
                ", vulkan, vulkan:N"
            } else {
                ""
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse_device("cpu").is_ok());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("cpu"), "{e}");
        #[cfg(not(feature = "cuda"))]
        assert!(
            parse_device("cuda:0")
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
        #[cfg(not(feature = "vulkan"))]
        assert!(
            parse_device("vulkan")
                .unwrap_err()
                .to_string()
                .contains("--features vulkan")
        );
    }
}
