//! Drawing pieces the tabs share: charts (axes, bounds, smoothing) and painted maps
//! and images (half blocks, heat and signed ramps).

pub mod chart;
pub mod paint;
