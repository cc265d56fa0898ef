//! The one way enforcer makes HTTP requests: reqwest with rustls (ring), for Prometheus (the
//! pricing engine and `audit calibrate`), the CLI's calls to the daemon's admin socket, and
//! the OTLP exporter.
//!
//! Why one place: TLS needs a crypto provider installed once per process, and every client
//! must get the same choices (trusted roots, timeouts, no proxy from the environment for a
//! Unix socket) instead of each caller rediscovering them.
//!
//! Secrets (bearer tokens, passwords) never come from the config text: [`Secret`] names a file
//! or an environment variable, and is read when it is used, so a rotated token (a Kubernetes
//! projected service-account token, say) is picked up without a reload.
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a client could not be built or a secret read.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    /// The CA file could not be read or holds no certificate.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A secret's file could not be read, or its variable is unset.
    #[error("{0}")]
    Secret(String),
    /// reqwest refused the configuration.
    #[error("HTTP client: {0}")]
    Build(String),
}

/// Installs rustls's ring provider as the process default (reqwest is built without one, so
/// that no C crypto library is needed). Idempotent; safe from any thread.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first; that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Where a secret comes from: a file (trailing newline trimmed) or an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// Read from this file at each use.
    File(PathBuf),
    /// Read from this environment variable at each use.
    Env(String),
}

impl Secret {
    /// From a config's `*_file` / `*_env` pair: at most one may be set.
    pub fn from_pair(file: &str, env: &str) -> Option<Self> {
        if !file.is_empty() {
            Some(Self::File(PathBuf::from(file)))
        } else if !env.is_empty() {
            Some(Self::Env(env.to_owned()))
        } else {
            None
        }
    }

    /// The secret now. Empty is an error: an empty password is a mistake, not a choice.
    pub fn read(&self) -> Result<String, HttpClientError> {
        let value = match self {
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|e| HttpClientError::Secret(format!("{}: {e}", path.display())))?,
            Self::Env(name) => std::env::var(name).map_err(|_| {
                HttpClientError::Secret(format!("environment variable {name} is not set"))
            })?,
        };
        let value = value.trim_end_matches(['\r', '\n']).to_owned();
        if value.is_empty() {
            return Err(HttpClientError::Secret(format!(
                "{} is empty",
                self.origin()
            )));
        }
        Ok(value)
    }

    /// Where it comes from, for messages (never the value).
    pub fn origin(&self) -> String {
        match self {
            Self::File(path) => format!("file {}", path.display()),
            Self::Env(name) => format!("environment variable {name}"),
        }
    }
}

/// How requests authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// `Authorization: Basic …`.
    Basic {
        /// The user name (not a secret).
        username: String,
        /// The password.
        password: Secret,
    },
}

impl Auth {
    /// Adds the credentials to `request`, reading the secret now.
    pub fn apply(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, HttpClientError> {
        Ok(match self {
            Self::None => request,
            Self::Bearer(token) => request.bearer_auth(token.read()?),
            Self::Basic { username, password } => {
                request.basic_auth(username, Some(password.read()?))
            }
        })
    }
}

/// A client for a remote HTTP(S) server: `timeout` bounds each whole request; `ca_file`, when
/// given, is the only trusted root (as Prometheus's own `tls_config.ca_file`), otherwise the
/// system's roots are.
pub fn remote(
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<reqwest::Client, HttpClientError> {
    install_crypto();
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        // A proxy from the environment (HTTPS_PROXY) is not what a node-local telemetry
        // client should silently go through.
        .no_proxy();
    if let Some(path) = ca_file {
        let ca = |reason: String| HttpClientError::CaFile {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca("no PEM certificate in it".into()));
        }
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| HttpClientError::Build(e.to_string()))
}

/// A client whose every request goes to the Unix socket at `socket` (the daemon's admin API);
/// URLs then only name the path (`http://enforcer/v1/status`).
pub fn unix(socket: &Path, timeout: Duration) -> Result<reqwest::Client, HttpClientError> {
    install_crypto();
    reqwest::Client::builder()
        .unix_socket(socket)
        .timeout(timeout)
        .no_proxy()
        .build()
        .map_err(|e| HttpClientError::Build(e.to_string()))
}

/// An error and its causes in one line (reqwest's own message alone says only "error sending
/// request"; the causes say "certificate not trusted" or "connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs `request` to completion for a synchronous caller (the CLI): on a small runtime of its
/// own, on a thread of its own, so that it works the same inside or outside a runtime.
pub fn block_on<T: Send>(
    request: impl std::future::Future<Output = T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|runtime| runtime.block_on(request))
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the request panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_files_or_the_environment_and_empty_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").expect("write");
        assert_eq!(Secret::File(file.clone()).read().expect("file"), "s3cret");
        std::fs::write(&file, "\n").expect("write");
        assert!(Secret::File(file.clone()).read().is_err(), "empty");
        assert!(Secret::File(dir.path().join("missing")).read().is_err());
        assert!(
            Secret::Env("ENFORCER_TEST_SURELY_UNSET_VARIABLE".into())
                .read()
                .is_err()
        );
        assert_eq!(Secret::from_pair("", ""), None);
        assert_eq!(
            Secret::from_pair("/a", ""),
            Some(Secret::File(PathBuf::from("/a")))
        );
        assert_eq!(Secret::from_pair("", "X"), Some(Secret::Env("X".into())));
        // Messages name where a secret lives, never what it is.
        assert!(!Secret::File(file).origin().contains("s3cret"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, "not a certificate\n").expect("write");
        let err = remote(Some(&file), Duration::from_secs(1)).expect_err("no cert");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert!(
            remote(
                Some(&dir.path().join("missing.pem")),
                Duration::from_secs(1)
            )
            .is_err()
        );
        assert!(remote(None, Duration::from_secs(1)).is_ok());
    }
}
