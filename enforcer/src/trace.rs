//! Traces: OpenTelemetry spans of decisions and pricing rounds, exported over OTLP/HTTP
//! (protobuf) to `[telemetry] otlp_endpoint`.
//!
//! The spans are `tracing` spans with the target [`TARGET`], enabled by the subscriber's
//! filter only when an endpoint is configured ([`directive`]): without one every span callsite
//! is disabled once and for all, and a decision pays a cached interest check per span. The
//! OpenTelemetry layer ([`Traces::layer`]) is shown these spans and nothing else; the log
//! layer sees them too, as the context of a log line written inside a decision (no raw key
//! there either).
//!
//! Sampling is parent-based: a decision without a `traceparent` is a root, sampled with
//! `sample_ratio`; a gateway's W3C `traceparent` (HTTP header, [`http_parent`]; gRPC metadata,
//! [`grpc_parent`]) makes it a child of the gateway's span, sampled as the gateway says.
//!
//! Exporting never holds up a decision. An ended span is put on a bounded queue
//! (`max_queue_size`) without waiting, or dropped and counted
//! (`enforcer_trace_spans_dropped_total`); a task on the daemon's runtime ([`Traces::start`])
//! sends batches with the OTLP exporter over reqwest (rustls with ring), each bounded by
//! `export_timeout_ms`, and counts them (`enforcer_trace_exports_total{result}`). At shutdown
//! ([`Traces::shutdown`]) what is queued gets one last chance, bounded by [`SHUTDOWN_TIMEOUT`]:
//! a receiver that does not answer is not waited for. (The SDK's `BatchSpanProcessor` is not
//! used: it exports from a thread of its own with a blocking executor, which the async reqwest
//! client cannot run on, and it keeps its drop count to itself.)
//!
//! A raw API key never reaches a span: a key is named by the first 8 hex digits of its SHA-256
//! ([`key_prefix`]), as in the logs.
use crate::config::TelemetryConfig;
use crate::key::KeyHash;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use prometheus::{IntCounter, IntCounterVec, Opts};
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::Span;
use tracing::field::Empty;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The `tracing` target of every span that is exported (and of nothing else).
pub const TARGET: &str = "enforcer_traces";

/// How long shutdown gives the last export before it drops what is left.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The exporter's HTTP client could not be built.
    #[error("the trace exporter's HTTP client: {0}")]
    Client(String),
    /// The OTLP exporter refused its settings.
    #[error("the OTLP trace exporter: {0}")]
    Exporter(String),
}

/// The exporter's counters. Process-wide, like the tracer provider (which is set up before any
/// metrics registry): [`crate::metrics::Metrics`] registers them in every registry it makes.
#[derive(Debug, Clone)]
pub struct TraceMetrics {
    /// `enforcer_trace_spans_dropped_total`: sampled spans the export queue had no room for.
    pub spans_dropped: IntCounter,
    /// `enforcer_trace_spans_exported_total`: spans the receiver took.
    pub spans_exported: IntCounter,
    /// `enforcer_trace_exports_total{result}`: export requests, `ok` or `failed` (refused,
    /// unreachable, timed out, or abandoned at shutdown).
    pub exports: IntCounterVec,
}

static METRICS: LazyLock<TraceMetrics> = LazyLock::new(|| TraceMetrics {
    spans_dropped: IntCounter::new(
        "enforcer_trace_spans_dropped_total",
        "Sampled trace spans dropped because the export queue was full (telemetry.max_queue_size)",
    )
    .expect("valid metric definition"),
    spans_exported: IntCounter::new(
        "enforcer_trace_spans_exported_total",
        "Trace spans the OTLP receiver took",
    )
    .expect("valid metric definition"),
    exports: IntCounterVec::new(
        Opts::new(
            "enforcer_trace_exports_total",
            "OTLP trace export requests by result (ok, failed: refused, unreachable, timed out \
             or abandoned at shutdown)",
        ),
        &["result"],
    )
    .expect("valid metric definition"),
});

/// The exporter's counters.
pub fn metrics() -> &'static TraceMetrics {
    &METRICS
}

/// Whether spans are exported at all (a cached callsite check: cheap on the decision path).
pub fn on() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// How spans name a key: the first 8 hex digits of its SHA-256.
pub fn key_prefix(hash: &KeyHash) -> String {
    let mut hex = hash.to_hex();
    hex.truncate(8);
    hex
}

/// The subscriber filter's directive for the spans of [`TARGET`]: `info` with traces, `off`
/// without (whatever else `RUST_LOG` enables).
pub fn directive(on: bool) -> Option<tracing_subscriber::filter::Directive> {
    format!("{TARGET}={}", if on { "info" } else { "off" })
        .parse()
        .ok()
}

/// Traces of this process: the tracer provider, and the export task once a runtime runs it.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    /// What the export task needs, until [`Traces::start`] spawns it.
    export: Option<Export>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Traces {
    /// Traces as `config` asks: `None` without an endpoint. Needs no runtime (the tracing
    /// subscriber is set up before the daemon's runtime starts); spans ended before
    /// [`Traces::start`] wait in the queue.
    pub fn new(config: &TelemetryConfig) -> Result<Option<Self>, TraceError> {
        if config.otlp_endpoint.is_empty() {
            return Ok(None);
        }
        let timeout = Duration::from_millis(config.export_timeout_ms);
        // The project's one client set-up (rustls with ring, system roots, no proxy from the
        // environment), each export bounded by `export_timeout_ms`.
        let client = crate::http_client::remote(None, timeout)
            .map_err(|e| TraceError::Client(e.to_string()))?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(traces_url(&config.otlp_endpoint))
            .with_timeout(timeout)
            .build()
            .map_err(|e| TraceError::Exporter(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        let (queue, spans) = mpsc::channel(config.max_queue_size);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue { spans: queue })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Some(Self {
            provider,
            export: Some(Export {
                spans,
                exporter,
                batch: config.max_export_batch_size,
                interval: Duration::from_millis(config.export_interval_ms),
                timeout,
                failing: false,
            }),
            stop: watch::channel(false).0,
            task: None,
        }))
    }

    /// The `tracing` layer that turns the spans of [`TARGET`] into OpenTelemetry spans (and
    /// sees nothing else).
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
    {
        Only(
            tracing_opentelemetry::layer()
                .with_tracer(self.provider.tracer("enforcer"))
                // Attributes of our own, not the source file, thread or (constant) target.
                .with_location(false)
                .with_threads(false)
                .with_target(false),
        )
    }

    /// Starts exporting, on the current tokio runtime.
    pub fn start(&mut self) {
        if let Some(export) = self.export.take() {
            self.task = Some(tokio::spawn(export.run(self.stop.subscribe())));
        }
    }

    /// Sends what is queued (at most [`SHUTDOWN_TIMEOUT`]: a receiver that does not answer
    /// is not waited for) and stops. Spans ended later are not exported.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_TIMEOUT, &mut task)
                .await
                .is_err()
        {
            task.abort();
            metrics().exports.with_label_values(&["failed"]).inc();
            tracing::warn!(
                "the trace receiver did not take the last spans in time: they are dropped"
            );
        }
        // Nothing to wait for: the queue's processor holds no thread of its own.
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::debug!(error = %e, "tracer provider shutdown");
        }
    }
}

/// A layer shown only the spans of [`TARGET`], and no events. A wrapper, not a per-layer
/// filter (`Layer::with_filter`): per-layer filters keep their verdicts in a thread-local
/// between `enabled` and the callback, and a query that never dispatches (the `log` crate's
/// `log_enabled!` through `tracing-log`) leaves a stale one that silently drops the next event
/// of the log layer (tokio-rs/tracing#2519).
struct Only<L>(L);

fn ours<S: tracing::Subscriber + for<'a> LookupSpan<'a>>(
    id: &tracing::span::Id,
    ctx: &Context<'_, S>,
) -> bool {
    ctx.metadata(id).is_some_and(|m| m.target() == TARGET)
}

impl<S, L> tracing_subscriber::Layer<S> for Only<L>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    L: tracing_subscriber::Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        if attrs.metadata().target() == TARGET {
            self.0.on_new_span(attrs, id, ctx);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if ours(id, &ctx) {
            self.0.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(
        &self,
        id: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        if ours(id, &ctx) && ours(follows, &ctx) {
            self.0.on_follows_from(id, follows, ctx);
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        if ours(id, &ctx) {
            self.0.on_enter(id, ctx);
        }
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        if ours(id, &ctx) {
            self.0.on_exit(id, ctx);
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        if ours(&id, &ctx) {
            self.0.on_close(id, ctx);
        }
    }
}

impl<L> std::fmt::Debug for Only<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Only(enforcer_traces)")
    }
}

/// `otlp_endpoint` as the exporter's URL: `/v1/traces` added to a URL without a path.
fn traces_url(endpoint: &str) -> String {
    match endpoint.parse::<axum::http::Uri>() {
        Ok(uri) if matches!(uri.path(), "" | "/") => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_owned(),
    }
}

/// The span processor: ended, sampled spans onto the bounded queue, never waiting.
#[derive(Debug)]
struct Queue {
    spans: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() && self.spans.try_send(span).is_err() {
            metrics().spans_dropped.inc();
        }
    }

    // Flushing is the export task's, at shutdown ([`Traces::shutdown`]): the SDK's calls
    // return at once, whatever the receiver does.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task's side of the queue.
#[derive(Debug)]
struct Export {
    spans: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    batch: usize,
    interval: Duration,
    timeout: Duration,
    /// The last export failed (logged once, until one succeeds again).
    failing: bool,
}

impl Export {
    /// Sends a batch when it is full or `interval` after its first span, one export at a
    /// time, until `stop`; then what is queued, once.
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut batch = Vec::with_capacity(self.batch);
        'run: loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break 'run,
                n = self.spans.recv_many(&mut batch, self.batch) => if n == 0 { break 'run },
            }
            let fill = tokio::time::sleep(self.interval);
            tokio::pin!(fill);
            while batch.len() < self.batch {
                let room = self.batch - batch.len();
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break 'run,
                    () = &mut fill => break,
                    n = self.spans.recv_many(&mut batch, room) => if n == 0 { break 'run },
                }
            }
            let spans = std::mem::take(&mut batch);
            tokio::select! {
                biased;
                // A receiver that does not answer does not hold up the shutdown.
                _ = stop.wait_for(|s| *s) => {
                    metrics().exports.with_label_values(&["failed"]).inc();
                    break 'run;
                }
                () = self.send(spans) => {}
            }
        }
        // The last round: what is queued now (the caller bounds it as a whole).
        self.spans.close();
        while let Ok(span) = self.spans.try_recv() {
            batch.push(span);
            if batch.len() == self.batch {
                self.send(std::mem::take(&mut batch)).await;
            }
        }
        if !batch.is_empty() {
            self.send(batch).await;
        }
    }

    /// One export request, bounded by the timeout, counted.
    async fn send(&mut self, spans: Vec<SpanData>) {
        let n = spans.len() as u64;
        let error = match tokio::time::timeout(self.timeout, self.exporter.export(spans)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        let m = metrics();
        match error {
            None => {
                m.exports.with_label_values(&["ok"]).inc();
                m.spans_exported.inc_by(n);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("trace export works again");
                }
            }
            Some(error) => {
                m.exports.with_label_values(&["failed"]).inc();
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(
                        %error,
                        "trace export failed: spans are lost until the receiver answers \
                         (enforcer_trace_exports_total{{result=\"failed\"}})"
                    );
                }
            }
        }
    }
}

/// The W3C trace context of a carrier, when it names a valid remote span (and traces are on).
fn remote(carrier: &dyn Extractor) -> Option<opentelemetry::Context> {
    if !on() {
        return None;
    }
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// HTTP headers as a trace-context carrier.
struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// gRPC metadata as a trace-context carrier.
struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context from gRPC metadata (`traceparent`), if any.
pub fn grpc_parent(metadata: &tonic::metadata::MetadataMap) -> Option<opentelemetry::Context> {
    remote(&Metadata(metadata))
}

/// Runs `fut` with `parent` as the current trace context: the spans it starts are the
/// caller's children.
pub async fn within<F: Future>(parent: Option<opentelemetry::Context>, fut: F) -> F::Output {
    use opentelemetry::context::FutureExt as _;
    match parent {
        Some(cx) => fut.with_context(cx).await,
        None => fut.await,
    }
}

/// HTTP middleware: a request with a `traceparent` header is handled in the caller's trace.
pub async fn http_parent(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let parent = remote(&Headers(request.headers()));
    within(parent, next.run(request)).await
}

/// The span of a refund (`POST /v1/refund`, Envoy's refund of a refused request's charges).
pub fn refund() -> Span {
    tracing::info_span!(target: TARGET, "refund", otel.kind = "server", enforcer.key_hash = Empty)
}

/// The span of a settle (`POST /v1/settle`, Envoy's stream-done call).
pub fn settle() -> Span {
    tracing::info_span!(target: TARGET, "settle", otel.kind = "server", enforcer.key_hash = Empty)
}

/// The ledger's part of a decision (the row appended or queued before the answer): a child
/// of the traced operation now running, never a trace of its own.
pub fn ledger_enqueue() -> Span {
    if !on() || Span::current().is_disabled() {
        return Span::none();
    }
    tracing::info_span!(target: TARGET, "ledger.enqueue")
}

/// One round of the pricing engine (its Prometheus queries are children).
pub fn pricing_round() -> Span {
    tracing::info_span!(target: TARGET, "pricing.round")
}

/// A Prometheus query of a pricing round, as a child span: the endpoint, the signal (`cpu`,
/// `memory`), the PromQL, and the outcome (`ok` and the value, or `kind` of the error).
pub async fn prometheus_query<E>(
    endpoint: &str,
    signal: &'static str,
    query: &str,
    read: impl Future<Output = Result<f64, E>>,
    kind: impl FnOnce(&E) -> &'static str,
) -> Result<f64, E> {
    use tracing::Instrument as _;
    if !on() {
        return read.await;
    }
    let span = tracing::info_span!(
        target: TARGET,
        "prometheus.query",
        otel.kind = "client",
        otel.status_code = Empty,
        db.system.name = "prometheus",
        db.query.text = query,
        enforcer.endpoint = endpoint,
        enforcer.signal = signal,
        enforcer.outcome = Empty,
        enforcer.value = Empty,
    );
    let result = read.instrument(span.clone()).await;
    match &result {
        Ok(v) => {
            span.record("enforcer.outcome", "ok");
            span.record("enforcer.value", *v);
        }
        Err(e) => {
            span.record("enforcer.outcome", kind(e));
            span.record("otel.status_code", "ERROR");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_a_path_gets_the_traces_path() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://vendor.example/otlp/v1/traces"),
            "https://vendor.example/otlp/v1/traces"
        );
    }

    #[test]
    fn a_key_is_named_by_8_hex_digits_of_its_hash() {
        let key = crate::key::ApiKey::parse("abc").expect("key");
        assert_eq!(key_prefix(&key.hash()), "ba7816bf");
    }

    #[test]
    fn no_endpoint_no_traces() {
        assert!(
            Traces::new(&TelemetryConfig::default())
                .expect("no error")
                .is_none()
        );
    }

    #[test]
    fn a_traceparent_is_read_from_headers_and_metadata() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("traceparent", value.parse().expect("header"));
        let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract(&Headers(&headers));
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("traceparent", value.parse().expect("metadata"));
        let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract(&Metadata(&metadata));
        assert_eq!(cx.span().span_context().span_id(), sc.span_id());
    }
}
