//! The still pictures: attention, features, patches, predictions, curves and the
//! layer maps, each
//! drawn from the run's recorded probes, predictions and metrics. Here only the map:
//! the shared drawing is `draw.rs`, the probe pictures `probes.rs`, the pictures of
//! records `records.rs`.

mod draw;
mod layers;
mod probes;
mod records;

pub use draw::draw_image;
pub use layers::layers;
pub use probes::{attention, attention_cell, features, patches, MATRIX_ORIGIN};
pub use records::{curves, predictions, tile_origin, TILES, TILE_SCALE};
