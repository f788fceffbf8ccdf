//! TLS trust for every outbound connection (token endpoints and upstreams): the webpki roots,
//! the system's store, and optionally one extra CA file. Certificates are always verified; there
//! is deliberately no way to turn that off.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

/// The trust store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read.
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("CA file {path} contains no valid PEM certificate")]
    NoCertificates {
        /// The file.
        path: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The roots trusted for outbound TLS: webpki's (Mozilla's) roots, the system store, and the
/// certificates in `ca_file`.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The system store may be missing in a distroless image; that is not an error.
    let native = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TlsError::CaFile {
            path: shown.clone(),
            source,
        })?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
            .filter_map(Result::ok)
            .collect();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsError::NoCertificates { path: shown });
        }
    }
    Ok(roots)
}

/// A client configuration that verifies servers against [`root_store`], offering `alpn`, and
/// presenting `identity`'s certificate when the server asks for one.
pub fn client_config(
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
    identity: Option<Arc<crate::identity::ClientIdentity>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca_file)?);
    let mut config = match identity {
        Some(identity) => builder.with_client_cert_resolver(identity),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_ca_is_added_and_bad_files_are_reported() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        let base = root_store(None).unwrap().len();
        assert_eq!(root_store(Some(&good)).unwrap().len(), base + 1);

        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        assert!(matches!(
            root_store(Some(&bad)),
            Err(TlsError::NoCertificates { .. })
        ));
        assert!(matches!(
            root_store(Some(&dir.path().join("missing.pem"))),
            Err(TlsError::CaFile { .. })
        ));
        assert!(client_config(Some(&good), &[b"h2", b"http/1.1"], None).is_ok());
    }
}
