//! Drawing pieces the tabs share: charts (axes, bounds, smoothing) and painted maps
//! and images (half blocks, heat and signed ramps), and the frame of a panel.

pub mod chart;
pub mod frame;
pub mod heat_grid;
pub mod paint;
