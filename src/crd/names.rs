//! Kubernetes name rules (RFC 1123), for what becomes a name, a label or a URL segment.

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

#[cfg(test)]
mod tests {
    use super::*;

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
