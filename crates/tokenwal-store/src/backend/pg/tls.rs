//! TLS to the database (rustls, no system OpenSSL), chosen by the URL's `sslmode` as libpq does:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | absent, `disable` | no | — |
//! | `prefer` | if the server offers it | against `sslrootcert` if given (chain only), else not |
//! | `require` | yes | against `sslrootcert` if given (chain only), else not |
//! | `verify-ca` | yes | chain against `sslrootcert`, or the Mozilla roots (`webpki-roots`) |
//! | `verify-full` | yes | chain **and host name**, against `sslrootcert` or the Mozilla roots |
//!
//! Unlike libpq, an absent `sslmode` means `disable` (libpq's default is `prefer`): a store's
//! connections are encrypted only when the URL asks, so loopback and Unix-socket deployments pay
//! nothing. `sslrootcert=PATH` is a PEM file of CA certificates (a hosted database's CA bundle).

use crate::error::StoreError;
use postgres::config::SslMode;
use postgres::{Client, NoTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a store's connections use TLS (from the URL).
#[derive(Clone)]
pub(crate) struct Tls {
    mode: &'static str,
    root: Option<PathBuf>,
    connector: Option<MakeRustlsConnect>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("sslmode", &self.mode).field("sslrootcert", &self.root).finish()
    }
}

impl Tls {
    /// The TLS settings of `sslmode` and `sslrootcert` (the URL's values, if given), and the
    /// driver's mode to set.
    pub(crate) fn from_url(mode: Option<&str>, root: Option<&str>) -> Result<(Tls, SslMode), StoreError> {
        let invalid = |reason: String| StoreError::InvalidLocation { reason };
        let (mode, driver, verify): (&'static str, SslMode, Verify) = match mode.unwrap_or("disable") {
            "disable" => ("disable", SslMode::Disable, Verify::Nothing),
            "prefer" => ("prefer", SslMode::Prefer, Verify::Nothing),
            "require" => ("require", SslMode::Require, Verify::Nothing),
            "verify-ca" => ("verify-ca", SslMode::Require, Verify::Chain),
            "verify-full" => ("verify-full", SslMode::Require, Verify::ChainAndName),
            other => {
                return Err(invalid(format!(
                    "sslmode={other:?}: expected disable, prefer, require, verify-ca or verify-full"
                )))
            }
        };
        let roots = match root {
            Some(path) => {
                let mut store = RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<_, _>>())
                    .map_err(|e| invalid(format!("sslrootcert={path:?}: cannot read PEM certificates ({e})")))?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(invalid(format!("sslrootcert={path:?}: no usable CA certificate in the file")));
                }
                Some(store)
            }
            None => None,
        };
        // libpq: with a root certificate, `prefer` and `require` check the chain too.
        let verify = match (&verify, &roots) {
            (Verify::Nothing, Some(_)) => Verify::Chain,
            _ => verify,
        };
        let connector = if driver == SslMode::Disable {
            None
        } else {
            let roots = roots.unwrap_or_else(|| RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() });
            Some(MakeRustlsConnect::new(client_config(verify, roots)?))
        };
        Ok((Tls { mode, root: root.map(PathBuf::from), connector }, driver))
    }

    /// The `sslmode` in effect.
    pub(crate) fn mode(&self) -> &'static str {
        self.mode
    }

    /// Opens a connection with `config` under these settings.
    pub(crate) fn connect(&self, config: &postgres::Config) -> Result<Client, postgres::Error> {
        match &self.connector {
            None => config.connect(NoTls),
            Some(c) => config.connect(c.clone()),
        }
    }
}

enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(verify: Verify, roots: RootCertStore) -> Result<ClientConfig, StoreError> {
    let tls_err = |e: rustls::Error| StoreError::InvalidLocation { reason: format!("TLS settings: {e}") };
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(tls_err)?;
    let check_chain = match verify {
        Verify::ChainAndName => return Ok(builder.with_root_certificates(roots).with_no_client_auth()),
        Verify::Chain => true,
        Verify::Nothing => false,
    };
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| StoreError::InvalidLocation { reason: format!("TLS roots: {e}") })?;
    let relaxed = Relaxed { webpki, check_chain };
    Ok(builder.dangerous().with_custom_certificate_verifier(Arc::new(relaxed)).with_no_client_auth())
}

/// The certificate checks below `verify-full`: `verify-ca` (`check_chain`: the chain must lead to a
/// trusted root; the name in the certificate is not checked) and `prefer` / `require` without a root
/// certificate (libpq's meaning: encrypted, the certificate not checked). The handshake's signatures
/// are always checked.
#[derive(Debug)]
struct Relaxed {
    webpki: Arc<WebPkiServerVerifier>,
    check_chain: bool,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        // rustls checks the chain before the name: a name error means the chain was trusted.
        match self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
