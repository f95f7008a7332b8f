//! Response bodies that misbehave, for the download tests.

use std::time::Duration;

use axum::body::{Body, Bytes};
use futures::StreamExt;

/// The JPEG signature, then 1 byte every 100 ms for a minute.
pub fn slow_body() -> Body {
    let head = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
        b"\xFF\xD8\xFF\xE0",
    ))]);
    let drip = futures::stream::unfold(0u32, |n| async move {
        if n >= 600 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok(Bytes::from_static(b"\0")), n + 1))
    });
    Body::from_stream(head.chain(drip))
}

/// A PNG signature, then zeros forever (no Content-Length).
pub fn endless_body() -> Body {
    let head = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
        b"\x89PNG\r\n\x1a\n",
    ))]);
    let zeros = futures::stream::repeat_with(|| Ok(Bytes::from(vec![0u8; 64 * 1024])));
    Body::from_stream(head.chain(zeros))
}
