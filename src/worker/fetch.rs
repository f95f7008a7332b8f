//! Downloading one image: connect and total timeouts, a byte limit enforced while
//! streaming (the Content-Length is not trusted), and a bounded number of redirects.

use std::time::Duration;

use futures::StreamExt;

#[derive(Clone, Debug)]
pub struct FetchConfig {
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    pub max_bytes: usize,
    pub max_redirects: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(30),
            max_bytes: 20 * 1024 * 1024,
            max_redirects: 5,
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
            Self::Other(_) => "DownloadFailed",
        }
    }
}

#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    max_bytes: usize,
}

impl Fetcher {
    pub fn new(config: &FetchConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.total_timeout)
            .redirect(reqwest::redirect::Policy::limited(config.max_redirects))
            .user_agent(concat!("kinsight-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            max_bytes: config.max_bytes,
        })
    }

    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let response = self.http.get(url).send().await.map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(classify)?;
            if body.len() + chunk.len() > self.max_bytes {
                return Err(FetchError::TooLarge(self.max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn classify(e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout
    } else if e.is_connect() {
        FetchError::Connect(e.to_string())
    } else {
        FetchError::Other(e.to_string())
    }
}
