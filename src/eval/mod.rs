//! Evaluation: detection metrics (`metrics`).
pub mod metrics;
pub mod report;
