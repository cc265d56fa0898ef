//! A real Prometheus server (Debian's `prometheus`) on a free loopback port, scraping a tiny
//! exporter the test controls, for the pricing engine's Prometheus source.
use crate::{Process, free_port};
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An exporter serving `/metrics` with whatever text the test sets.
#[derive(Debug, Clone)]
pub struct Exporter {
    pub port: u16,
    body: Arc<Mutex<String>>,
}

impl Exporter {
    /// Starts serving (a thread; lives as long as the process).
    pub fn start(body: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind exporter");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Mutex::new(body.to_owned()));
        let served = Arc::clone(&shared);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let body = served.lock().expect("lock").clone();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { port, body: shared }
    }

    /// Replaces what `/metrics` serves.
    pub fn set(&self, body: &str) {
        *self.body.lock().expect("lock") = body.to_owned();
    }
}

/// The password of [`PrivatePrometheus::start_secure`]'s user `enforcer`.
pub const PASSWORD: &str = "prom-pass-15";
/// Its bcrypt hash (cost 4), as Prometheus's `basic_auth_users` wants it.
const PASSWORD_BCRYPT: &str = "$2b$04$jEctyT5VWxuGVGaYq7mj/O51eTNG5VJTuoB0g495x4rasfYx8WVCa";

/// A CA and a server certificate for `127.0.0.1` and `localhost` it signed, as PEM files.
#[derive(Debug)]
pub struct TestCa {
    /// The CA's certificate (what clients trust).
    pub ca_file: std::path::PathBuf,
    /// The server's certificate.
    pub cert_file: std::path::PathBuf,
    /// The server's private key.
    pub key_file: std::path::PathBuf,
}

impl TestCa {
    /// A fresh CA and server certificate, written into `dir`.
    pub fn new(dir: &std::path::Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "enforcer test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key"))
            .expect("ca cert");
        let key = KeyPair::generate().expect("server key");
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "prometheus");
        let cert = server.signed_by(&key, &ca).expect("server cert");
        let out = Self {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
        };
        std::fs::write(&out.ca_file, ca.pem()).expect("ca file");
        std::fs::write(&out.cert_file, cert.pem()).expect("cert file");
        std::fs::write(&out.key_file, key.serialize_pem()).expect("key file");
        out
    }
}

/// A private Prometheus scraping one exporter every 200 ms; stopped on drop.
#[derive(Debug)]
pub struct PrivatePrometheus {
    pub port: u16,
    /// Served over TLS with basic auth ([`PrivatePrometheus::start_secure`]).
    pub secure: Option<TestCa>,
    // Before `dir`: the server stops before its directory goes.
    child: Option<Process>,
    dir: tempfile::TempDir,
}

impl PrivatePrometheus {
    /// Starts it and waits until it is ready.
    pub fn start(exporter: &Exporter) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 200ms\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: backend\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{}']\n",
                exporter.port
            ),
        )
        .expect("config");
        let mut p = Self {
            port,
            secure: None,
            child: None,
            dir,
        };
        p.restart();
        p
    }

    /// Like [`PrivatePrometheus::start`], but as operators run it: HTTPS only (a certificate
    /// of a fresh [`TestCa`], in `secure`) and basic auth (user `enforcer`, [`PASSWORD`]),
    /// through Prometheus's own `--web.config.file`.
    pub fn start_secure(exporter: &Exporter) -> Self {
        let mut p = Self::start_stopped(exporter);
        let ca = TestCa::new(p.dir.path());
        std::fs::write(
            p.dir.path().join("web.yml"),
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n\
                 basic_auth_users:\n  enforcer: '{PASSWORD_BCRYPT}'\n",
                ca.cert_file.display(),
                ca.key_file.display()
            ),
        )
        .expect("web config");
        p.secure = Some(ca);
        p.restart();
        p
    }

    fn start_stopped(exporter: &Exporter) -> Self {
        let mut p = Self::start(exporter);
        p.stop();
        p
    }

    /// `http://127.0.0.1:<port>`, or `https://…` when secure.
    pub fn url(&self) -> String {
        let scheme = if self.secure.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Starts it (again) and waits until `/-/ready` answers.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .args(self.secure.as_ref().map(|_| {
                format!(
                    "--web.config.file={}",
                    self.dir.path().join("web.yml").display()
                )
            }))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (cargo xtask setup)");
        self.child = Some(Process(child));
        let start = Instant::now();
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = write!(
                    s,
                    "GET /-/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                );
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.1 200") {
                    return;
                }
                // Over TLS, Go answers plain HTTP with a 400: the server is up (whether its
                // storage is ready, the test's first query tells).
                if self.secure.is_some() && out.starts_with("HTTP/1.0 400") {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
