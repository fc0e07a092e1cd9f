//! Serving SD2: `batcher` groups face crops from concurrent requests into full model batches
//! (usable without HTTP); `http` is `sd2 serve` (feature `server`, on by default); `client` a
//! small blocking HTTP client for it; `metrics` its Prometheus counters.
pub mod batcher;
pub mod client;
#[cfg(feature = "server")]
pub mod http;
pub mod metrics;

pub use batcher::{BatchConfig, BatchStats, Batcher};
#[cfg(feature = "server")]
pub use http::{Server, ServerConfig};
