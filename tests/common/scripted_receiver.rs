//! A misbehaving webhook receiver for tests: raw TCP on 127.0.0.1, so it can do what a
//! well-behaved HTTP server never would (reset connections, hang, vanish and come back).
//! Each path has a script of replies, one per attempt; past its end it answers its
//! fallback (204 unless set), which a test may change while it runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug)]
pub enum Reply {
    Status(u16),
    /// A status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// Wait this long before answering 204 (longer than the sender's timeout: a timeout).
    Hang(Duration),
    /// Reset the connection without answering.
    Reset,
    /// 200 with an endless body.
    HugeBody,
}

#[derive(Clone, Debug)]
pub struct Attempt {
    pub path: String,
    pub webhook_id: String,
    pub event: String,
    /// `data.imageId` of image events.
    pub image: Option<String>,
    pub at: tokio::time::Instant,
}

#[derive(Clone, Default)]
pub struct Scripted {
    scripts: Arc<Mutex<HashMap<String, Vec<Reply>>>>,
    fallbacks: Arc<Mutex<HashMap<String, Reply>>>,
    log: Arc<Mutex<Vec<Attempt>>>,
    /// Requests being answered now, and the most ever at once, per path.
    in_flight: Arc<Mutex<HashMap<String, (usize, usize)>>>,
}

impl Scripted {
    pub fn script(&self, path: &str, replies: Vec<Reply>) {
        if let Ok(mut s) = self.scripts.lock() {
            s.insert(path.to_owned(), replies);
        }
    }

    /// What the path answers once its script is used up.
    pub fn fallback(&self, path: &str, reply: Reply) {
        if let Ok(mut f) = self.fallbacks.lock() {
            f.insert(path.to_owned(), reply);
        }
    }

    /// The most requests to `path` that were being answered at the same time.
    pub fn max_in_flight(&self, path: &str) -> usize {
        self.in_flight
            .lock()
            .ok()
            .and_then(|m| m.get(path).map(|(_, max)| *max))
            .unwrap_or(0)
    }

    fn track(&self, path: &str, delta: isize) {
        if let Ok(mut m) = self.in_flight.lock() {
            let entry = m.entry(path.to_owned()).or_default();
            entry.0 = entry.0.saturating_add_signed(delta);
            entry.1 = entry.1.max(entry.0);
        }
    }

    pub fn attempts(&self, path: &str) -> Vec<Attempt> {
        self.log
            .lock()
            .map(|l| l.iter().filter(|a| a.path == path).cloned().collect())
            .unwrap_or_default()
    }

    /// A new receiver serving on 127.0.0.1: itself, its base URL (`http://127.0.0.1:PORT`,
    /// no trailing slash) and the server task.
    pub async fn start() -> (Scripted, String, tokio::task::JoinHandle<()>) {
        let scripted = Scripted::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let server = scripted.serve(listener);
        (scripted, base, server)
    }

    /// Serves on `listener` until the task is dropped.
    pub fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let this = this.clone();
                tokio::spawn(async move { this.handle(stream).await });
            }
        })
    }

    async fn handle(&self, mut stream: TcpStream) {
        let Some((path, headers, _body)) = read_request(&mut stream).await else {
            return;
        };
        self.track(&path, 1);
        self.answer(stream, &path, &headers, &_body).await;
    }

    async fn answer(
        &self,
        mut stream: TcpStream,
        path: &str,
        headers: &HashMap<String, String>,
        _body: &[u8],
    ) {
        let payload = serde_json::from_slice::<serde_json::Value>(_body).unwrap_or_default();
        let event = payload["type"].as_str().unwrap_or_default().to_owned();
        let image = payload["data"]["imageId"].as_str().map(str::to_owned);
        let reply = {
            let Ok(mut log) = self.log.lock() else { return };
            let n = log.iter().filter(|a| a.path == path).count();
            log.push(Attempt {
                path: path.to_owned(),
                webhook_id: headers.get("webhook-id").cloned().unwrap_or_default(),
                event,
                image,
                at: tokio::time::Instant::now(),
            });
            self.scripts
                .lock()
                .ok()
                .and_then(|s| s.get(path).and_then(|r| r.get(n).cloned()))
                .or_else(|| {
                    self.fallbacks
                        .lock()
                        .ok()
                        .and_then(|f| f.get(path).cloned())
                })
        };
        let response = match reply {
            None => status_line(204, None),
            Some(Reply::Status(302)) => {
                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            }
            Some(Reply::Status(code)) => status_line(code, None),
            Some(Reply::RetryAfter(code, secs)) => status_line(code, Some(secs)),
            Some(Reply::Hang(wait)) => {
                tokio::time::sleep(wait).await;
                status_line(204, None)
            }
            Some(Reply::Reset) => {
                self.track(path, -1);
                #[allow(deprecated)] // linger 0 sends RST at once; nothing blocks
            let _ = stream.set_linger(Some(Duration::ZERO));
                return;
            }
            Some(Reply::HugeBody) => {
                self.track(path, -1);
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
                // Up to 256 MiB, stopping as soon as the sender hangs up.
                for _ in 0..4096 {
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
                return;
            }
        };
        // Answered from here on: once the sender reads this it may send the next request,
        // possibly before this task runs again, so it no longer counts as in flight.
        self.track(path, -1);
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

fn status_line(code: u16, retry_after: Option<u64>) -> String {
    let extra = retry_after
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    format!("HTTP/1.1 {code} Scripted\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

async fn read_request(
    stream: &mut TcpStream,
) -> Option<(String, HashMap<String, String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((path, headers, body))
}

/// A listener on a port that is down (connections refused) from its first contact for
/// `down`, then back: the first connection is reset, the listener dropped, and bound again.
pub async fn flapping(
    scripted: Scripted,
    down: Duration,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = tokio::spawn(async move {
        if let Ok((stream, _)) = listener.accept().await {
            #[allow(deprecated)] // linger 0 sends RST at once; nothing blocks
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
        drop(listener);
        tokio::time::sleep(down).await;
        let again = TcpListener::bind(addr).await.expect("rebind the same port");
        let _ = scripted.serve(again).await;
    });
    (addr, handle)
}
