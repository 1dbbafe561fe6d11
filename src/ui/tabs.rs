//! One module per tab (and the runs screen): what each draws from the run's history.

pub mod attention;
pub mod compare;
pub mod features;
pub mod layernorm;
pub mod layers;
pub mod patches;
pub mod predictions;
pub mod runs;
pub mod training;
