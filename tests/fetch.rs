//! The worker's downloader against servers on 127.0.0.1: the egress guard (IP literals,
//! resolved names, every redirect hop), redirect limits, timeouts, the byte limit and
//! content sniffing. Names are resolved by injected resolvers; no test sends a packet to
//! anything but loopback (a refusal that must happen before connecting to another address
//! is first checked on the guard alone, so a broken guard fails the test before any request).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
mod common;

use common::bad_bodies::{endless_body, slow_body};
use kinsight::net::{BlockReason, EgressError, EgressGuard, EgressPolicy, StaticResolver};
use kinsight::worker::{FetchConfig, FetchError, Fetcher};

/// Every test is bounded by this, whatever the fetcher does.
const TEST_LIMIT: Duration = Duration::from_secs(20);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("IP")
}

fn png_1x1() -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 10]))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encode");
    out
}

fn image_response(content_type: &'static str, body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn serve() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let port = addr.port();
    let app =
        Router::new()
            .route(
                "/ok.png",
                get(|| async { image_response("image/png", png_1x1()) }),
            )
            .route(
                "/ok-as-text.png",
                get(|| async { image_response("text/plain", png_1x1()) }),
            )
            .route(
                "/page.jpg",
                get(|| async {
                    image_response(
                        "image/jpeg",
                        b"<!DOCTYPE html><html><body>Not found</body></html>".to_vec(),
                    )
                }),
            )
            .route(
                "/anim.gif",
                get(|| async {
                    image_response("image/gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec())
                }),
            )
            .route(
                "/empty.png",
                get(|| async { image_response("image/png", Vec::new()) }),
            )
            .route(
                "/short.jpg",
                get(|| async { image_response("image/jpeg", b"\xFF\xD8".to_vec()) }),
            )
            .route("/missing.png", get(|| async { StatusCode::NOT_FOUND }))
            .route(
                "/slow.jpg",
                get(|| async { ([(header::CONTENT_TYPE, "image/jpeg")], slow_body()) }),
            )
            .route(
                "/endless.png",
                get(|| async { ([(header::CONTENT_TYPE, "image/png")], endless_body()) }),
            )
            .route(
                "/declared-huge.png",
                get(|| async {
                    (
                        [
                            (header::CONTENT_TYPE, "image/png"),
                            (header::CONTENT_LENGTH, "5000000000"),
                        ],
                        endless_body(),
                    )
                }),
            )
            .route("/loop", get(|| async { Redirect::temporary("/loop") }))
            .route(
                "/hops/{n}",
                get(|Path(n): Path<u32>| async move {
                    if n == 0 {
                        Redirect::temporary("/ok.png")
                    } else {
                        Redirect::temporary(&format!("/hops/{}", n - 1))
                    }
                }),
            )
            .route(
                "/to-private",
                get(|| async { Redirect::temporary("http://10.0.0.1/x.png") }),
            )
            .route(
                "/to-metadata",
                get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }),
            )
            .route(
                "/to-mapped",
                get(|| async { Redirect::temporary("http://[::ffff:192.168.0.1]/x.png") }),
            )
            .route(
                "/to-file",
                get(|| async { Redirect::temporary("file:///etc/passwd") }),
            )
            .route(
                "/to-evil",
                get(move || async move {
                    Redirect::temporary(&format!("http://evil.test:{port}/ok.png"))
                }),
            )
            .route(
                "/to-good-name",
                get(move || async move {
                    Redirect::temporary(&format!("http://good.test:{port}/ok.png"))
                }),
            )
            .layer(axum::middleware::from_fn(
                move |request, next: axum::middleware::Next| {
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        next.run(request).await
                    }
                },
            ));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { addr, hits }
}

fn config(egress: EgressPolicy) -> FetchConfig {
    FetchConfig {
        connect_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(1),
        max_bytes: 1024 * 1024,
        max_redirects: 3,
        egress,
    }
}

fn resolver() -> Arc<StaticResolver> {
    Arc::new(
        StaticResolver::new()
            .with("evil.test", [ip("10.0.0.1")])
            .with(
                "metadata.test",
                [ip("169.254.169.254"), ip("fd00:ec2::254")],
            )
            .with("good.test", [ip("127.0.0.1")])
            .with(
                "mixed.test",
                [ip("169.254.169.254"), ip("10.1.2.3"), ip("127.0.0.1")],
            ),
    )
}

fn guard(egress: EgressPolicy) -> EgressGuard {
    kinsight::install_crypto_provider();
    EgressGuard::with_resolver(egress, resolver())
}

fn fetcher_with(config: &FetchConfig, guard: EgressGuard) -> Fetcher {
    Fetcher::with_guard(config, guard).expect("fetcher")
}

/// A fetcher allowing loopback (the test servers), names resolved by [`resolver`].
fn loopback_fetcher() -> (Fetcher, EgressGuard) {
    let guard = guard(EgressPolicy::allow_loopback());
    (
        fetcher_with(&config(EgressPolicy::allow_loopback()), guard.clone()),
        guard,
    )
}

async fn fetch(fetcher: &Fetcher, url: &str) -> Result<Vec<u8>, FetchError> {
    tokio::time::timeout(TEST_LIMIT, fetcher.fetch(url))
        .await
        .expect("the fetcher returns in time")
}

fn assert_reason(result: Result<Vec<u8>, FetchError>, reason: &str) -> FetchError {
    match result {
        Ok(bytes) => panic!("expected {reason}, got {} bytes", bytes.len()),
        Err(e) => {
            assert_eq!(e.reason(), reason, "{e}");
            e
        }
    }
}

#[tokio::test]
async fn fetches_a_small_png_whatever_its_content_type() {
    let server = serve().await;
    let (fetcher, _) = loopback_fetcher();
    assert_eq!(
        fetch(&fetcher, &server.url("/ok.png")).await.expect("ok"),
        png_1x1()
    );
    assert_eq!(
        fetch(&fetcher, &server.url("/ok-as-text.png"))
            .await
            .expect("ok"),
        png_1x1()
    );
    // Names resolve through the guard.
    let url = format!("http://good.test:{}/ok.png", server.addr.port());
    assert_eq!(fetch(&fetcher, &url).await.expect("ok"), png_1x1());
}

#[tokio::test]
async fn loopback_is_refused_by_default_without_a_request() {
    let server = serve().await;
    // Production policy: loopback (where the test server is) is not allowed.
    let fetcher = fetcher_with(
        &config(EgressPolicy::default()),
        guard(EgressPolicy::default()),
    );
    let port = server.addr.port();
    for url in [
        server.url("/ok.png"),
        format!("http://[::ffff:127.0.0.1]:{port}/ok.png"),
        format!("http://2130706433:{port}/ok.png"),
        format!("http://0.0.0.0:{port}/ok.png"),
        format!("http://good.test:{port}/ok.png"),
    ] {
        let err = assert_reason(fetch(&fetcher, &url).await, "DestinationNotAllowed");
        assert!(matches!(err, FetchError::Blocked(_)), "{url}: {err:?}");
    }
    let err = assert_reason(
        fetch(&fetcher, &server.url("/ok.png")).await,
        "DestinationNotAllowed",
    );
    assert_eq!(
        err.to_string(),
        "destination not allowed: address 127.0.0.1 is not allowed (loopback)"
    );
    let err = assert_reason(
        fetch(&fetcher, &format!("http://good.test:{port}/ok.png")).await,
        "DestinationNotAllowed",
    );
    assert_eq!(
        err.to_string(),
        "destination not allowed: host good.test resolves to an address that is not allowed (loopback)"
    );
    assert_eq!(server.hits(), 0, "a refused request reached the server");
    // The testbed's policy lets the same request through.
    let (fetcher, _) = loopback_fetcher();
    assert_eq!(
        fetch(&fetcher, &server.url("/ok.png")).await.expect("ok"),
        png_1x1()
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn names_resolving_to_private_addresses_are_refused_before_connecting() {
    let (fetcher, guard) = loopback_fetcher();
    // The guard alone refuses first: a broken guard fails here, before any request.
    let refusal = guard
        .resolve("evil.test")
        .await
        .expect_err("evil.test is refused");
    assert_eq!(
        refusal.to_string(),
        "host evil.test resolves to an address that is not allowed (private network)"
    );
    assert!(guard.resolve("metadata.test").await.is_err());

    let err = assert_reason(
        fetch(&fetcher, "http://evil.test/x.png").await,
        "DestinationNotAllowed",
    );
    match err {
        // The resolver's verdict is the error: the connector never got an address.
        FetchError::Blocked(EgressError::Blocked { host, addr, reason }) => {
            assert_eq!(
                (host.as_str(), addr, reason),
                ("evil.test", ip("10.0.0.1"), BlockReason::Private)
            );
        }
        other => panic!("{other:?}"),
    }
    let err = assert_reason(
        fetch(&fetcher, "http://metadata.test/latest").await,
        "DestinationNotAllowed",
    );
    assert!(
        matches!(
            err,
            FetchError::Blocked(EgressError::Blocked {
                reason: BlockReason::CloudMetadata,
                ..
            })
        ),
        "{err:?}"
    );
    // An unknown name is a download failure, not a refusal.
    assert_reason(
        fetch(&fetcher, "http://nowhere.test/x.png").await,
        "DownloadFailed",
    );
}

#[tokio::test]
async fn only_allowed_addresses_of_a_name_are_used() {
    let server = serve().await;
    let (fetcher, guard) = loopback_fetcher();
    assert_eq!(
        guard.resolve("mixed.test").await.expect("resolves"),
        vec![ip("127.0.0.1")]
    );
    let url = format!("http://mixed.test:{}/ok.png", server.addr.port());
    assert_eq!(fetch(&fetcher, &url).await.expect("ok"), png_1x1());
}

#[tokio::test]
async fn every_redirect_target_is_checked() {
    let server = serve().await;
    let (fetcher, guard) = loopback_fetcher();
    // The guard alone refuses each target first (no packet may leave loopback).
    for target in [
        "http://10.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:192.168.0.1]/x.png",
    ] {
        assert!(
            guard.check_url(&target.parse().expect("url")).is_err(),
            "{target}"
        );
    }
    assert!(guard.resolve("evil.test").await.is_err());

    for (path, expected) in [
        (
            "/to-private",
            "address 10.0.0.1 is not allowed (private network)",
        ),
        (
            "/to-metadata",
            "address 169.254.169.254 is not allowed (cloud metadata endpoint)",
        ),
        (
            "/to-mapped",
            "address ::ffff:192.168.0.1 is not allowed (private network)",
        ),
        (
            "/to-evil",
            "host evil.test resolves to an address that is not allowed (private network)",
        ),
    ] {
        let err = assert_reason(
            fetch(&fetcher, &server.url(path)).await,
            "DestinationNotAllowed",
        );
        match &err {
            FetchError::Blocked(e) => assert_eq!(e.to_string(), expected, "{path}"),
            other => panic!("{path}: {other:?}"),
        }
    }
    // A Location that is not an http(s) URL is not followed: the redirect is the answer.
    assert_reason(
        fetch(&fetcher, &server.url("/to-file")).await,
        "DownloadHttpError",
    );
    // A redirect to an allowed name is followed.
    assert_eq!(
        fetch(&fetcher, &server.url("/to-good-name"))
            .await
            .expect("ok"),
        png_1x1()
    );
}

#[tokio::test]
async fn redirects_are_bounded() {
    let server = serve().await;
    let (fetcher, _) = loopback_fetcher();
    // max_redirects is 3.
    assert_eq!(
        fetch(&fetcher, &server.url("/hops/2"))
            .await
            .expect("3 redirects"),
        png_1x1()
    );
    let err = assert_reason(
        fetch(&fetcher, &server.url("/hops/3")).await,
        "TooManyRedirects",
    );
    assert_eq!(err.to_string(), "more than 3 redirects");
    let hits = server.hits();
    let started = Instant::now();
    assert_reason(
        fetch(&fetcher, &server.url("/loop")).await,
        "TooManyRedirects",
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.hits() - hits, 4, "the first request and 3 redirects");

    let no_redirects = fetcher_with(
        &FetchConfig {
            max_redirects: 0,
            ..config(EgressPolicy::allow_loopback())
        },
        guard(EgressPolicy::allow_loopback()),
    );
    assert_reason(
        fetch(&no_redirects, &server.url("/hops/0")).await,
        "TooManyRedirects",
    );
}

#[tokio::test]
async fn a_slow_body_stops_at_the_total_timeout() {
    let server = serve().await;
    let (fetcher, _) = loopback_fetcher();
    let started = Instant::now();
    let err = assert_reason(
        fetch(&fetcher, &server.url("/slow.jpg")).await,
        "DownloadTimeout",
    );
    assert!(matches!(err, FetchError::Timeout));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    // Accepts connections and reads nothing, answers nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let (fetcher, _) = loopback_fetcher();
    let started = Instant::now();
    assert_reason(
        fetch(&fetcher, &format!("http://{addr}/x.png")).await,
        "DownloadTimeout",
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_closed_port_is_a_download_failure() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let (fetcher, _) = loopback_fetcher();
    let err = assert_reason(
        fetch(&fetcher, &format!("http://{addr}/x.png")).await,
        "DownloadFailed",
    );
    assert!(matches!(err, FetchError::Connect(_)), "{err:?}");
}

#[tokio::test]
async fn failure_texts_never_repeat_a_signed_url() {
    // A server that answers with something that is not HTTP, so the request fails after
    // connecting, in the error reqwest describes with its URL.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = socket.write_all(b"this is not HTTP\r\n\r\n").await;
        }
    });
    let (fetcher, _) = loopback_fetcher();
    let url = format!("http://user:hunter2@{addr}/photo.png?X-Amz-Signature=s3cr3t");
    let err = fetch(&fetcher, &url).await.expect_err("not HTTP");
    let text = err.to_string();
    assert!(
        !text.contains("s3cr3t") && !text.contains("hunter2") && !text.contains("photo.png"),
        "{text}"
    );
    assert!(
        text.starts_with("download failed: error sending request"),
        "{text}"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_cut_off() {
    let server = serve().await;
    let (fetcher, _) = loopback_fetcher();
    let started = Instant::now();
    let err = assert_reason(
        fetch(&fetcher, &server.url("/endless.png")).await,
        "ImageTooLarge",
    );
    assert_eq!(err.to_string(), "image is larger than 1048576 bytes");
    assert!(started.elapsed() < Duration::from_secs(1));
    // A declared length over the limit is refused before reading.
    assert_reason(
        fetch(&fetcher, &server.url("/declared-huge.png")).await,
        "ImageTooLarge",
    );
}

#[tokio::test]
async fn non_images_are_refused_by_their_bytes() {
    let server = serve().await;
    let (fetcher, _) = loopback_fetcher();
    let err = assert_reason(
        fetch(&fetcher, &server.url("/page.jpg")).await,
        "UnsupportedFormat",
    );
    assert_eq!(
        err.to_string(),
        "not a JPEG, PNG or WebP image: HTML or XML text, served as image/jpeg"
    );
    let err = assert_reason(
        fetch(&fetcher, &server.url("/anim.gif")).await,
        "UnsupportedFormat",
    );
    assert_eq!(
        err.to_string(),
        "not a JPEG, PNG or WebP image: GIF, served as image/gif"
    );
    assert_reason(
        fetch(&fetcher, &server.url("/short.jpg")).await,
        "UnsupportedFormat",
    );
    let err = assert_reason(
        fetch(&fetcher, &server.url("/empty.png")).await,
        "CorruptImage",
    );
    assert!(matches!(err, FetchError::Empty), "{err:?}");
    assert_reason(
        fetch(&fetcher, &server.url("/missing.png")).await,
        "DownloadHttpError",
    );
}

#[tokio::test]
async fn invalid_urls_and_schemes_fail_without_a_request() {
    // A server the refused URLs point at (loopback is allowed): it must see no request.
    let server = serve().await;
    let port = server.addr.port();
    let (fetcher, _) = loopback_fetcher();
    let err = assert_reason(fetch(&fetcher, "not a url").await, "DownloadFailed");
    assert!(matches!(err, FetchError::InvalidUrl(_)), "{err:?}");
    let err = assert_reason(
        fetch(&fetcher, &format!("http://127.0.0.1:{port}:{port}/ok.png")).await,
        "DownloadFailed",
    );
    assert!(matches!(err, FetchError::InvalidUrl(_)), "{err:?}");
    assert_reason(
        fetch(&fetcher, "file:///etc/passwd").await,
        "DestinationNotAllowed",
    );
    assert_reason(
        fetch(&fetcher, &format!("ftp://127.0.0.1:{port}/ok.png")).await,
        "DestinationNotAllowed",
    );
    assert_eq!(server.hits(), 0, "a refused URL reached the server");
    // The same server answers a valid URL, so the count above would have seen a request.
    assert_eq!(
        fetch(&fetcher, &server.url("/ok.png")).await.expect("ok"),
        png_1x1()
    );
    assert_eq!(server.hits(), 1);
}
