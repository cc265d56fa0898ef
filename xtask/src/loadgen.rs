//! A small HTTP load generator for the benchmarks: keep-alive HTTP/1.1 connections, closed loop
//! (as fast as answers come) or open loop (a fixed schedule; a request the server made late is
//! timed from its scheduled send time, so a stall is not hidden by coordinated omission). And a
//! closed-loop gRPC one for Envoy's rate-limit API ([`grpc`]), as an Envoy calls it: a few
//! HTTP/2 connections, many concurrent calls on each.
use anyhow::{Context as _, Result, bail};
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Each connection sends its next request as soon as the previous answer arrived.
    Closed,
    /// All connections together send this many requests per second.
    Open(f64),
}

#[derive(Debug)]
pub struct Report {
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    /// Sorted latencies, microseconds.
    pub latencies_us: Vec<u32>,
}

impl Report {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

/// Drives `POST path` with bodies from `body(i)` over `clients` connections for `duration`.
pub fn run(
    addr: SocketAddr,
    path: &str,
    clients: usize,
    duration: Duration,
    pace: Pace,
    body: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Result<Report> {
    // One thread: the generator must not take the cores the daemon and Redis are measured on.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let body = std::sync::Arc::new(body);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let body = body.clone();
            let path = path.to_owned();
            tasks.push(tokio::spawn(async move {
                worker(addr, &path, c, clients, start, duration, pace, &*body).await
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (lat, err) = t.await.context("load worker panicked")??;
            latencies.extend(lat);
            errors += err;
        }
        latencies.sort_unstable();
        let seconds = start.elapsed().as_secs_f64();
        Ok(Report {
            requests: latencies.len(),
            errors,
            seconds,
            latencies_us: latencies,
        })
    })
}

#[expect(clippy::too_many_arguments, reason = "a private helper of run()")]
async fn worker(
    addr: SocketAddr,
    path: &str,
    client: usize,
    clients: usize,
    start: Instant,
    duration: Duration,
    pace: Pace,
    body: &(dyn Fn(usize) -> String + Send + Sync),
) -> Result<(Vec<u32>, usize)> {
    // Plain HTTP/1.1 over one keep-alive socket, written and parsed by hand: the generator
    // shares the machine with what it measures and must cost as little CPU as possible.
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::with_capacity(16 * 1024, read);
    let interval = match pace {
        Pace::Closed => None,
        Pace::Open(rate) => Some(Duration::from_secs_f64(clients as f64 / rate)),
    };
    // Spread the open-loop schedules of the connections over one interval.
    let mut next = start
        + interval
            .map(|i| i.mul_f64(client as f64 / clients as f64))
            .unwrap_or_default();
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    let mut i = client;
    let mut request = Vec::with_capacity(512);
    let mut line = String::new();
    let mut sink = Vec::new();
    while start.elapsed() < duration {
        // Latency counts from the scheduled send time when the previous answer came late (the
        // server made this request wait: no coordinated omission), else from the actual send
        // (the timer wheel's millisecond granularity is the generator's delay, not the server's).
        let origin = if let Some(interval) = interval {
            let scheduled = next;
            next += interval;
            if Instant::now() < scheduled {
                tokio::time::sleep_until(scheduled.into()).await;
                Instant::now()
            } else {
                scheduled
            }
        } else {
            Instant::now()
        };
        let b = body(i);
        i += clients;
        request.clear();
        write!(
            request,
            "POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
            b.len()
        )?;
        write.write_all(&request).await?;
        // Status line, headers (only content-length matters), body.
        line.clear();
        read.read_line(&mut line).await?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("bad status line")?;
        let mut length = 0usize;
        loop {
            line.clear();
            if read.read_line(&mut line).await? == 0 {
                bail!("connection closed");
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().context("content-length")?;
            }
        }
        sink.resize(length, 0);
        read.read_exact(&mut sink).await?;
        if (200..300).contains(&status) {
            latencies.push(origin.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        } else {
            errors += 1;
            if errors > 1000 {
                bail!("too many errors (last status {status})");
            }
        }
    }
    Ok((latencies, errors))
}

/// Drives Envoy's `ShouldRateLimit` with `clients` concurrent calls in a closed loop over
/// `connections` HTTP/2 connections (an Envoy keeps one per worker thread) for `duration`;
/// the descriptors of call `i` come from `descriptor(i)`. Only `OK` answers count as served.
pub fn grpc(
    addr: SocketAddr,
    clients: usize,
    connections: usize,
    duration: Duration,
    descriptor: impl Fn(usize) -> Vec<(String, String)> + Send + Sync + 'static,
) -> Result<Report> {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let descriptor = std::sync::Arc::new(descriptor);
        let mut channels = Vec::new();
        for _ in 0..connections.max(1) {
            channels.push(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .context("gRPC connect")?,
            );
        }
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let descriptor = descriptor.clone();
            let mut client = RateLimitServiceClient::new(channels[c % channels.len()].clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut errors = 0usize;
                let mut i = c;
                while start.elapsed() < duration {
                    let request = RateLimitRequest {
                        domain: "bench".to_owned(),
                        descriptors: vec![RateLimitDescriptor {
                            entries: descriptor(i)
                                .into_iter()
                                .map(|(key, value)| Entry { key, value })
                                .collect(),
                            ..Default::default()
                        }],
                        hits_addend: 0,
                    };
                    i += clients;
                    let sent = Instant::now();
                    match client.should_rate_limit(request).await {
                        Ok(r) if r.get_ref().overall_code == Code::Ok as i32 => latencies
                            .push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                        _ => {
                            errors += 1;
                            if errors > 1000 {
                                bail!("too many gRPC errors or denials");
                            }
                        }
                    }
                }
                Ok::<_, anyhow::Error>((latencies, errors))
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (lat, err) = t.await.context("gRPC load worker panicked")??;
            latencies.extend(lat);
            errors += err;
        }
        latencies.sort_unstable();
        let seconds = start.elapsed().as_secs_f64();
        Ok(Report {
            requests: latencies.len(),
            errors,
            seconds,
            latencies_us: latencies,
        })
    })
}
