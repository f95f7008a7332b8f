//! The guard: a DNS resolver for reqwest that drops refused addresses, the up-front URL
//! check for IP literals, and a redirect policy that checks each hop.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::Policy;

use super::policy::{BlockReason, EgressPolicy};

/// Why a request was not made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// The host name resolved only to refused addresses. The message does not name the
    /// address: it reaches customers (image failures, delivery errors), and a cluster's
    /// internal addresses are not theirs to map; `addr` is there for logs.
    #[error("host {host} resolves to an address that is not allowed ({reason})")]
    Blocked {
        host: String,
        addr: IpAddr,
        reason: BlockReason,
    },
    /// The URL names a refused address directly.
    #[error("address {addr} is not allowed ({reason})")]
    BlockedAddress { addr: IpAddr, reason: BlockReason },
    #[error("URL scheme {0:?} is not allowed (only http and https)")]
    Scheme(String),
    #[error("URL has no host")]
    NoHost,
    /// Resolution failed (no such host, resolver down): not a policy decision.
    #[error("could not resolve host {host}: {message}")]
    Resolve { host: String, message: String },
}

impl EgressError {
    /// True when the policy refused the destination; false when the name did not resolve.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Self::Resolve { .. })
    }
}

/// A redirect chain longer than allowed (loops end here too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("more than {max} redirects")]
pub struct TooManyRedirects {
    pub max: usize,
}

/// Turns a host name into addresses. [`SystemResolver`] in production; tests inject fixed
/// answers ([`StaticResolver`]) so that no query or packet leaves the machine.
pub trait HostResolver: Send + Sync {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// The operating system's resolver (`getaddrinfo` through tokio).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl HostResolver for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Fixed answers; unknown names do not resolve.
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    hosts: HashMap<String, Vec<IpAddr>>,
}

impl StaticResolver {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, host: &str, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.hosts
            .insert(host.to_ascii_lowercase(), addrs.into_iter().collect());
        self
    }
}

impl HostResolver for StaticResolver {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        let found = self
            .hosts
            .get(&host.to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"));
        Box::pin(async move { found })
    }
}

/// Checks destinations against an [`EgressPolicy`]. Cheap to clone.
#[derive(Clone)]
pub struct EgressGuard {
    policy: Arc<EgressPolicy>,
    resolver: Arc<dyn HostResolver>,
}

impl fmt::Debug for EgressGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressGuard")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl EgressGuard {
    /// A guard resolving names with the system resolver.
    pub fn new(policy: EgressPolicy) -> Self {
        Self::with_resolver(policy, Arc::new(SystemResolver))
    }

    pub fn with_resolver(policy: EgressPolicy, resolver: Arc<dyn HostResolver>) -> Self {
        Self {
            policy: Arc::new(policy),
            resolver,
        }
    }

    /// Checks what can be checked before connecting: the scheme, and the address when the
    /// host is an IP literal (the HTTP client resolves no such host, so the resolver would
    /// never see it). Host names are checked when they resolve.
    pub fn check_url(&self, url: &Url) -> Result<(), EgressError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EgressError::Scheme(url.scheme().to_owned()));
        }
        let host = url.host_str().ok_or(EgressError::NoHost)?;
        self.check_literal(host)?;
        Ok(())
    }

    /// When `host` is an IP literal (bracketed or not): the address, if the policy allows it.
    fn check_literal(&self, host: &str) -> Result<Option<IpAddr>, EgressError> {
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let Ok(addr) = literal.parse::<IpAddr>() else {
            return Ok(None);
        };
        self.policy
            .check(addr)
            .map_err(|reason| EgressError::BlockedAddress { addr, reason })?;
        Ok(Some(addr))
    }

    /// Resolves `host` and keeps the allowed addresses; fails when none is left.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, EgressError> {
        if let Some(addr) = self.check_literal(host)? {
            return Ok(vec![addr]);
        }
        let found = self
            .resolver
            .lookup(host)
            .await
            .map_err(|e| EgressError::Resolve {
                host: host.to_owned(),
                message: e.to_string(),
            })?;
        let mut allowed = Vec::with_capacity(found.len());
        let mut refused = None;
        for addr in found {
            match self.policy.check(addr) {
                Ok(()) => allowed.push(addr),
                Err(reason) => {
                    tracing::debug!(host, %addr, %reason, "refused address dropped");
                    refused.get_or_insert(EgressError::Blocked {
                        host: host.to_owned(),
                        addr,
                        reason,
                    });
                }
            }
        }
        if allowed.is_empty() {
            return Err(refused.unwrap_or_else(|| EgressError::Resolve {
                host: host.to_owned(),
                message: "no addresses".to_owned(),
            }));
        }
        Ok(allowed)
    }

    /// A client builder whose connections go through this guard: it resolves every host
    /// name, and no proxy is used (through one, the guard would only see the proxy).
    /// Callers still check each URL with [`check_url`](Self::check_url) and set a redirect
    /// policy: [`redirect_policy`](Self::redirect_policy) or `Policy::none()`.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .dns_resolver(self.clone())
            .no_proxy()
    }

    /// Follows at most `max_redirects` redirects, each target checked like the first URL
    /// (its host name, if any, is checked again when it resolves).
    pub fn redirect_policy(&self, max_redirects: usize) -> Policy {
        let guard = self.clone();
        Policy::custom(move |attempt| {
            // `previous` holds the first URL and every hop so far.
            if attempt.previous().len() > max_redirects {
                return attempt.error(TooManyRedirects { max: max_redirects });
            }
            match guard.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        })
    }
}

impl Resolve for EgressGuard {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.clone();
        Box::pin(async move {
            let addrs = guard.resolve(name.as_str()).await?;
            let addrs: Addrs = Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// The first error of type `E` in `error`'s source chain (e.g. an [`EgressError`] inside
/// a `reqwest::Error`).
pub fn find_cause<'a, E: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    fn guard(policy: EgressPolicy) -> EgressGuard {
        let resolver = StaticResolver::new()
            .with("evil.test", [ip("10.0.0.1")])
            .with("meta.test", [ip("169.254.169.254"), ip("fd00:ec2::254")])
            .with("mixed.test", [ip("127.0.0.1"), ip("93.184.216.34")])
            .with("public.test", [ip("93.184.216.34")])
            .with("local.test", [ip("127.0.0.1")])
            .with("empty.test", []);
        EgressGuard::with_resolver(policy, Arc::new(resolver))
    }

    #[test]
    fn check_url_refuses_blocked_literals_in_every_spelling() {
        let g = guard(EgressPolicy::default());
        for u in [
            "http://10.0.0.5/a.png",
            "http://127.0.0.1:8080/",
            "https://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://[::ffff:10.0.0.5]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[fd00:ec2::254]/",
            "http://[fe80::1]/",
            "http://0.0.0.0/",
            "http://2130706433/",   // 127.0.0.1 as one number
            "http://0x7f.1/",       // 127.0.0.1, hex and short form
            "http://017700000001/", // 127.0.0.1 in octal
            "http://127.1/",
            "http://100.100.100.200/",
            "http://100.64.1.1/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://127.0.0.1./",
        ] {
            let err = g.check_url(&url(u)).unwrap_err();
            assert!(
                matches!(err, EgressError::BlockedAddress { .. }),
                "{u}: {err:?}"
            );
            assert!(err.is_refusal());
        }
        let err = g.check_url(&url("http://10.0.0.5/a.png")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "address 10.0.0.5 is not allowed (private network)"
        );
        assert_eq!(
            g.check_url(&url("http://[::ffff:a9fe:a9fe]/"))
                .unwrap_err()
                .to_string(),
            "address ::ffff:169.254.169.254 is not allowed (cloud metadata endpoint)"
        );
    }

    #[test]
    fn check_url_passes_public_literals_and_names_and_refuses_other_schemes() {
        let g = guard(EgressPolicy::default());
        for u in [
            "http://93.184.216.34/x.jpg",
            "https://[2606:4700:4700::1111]/",
            "https://example.com/a.png",
            "http://evil.test/",
        ] {
            assert_eq!(g.check_url(&url(u)), Ok(()), "{u}");
        }
        for u in [
            "file:///etc/passwd",
            "ftp://93.184.216.34/x",
            "gopher://127.0.0.1/",
        ] {
            assert!(
                matches!(g.check_url(&url(u)), Err(EgressError::Scheme(_))),
                "{u}"
            );
        }
        assert_eq!(
            g.check_url(&url("data:text/plain,hi")),
            Err(EgressError::Scheme("data".into()))
        );
    }

    #[test]
    fn allow_list_opens_literals() {
        let g = guard(EgressPolicy::allow_loopback());
        assert_eq!(g.check_url(&url("http://127.0.0.1:9/")), Ok(()));
        assert_eq!(g.check_url(&url("http://[::1]:9/")), Ok(()));
        assert!(g.check_url(&url("http://10.0.0.1/")).is_err());
    }

    #[tokio::test]
    async fn resolution_is_filtered() {
        let g = guard(EgressPolicy::default());
        let err = g.resolve("evil.test").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "host evil.test resolves to an address that is not allowed (private network)"
        );
        assert!(err.is_refusal());
        let err = g.resolve("meta.test").await.unwrap_err();
        assert!(
            matches!(
                err,
                EgressError::Blocked {
                    reason: BlockReason::CloudMetadata,
                    ..
                }
            ),
            "{err:?}"
        );
        // Refused addresses are dropped, the others kept.
        assert_eq!(g.resolve("mixed.test").await, Ok(vec![ip("93.184.216.34")]));
        assert_eq!(
            g.resolve("public.test").await,
            Ok(vec![ip("93.184.216.34")])
        );
        let err = g.resolve("nowhere.test").await.unwrap_err();
        assert!(!err.is_refusal(), "{err:?}");
        assert!(!g.resolve("empty.test").await.unwrap_err().is_refusal());
        // Names that are addresses are judged directly.
        assert!(g.resolve("10.1.1.1").await.unwrap_err().is_refusal());
        assert!(g.resolve("[::1]").await.unwrap_err().is_refusal());

        let g = guard(EgressPolicy::allow_loopback());
        assert_eq!(g.resolve("local.test").await, Ok(vec![ip("127.0.0.1")]));
        assert_eq!(
            g.resolve("mixed.test").await,
            Ok(vec![ip("127.0.0.1"), ip("93.184.216.34")])
        );
        assert!(g.resolve("evil.test").await.is_err());
    }

    /// A resolver that counts lookups, proving the refused request went through it.
    struct Counting(StaticResolver, AtomicUsize);

    impl HostResolver for Counting {
        fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.lookup(host)
        }
    }

    #[tokio::test]
    async fn http_client_refuses_before_connecting() {
        crate::install_crypto_provider();
        let counting = Arc::new(Counting(
            StaticResolver::new().with("evil.test", [ip("10.0.0.1")]),
            AtomicUsize::new(0),
        ));
        let g = EgressGuard::with_resolver(EgressPolicy::default(), counting.clone());
        let client = g
            .client_builder()
            .redirect(g.redirect_policy(3))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        // The guard alone refuses first, so a broken guard fails here and sends nothing.
        assert!(g.resolve("evil.test").await.is_err());
        let err = client.get("http://evil.test:9/").send().await.unwrap_err();
        // The resolver's refusal is the cause: no connection was attempted.
        let cause = find_cause::<EgressError>(&err).unwrap_or_else(|| panic!("{err:?}"));
        assert_eq!(
            cause,
            &EgressError::Blocked {
                host: "evil.test".into(),
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                reason: BlockReason::Private
            }
        );
        assert_eq!(counting.1.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn find_cause_walks_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] EgressError);
        let outer = Outer(EgressError::NoHost);
        assert_eq!(
            find_cause::<EgressError>(&outer),
            Some(&EgressError::NoHost)
        );
        assert_eq!(find_cause::<TooManyRedirects>(&outer), None);
    }
}
