//! TLS for tests: a throw-away certificate authority with a certificate for
//! `localhost` and `127.0.0.1`, and a TLS-terminating proxy, so that a
//! transport's `amqps://` or `tls://` path can be tested against a broker
//! that only speaks plain TCP.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// A certificate authority and a server certificate it signed, written as
/// PEM files into a directory of their own (removed on drop).
pub struct TestCertificates {
    dir: PathBuf,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl TestCertificates {
    /// A new CA and a server certificate for `localhost` and `127.0.0.1`,
    /// written to `ca.pem`, `server.pem` and `server.key` in a fresh
    /// directory under the system's temporary directory.
    pub fn generate() -> io::Result<Self> {
        let ca_key = KeyPair::generate().map_err(invalid)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).map_err(invalid)?;

        let key = KeyPair::generate().map_err(invalid)?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .map_err(invalid)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key).map_err(invalid)?;

        let dir = std::env::temp_dir().join(format!(
            "switchyard-tls-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        ));
        std::fs::create_dir_all(&dir)?;
        let certs = TestCertificates {
            dir,
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        std::fs::write(certs.ca_path(), &certs.ca_pem)?;
        std::fs::write(certs.cert_path(), &certs.cert_pem)?;
        std::fs::write(certs.key_path(), &certs.key_pem)?;
        Ok(certs)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM file) that clients must trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server certificate (PEM file).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key (PEM file).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    fn server_config(&self) -> io::Result<ServerConfig> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(invalid)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(invalid)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(invalid)?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(invalid)
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Accepts TLS on a local port with the test server certificate and
/// forwards the plain bytes to `upstream`: an `amqps://` front for a broker
/// that only listens on plain TCP.
pub struct TlsProxy {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl TlsProxy {
    /// Listens on an ephemeral port of 127.0.0.1.
    pub async fn start(certs: &TestCertificates, upstream: &str) -> io::Result<Self> {
        let acceptor = TlsAcceptor::from(Arc::new(certs.server_config()?));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    // A client that does not finish the handshake (one that
                    // does not trust the CA) is simply dropped.
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Ok(TlsProxy { addr, accept })
    }

    /// The address to connect to with TLS.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
