//! What the tabs and exports read off a model: the probes that capture tensors during
//! training and turn them into plain data, and the pure analyses over that data
//! (attention statistics, features, predictions, what each layer knows, scale by
//! depth). Nothing here draws or writes files,
//! so the dashboard, `view` and `export` share one definition of every number.

pub mod attention;
pub mod features;
pub mod knowledge;
pub mod layer_records;
pub mod layers;
pub mod predictions;
pub mod probe;
pub mod scale;
