//! Evaluation: detection metrics (`metrics`).
pub mod metrics;
