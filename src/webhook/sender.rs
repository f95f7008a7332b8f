//! One signed HTTP attempt. 2xx within the timeout is success; anything else, redirects
//! included (never followed), is a failure the caller may retry. Response bodies are not read
//! beyond a small limit, so a receiver cannot make the sender buffer megabytes.

use std::time::Duration;

use futures::StreamExt;

use super::signing::sign;
use crate::net::{EgressError, EgressGuard, find_cause};
use crate::trace::TraceContext;

#[derive(Clone, Debug)]
pub struct SenderConfig {
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What an endpoint adds to each request: custom headers (never the signature or content
/// headers, which are set after them) and its own timeout.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EndpointOptions {
    pub headers: Vec<(String, String)>,
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttemptOutcome {
    Delivered {
        status: u16,
    },
    /// `gone` is a 410: the receiver asks us to stop.
    Failed {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
        gone: bool,
        /// The start of what the receiver answered (at most [`RESPONSE_EXCERPT_BYTES`]),
        /// kept with the attempt to tell why it refused.
        response: Option<String>,
    },
    /// Nothing reached the receiver, for a reason of ours (the signing secret, the URL,
    /// the egress policy): a failed attempt of the event that says nothing of the
    /// endpoint's health.
    NotSent {
        error: String,
    },
}

#[derive(Clone)]
pub struct Sender {
    http: reqwest::Client,
    guard: EgressGuard,
}

const MAX_RESPONSE_BYTES: usize = 4096;
/// Bytes of a refusal's body kept with the attempt.
pub const RESPONSE_EXCERPT_BYTES: usize = 512;

impl Sender {
    /// Every attempt's destination passes `guard` (see [`crate::net`]).
    pub fn new(config: &SenderConfig, guard: EgressGuard) -> Result<Self, reqwest::Error> {
        let http = guard
            .client_builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kinsight-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, guard })
    }

    /// Signs `body` with every secret and POSTs it once.
    pub async fn attempt(
        &self,
        url: &str,
        msg_id: &str,
        body: &str,
        secrets: &[String],
    ) -> AttemptOutcome {
        self.attempt_with(
            url,
            msg_id,
            body,
            secrets,
            &EndpointOptions::default(),
            &TraceContext::default(),
        )
        .await
    }

    /// One attempt with an endpoint's own headers and timeout, and the delivery's trace
    /// context (`traceparent`, `tracestate`: they replace custom headers of those names).
    pub async fn attempt_with(
        &self,
        url: &str,
        msg_id: &str,
        body: &str,
        secrets: &[String],
        options: &EndpointOptions,
        trace: &TraceContext,
    ) -> AttemptOutcome {
        let timestamp = jiff::Timestamp::now().as_second();
        let signature = match sign(secrets, msg_id, timestamp, body) {
            Ok(s) => s,
            Err(e) => return not_sent(e.to_string()),
        };
        let url = match reqwest::Url::parse(url) {
            Ok(u) => u,
            Err(e) => return not_sent(format!("invalid URL: {e}")),
        };
        if let Err(e) = self.guard.check_url(&url) {
            return not_sent(e.to_string());
        }
        let mut request = self.http.post(url);
        let ours = [
            (crate::trace::HEADER, trace.traceparent.as_deref()),
            (crate::trace::STATE_HEADER, trace.tracestate.as_deref()),
        ];
        let replaced = |name: &str| {
            ours.iter()
                .any(|(ours, value)| value.is_some() && name.eq_ignore_ascii_case(ours))
        };
        for (name, value) in &options.headers {
            if !replaced(name) {
                request = request.header(name.as_str(), value.as_str());
            }
        }
        for (name, value) in ours {
            if let Some(value) = value {
                request = request.header(name, value);
            }
        }
        if let Some(timeout) = options.timeout {
            request = request.timeout(timeout);
        }
        let response = request
            .header("content-type", "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                // A name that resolves to a refused address: refused before connecting.
                if let Some(egress) = find_cause::<EgressError>(&e)
                    && egress.is_refusal()
                {
                    return not_sent(egress.to_string());
                }
                return AttemptOutcome::Failed {
                    status: None,
                    error: describe(e),
                    retry_after: None,
                    gone: false,
                    response: None,
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Drain a little of the body so the connection can be reused, no more; its start is
        // kept for the attempt's history.
        let mut stream = response.bytes_stream();
        let mut read = 0usize;
        let mut excerpt = Vec::new();
        while read < MAX_RESPONSE_BYTES {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    let room = RESPONSE_EXCERPT_BYTES.saturating_sub(excerpt.len());
                    excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    read += chunk.len();
                }
                _ => break,
            }
        }
        if status.is_success() {
            AttemptOutcome::Delivered {
                status: status.as_u16(),
            }
        } else {
            AttemptOutcome::Failed {
                status: Some(status.as_u16()),
                error: format!("receiver answered {status}"),
                retry_after,
                gone: status == reqwest::StatusCode::GONE,
                response: response_excerpt(&excerpt),
            }
        }
    }
}

/// What of a refusal's body is kept: its start, as text, without control characters.
fn response_excerpt(bytes: &[u8]) -> Option<String> {
    let text: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn not_sent(error: String) -> AttemptOutcome {
    AttemptOutcome::NotSent { error }
}

/// The error without the URL: it may carry a token (in its path, query or user info),
/// and this text is stored in the group's status and shown to whoever reads it.
fn describe(e: reqwest::Error) -> String {
    if let Some(egress) = find_cause::<EgressError>(&e) {
        egress.to_string()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        format!("request failed: {}", e.without_url())
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use super::*;
    use crate::net::{EgressPolicy, StaticResolver};

    /// Refusals of ours never reach a socket: the addresses are private or loopback and
    /// the public-only policy refuses them before any connection.
    #[tokio::test]
    async fn refusals_of_ours_are_not_sent_and_say_why() {
        crate::install_crypto_provider();
        let private: IpAddr = [10, 1, 2, 3].into();
        let resolver = Arc::new(StaticResolver::new().with("internal.test", [private]));
        let guard = EgressGuard::with_resolver(EgressPolicy::default(), resolver);
        let sender = Sender::new(&SenderConfig::default(), guard).expect("sender");
        let key = vec![super::super::generate_secret()];
        let cases = [
            ("http://127.0.0.1:9/hook", key.clone(), "address 127.0.0.1"),
            (
                "http://internal.test:9/hook",
                key.clone(),
                "host internal.test resolves to an address that is not allowed",
            ),
            ("not a url", key.clone(), "invalid URL"),
            (
                "http://internal.test:9/hook",
                vec!["not-a-secret".to_owned()],
                "invalid signing secret",
            ),
        ];
        for (url, secrets, expected) in cases {
            match sender.attempt(url, "msg_1", "{}", &secrets).await {
                AttemptOutcome::NotSent { error } => {
                    assert!(error.contains(expected), "{url}: {error}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    /// A refusal's answer is kept, its start only, as one line of text.
    #[tokio::test]
    async fn a_refusals_answer_is_kept_short() {
        crate::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let body = format!("quota exceeded\nfor tenant 42 {}", "x".repeat(5000));
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let body = body.clone();
                async move { (axum::http::StatusCode::TOO_MANY_REQUESTS, body) }
            }),
        );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let guard = EgressGuard::new(EgressPolicy::allow_loopback());
        let sender = Sender::new(&SenderConfig::default(), guard).expect("sender");
        let key = vec![super::super::generate_secret()];
        let outcome = sender.attempt(&url, "msg_1", "{}", &key).await;
        server.abort();
        let AttemptOutcome::Failed {
            status, response, ..
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!(status, Some(429));
        let response = response.expect("an excerpt");
        assert!(
            response.starts_with("quota exceeded for tenant 42 xxx"),
            "{response}"
        );
        assert_eq!(response.len(), RESPONSE_EXCERPT_BYTES);
        assert_eq!(response_excerpt(b" \n "), None);
    }
}
