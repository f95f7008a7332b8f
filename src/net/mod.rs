//! Outbound-request safety (SSRF): every request kinsight makes to a customer-chosen URL
//! (the worker's image downloads, the controller's webhooks) goes through an
//! [`EgressGuard`].
//!
//! - Names are resolved by the guard itself (it is the HTTP client's DNS resolver) and
//!   only addresses the [`EgressPolicy`] allows are handed to the connector, so the check
//!   sees the very addresses that are connected to (no window for DNS rebinding).
//! - IP-literal URLs never reach a resolver: callers check every URL, the first and each
//!   redirect target, with [`EgressGuard::check_url`] before connecting.
//! - Private, loopback, link-local, metadata, CGNAT, multicast and reserved addresses
//!   (and IPv6 forms embedding them) are refused unless the policy's allow-list opens them.
//! - System proxies are not used: through a proxy the guard would only see the proxy.
//! - URLs are redacted ([`redact_urls`]) before they go into Events and logs.

mod guard;
mod policy;
mod redact;

pub use guard::{
    EgressError, EgressGuard, HostResolver, StaticResolver, SystemResolver, TooManyRedirects,
    find_cause,
};
pub use policy::{BlockReason, EgressPolicy, IpNet, classify, parse_cidrs};
pub use redact::{redact_url, redact_urls};
