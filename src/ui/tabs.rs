//! One module per tab (and the runs screen): each owns its view settings, the keys
//! that change them, and its drawing from the run (`run_state::Ctx`, read-only).

pub mod attention;
pub mod compare;
pub mod features;
pub mod layernorm;
pub mod layers;
pub mod patches;
pub mod predictions;
pub mod runs;
pub mod training;
