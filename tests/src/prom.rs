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

/// A private Prometheus scraping one exporter every 200 ms; stopped on drop.
#[derive(Debug)]
pub struct PrivatePrometheus {
    pub port: u16,
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
            child: None,
            dir,
        };
        p.restart();
        p
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
