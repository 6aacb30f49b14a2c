//! TLS on the gRPC listener, with mutual TLS when a client CA is given. Certificate, key and CA
//! files are read again when they change (checked at each handshake, by size and time), so a
//! rotated certificate is served without a restart; a file that does not load keeps the last
//! good one serving, with one warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// Where the listener's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signs clients' certificates: set, every client must present one.
    pub client_ca: Option<PathBuf>,
    /// A DNS name the client certificate must hold (envoyproxy/ratelimit's
    /// `GRPC_CLIENT_TLS_SAN`).
    pub client_san: Option<String>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or holds no usable PEM.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The client SAN is not a DNS name.
    #[error("client SAN `{0}` is not a DNS name")]
    San(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The size and modification time of each watched file: a change in either means reload.
type Stamp = Vec<Option<(u64, SystemTime)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            Some((meta.len(), meta.modified().ok()?))
        })
        .collect()
}

/// How a [`Reloading`] value is read from its files.
type Loader<T> = Box<dyn Fn(&[PathBuf]) -> Result<T, TlsError> + Send + Sync>;

/// Something loaded from files, loaded again when they change.
struct Reloading<T> {
    paths: Vec<PathBuf>,
    load: Loader<T>,
    state: Mutex<(Stamp, Arc<T>)>,
    what: &'static str,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reloading({}: {:?})", self.what, self.paths)
    }
}

impl<T> Reloading<T> {
    fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: impl Fn(&[PathBuf]) -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let first = stamp(&refs);
        let loaded = Arc::new(load(&paths)?);
        Ok(Reloading {
            paths,
            load: Box::new(load),
            state: Mutex::new((first, loaded)),
            what,
        })
    }

    /// The current version, reloaded first if the files changed.
    fn current(&self) -> Arc<T> {
        let refs: Vec<&Path> = self.paths.iter().map(PathBuf::as_path).collect();
        let now = stamp(&refs);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.0 != now {
            // Recorded whatever the outcome, so a broken file is reported once.
            state.0 = now;
            match (self.load)(&self.paths) {
                Ok(fresh) => {
                    tracing::info!(files = ?self.paths, "TLS {} reloaded", self.what);
                    state.1 = Arc::new(fresh);
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS {} not reloaded; the previous one keeps serving", self.what);
                }
            }
        }
        state.1.clone()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            message: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            message: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

/// The server certificate, reloaded when its files change.
#[derive(Debug)]
struct ServerCertificate(Reloading<CertifiedKey>);

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

/// Client certificates checked against the CA file (reloaded when it changes) and, when
/// given, for a DNS name.
#[derive(Debug)]
struct ClientCertificates {
    verifier: Reloading<Arc<dyn ClientCertVerifier>>,
    san: Option<ServerName<'static>>,
}

impl ClientCertVerifier for ClientCertificates {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The CA may change under us; clients send their certificate without hints.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified =
            self.verifier
                .current()
                .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(san) = &self.san {
            let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
            cert.verify_is_valid_for_subject_name(san).map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
            })?;
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier
            .current()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier
            .current()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier.current().supported_verify_schemes()
    }
}

/// The rustls configuration of the gRPC listener: HTTP/2 only, the certificate (and the
/// client CA) reloaded when their files change.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let keys = provider.clone();
    let certificate = Reloading::new(
        "certificate",
        vec![files.cert.clone(), files.key.clone()],
        move |paths| {
            let chain = certificates(&paths[0])?;
            let key =
                PrivateKeyDer::from_pem_slice(&read(&paths[1])?).map_err(|e| TlsError::File {
                    path: paths[1].clone(),
                    message: format!("not a PEM private key: {e}"),
                })?;
            let signing = keys.key_provider.load_private_key(key)?;
            let certified = CertifiedKey::new(chain, signing);
            certified.keys_match()?;
            Ok(certified)
        },
    )?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match &files.client_ca {
        None => builder
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ServerCertificate(certificate))),
        Some(ca) => {
            let san = files
                .client_san
                .as_ref()
                .map(|san| {
                    ServerName::try_from(san.clone()).map_err(|_| TlsError::San(san.clone()))
                })
                .transpose()?;
            let verifier = client_verifier(ca.clone(), provider)?;
            builder
                .with_client_cert_verifier(Arc::new(ClientCertificates { verifier, san }))
                .with_cert_resolver(Arc::new(ServerCertificate(certificate)))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn client_verifier(
    ca: PathBuf,
    provider: Arc<CryptoProvider>,
) -> Result<Reloading<Arc<dyn ClientCertVerifier>>, TlsError> {
    Reloading::new("client CA", vec![ca], move |paths| {
        let mut roots = RootCertStore::empty();
        for cert in certificates(&paths[0])? {
            roots.add(cert).map_err(|e| TlsError::File {
                path: paths[0].clone(),
                message: format!("not a CA certificate: {e}"),
            })?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::File {
                path: paths[0].clone(),
                message: e.to_string(),
            })
    })
}
