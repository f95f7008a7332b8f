//! URLs with credentials in them (`user:password@`, signed query strings such as
//! `?X-Amz-Signature=...` or `?token=...`, fragments) are redacted before they go into
//! Kubernetes Events or logs, which far more people can read than the groups themselves.

use reqwest::Url;

const REDACTED: &str = "redacted";

/// `url` with its user info and the values of its query and fragment replaced by
/// `redacted` (the names stay, so the URL is still recognisable). Text that does not parse
/// as a URL keeps only its scheme.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        return format!("{scheme}://{REDACTED}");
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // Setting these fails only for URLs that cannot have them (no host), which then
        // had none to begin with.
        let _ = parsed.set_username(REDACTED);
        let _ = parsed.set_password(None);
    }
    if parsed.query().is_some() {
        let names: Vec<String> = parsed
            .query_pairs()
            .map(|(name, _)| name.into_owned())
            .collect();
        if names.iter().all(|n| !n.is_empty()) && !names.is_empty() {
            parsed
                .query_pairs_mut()
                .clear()
                .extend_pairs(names.iter().map(|n| (n.as_str(), REDACTED)));
        } else {
            parsed.set_query(Some(REDACTED));
        }
    }
    if parsed.fragment().is_some() {
        parsed.set_fragment(Some(REDACTED));
    }
    parsed.into()
}

/// `text` with every `http://` or `https://` URL in it redacted ([`redact_url`]); a URL
/// ends at white space, a quote or a closing bracket.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = find_url(rest) {
        out.push_str(&rest[..start]);
        let url = &rest[start..];
        let end = url
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | ')' | ']' | '}')
            })
            .unwrap_or(url.len());
        // A sentence's full stop or comma is not part of the URL.
        let end = url[..end].trim_end_matches(['.', ',', ';', ':']).len();
        out.push_str(&redact_url(&url[..end]));
        rest = &url[end..];
    }
    out.push_str(rest);
    out
}

fn find_url(text: &str) -> Option<usize> {
    let lower = text.to_ascii_lowercase();
    [lower.find("http://"), lower.find("https://")]
        .into_iter()
        .flatten()
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_redacted_and_the_rest_kept() {
        assert_eq!(
            redact_url("https://alice:s3cret@hooks.example.com/in?token=abc&v=2#frag"),
            "https://redacted@hooks.example.com/in?token=redacted&v=redacted#redacted"
        );
        assert_eq!(
            redact_url("https://hooks.example.com/a/b"),
            "https://hooks.example.com/a/b"
        );
        assert_eq!(
            redact_url("http://h/x?opaque"),
            "http://h/x?opaque=redacted"
        );
        assert_eq!(redact_url("http://h/x?=v"), "http://h/x?redacted");
        assert_eq!(redact_url("https://[not a url"), "https://redacted");
    }

    #[test]
    fn every_url_in_a_text_is_redacted() {
        let note = "deliveries to https://h.example/hook?sig=XYZ paused (last: error for \
                    url (HTTP://u:p@other.example/x)); retry https://h.example/ok.";
        let redacted = redact_urls(note);
        assert_eq!(
            redacted,
            "deliveries to https://h.example/hook?sig=redacted paused (last: error for \
             url (http://redacted@other.example/x)); retry https://h.example/ok."
        );
        assert!(!redacted.contains("XYZ") && !redacted.contains(":p@"));
        assert_eq!(redact_urls("no url here"), "no url here");
    }
}
