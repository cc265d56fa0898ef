//! Telemetry sources behind one trait: the node from `/proc` (always on) and per-endpoint CPU
//! and memory from a Prometheus HTTP query API.
//!
//! A source answers one [`Signal`] at a time with a finite, non-negative number, or an error.
//! Nonsense (NaN, infinities, negative values, no series, several series) is an error too: the
//! engine then keeps the last good value and counts the failure.
use crate::http_client::{Auth, error_chain};
use async_trait::async_trait;
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a reading failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TelemetryError {
    /// The source could not be reached or read (down, timeout, I/O error).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// It answered, but not with one usable number.
    #[error("nonsense: {0}")]
    Nonsense(String),
    /// This source does not provide that signal.
    #[error("not provided by this source")]
    Unsupported,
}

impl TelemetryError {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::Nonsense(_) => "nonsense",
            Self::Unsupported => "unsupported",
        }
    }
}

/// What is read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Node CPU utilisation since the previous reading, 0–1.
    NodeCpu,
    /// Node memory utilisation (1 − MemAvailable / MemTotal), 0–1.
    NodeMemory,
    /// 1-minute load average per CPU.
    NodeLoad,
    /// A PromQL instant query that must give one series.
    Query(String),
}

/// A telemetry source.
#[async_trait]
pub trait TelemetrySource: Send + Sync + std::fmt::Debug {
    /// Short name (`node`, `prometheus`) for metrics and `/v1/costs`.
    fn name(&self) -> &'static str;
    /// One reading.
    async fn read(&self, signal: &Signal) -> Result<f64, TelemetryError>;
}

/// A reading is usable when it is a finite number ≥ 0.
pub fn sane(v: f64) -> Result<f64, TelemetryError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(TelemetryError::Nonsense(format!("value {v}")))
    }
}

/// The node, from `/proc` (`stat`, `meminfo`, `loadavg`).
#[derive(Debug)]
pub struct ProcNode {
    root: PathBuf,
    /// CPU times of the previous `NodeCpu` reading (utilisation is a difference).
    prev: parking_lot::Mutex<Option<CpuTimes>>,
}

/// Busy and total jiffies of the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Everything but idle and iowait.
    pub busy: u64,
    /// All of it.
    pub total: u64,
}

impl ProcNode {
    /// Reads `/proc`.
    pub fn new() -> Self {
        Self::at("/proc")
    }

    /// Reads another directory laid out like `/proc` (tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            prev: parking_lot::Mutex::new(None),
        }
    }

    fn file(&self, name: &str) -> Result<String, TelemetryError> {
        std::fs::read_to_string(self.root.join(name))
            .map_err(|e| TelemetryError::Unavailable(format!("{name}: {e}")))
    }

    fn cpus(&self) -> f64 {
        std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
    }
}

impl Default for ProcNode {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl TelemetrySource for ProcNode {
    fn name(&self) -> &'static str {
        "node"
    }

    async fn read(&self, signal: &Signal) -> Result<f64, TelemetryError> {
        match signal {
            Signal::NodeCpu => {
                let now = parse_stat(&self.file("stat")?)?;
                let prev = self.prev.lock().replace(now);
                match prev {
                    Some(p) => cpu_utilisation(p, now),
                    // The first reading has nothing to compare with: idle until the next.
                    None => Ok(0.0),
                }
            }
            Signal::NodeMemory => parse_meminfo(&self.file("meminfo")?),
            Signal::NodeLoad => Ok(parse_loadavg(&self.file("loadavg")?)? / self.cpus()),
            Signal::Query(_) => Err(TelemetryError::Unsupported),
        }
    }
}

/// The `cpu` line of `/proc/stat`.
pub fn parse_stat(text: &str) -> Result<CpuTimes, TelemetryError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| TelemetryError::Nonsense("no cpu line in /proc/stat".into()))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| TelemetryError::Nonsense(format!("/proc/stat: {e}")))?;
    if fields.len() < 4 {
        return Err(TelemetryError::Nonsense(
            "/proc/stat: short cpu line".into(),
        ));
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Ok(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// Utilisation between two readings of `/proc/stat`.
pub fn cpu_utilisation(prev: CpuTimes, now: CpuTimes) -> Result<f64, TelemetryError> {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return Err(TelemetryError::Nonsense("no CPU time elapsed".into()));
    }
    let busy = now.busy.saturating_sub(prev.busy);
    Ok((busy as f64 / total as f64).clamp(0.0, 1.0))
}

/// `1 − MemAvailable / MemTotal` from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Result<f64, TelemetryError> {
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
    };
    match (field("MemTotal"), field("MemAvailable")) {
        (Some(total), Some(avail)) if total > 0.0 => Ok((1.0 - avail / total).clamp(0.0, 1.0)),
        _ => Err(TelemetryError::Nonsense(
            "/proc/meminfo: no MemTotal/MemAvailable".into(),
        )),
    }
}

/// The 1-minute load average from `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Result<f64, TelemetryError> {
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| TelemetryError::Nonsense("/proc/loadavg".into()))
        .and_then(sane)
}

/// The largest Prometheus answer read (an instant query of one series is a few hundred bytes).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The Prometheus HTTP API (`GET /api/v1/query`), over `http://` or `https://`, with bearer
/// or basic auth ([`crate::http_client`]).
#[derive(Debug)]
pub struct Prometheus {
    base: String,
    auth: Auth,
    /// The client, or why it could not be built (a CA file gone since the config was
    /// checked): then every query fails with that reason, counted like any outage.
    client: Result<reqwest::Client, String>,
}

impl Prometheus {
    /// A plain-HTTP client of the server at `base` (`http://host:port`), each query bounded by
    /// `timeout`.
    pub fn new(base: &str, timeout: Duration) -> Self {
        Self::with(base, None, Auth::None, timeout)
    }

    /// A client of `[pricing.prometheus]` as configured.
    pub fn from_config(config: &crate::config::PrometheusConfig) -> Self {
        let ca = (!config.ca_file.is_empty()).then(|| Path::new(&config.ca_file));
        Self::with(
            &config.url,
            ca,
            config.auth(),
            Duration::from_millis(config.timeout_ms),
        )
    }

    /// A client of the server at `base` trusting only `ca_file` (when given), authenticating
    /// with `auth`, each query bounded by `timeout`.
    pub fn with(base: &str, ca_file: Option<&Path>, auth: Auth, timeout: Duration) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            auth,
            client: crate::http_client::remote(ca_file, timeout).map_err(|e| e.to_string()),
        }
    }

    /// The answer to `GET <base><path>?<query>` (the query already encoded), or why not.
    async fn get(&self, path_and_query: &str) -> Result<Bytes, TelemetryError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| TelemetryError::Unavailable(e.clone()))?;
        let request = self
            .auth
            .apply(client.get(format!("{}{path_and_query}", self.base)))
            .map_err(|e| TelemetryError::Unavailable(e.to_string()))?;
        let resp = request.send().await.map_err(|e| {
            TelemetryError::Unavailable(if e.is_timeout() {
                "timed out".to_owned()
            } else {
                error_chain(&e)
            })
        })?;
        let status = resp.status();
        // An instant query answers one series: a body past the cap is a wrong query (or a
        // wrong server), not something to hold in memory.
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| TelemetryError::Unavailable(error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(TelemetryError::Nonsense(format!(
                    "answer over {MAX_ANSWER_BYTES} bytes (the query must aggregate to one series)"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let body = Bytes::from(body);
        // Prometheus answers a bad query with 400/422 and a JSON error: that is nonsense (the
        // query), not an outage. 401/403 are: the credentials are wrong, nothing answers.
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(TelemetryError::Unavailable(format!(
                "HTTP {status}: check pricing.prometheus's credentials"
            )));
        }
        if !status.is_success() && !status.is_client_error() {
            return Err(TelemetryError::Unavailable(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )));
        }
        Ok(body)
    }

    /// An instant query's one value; `at` (Unix seconds) evaluates it then instead of now.
    pub async fn instant(&self, promql: &str, at: Option<f64>) -> Result<f64, TelemetryError> {
        let mut path = format!("/api/v1/query?query={}", percent_encode(promql));
        if let Some(at) = at {
            path.push_str(&format!("&time={at:.3}"));
        }
        parse_query_response(&self.get(&path).await?)
    }
}

#[async_trait]
impl TelemetrySource for Prometheus {
    fn name(&self) -> &'static str {
        "prometheus"
    }

    async fn read(&self, signal: &Signal) -> Result<f64, TelemetryError> {
        let Signal::Query(promql) = signal else {
            return Err(TelemetryError::Unsupported);
        };
        self.instant(promql, None).await
    }
}

/// The one value of an instant-query answer (`vector` of one series, or `scalar`).
pub fn parse_query_response(body: &[u8]) -> Result<f64, TelemetryError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| TelemetryError::Nonsense(format!("not JSON: {e}")))?;
    if v["status"] != "success" {
        return Err(TelemetryError::Nonsense(format!(
            "status {}: {}",
            v["status"], v["error"]
        )));
    }
    let data = &v["data"];
    let value = match data["resultType"].as_str() {
        Some("vector") => {
            let series = data["result"].as_array().map_or(&[][..], |a| a.as_slice());
            match series {
                [one] => &one["value"],
                [] => return Err(TelemetryError::Nonsense("no series".into())),
                more => {
                    return Err(TelemetryError::Nonsense(format!(
                        "{} series (the query must aggregate to one)",
                        more.len()
                    )));
                }
            }
        }
        Some("scalar") => &data["result"],
        other => {
            return Err(TelemetryError::Nonsense(format!("result type {other:?}")));
        }
    };
    // [ <unix time>, "<value>" ]; the value is a string, and may be "NaN" or "+Inf".
    let text = value[1]
        .as_str()
        .ok_or_else(|| TelemetryError::Nonsense("no value".into()))?;
    let number = text
        .parse::<f64>()
        .map_err(|_| TelemetryError::Nonsense(format!("value {text:?}")))?;
    sane(number)
}

/// Percent-encodes a query-string value (everything but RFC 3986 unreserved characters).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  4705 356 584 3699176 23060 0 277 0 0 0\ncpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0\nintr 1\n";
    const STAT_LATER: &str = "cpu  5705 356 1584 3700176 23060 0 277 0 0 0\n";
    const MEMINFO: &str = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4000000 kB\nBuffers: 1 kB\n";

    #[test]
    fn proc_files_parse() {
        let a = parse_stat(STAT).expect("stat");
        assert_eq!(a.total, 4705 + 356 + 584 + 3_699_176 + 23_060 + 277);
        assert_eq!(a.busy, 4705 + 356 + 584 + 277);
        let b = parse_stat(STAT_LATER).expect("stat");
        // 2000 busy jiffies of 3000 elapsed.
        let u = cpu_utilisation(a, b).expect("util");
        assert!((u - 2000.0 / 3000.0).abs() < 1e-9, "{u}");
        assert_eq!(parse_meminfo(MEMINFO), Ok(0.75));
        assert_eq!(parse_loadavg("1.50 0.80 0.40 2/345 6789\n"), Ok(1.5));
        assert!(parse_stat("intr 1\n").is_err());
        assert!(parse_meminfo("MemTotal: 0 kB\n").is_err());
        assert!(parse_loadavg("-1 0 0").is_err());
        assert!(cpu_utilisation(a, a).is_err(), "no time elapsed");
    }

    #[tokio::test]
    async fn proc_node_reads_a_directory_laid_out_like_proc() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("stat"), STAT).expect("write");
        std::fs::write(dir.path().join("meminfo"), MEMINFO).expect("write");
        std::fs::write(dir.path().join("loadavg"), "0.5 0 0 1/1 1").expect("write");
        let node = ProcNode::at(dir.path());
        assert_eq!(node.read(&Signal::NodeCpu).await, Ok(0.0), "first reading");
        std::fs::write(dir.path().join("stat"), STAT_LATER).expect("write");
        let u = node.read(&Signal::NodeCpu).await.expect("cpu");
        assert!((u - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(node.read(&Signal::NodeMemory).await, Ok(0.75));
        assert!(node.read(&Signal::NodeLoad).await.expect("load") > 0.0);
        assert_eq!(
            node.read(&Signal::Query("up".into())).await,
            Err(TelemetryError::Unsupported)
        );
    }

    #[test]
    fn query_answers_parse_and_nonsense_is_refused() {
        let one = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.1,"0.25"]}]}}"#;
        assert_eq!(parse_query_response(one), Ok(0.25));
        let scalar =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000.1,"3"]}}"#;
        assert_eq!(parse_query_response(scalar), Ok(3.0));
        for bad in [
            &br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#[..],
            br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"NaN"]}]}}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"-2"]}]}}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"+Inf"]}]}}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#,
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
            b"<html>",
        ] {
            assert!(
                matches!(parse_query_response(bad), Err(TelemetryError::Nonsense(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            percent_encode(r#"sum(rate(x{a="b c"}[1m]))"#),
            "sum%28rate%28x%7Ba%3D%22b%20c%22%7D%5B1m%5D%29%29"
        );
    }
}
