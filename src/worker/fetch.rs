//! Downloading one image from a URL the customer chose. Every destination, the first and
//! each redirect target, passes the egress guard (no private, loopback, link-local or
//! metadata addresses unless allowed); connect and total timeouts; a byte limit enforced
//! while streaming (the Content-Length is not trusted); a bounded number of redirects;
//! and the first bytes must be those of a JPEG, PNG or WebP, whatever the Content-Type
//! says, so that anything else is dropped after its first chunk.

use std::time::Duration;

use futures::StreamExt;
use reqwest::Url;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};

use crate::net::{EgressError, EgressGuard, EgressPolicy, TooManyRedirects, find_cause};

#[derive(Clone, Debug)]
pub struct FetchConfig {
    pub connect_timeout: Duration,
    /// Bounds the whole download: connecting, redirects, headers and body.
    pub total_timeout: Duration,
    pub max_bytes: usize,
    pub max_redirects: usize,
    /// Private destinations the worker may reach anyway (default: none).
    pub egress: EgressPolicy,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(30),
            max_bytes: 20 * 1024 * 1024,
            max_redirects: 5,
            egress: EgressPolicy::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("download timed out")]
    Timeout,
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("server answered HTTP {0}")]
    Status(u16),
    #[error("image is larger than {0} bytes")]
    TooLarge(usize),
    /// The egress guard refused the URL, a redirect target or every address of the host.
    #[error("destination not allowed: {0}")]
    Blocked(EgressError),
    #[error("{0}")]
    TooManyRedirects(TooManyRedirects),
    /// The body does not start like a JPEG, PNG or WebP.
    #[error("not a JPEG, PNG or WebP image: {0}")]
    UnsupportedFormat(String),
    #[error("the server sent no data (0 bytes)")]
    Empty,
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    #[error("download failed: {0}")]
    Other(String),
}

impl FetchError {
    /// Stable reason recorded in the image's result.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout => "DownloadTimeout",
            Self::Connect(_) => "DownloadFailed",
            Self::Status(_) => "DownloadHttpError",
            Self::TooLarge(_) => "ImageTooLarge",
            Self::Blocked(_) => "DestinationNotAllowed",
            Self::TooManyRedirects(_) => "TooManyRedirects",
            Self::UnsupportedFormat(_) => "UnsupportedFormat",
            // As the decoder reports an empty image.
            Self::Empty => "CorruptImage",
            Self::InvalidUrl(_) => "DownloadFailed",
            Self::Other(_) => "DownloadFailed",
        }
    }

    fn from_egress(e: EgressError) -> Self {
        if e.is_refusal() {
            Self::Blocked(e)
        } else {
            Self::Connect(e.to_string())
        }
    }
}

/// First allocation for a body; it then grows (never past the byte limit) as data arrives.
const INITIAL_CAPACITY: usize = 256 * 1024;

#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    guard: EgressGuard,
    max_bytes: usize,
    total_timeout: Duration,
}

impl Fetcher {
    /// A fetcher whose guard applies `config.egress` and resolves with the system resolver.
    pub fn new(config: &FetchConfig) -> Result<Self, reqwest::Error> {
        Self::with_guard(config, EgressGuard::new(config.egress.clone()))
    }

    /// A fetcher using `guard` (and not `config.egress`); tests inject a resolver this way.
    pub fn with_guard(config: &FetchConfig, guard: EgressGuard) -> Result<Self, reqwest::Error> {
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("image/jpeg, image/png, image/webp, image/*;q=0.8"),
        );
        let http = guard
            .client_builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.total_timeout)
            .redirect(guard.redirect_policy(config.max_redirects))
            .referer(false)
            .default_headers(headers)
            .user_agent(concat!("kinsight-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            guard,
            max_bytes: config.max_bytes,
            total_timeout: config.total_timeout,
        })
    }

    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let url = Url::parse(url).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        self.guard
            .check_url(&url)
            .map_err(FetchError::from_egress)?;
        // The client's timeout covers the request and its body; this one bounds the call
        // whatever happens inside it.
        tokio::time::timeout(self.total_timeout, self.download(url))
            .await
            .unwrap_or(Err(FetchError::Timeout))
    }

    async fn download(&self, url: Url) -> Result<Vec<u8>, FetchError> {
        let response = self.http.get(url).send().await.map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let declared = response.content_length();
        if declared.is_some_and(|n| n > self.max_bytes as u64) {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let initial = declared.map_or(INITIAL_CAPACITY, |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
        let mut body = Vec::with_capacity(initial.min(INITIAL_CAPACITY).min(self.max_bytes));
        let mut recognised = false;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(classify)?;
            let len = body.len().saturating_add(chunk.len());
            if len > self.max_bytes {
                return Err(FetchError::TooLarge(self.max_bytes));
            }
            if len > body.capacity() {
                // Grow geometrically, but never past the limit.
                let target = len
                    .max(body.capacity().saturating_mul(2))
                    .min(self.max_bytes);
                body.reserve_exact(target - body.len());
            }
            body.extend_from_slice(&chunk);
            if !recognised {
                match sniff(&body) {
                    Sniff::Image => recognised = true,
                    Sniff::NeedMore => {}
                    Sniff::NotImage => return Err(unsupported(&body, content_type.as_deref())),
                }
            }
        }
        if body.is_empty() {
            return Err(FetchError::Empty);
        }
        if !recognised {
            return Err(unsupported(&body, content_type.as_deref()));
        }
        Ok(body)
    }
}

fn classify(e: reqwest::Error) -> FetchError {
    if let Some(egress) = find_cause::<EgressError>(&e) {
        return FetchError::from_egress(egress.clone());
    }
    if let Some(too_many) = find_cause::<TooManyRedirects>(&e) {
        return FetchError::TooManyRedirects(*too_many);
    }
    // Image URLs are often signed (a token in the query): failure texts reach the
    // customer's results and webhooks, so they never repeat the URL.
    let e = e.without_url();
    if e.is_timeout() {
        FetchError::Timeout
    } else if e.is_connect() {
        FetchError::Connect(with_causes(&e))
    } else {
        FetchError::Other(with_causes(&e))
    }
}

/// `error: cause: cause`, as reqwest's own message leaves the causes out.
fn with_causes(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[derive(Debug, PartialEq, Eq)]
enum Sniff {
    Image,
    NotImage,
    NeedMore,
}

/// Magic bytes of the accepted formats; `None` matches any byte.
const SIGNATURES: [&[Option<u8>]; 3] = [
    // JPEG: SOI and the first marker.
    &[Some(0xFF), Some(0xD8), Some(0xFF)],
    // PNG.
    &[Some(0x89), Some(b'P'), Some(b'N'), Some(b'G')],
    // WebP: RIFF, the chunk size, WEBP.
    &[
        Some(b'R'),
        Some(b'I'),
        Some(b'F'),
        Some(b'F'),
        None,
        None,
        None,
        None,
        Some(b'W'),
        Some(b'E'),
        Some(b'B'),
        Some(b'P'),
    ],
];

/// Whether `head` (the first bytes received) starts like a JPEG, PNG or WebP.
fn sniff(head: &[u8]) -> Sniff {
    let mut could_be = false;
    for signature in SIGNATURES {
        let matches = signature
            .iter()
            .zip(head)
            .all(|(expected, byte)| expected.is_none_or(|e| e == *byte));
        if matches {
            if head.len() >= signature.len() {
                return Sniff::Image;
            }
            could_be = true;
        }
    }
    if could_be {
        Sniff::NeedMore
    } else {
        Sniff::NotImage
    }
}

/// What a refused body looks like, for the failure message.
fn describe_data(head: &[u8]) -> &'static str {
    let text = head.trim_ascii_start();
    if head.starts_with(b"GIF8") {
        "GIF"
    } else if head.starts_with(b"BM") {
        "BMP"
    } else if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        "TIFF"
    } else if head.get(4..8) == Some(b"ftyp") {
        "ISO media (HEIC, AVIF or video)"
    } else if head.starts_with(b"%PDF") {
        "PDF"
    } else if head.starts_with(&[0, 0, 1, 0]) {
        "ICO"
    } else if text.starts_with(b"<") || text.starts_with(b"\xEF\xBB\xBF<") {
        "HTML or XML text"
    } else if text.starts_with(b"{") || text.starts_with(b"[") {
        "JSON text"
    } else if head.len() < 12 {
        "too short to be an image"
    } else {
        "unrecognised data"
    }
}

fn unsupported(head: &[u8], content_type: Option<&str>) -> FetchError {
    let what = describe_data(head);
    let served_as = content_type.map(|t| t.chars().take(100).collect::<String>());
    FetchError::UnsupportedFormat(match served_as {
        Some(t) => format!("{what}, served as {t}"),
        None => what.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_accepted_formats_from_their_first_bytes() {
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0\x00\x10JFIF"), Sniff::Image);
        assert_eq!(sniff(b"\xFF\xD8\xFF"), Sniff::Image);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), Sniff::Image);
        assert_eq!(sniff(b"RIFF\x24\0\0\0WEBPVP8L"), Sniff::Image);
        // Partial signatures wait for more data.
        for partial in [
            &b""[..],
            b"\xFF",
            b"\xFF\xD8",
            b"\x89",
            b"\x89PN",
            b"RIFF",
            b"RIFF\0\0\0\0WEB",
        ] {
            assert_eq!(sniff(partial), Sniff::NeedMore, "{partial:?}");
        }
        for other in [
            &b"GIF89a"[..],
            b"<!doctype html>",
            b"RIFF\0\0\0\0WAVEfmt ",
            b"\xFF\xD9",
            b"\x89PNx",
            b"BM\0\0",
            b"{\"a\":1}",
            b" ",
        ] {
            assert_eq!(sniff(other), Sniff::NotImage, "{other:?}");
        }
    }

    #[test]
    fn refusals_say_what_the_data_looked_like() {
        let err = unsupported(b"<html><body>hi", Some("image/jpeg"));
        assert_eq!(
            err.to_string(),
            "not a JPEG, PNG or WebP image: HTML or XML text, served as image/jpeg"
        );
        assert_eq!(err.reason(), "UnsupportedFormat");
        assert_eq!(
            unsupported(b"GIF89a....", None).to_string(),
            "not a JPEG, PNG or WebP image: GIF"
        );
        assert_eq!(describe_data(b"\xFF\xD8"), "too short to be an image");
        assert_eq!(
            describe_data(b"\0\0\0\x20ftypavif"),
            "ISO media (HEIC, AVIF or video)"
        );
    }

    #[test]
    fn reasons_are_stable() {
        use std::net::{IpAddr, Ipv4Addr};
        let blocked = EgressError::BlockedAddress {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            reason: crate::net::BlockReason::Private,
        };
        let cases = [
            (FetchError::Timeout, "DownloadTimeout"),
            (FetchError::Connect(String::new()), "DownloadFailed"),
            (FetchError::Status(404), "DownloadHttpError"),
            (FetchError::TooLarge(1), "ImageTooLarge"),
            (FetchError::from_egress(blocked), "DestinationNotAllowed"),
            (
                FetchError::TooManyRedirects(TooManyRedirects { max: 5 }),
                "TooManyRedirects",
            ),
            (
                FetchError::UnsupportedFormat(String::new()),
                "UnsupportedFormat",
            ),
            (FetchError::Empty, "CorruptImage"),
            (FetchError::InvalidUrl(String::new()), "DownloadFailed"),
            (FetchError::Other(String::new()), "DownloadFailed"),
        ];
        for (error, reason) in cases {
            assert_eq!(error.reason(), reason, "{error:?}");
        }
        // A name that does not resolve is a download failure, not a refusal.
        let unresolved = EgressError::Resolve {
            host: "x.test".into(),
            message: "no such host".into(),
        };
        assert_eq!(
            FetchError::from_egress(unresolved).reason(),
            "DownloadFailed"
        );
    }
}
