//! kinsight: an operator that runs ONNX models on customers' images and pushes the
//! results to their webhooks. One folder per concern; `main.rs` only parses the command line.
//!
//! - [`api`]: the REST front door (axum) that turns requests into ImageGroups;
//! - [`crd`]: the custom resources;
//! - [`controller`]: reconciles ImageGroups (Jobs, status, aggregate, webhooks) and subscriptions;
//! - [`worker`]: the Job's process: fetch, decode, infer, write results;
//! - [`inference`]: the model catalog and ONNX Runtime sessions;
//! - [`results`]: the result path (the worker's uploader, the records it carries);
//! - [`store`]: PostgreSQL, where high-volume state lives (the only code speaking SQL);
//! - [`delivery`]: webhook deliveries (one per event and endpoint) and their attempts;
//! - [`webhook`]: signing and sending events;
//! - [`net`]: outbound-request safety (SSRF guard) for image downloads and webhooks;
//! - [`shutdown`]: stopping cleanly on SIGTERM;
//! - [`trace`]: W3C trace context, carried from the POST to every webhook;
//! - [`testbed`]: a local control plane and real node for tests and `kinsight-dev`;
//! - [`dev`]: `kinsight-dev dev` and `demo` (`kinsight dev`/`demo` run them);
//! - [`cli`]: what the `kinsight` and `kinsight-dev` binaries share.
//!
//! Only `kinsight-dev` (src/bin) uses [`testbed`] and [`dev`], so the `kinsight` binary, the
//! one the image carries, links none of them.

pub mod api;
pub mod bench;
mod cache;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod delivery;
pub mod dev;
pub mod inference;
pub mod net;
pub mod results;
pub mod shutdown;
pub mod store;
mod sync;
pub mod tenancy;
pub mod testbed;
pub mod trace;
pub mod webhook;
pub mod worker;

/// kube and reqwest use rustls with the ring provider; it must be chosen once per process.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
