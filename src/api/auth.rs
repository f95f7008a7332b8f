//! API keys. Each tenant has a Secret in the API's namespace, labelled
//! `kinsight.io/api-key=true`, holding the SHA-256 of its key (`key-sha256`, hex) and the
//! namespace its groups live in (`tenant-namespace`). The API never stores keys in clear and
//! watches those Secrets, so keys can be added or revoked with kubectl without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::HeaderMap;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::Store;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::ApiError;

pub const API_KEY_LABEL: &str = "kinsight.io/api-key";
pub const KEY_HASH_FIELD: &str = "key-sha256";
pub const TENANT_NAMESPACE_FIELD: &str = "tenant-namespace";
/// The tenant's webhook signing secret, in the tenant namespace.
pub const SIGNING_SECRET_NAME: &str = "kinsight-webhook-signing";
pub const SIGNING_SECRET_KEY: &str = "secret";

/// The caller, once its key checked out.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub namespace: String,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The tenants' API-key Secrets as the API's watch has them.
#[derive(Clone)]
pub struct ApiKeys {
    pub store: Store<Secret>,
    /// Whether they have been listed once: until then an unknown key may just not be
    /// loaded yet, and is answered 503, not 401.
    pub loaded: Arc<AtomicBool>,
}

pub fn authenticate(keys: &ApiKeys, headers: &HeaderMap) -> Result<Tenant, ApiError> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    let digest = hash_key(presented);
    for secret in keys.store.state() {
        let Some(data) = secret.data.as_ref() else {
            continue;
        };
        let (Some(hash), Some(namespace)) =
            (data.get(KEY_HASH_FIELD), data.get(TENANT_NAMESPACE_FIELD))
        else {
            continue;
        };
        if bool::from(hash.0.trim_ascii().ct_eq(digest.as_bytes())) {
            let namespace =
                String::from_utf8(namespace.0.clone()).map_err(|_| ApiError::Unauthorized)?;
            return Ok(Tenant {
                namespace: namespace.trim().to_owned(),
            });
        }
    }
    if !keys.loaded.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable(
            "API keys are still loading; retry shortly".to_owned(),
        ));
    }
    Err(ApiError::Unauthorized)
}
