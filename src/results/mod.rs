//! The result path. A worker hands each image's result to the API's internal ingest
//! (`POST /internal/v1/results`, batched, authenticated by the pod's ServiceAccount token),
//! which stores it in PostgreSQL (`crate::store`) and wakes the controller. Workers parse
//! untrusted images, so they hold no database credentials and write nothing to etcd.

mod model;
mod upload;

pub use model::{ImageFailure, ImageResult, ModelResult, Timings};
pub(crate) use upload::failed_answer;
pub use upload::{
    REQUEST_TIMEOUT, ResultUploader, TokenSource, UploadError, UploadReport, internal_client,
};

use serde::{Deserialize, Serialize};

/// The internal endpoint's path, below the API's address.
pub const INGEST_PATH: &str = "/internal/v1/results";
/// Results in one request, at most.
pub const MAX_BATCH: usize = 500;

/// The group results belong to: enough to name it and to tell it from a later group of the
/// same name.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What a worker sends: results of one group, written by the Job of one generation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResultBatch {
    pub group: GroupRef,
    pub generation: i64,
    pub results: Vec<ImageResult>,
}
