//! Evaluation: detection metrics (`metrics`), scoring a manifest (`predict`), reports and
//! plots (`report`).
pub mod metrics;
pub mod plot;
pub mod predict;
pub mod probe;
pub mod report;
