//! How the store reaches PostgreSQL: a libpq-style URL, with TLS through rustls.
//!
//! `sslmode` means what it means to libpq: `disable`; `prefer` (the default: TLS when the
//! server offers it) and `require` encrypt without checking who answers, unless CAs are
//! given in `sslrootcert` (libpq's own parameter: a PEM file, e.g. CloudNativePG's
//! `<cluster>-ca` Secret mounted into the pod); `verify-ca` and `verify-full` check the
//! server's certificate and name against those CAs and the system's roots. tokio-postgres
//! knows only the first three modes and not `sslrootcert`, so both are read here. As with
//! libpq, `PGSSLMODE` and `PGSSLROOTCERT` apply when the URL names neither (the chart sets
//! them when given the database's CA, so that CloudNativePG's own URL Secret is used as it
//! is).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// A parsed database URL and the TLS connector for it.
pub struct Connection {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
}

/// Parses `url` (`postgres://user:password@host:port/database?param=value&...`).
pub fn parse(url: &str) -> Result<Connection, StoreError> {
    parse_with(url, |name| std::env::var(name).ok())
}

/// [`parse`], with the environment given.
fn parse_with(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Connection, StoreError> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut kept: Vec<String> = Vec::new();
    let mut ca_file: Option<PathBuf> = None;
    let mut mode: Option<String> = None;
    // Each parameter is kept as written (its encoding is tokio-postgres's to read), except
    // the two it does not know.
    for raw in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = raw.split_once('=').unwrap_or((raw, ""));
        let decoded = || {
            percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| StoreError::Config(format!("{key} is not UTF-8")))
        };
        match key {
            "sslrootcert" => ca_file = Some(PathBuf::from(decoded()?)),
            "sslmode" => mode = Some(decoded()?),
            _ => kept.push(raw.to_owned()),
        }
    }
    let mode = mode.or_else(|| env("PGSSLMODE"));
    if ca_file.is_none() {
        ca_file = env("PGSSLROOTCERT").map(PathBuf::from);
    }
    let verify = ca_file.is_some() || matches!(mode.as_deref(), Some("verify-ca" | "verify-full"));
    if let Some(mode) = &mode {
        kept.push(ssl_mode(mode));
    }
    let rebuilt = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let config: tokio_postgres::Config = rebuilt
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
    let tls = MakeRustlsConnect::new(client_config(verify, ca_file.as_deref())?);
    Ok(Connection { config, tls })
}

/// libpq's `sslmode` as tokio-postgres takes it (whether to verify is the connector's).
fn ssl_mode(mode: &str) -> String {
    let mode = match mode {
        "verify-ca" | "verify-full" => "require",
        other => other,
    };
    format!(
        "sslmode={}",
        percent_encoding::utf8_percent_encode(mode, percent_encoding::NON_ALPHANUMERIC)
    )
}

/// Trusts the system's roots and, when given, the CAs in `ca_file`; or, without `verify`,
/// any certificate (encryption only, as libpq's `prefer` and `require`).
fn client_config(verify: bool, ca_file: Option<&Path>) -> Result<rustls::ClientConfig, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(format!("TLS: {e}")))?;
    if !verify {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    // A system certificate that cannot be used is skipped, as every TLS client does.
    let _ = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        let unreadable = |e: &dyn std::fmt::Display| {
            StoreError::Config(format!("sslrootcert {}: {e}", path.display()))
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| unreadable(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(&e))?;
        if certs.is_empty() {
            return Err(unreadable(&"holds no PEM certificate"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| unreadable(&e))?;
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// libpq's `prefer` and `require` without CAs: the server's certificate is not checked
/// (its handshake signatures are, so the session is encrypted with the key that answered).
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_tokio_postgres_lacks_are_read_here() {
        let plain = parse("postgres://u:p@127.0.0.1:5432/db").expect("plain");
        assert_eq!(
            plain.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        let verify = parse(
            "postgres://u:p@db.example:5432/db?sslmode=verify-full&application_name=kinsight%20api",
        )
        .expect("verify-full");
        assert_eq!(
            verify.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(verify.config.get_application_name(), Some("kinsight api"));
        let Err(err) = parse("postgres://u:p@db.example/db?sslrootcert=/no/such/ca.crt") else {
            panic!("a missing CA file is refused");
        };
        assert!(
            err.to_string().contains("sslrootcert /no/such/ca.crt"),
            "{err}"
        );
        // The environment applies only where the URL is silent.
        let env = |name: &str| match name {
            "PGSSLMODE" => Some("verify-full".to_owned()),
            "PGSSLROOTCERT" => Some("/no/such/env-ca.crt".to_owned()),
            _ => None,
        };
        let Err(err) = parse_with("postgres://u:p@db.example/db", env) else {
            panic!("the environment's CA file is read");
        };
        assert!(err.to_string().contains("/no/such/env-ca.crt"), "{err}");
        let given = |name: &str| (name == "PGSSLMODE").then(|| "verify-full".to_owned());
        let from_env = parse_with("postgres://u:p@db.example/db", given).expect("env");
        assert_eq!(
            from_env.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let url_wins =
            parse_with("postgres://u:p@db.example/db?sslmode=disable", given).expect("url");
        assert_eq!(
            url_wins.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        let Err(err) = parse("postgres://u:p@db.example/db?sslmode=sometimes") else {
            panic!("refused");
        };
        assert!(err.to_string().contains("invalid"), "{err}");
    }
}
