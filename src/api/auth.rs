//! API keys. Each tenant has a Secret in the API's namespace, labelled
//! `kinsight.io/api-key=true`, holding the SHA-256 of its key (`key-sha256`, hex) and the
//! namespace its groups live in (`tenant-namespace`), and optionally its rate limit
//! (`rate-limit`, requests per second) and cap on images in flight
//! (`max-in-flight-images`). The API never stores keys in clear and
//! watches those Secrets, so keys can be added or revoked with kubectl without a restart.

use axum::http::HeaderMap;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::Store;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::ApiError;
use crate::crd::is_dns_label;

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
    /// The key's SHA-256 (hex): what its rate limit is counted by.
    pub key: String,
    /// Requests per second from the key record, when it sets one.
    pub rate_limit: Option<std::num::NonZeroU32>,
    /// Images in flight at most, from the key record, when it sets one.
    pub in_flight_limit: Option<std::num::NonZeroU32>,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The tenants' API-key Secrets as the API's watch has them.
#[derive(Clone)]
pub struct ApiKeys {
    pub store: Store<Secret>,
    /// Whether they have been listed once: until then an unknown key may just not be
    /// loaded yet, and is answered 503, not 401. The key watch is the only one to wait on
    /// the store's ready signal (kube-runtime's wakes only the last of several waiters);
    /// everyone else reads or waits on this.
    pub loaded: tokio::sync::watch::Receiver<bool>,
}

/// The credential of `Authorization: Bearer <credential>`; the scheme's case does not matter
/// (RFC 9110 11.1).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credential)| credential.trim())
        .filter(|c| !c.is_empty())
        .ok_or(ApiError::Unauthorized)
}

pub fn authenticate(keys: &ApiKeys, headers: &HeaderMap) -> Result<Tenant, ApiError> {
    let digest = hash_key(bearer_token(headers)?);
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
            // A blank or malformed namespace would put the tenant's requests somewhere
            // else than one namespace (an empty one reads as all of them): an operator's
            // mistake, refused and logged rather than followed.
            let namespace = std::str::from_utf8(&namespace.0)
                .map(str::trim)
                .ok()
                .filter(|n| is_dns_label(n, 63));
            let Some(namespace) = namespace else {
                tracing::warn!(
                    secret = %secret.metadata.name.as_deref().unwrap_or_default(),
                    "API key Secret has no valid {TENANT_NAMESPACE_FIELD}; its key is refused"
                );
                return Err(ApiError::Unauthorized);
            };
            // A malformed limit is the operator's mistake too: logged, the default applies.
            let limit = |field: &str| {
                let parsed = data.get(field).map(|v| {
                    std::str::from_utf8(&v.0)
                        .ok()
                        .and_then(|t| t.trim().parse().ok())
                });
                if parsed == Some(None) {
                    tracing::warn!(
                        secret = %secret.metadata.name.as_deref().unwrap_or_default(),
                        "API key Secret's {field} is not a positive integer; the default applies"
                    );
                }
                parsed.flatten()
            };
            return Ok(Tenant {
                namespace: namespace.to_owned(),
                key: digest,
                rate_limit: limit(super::rate_limit::RATE_LIMIT_FIELD),
                in_flight_limit: limit(super::in_flight::IN_FLIGHT_LIMIT_FIELD),
            });
        }
    }
    if !*keys.loaded.borrow() {
        return Err(ApiError::Unavailable(
            "API keys are still loading; retry shortly".to_owned(),
        ));
    }
    Err(ApiError::Unauthorized)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::http::HeaderValue;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;
    use kube::runtime::{reflector, watcher};

    use super::*;

    fn keys(tenants: &[(&str, &str)]) -> ApiKeys {
        let (store, mut writer) = reflector::store();
        for (i, (key, namespace)) in tenants.iter().enumerate() {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(format!("key-{i}")),
                    namespace: Some("kinsight-system".into()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([
                    (
                        KEY_HASH_FIELD.to_owned(),
                        ByteString(hash_key(key).into_bytes()),
                    ),
                    (
                        TENANT_NAMESPACE_FIELD.to_owned(),
                        ByteString(namespace.as_bytes().to_vec()),
                    ),
                ])),
                ..Secret::default()
            };
            writer.apply_watcher_event(&watcher::Event::Apply(secret));
        }
        ApiKeys {
            store,
            loaded: tokio::sync::watch::channel(true).1,
        }
    }

    fn with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(authorization) {
            headers.insert(axum::http::header::AUTHORIZATION, value);
        }
        headers
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let keys = keys(&[("k1", "tenant-a")]);
        for header in ["Bearer k1", "bearer k1", "BEARER  k1 "] {
            let tenant = authenticate(&keys, &with(header)).expect(header);
            assert_eq!(tenant.namespace, "tenant-a");
        }
        for header in ["Basic k1", "Bearer", "k1", "Bearer k2"] {
            assert!(
                matches!(
                    authenticate(&keys, &with(header)),
                    Err(ApiError::Unauthorized)
                ),
                "{header}"
            );
        }
    }

    #[test]
    fn a_key_whose_tenant_namespace_is_blank_or_malformed_is_refused() {
        let keys = keys(&[
            ("blank", "  "),
            ("path", "a/b"),
            ("dotted", "a.b"),
            ("ok", " tenant-b\n"),
        ]);
        for key in ["blank", "path", "dotted"] {
            let result = authenticate(&keys, &with(&format!("Bearer {key}")));
            assert!(matches!(result, Err(ApiError::Unauthorized)), "{key}");
        }
        let tenant = authenticate(&keys, &with("Bearer ok")).expect("ok");
        assert_eq!(tenant.namespace, "tenant-b");
    }
}
