//! TLS settings for both ends of the mirror protocol (docs/protocol.md,
//! "Transport"): the target's rustls server configuration from PEM files
//! and the client's ureq agent. Both use one crypto provider, ring, so
//! only one is compiled and the two ends cannot drift apart.
//!
//! Calls rustls (through tokio-rustls) and ureq only.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocols the target offers, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// How long a client waits for a TCP connection to the target.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one request may take, from connecting to the last byte of the
/// answer: enough for a 16 MiB blob (the largest) at 1.2 Mbit/s.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The crypto provider of both ends. rustls 0.23.48 deprecates ring's
/// provider because it lacks the post-quantum key exchange
/// (X25519MLKEM768) that aws-lc-rs has; ring is kept because aws-lc-rs
/// needs cmake and a C build of its own, and ureq uses ring already.
/// Moving to aws-lc-rs is this one line and the features in Cargo.toml.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The target's TLS configuration: the certificate chain in `cert` (PEM,
/// leaf first) and its private key in `key` (PEM: PKCS#8, PKCS#1 or SEC1),
/// TLS 1.3 only, offering h2 and http/1.1. Errors name the file at fault.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\")",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "--tls-key {}: no private key in it (expected PEM \"BEGIN PRIVATE KEY\")",
            key.display()
        ),
        e => format!("--tls-key {}: {e}", key.display()),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "--tls-cert {} with --tls-key {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A ureq agent for talking to a target: trusting exactly the root
/// certificates in `ca_pem` when given (a target with a self-signed or
/// private certificate), else the Mozilla roots built into the binary
/// (webpki-roots: nothing to read or fetch at run time). Statuses are not
/// errors, so that a caller can read a refusal's body.
pub fn agent(ca_pem: Option<&[u8]>) -> Result<ureq::Agent, String> {
    let roots = match ca_pem {
        Some(pem) => ureq::tls::RootCerts::new_with_certs(&roots_from_pem(pem)?),
        None => ureq::tls::RootCerts::WebPki,
    };
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(provider())
        .root_certs(roots)
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_per_call(Some(REQUEST_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into())
}

/// The certificates of a PEM bundle, each checked to be usable as a trust
/// anchor: ureq skips unparsable roots silently, which would turn a bad
/// file into a puzzling verification failure later.
fn roots_from_pem(pem: &[u8]) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let mut out = Vec::new();
    let mut store = rustls::RootCertStore::empty();
    for (i, der) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let der = der.map_err(|e| format!("CA certificates: PEM item {}: {e}", i + 1))?;
        store
            .add(der.clone())
            .map_err(|e| format!("CA certificates: certificate {}: {e}", i + 1))?;
        out.push(ureq::tls::Certificate::from_der(der.as_ref()).to_owned());
    }
    if out.is_empty() {
        return Err("CA certificates: none found (expected PEM \"BEGIN CERTIFICATE\")".to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_broken_ca_bundle_is_an_error_not_an_agent_that_trusts_nothing() {
        assert!(agent(Some(b"")).unwrap_err().contains("none found"));
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(agent(Some(garbage)).unwrap_err().contains("certificate 1"));
        assert!(agent(None).is_ok());
    }

    #[test]
    fn missing_or_empty_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let empty = d.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let gone = d.path().join("gone.pem");
        let e = server_config(&gone, &empty).unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("gone.pem"), "{e}");
        let e = server_config(&empty, &empty).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
    }
}
