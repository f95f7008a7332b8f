//! Per-key rate limits against the real control plane: the limit in a tenant's key record
//! applies (without a restart), the request past it is 429 with `Retry-After` and the IETF
//! draft's `RateLimit` headers, and a token is back a second later. (That keys have buckets of
//! their own is src/api/rate_limit.rs's unit test.)

mod common;

crate::real_node_tests!(a_key_past_its_limit_is_answered_429_with_rate_limit_headers);

use std::time::Duration;

use common::Harness;

async fn a_key_past_its_limit_is_answered_429_with_rate_limit_headers() {
    let h = Harness::start("tenant-limited").await;
    h.set_key_field(kinsight::api::RATE_LIMIT_FIELD, "3").await;
    let client = reqwest::Client::new();
    let get = || {
        client
            .get(format!("{}/v1/deliveries", h.api_url))
            .bearer_auth(&h.api_key)
            .send()
    };
    // The API's key watch picks the limit up.
    common::eventually(
        "the key's limit applies",
        Duration::from_secs(10),
        async || {
            let response = get().await.expect("GET");
            response
                .headers()
                .get("ratelimit-policy")
                .is_some_and(|v| v.as_bytes() == b"\"per-key\";q=3;w=1")
        },
    )
    .await;
    // Its bucket (3) is drained within a few requests; the next one is refused.
    let mut refused = None;
    for _ in 0..10 {
        let response = get().await.expect("GET");
        if response.status() == 429 {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
    }
    let refused = refused.expect("a request past the limit is refused");
    let header = |name: &str| {
        refused
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("retry-after").as_deref(), Some("1"));
    assert_eq!(header("ratelimit").as_deref(), Some("\"per-key\";r=0;t=1"));
    assert_eq!(
        header("ratelimit-policy").as_deref(),
        Some("\"per-key\";q=3;w=1")
    );
    assert_eq!(
        header("content-type").as_deref(),
        Some("application/problem+json")
    );
    let problem: serde_json::Value = refused.json().await.expect("problem");
    assert_eq!(problem["code"], "rate_limited");
    // A second later a token is back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get().await.expect("GET").status(), 200);
}
