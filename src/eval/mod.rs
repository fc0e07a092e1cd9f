//! Evaluation: detection metrics (`metrics`), scoring a manifest (`predict`), reports and
//! plots (`report`), the `sd2 eval` command (`evaluate`) and the linear probe (`probe`).
pub mod evaluate;
pub mod metrics;
#[cfg(feature = "cli")]
pub mod plot;
pub mod predict;
pub mod probe;
pub mod report;
