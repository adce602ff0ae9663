//! One file per method, each reading like its paper.

pub mod ddpo;
pub mod diffusion_dpo;
pub mod draft_k;

pub use ddpo::Ddpo;
pub use diffusion_dpo::DiffusionDpo;
pub use draft_k::DraftK;

use crate::Algorithm;
use crate::config::{AlignConfig, MethodName};

/// The method a config names, with its section's settings.
pub fn build(config: &AlignConfig) -> Box<dyn Algorithm> {
    match config.method {
        MethodName::Ddpo => Box::new(Ddpo::new(config.ddpo.clone())),
        MethodName::DiffusionDpo => Box::new(DiffusionDpo {
            beta: config.dpo.beta,
        }),
        MethodName::DraftK => Box::new(DraftK { k: config.draft.k }),
    }
}
