//! Kubernetes name rules (RFC 1123), for what becomes a name, a label or a URL segment.

use sha2::{Digest, Sha256};

/// An RFC 1123 label of at most `max` characters: lowercase letters, digits and `-`,
/// starting and ending with a letter or digit.
pub fn is_dns_label(text: &str, max: usize) -> bool {
    let bytes = text.as_bytes();
    bytes.len() <= max
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// An object name (RFC 1123 subdomain): labels joined by dots, 253 characters at most.
pub fn is_object_name(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(|label| is_dns_label(label, 253))
}

/// A label value for a group name: label values are limited to 63 characters, so long
/// names are shortened and made unique with a hash.
pub fn label_value(group: &str) -> String {
    if group.len() <= 63 {
        return group.to_owned();
    }
    let digest = hex::encode(Sha256::digest(group.as_bytes()));
    format!("{}-{}", &group[..46], &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_fit_kubernetes_limits() {
        assert_eq!(label_value("g"), "g");
        assert_eq!(label_value(&"b".repeat(100)).len(), 63);
        assert_ne!(label_value(&"b".repeat(100)), label_value(&"b".repeat(101)));
    }

    #[test]
    fn labels_and_object_names() {
        for good in [
            "grp-0123456789abcdef",
            "listing-42",
            "a",
            "a.b-c",
            &"x".repeat(253),
        ] {
            assert!(is_object_name(good), "{good}");
        }
        for bad in [
            "",
            "grp-x/status",
            "..",
            ".",
            "a..b",
            "-a",
            "a-",
            "A",
            "a b",
            "a%2Fb",
            "grp_x",
            &"x".repeat(254),
        ] {
            assert!(!is_object_name(bad), "{bad}");
        }
        assert!(is_dns_label("tenant-a", 63));
        assert!(!is_dns_label("a.b", 63));
        assert!(!is_dns_label(&"x".repeat(64), 63));
        assert!(!is_dns_label("", 63));
    }
}
