//! Standard Webhooks signatures (`webhook-signature: v1,<base64 HMAC-SHA256(id.ts.body)>`),
//! computed by the spec's own crate; secrets are in the `whsec_<base64>` form.

use base64::Engine;
use standardwebhooks::Webhook;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("invalid signing secret: {0}")]
    InvalidSecret(String),
}

/// The `webhook-signature` header value: one `v1,<sig>` per secret, space separated,
/// so a receiver holding any active key can verify during a rotation.
pub fn sign(
    secrets: &[String],
    msg_id: &str,
    timestamp: i64,
    body: &str,
) -> Result<String, SigningError> {
    let mut signatures = Vec::with_capacity(secrets.len());
    for secret in secrets {
        let secret = secret.trim();
        if !secret.starts_with("whsec_") {
            return Err(SigningError::InvalidSecret("must start with whsec_".into()));
        }
        let webhook =
            Webhook::new(secret).map_err(|e| SigningError::InvalidSecret(e.to_string()))?;
        signatures.push(
            webhook
                .sign(msg_id, timestamp, body.as_bytes())
                .map_err(|e| SigningError::InvalidSecret(e.to_string()))?,
        );
    }
    if signatures.is_empty() {
        return Err(SigningError::InvalidSecret("no signing secret".into()));
    }
    Ok(signatures.join(" "))
}

/// A fresh random `whsec_` secret (24 random bytes, like the reference implementations).
pub fn generate_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_with_the_reference_verifier() {
        let secret = generate_secret();
        let other = generate_secret();
        let ts = jiff::Timestamp::now().as_second();
        let header = sign(&[other, secret.clone()], "msg_1", ts, r#"{"a":1}"#).expect("signs");
        assert_eq!(header.split(' ').count(), 2);
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", http::HeaderValue::from_static("msg_1"));
        headers.insert("webhook-timestamp", ts.to_string().parse().expect("header"));
        headers.insert("webhook-signature", header.parse().expect("header"));
        let verifier = Webhook::new(&secret).expect("secret");
        assert!(verifier.verify(br#"{"a":1}"#, &headers).is_ok());
        assert!(verifier.verify(br#"{"a":2}"#, &headers).is_err());
    }

    #[test]
    fn rejects_secrets_not_in_whsec_form() {
        assert!(sign(&["plain".into()], "m", 1, "{}").is_err());
        assert!(sign(&["whsec_!!!".into()], "m", 1, "{}").is_err());
        assert!(sign(&[], "m", 1, "{}").is_err());
    }
}
