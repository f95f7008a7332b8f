//! Which Secrets may sign webhooks. The controller reads Secrets in tenant namespaces only to
//! sign; a `secretRef` that could name any Secret would make it a signing oracle (a tenant's
//! receiver learns HMACs keyed with whatever `whsec_` value another team keeps there). So a
//! Secret signs only when it carries the label [`SIGNING_LABEL`]`: "true"`; the same mark
//! lets a subscription take request headers from a Secret ([`secret_headers`]).

use k8s_openapi::api::core::v1::Secret;

/// The label that marks a Secret for kinsight's signing (and subscription headers).
pub const SIGNING_LABEL: &str = "kinsight.io/webhook-signing";

/// Why a Secret cannot sign; `reason()` is the stable condition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningSecretError {
    #[error("Secret {0} not found")]
    NotFound(String),
    #[error("Secret {0} is not marked for kinsight: label it {SIGNING_LABEL}=true")]
    NotMarked(String),
    #[error("Secret {0} has no key {1}")]
    KeyMissing(String, String),
    #[error("Secret {0}: signing secrets must be whsec_<base64> values")]
    Invalid(String),
    #[error("Secret {0}: {1}")]
    InvalidHeaders(String, String),
}

impl SigningSecretError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "SecretNotFound",
            Self::NotMarked(_) => "SecretNotMarked",
            Self::KeyMissing(..) => "SecretKeyMissing",
            Self::Invalid(_) => "InvalidSecret",
            Self::InvalidHeaders(..) => "InvalidHeaders",
        }
    }
}

pub fn is_marked(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SIGNING_LABEL))
        .is_some_and(|v| v == "true")
}

/// The signing keys under `key` of a found Secret (`None`: not found): one or more `whsec_`
/// values separated by white space, from a Secret marked for kinsight.
pub fn signing_keys(
    name: &str,
    secret: Option<&Secret>,
    key: &str,
) -> Result<Vec<String>, SigningSecretError> {
    let secret = secret.ok_or_else(|| SigningSecretError::NotFound(name.to_owned()))?;
    if !is_marked(secret) {
        return Err(SigningSecretError::NotMarked(name.to_owned()));
    }
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| SigningSecretError::KeyMissing(name.to_owned(), key.to_owned()))?;
    let text =
        std::str::from_utf8(&bytes.0).map_err(|_| SigningSecretError::Invalid(name.to_owned()))?;
    let keys: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    if keys.is_empty() || !keys.iter().all(|k| k.starts_with("whsec_")) {
        return Err(SigningSecretError::Invalid(name.to_owned()));
    }
    Ok(keys)
}

/// The request headers a found Secret (`None`: not found) marked for kinsight holds: each
/// key a header name, its value the header's value.
pub fn secret_headers(
    name: &str,
    secret: Option<&Secret>,
) -> Result<Vec<(String, String)>, SigningSecretError> {
    let secret = secret.ok_or_else(|| SigningSecretError::NotFound(name.to_owned()))?;
    if !is_marked(secret) {
        return Err(SigningSecretError::NotMarked(name.to_owned()));
    }
    let invalid = |m: String| SigningSecretError::InvalidHeaders(name.to_owned(), m);
    let headers = secret
        .data
        .iter()
        .flatten()
        .map(|(header, value)| {
            let value = std::str::from_utf8(&value.0)
                .map_err(|_| invalid(format!("the value of {header:?} is not UTF-8")))?;
            Ok((header.clone(), value.trim().to_owned()))
        })
        .collect::<Result<std::collections::BTreeMap<_, _>, _>>()?;
    crate::crd::validate_headers(&headers).map_err(invalid)?;
    Ok(headers.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    use super::*;

    fn secret(label: Option<&str>, value: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("s".into()),
                labels: label.map(|v| BTreeMap::from([(SIGNING_LABEL.to_owned(), v.to_owned())])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "k".to_owned(),
                ByteString(value.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        }
    }

    #[test]
    fn only_marked_secrets_of_whsec_values_sign() {
        let ok = secret(Some("true"), "whsec_a  whsec_b\n");
        assert_eq!(
            signing_keys("s", Some(&ok), "k"),
            Ok(vec!["whsec_a".to_owned(), "whsec_b".to_owned()])
        );
        for unmarked in [secret(None, "whsec_a"), secret(Some("yes"), "whsec_a")] {
            let refused = signing_keys("s", Some(&unmarked), "k").unwrap_err();
            assert_eq!(refused.reason(), "SecretNotMarked");
            assert!(
                refused
                    .to_string()
                    .contains("kinsight.io/webhook-signing=true")
            );
        }
        assert_eq!(
            signing_keys("s", Some(&ok), "other").map_err(|e| e.reason()),
            Err("SecretKeyMissing")
        );
        for bad in ["", "  ", "whsec_a plain"] {
            let value = secret(Some("true"), bad);
            assert_eq!(
                signing_keys("s", Some(&value), "k").map_err(|e| e.reason()),
                Err("InvalidSecret"),
                "{bad:?}"
            );
        }
        assert_eq!(
            signing_keys("s", None, "k").map_err(|e| e.reason()),
            Err("SecretNotFound")
        );
    }

    #[test]
    fn headers_come_from_marked_secrets_and_never_replace_kinsights_own() {
        let mut token = secret(Some("true"), "Bearer t0k\n");
        if let Some(data) = token.data.as_mut() {
            data.insert("Authorization".into(), ByteString(b"Bearer t0k\n".to_vec()));
            data.remove("k");
        }
        assert_eq!(
            secret_headers("s", Some(&token)),
            Ok(vec![("Authorization".to_owned(), "Bearer t0k".to_owned())])
        );
        let unmarked = secret(None, "x");
        assert_eq!(
            secret_headers("s", Some(&unmarked)).map_err(|e| e.reason()),
            Err("SecretNotMarked")
        );
        let mut reserved = secret(Some("true"), "x");
        if let Some(data) = reserved.data.as_mut() {
            data.insert(
                "webhook-signature".into(),
                ByteString(b"v1,forged".to_vec()),
            );
        }
        let refused = secret_headers("s", Some(&reserved)).unwrap_err();
        assert_eq!(refused.reason(), "InvalidHeaders");
        assert!(refused.to_string().contains("set by kinsight"), "{refused}");
    }
}
