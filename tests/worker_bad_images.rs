//! A corpus of bad images, made here, served from 127.0.0.1 and taken through what the
//! worker does with each image before inference: fetch (guard, limits, sniffing), then
//! decode. Each bad image fails alone, with the reason the worker records; the good ones
//! beside them still succeed; the process's peak memory stays bounded on a decompression
//! bomb and an endless body. (`worker::run` needs a result store in Kubernetes: the whole
//! worker runs in the e2e suite.)

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use futures::StreamExt;
use image::ImageEncoder;
mod common;

use common::bad_bodies::{endless_body, slow_body};
use kinsight::inference::{DecodeLimits, decode_image};
use kinsight::net::EgressPolicy;
use kinsight::worker::{FetchConfig, Fetcher, failure_reason};

const TEST_LIMIT: Duration = Duration::from_secs(30);

fn gradient(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([x as u8, y as u8, (x * y) as u8])
    })
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = gradient(width, height);
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            image.as_raw(),
            width,
            height,
            image::ExtendedColorType::Rgb8,
        )
        .expect("png");
    out
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = gradient(width, height);
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(
            image.as_raw(),
            width,
            height,
            image::ExtendedColorType::Rgb8,
        )
        .expect("jpeg");
    out
}

fn webp(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbaImage::from_pixel(width, height, image::Rgba([1, 2, 3, 255]));
    let mut out = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut out)
        .write_image(
            image.as_raw(),
            width,
            height,
            image::ExtendedColorType::Rgba8,
        )
        .expect("webp");
    out
}

/// CRC-32 (IEEE) as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A small PNG whose valid (CRC-correct) header announces `width` x `height`.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = png(4, 4);
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// A zlib stream of `n` zero bytes, `n - 1` a multiple of 258, written by hand with
/// deflate's fixed Huffman codes (RFC 1951 3.2.6): one literal 0, then "copy 258 bytes
/// from 1 back" until done, about 160:1.
fn zlib_zeros(n: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        bit: u32,
    }
    impl Bits {
        /// A Huffman code: its most significant bit goes first.
        fn code(&mut self, code: u32, len: u32) {
            for i in (0..len).rev() {
                if self.bit == 0 {
                    self.out.push(0);
                }
                let last = self.out.len() - 1;
                self.out[last] |= (((code >> i) & 1) as u8) << self.bit;
                self.bit = (self.bit + 1) % 8;
            }
        }
    }
    let mut bits = Bits {
        out: vec![0x78, 0x01],
        bit: 0,
    };
    bits.code(0b110, 3); // in stream order: BFINAL = 1, then BTYPE = 01 (fixed) low bit first
    bits.code(0x30, 8); // literal 0
    for _ in 0..(n - 1) / 258 {
        bits.code(0xC5, 8); // length code 285: 258 bytes
        bits.code(0, 5); // distance code 0: 1 back
    }
    bits.code(0, 7); // end of block
    let mut out = bits.out;
    // Adler-32 of zeros: a stays 1, b grows by 1 per byte.
    let adler = (((n % 65521) as u32) << 16) | 1;
    out.extend_from_slice(&adler.to_be_bytes());
    out
}

/// A 4x4 PNG with a colour-profile (iCCP) chunk of about 1.7 MB that inflates to 256 MiB.
fn png_with_profile_bomb() -> Vec<u8> {
    let bytes = png(4, 4);
    let mut data = b"bomb\0\0".to_vec(); // profile name, then compression method 0
    data.extend(zlib_zeros(1 + 258 * ((256 << 20) / 258)));
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"iCCP");
    chunk.extend_from_slice(&data);
    let crc = crc32(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    // Right after the signature (8 bytes) and IHDR (25): before the image data.
    let mut out = bytes[..33].to_vec();
    out.extend(chunk);
    out.extend_from_slice(&bytes[33..]);
    out
}

/// A JPEG cut inside its header (quantization and Huffman tables): no decoder can fill that in.
fn truncated_jpeg() -> Vec<u8> {
    let mut bytes = jpeg(64, 64);
    bytes.truncate(120);
    bytes
}

fn truncated_png() -> Vec<u8> {
    let mut bytes = png(64, 64);
    bytes.truncate(bytes.len() / 2);
    bytes
}

/// A WebP shorter than its RIFF header announces (a partial download).
fn truncated_webp() -> Vec<u8> {
    let mut bytes = webp(64, 64);
    bytes.truncate(bytes.len() - 4);
    bytes
}

/// A PNG of full length whose pixel data was damaged (its checksum no longer matches).
fn corrupt_png() -> Vec<u8> {
    let mut bytes = png(64, 64);
    let middle = bytes.len() / 2;
    bytes[middle..middle + 16].fill(0x5A);
    bytes
}

fn wrong_magic_png() -> Vec<u8> {
    let mut bytes = png(8, 8);
    bytes[0] = 0x88;
    bytes
}

fn respond(content_type: &'static str, body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn serve_corpus() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new()
        .route("/ok-1x1.png", get(|| async { respond("image/png", png(1, 1)) }))
        .route("/ok.jpg", get(|| async { respond("image/jpeg", jpeg(16, 8)) }))
        .route("/ok.webp", get(|| async { respond("image/webp", webp(3, 2)) }))
        .route("/truncated.png", get(|| async { respond("image/png", truncated_png()) }))
        .route("/truncated.jpg", get(|| async { respond("image/jpeg", truncated_jpeg()) }))
        .route("/truncated.webp", get(|| async { respond("image/webp", truncated_webp()) }))
        .route("/corrupt.png", get(|| async { respond("image/png", corrupt_png()) }))
        .route("/wrong-magic.png", get(|| async { respond("image/png", wrong_magic_png()) }))
        .route("/empty.png", get(|| async { respond("image/png", Vec::new()) }))
        .route("/bomb.png", get(|| async { respond("image/png", png_claiming(30_000, 30_000)) }))
        .route("/profile-bomb.png", get(|| async { respond("image/png", png_with_profile_bomb()) }))
        .route("/zero-width.png", get(|| async { respond("image/png", png_claiming(0, 10)) }))
        .route("/anim.gif", get(|| async { respond("image/gif", b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;".to_vec()) }))
        .route("/page.jpg", get(|| async { respond("image/jpeg", b"<!doctype html><title>Login</title><form>...</form>".to_vec()) }))
        .route("/missing.png", get(|| async { StatusCode::NOT_FOUND }))
        .route("/loop.png", get(|| async { Redirect::temporary("/loop.png") }))
        .route("/to-metadata.png", get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }))
        .route("/slow.jpg", get(|| async { ([(header::CONTENT_TYPE, "image/jpeg")], slow_body()) }))
        .route("/endless.png", get(|| async { ([(header::CONTENT_TYPE, "image/png")], endless_body()) }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Fetch, then decode off the async threads: the worker's steps before inference.
async fn process(fetcher: &Fetcher, url: &str) -> Result<(u32, u32), (&'static str, String)> {
    let fetched = tokio::time::timeout(TEST_LIMIT, fetcher.fetch(url))
        .await
        .expect("the fetcher returns in time");
    let bytes = fetched.map_err(|e| (e.reason(), e.to_string()))?;
    let decoded =
        tokio::task::spawn_blocking(move || decode_image(&bytes, &DecodeLimits::default()))
            .await
            .expect("decode thread");
    let image = decoded.map_err(|e| (failure_reason(&e), e.to_string()))?;
    Ok((image.width(), image.height()))
}

fn test_config() -> FetchConfig {
    FetchConfig {
        connect_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(1),
        max_bytes: 1024 * 1024,
        max_redirects: 3,
        egress: EgressPolicy::allow_loopback(),
    }
}

fn fetcher(config: &FetchConfig) -> Fetcher {
    kinsight::install_crypto_provider();
    Fetcher::new(config).expect("fetcher")
}

/// Expected outcome of one corpus entry: the decoded size, or the worker's failure reason.
type Expected = Result<(u32, u32), &'static str>;

/// Path and expected outcome.
fn corpus() -> Vec<(&'static str, Expected)> {
    vec![
        ("/ok-1x1.png", Ok((1, 1))),
        ("/ok.jpg", Ok((16, 8))),
        ("/ok.webp", Ok((3, 2))),
        ("/truncated.png", Err("ImageTruncated")),
        ("/truncated.jpg", Err("ImageTruncated")),
        ("/truncated.webp", Err("ImageTruncated")),
        ("/corrupt.png", Err("CorruptImage")),
        ("/wrong-magic.png", Err("UnsupportedFormat")),
        ("/empty.png", Err("CorruptImage")),
        ("/bomb.png", Err("ImageTooLarge")),
        ("/zero-width.png", Err("CorruptImage")),
        ("/anim.gif", Err("UnsupportedFormat")),
        ("/page.jpg", Err("UnsupportedFormat")),
        ("/missing.png", Err("DownloadHttpError")),
        ("/loop.png", Err("TooManyRedirects")),
        ("/to-metadata.png", Err("DestinationNotAllowed")),
        ("/slow.jpg", Err("DownloadTimeout")),
        ("/endless.png", Err("ImageTooLarge")),
    ]
}

#[tokio::test]
async fn each_bad_image_fails_alone_with_its_reason() {
    let addr = serve_corpus().await;
    let fetcher = fetcher(&test_config());
    let mut wrong = Vec::new();
    for (path, expected) in corpus() {
        let got = process(&fetcher, &format!("http://{addr}{path}")).await;
        let outcome = got
            .as_ref()
            .map(|size| *size)
            .map_err(|(reason, _)| *reason);
        if outcome != expected {
            wrong.push(format!("{path}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test]
async fn good_images_succeed_between_bad_ones() {
    let addr = serve_corpus().await;
    let fetcher = fetcher(&test_config());
    // As the worker does: several downloads in flight, results in order.
    let cases = corpus();
    let results: Vec<_> =
        futures::stream::iter(cases.iter().map(|(path, _)| format!("http://{addr}{path}")))
            .map(|url| {
                let fetcher = fetcher.clone();
                async move { process(&fetcher, &url).await }
            })
            .buffered(4)
            .collect()
            .await;
    for ((path, expected), got) in cases.iter().zip(&results) {
        let outcome = got
            .as_ref()
            .map(|size| *size)
            .map_err(|(reason, _)| *reason);
        assert_eq!(&outcome, expected, "{path}: {got:?}");
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
}

#[tokio::test]
async fn failure_messages_explain_themselves() {
    let addr = serve_corpus().await;
    let fetcher = fetcher(&test_config());
    let message = |path: &'static str| {
        let fetcher = fetcher.clone();
        async move {
            match process(&fetcher, &format!("http://{addr}{path}")).await {
                Err((_, message)) => message,
                Ok(size) => panic!("{path} decoded as {size:?}"),
            }
        }
    };
    assert_eq!(
        message("/page.jpg").await,
        "not a JPEG, PNG or WebP image: HTML or XML text, served as image/jpeg"
    );
    assert!(message("/bomb.png").await.contains("30000x30000"));
    assert_eq!(
        message("/to-metadata.png").await,
        "destination not allowed: address 169.254.169.254 is not allowed (cloud metadata endpoint)"
    );
    assert_eq!(
        message("/empty.png").await,
        "the server sent no data (0 bytes)"
    );
}

/// Peak resident memory of this process so far (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[tokio::test]
async fn memory_stays_bounded_on_a_bomb_and_an_endless_body() {
    let Some(before) = peak_rss_bytes() else {
        eprintln!("no /proc/self/status: skipped");
        return;
    };
    let addr = serve_corpus().await;
    // The production limits (20 MiB, 30 s), loopback allowed.
    let fetcher = fetcher(&FetchConfig {
        egress: EgressPolicy::allow_loopback(),
        ..FetchConfig::default()
    });
    for _ in 0..3 {
        let bomb = process(&fetcher, &format!("http://{addr}/bomb.png")).await;
        assert_eq!(bomb.map_err(|(reason, _)| reason), Err("ImageTooLarge"));
        let endless = process(&fetcher, &format!("http://{addr}/endless.png")).await;
        assert_eq!(endless.map_err(|(reason, _)| reason), Err("ImageTooLarge"));
        // The profile is too big to keep; the image itself is fine.
        let profile = process(&fetcher, &format!("http://{addr}/profile-bomb.png")).await;
        assert_eq!(profile, Ok((4, 4)));
    }
    let after = peak_rss_bytes().unwrap_or(u64::MAX);
    let growth = after.saturating_sub(before);
    // A 30000x30000 RGB image would be 2.5 GiB, the profile 256 MiB; the endless body
    // stops at 20 MiB.
    assert!(
        growth < 64 << 20,
        "peak memory grew by {} MiB",
        growth >> 20
    );
    eprintln!("peak memory growth: {} MiB", growth >> 20);
}
