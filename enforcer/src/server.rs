//! Wiring: builds the store, the decider, the kernel gate and the HTTP API from a config, and
//! serves until shutdown (the accept loop and its connection limits: [`crate::listener`]).
//!
//! The decider publishes every decision to its [`Outbox`]: the audit ledger and the kernel
//! gate's sync subscribe. The background workers (kernel sync, pricing engine, the SIGHUP
//! reload) share one lifecycle ([`crate::lifecycle`]); the ledger writer is flushed after them.
//! [`Server::bind_from`] knows the config's file and overrides, so it can be reloaded
//! ([`crate::reload`]).
use crate::api::{self, App};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::decision::Decider;
use crate::decision::event::{Outbox, Subscriber};
use crate::lifecycle::Workers;
use crate::metrics::Metrics;
use crate::reload::{ConfigSource, Reloader};
use crate::store::{MemoryStore, RedisStore, RedisStoreConfig, StoreError, TokenStore};
use axum::http::{HeaderName, StatusCode};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Errors while starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The token store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
    /// The audit ledger could not be opened.
    #[error("audit ledger")]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The admin API's socket could not be created.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// A config value the HTTP layer cannot use (validation should have caught it).
    #[error("invalid config: {0}")]
    Config(String),
    /// The config file could not be read, or is invalid.
    #[error(transparent)]
    Load(#[from] crate::reload::ReloadError),
}

/// The token store a config asks for: a Redis Cluster when `store.redis_cluster` is set, one
/// Redis when `store.redis_url` is, else in-process.
pub fn build_store(config: &Config) -> Result<Arc<dyn TokenStore>, StoreError> {
    let policy = config.budget_policy();
    if config.store.redis_url.is_empty() && config.store.redis_cluster.is_empty() {
        Ok(Arc::new(
            MemoryStore::new(policy, Arc::new(SystemClock))
                .with_max_records(config.store.memory_max_records),
        ))
    } else {
        let redis = RedisStoreConfig {
            url: config.store.redis_url.clone(),
            cluster: config.store.redis_cluster.clone(),
            connections: config.store.connections,
            connect_timeout: Duration::from_millis(config.store.connect_timeout_ms),
            response_timeout: Duration::from_millis(config.store.timeout_ms),
            wait_replicas: config.store.wait_replicas,
            module: config.store.redis_module,
        };
        Ok(Arc::new(RedisStore::new(&redis, &policy)?))
    }
}

/// A bound, ready-to-serve daemon.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    app: Arc<App>,
    max_body_bytes: usize,
    limits: crate::listener::Limits,
    workers: Workers,
    writer: crate::ledger::Writer,
    /// Envoy's rate-limit API and gRPC health, when `server.grpc_listen` is set.
    grpc: Option<(TcpListener, crate::config::EnvoyConfig)>,
    /// The admin API's socket, when `server.admin_socket` is set.
    admin: Option<(
        tokio::net::UnixListener,
        std::path::PathBuf,
        Arc<crate::admin::Admin>,
    )>,
}

impl Server {
    /// Builds everything from `config` and binds the listen address. Knowing no file, the
    /// daemon cannot reload (shadow switches work); [`Server::bind_from`] can.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        Self::build(config, None).await
    }

    /// Loads the config from `source` (its file, or the defaults, and the command line's
    /// overrides), builds everything and binds; SIGHUP reloads it from there.
    pub async fn bind_from(source: ConfigSource) -> Result<Self, ServerError> {
        let config = source.load()?;
        Self::build(&config, Some(source)).await
    }

    /// The config now serving.
    pub fn config(&self) -> Arc<Config> {
        self.app.reloader.current()
    }

    /// Config reloads and shadow switches of this daemon.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.app.reloader.clone()
    }

    async fn build(config: &Config, source: Option<ConfigSource>) -> Result<Self, ServerError> {
        let sighup = source.is_some();
        let metrics = Metrics::new();
        let store = build_store(config)?;
        // Warm the store connection so the first decision does not pay for it; failure is
        // fine here (the breaker and the failure policy handle an unreachable store).
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), store.ping())
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("ping timed out".into())))
        {
            tracing::warn!(error = %e, backend = store.backend(), "token store not reachable at start");
        }
        let (ledger, writer) = crate::ledger::start(&config.ledger, metrics.ledger.clone()).await?;
        // A reservation's row says when its record expires unsettled (`settle_by`).
        ledger.set_settle_ttl(config.budget_policy().settle_ttl);
        let mut workers = Workers::new();
        let (gate, kernel) =
            crate::kernel::start(config, &metrics, Some(ledger.clone()), &mut workers);
        if config.ledger.database_url.is_empty() {
            tracing::info!(file = %config.ledger.file, "audit ledger: local file (no database configured)");
        } else {
            tracing::info!(spill = %config.ledger.file, "audit ledger: PostgreSQL");
        }
        // The ledger first: its row is written before the caller gets the answer.
        let mut events = Outbox::new().with(Arc::new(ledger.clone()) as Arc<dyn Subscriber>);
        if let Some(gate) = &gate {
            events = events.with(Arc::new(gate.clone()) as Arc<dyn Subscriber>);
        }
        // Low-balance alerts: audit rows, and the webhook's worker when one is configured.
        let webhook = crate::alerts::Webhook::from_config(&config.alerts)
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let alert_queue = webhook.map(|webhook| {
            let (tx, rx) = tokio::sync::mpsc::channel(config.alerts.queue);
            workers.spawn(
                "alert webhook",
                crate::alerts::deliver(webhook, rx, metrics.clone(), workers.shutdown()),
            );
            tx
        });
        let alerts = Arc::new(crate::alerts::Alerts::new(
            &config.alerts,
            Some(ledger.clone()),
            alert_queue,
            metrics.clone(),
        ));
        events = events.with(alerts.clone() as Arc<dyn Subscriber>);
        let decider = Decider::new(config, store, metrics.clone(), events);
        alerts.follow(decider.rules_switch());
        // The pricing worker runs whether or not the engine does: a reload may turn it on.
        // With `dynamic`, its first round runs before serving, so /v1/costs and the metrics
        // are never empty.
        let (pricing, repricing) = crate::pricing::Pricing::start(
            &config.pricing,
            &decider.prices(),
            metrics.clone(),
            gate.clone(),
        )
        .await;
        let costs = pricing.costs();
        workers.spawn("pricing", pricing.run(workers.shutdown()));
        // The store's Redis: its busy-reply-threshold and script times (the seed's outage).
        let redis_nodes = if !config.store.redis_cluster.is_empty() {
            config.store.redis_cluster.clone()
        } else if !config.store.redis_url.is_empty() {
            vec![config.store.redis_url.clone()]
        } else {
            Vec::new()
        };
        if !redis_nodes.is_empty() {
            workers.spawn(
                "redis watch",
                crate::store::redis_watch::watch(
                    redis_nodes,
                    metrics.clone(),
                    Duration::from_millis(config.store.watch_interval_ms),
                    workers.shutdown(),
                ),
            );
        }
        let reloader = Arc::new(Reloader::new(
            source,
            config,
            crate::reload::Parts {
                rules: decider.rules_switch(),
                store: decider.store().clone(),
                local: decider.local().cloned(),
                pricing: Some(repricing),
                costs: costs.clone(),
                gate,
                ledger: Some(ledger),
                metrics: metrics.clone(),
            },
        ));
        if sighup {
            spawn_sighup(&mut workers, reloader.clone());
        }
        if kernel.get().attached && config.server.trusted_proxies.is_empty() {
            tracing::info!(
                "no [server] trusted_proxies: no request names a client address, so the kernel \
                 gate binds no addresses (L4 identity); see docs/http-api.md#client-addresses"
            );
        }
        let app = Arc::new(App {
            decider,
            metrics,
            key_header: HeaderName::try_from(config.server.key_header.as_str())
                .map_err(|e| ServerError::Config(format!("server.key_header: {e}")))?,
            auth_deny_status: StatusCode::from_u16(config.server.auth_deny_status)
                .map_err(|e| ServerError::Config(format!("server.auth_deny_status: {e}")))?,
            kernel,
            costs,
            trusted_proxies: crate::client_addr::TrustedProxies::new(
                config.server.trusted_proxies.clone(),
            ),
            reloader,
        });
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        if let Some(local) = app.decider.local() {
            let listen = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            // The heartbeat only when the node count is not fixed by the config.
            let heartbeat = config.store.local_nodes == 0;
            workers.spawn(
                "fail-soft reconciler",
                local.clone().run(
                    crate::decision::local::Reconciler {
                        store: app.decider.store().clone(),
                        events: app.decider.events().clone(),
                        node: crate::decision::local::node_id(&config.ledger.node, listen),
                        heartbeat,
                        tick: Duration::from_millis(config.store.heartbeat_ms),
                        // Off the decision path: a debit-back may wait longer than a decision
                        // (one that times out is retried under its id: a replay, never a
                        // second charge).
                        timeout: Duration::from_millis(config.store.timeout_ms)
                            .max(Duration::from_secs(1)),
                    },
                    workers.shutdown(),
                ),
            );
            tracing::info!(
                local_nodes = config.store.local_nodes,
                heartbeat,
                "fail-soft local buckets ready (on_store_failure = \"local\")"
            );
        }
        let limits = crate::listener::Limits {
            header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(config.server.idle_timeout_ms),
            max_connections: config.server.max_connections,
        };
        let grpc = match config.server.grpc_addr() {
            Some(addr) => Some((
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
                config.envoy.clone(),
            )),
            None => None,
        };
        let admin = if config.server.admin_socket.is_empty() {
            None
        } else {
            let path = std::path::PathBuf::from(&config.server.admin_socket);
            match crate::admin::bind(&path).await {
                Ok(listener) => {
                    tracing::info!(socket = %path.display(), "admin API listening");
                    let admin = Arc::new(crate::admin::Admin {
                        app: app.clone(),
                        pin_dir: (!config.kernel.interfaces.is_empty())
                            .then(|| std::path::PathBuf::from(&config.kernel.pin_dir)),
                        started: std::time::Instant::now(),
                    });
                    Some((listener, path, admin))
                }
                // The default path needs root (/run): a user who did not ask for the admin
                // API still gets a daemon. A path the config names must work.
                Err(e) if config.server.admin_socket == crate::config::DEFAULT_ADMIN_SOCKET => {
                    tracing::warn!(error = %e, "admin API off: set [server] admin_socket (or --admin-socket) to a path this user may create");
                    None
                }
                Err(e) => return Err(e.into()),
            }
        };
        raise_file_limit(limits.max_connections);
        Ok(Self {
            listener,
            app,
            max_body_bytes: config.server.max_body_bytes,
            limits,
            workers,
            writer,
            grpc,
            admin,
        })
    }

    /// The admin API's socket, if it is served.
    pub fn admin_socket(&self) -> Option<&std::path::Path> {
        self.admin.as_ref().map(|(_, path, _)| path.as_path())
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.listener.local_addr().map_err(ServerError::Serve)
    }

    /// The bound gRPC address (Envoy's rate-limit API), if gRPC is on.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves; then stops accepting and drains the requests in
    /// flight, stops and joins the workers (the kernel sync applies what the last decisions
    /// changed and leaves the pinned maps enforcing; the pricing engine stops), and flushes the
    /// audit ledger (written to PostgreSQL, or spilled).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Self {
            listener,
            app,
            max_body_bytes,
            limits,
            workers,
            writer,
            grpc,
            admin,
        } = self;
        // One signal for both listeners.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop.send(true);
        });
        let signal = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let grpc = grpc.map(|(listener, mapping)| {
            tokio::spawn(serve_grpc(
                listener,
                crate::rls::RateLimitApi::new(app.clone(), mapping),
                max_body_bytes,
                signal(),
            ))
        });
        let admin = admin.map(|(listener, path, admin)| {
            tokio::spawn(crate::admin::serve(listener, path, admin, signal()))
        });
        let metrics = app.metrics.http.clone();
        let router = api::router(app, max_body_bytes);
        crate::listener::serve(listener, router, limits, metrics, signal()).await;
        if let Some(grpc) = grpc {
            match grpc.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "gRPC server failed"),
                Err(e) => tracing::error!(error = %e, "gRPC server task failed"),
            }
        }
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        tracing::info!(workers = ?workers.names(), "requests drained; stopping the workers");
        workers.stop().await;
        let _ = tokio::task::spawn_blocking(move || writer.shutdown()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// SIGHUP reloads the config (a worker, so it stops with the others). A failed reload is
/// logged and counted by the reloader; the old config keeps serving.
fn spawn_sighup(workers: &mut Workers, reloader: Arc<Reloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP: reload through the admin socket only");
            return;
        }
    };
    let mut shutdown = workers.shutdown();
    workers.spawn("config reload (SIGHUP)", async move {
        loop {
            tokio::select! {
                () = shutdown.requested() => break,
                got = hangup.recv() => {
                    if got.is_none() {
                        break;
                    }
                    tracing::info!("SIGHUP: reloading the config");
                    // The outcome is logged and counted by the reloader.
                    let _ = reloader.reload().await;
                }
            }
        }
    });
}

/// Serves Envoy's rate-limit API and `grpc.health.v1.Health` until `shutdown`: health says
/// `SERVING` while decisions are answered (also with the store down: the failure policy
/// answers), and `NOT_SERVING` once shutdown begins, so Envoy and Kubernetes stop sending.
async fn serve_grpc(
    listener: TcpListener,
    api: crate::rls::RateLimitApi,
    max_message_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RateLimitServiceServer<crate::rls::RateLimitApi>>()
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        // A peer that went away (a dead Envoy, a cut network) is noticed and its connection
        // dropped; a flood of streams on one connection is capped (Envoy opens another).
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(1024))
        .add_service(health)
        // `server.max_body_bytes` bounds a call as it bounds an HTTP body.
        .add_service(
            api.into_service()
                .max_decoding_message_size(max_message_bytes),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            reporter
                .set_not_serving::<RateLimitServiceServer<crate::rls::RateLimitApi>>()
                .await;
        })
        .await
}

/// File descriptors besides the client connections: Redis, PostgreSQL, the ledger file, the
/// kernel gate's maps, the runtime.
const SPARE_FDS: u64 = 1024;

/// Raises the soft open-file limit so that `max_connections` can be reached (Debian's default
/// soft limit is 1024, far below the default cap): to what is needed, at most the hard limit.
/// Past the limit, accepting fails (the listener retries) before the cap bites.
fn raise_file_limit(max_connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let needed = max_connections as u64 + SPARE_FDS;
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= needed {
        return;
    }
    let target = limit.maximum.map_or(needed, |hard| hard.min(needed));
    let raised = target > soft
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            },
        )
        .is_ok();
    let now = if raised { target } else { soft };
    if now < needed {
        tracing::warn!(
            open_files = now,
            max_connections,
            "the open-file limit is below server.max_connections plus spare: accepting will fail before the cap (raise LimitNOFILE / ulimit -n)"
        );
    } else {
        tracing::info!(
            from = soft,
            to = now,
            "raised the open-file limit for server.max_connections"
        );
    }
}

/// A future that resolves on SIGINT or SIGTERM. The handlers are installed *now*, not when the
/// future is first polled: a SIGTERM that arrives between "listening" and the first poll (a pod
/// deleted right after it started) must stop the daemon cleanly, ledger flushed, instead of
/// killing it with the default action.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
        tracing::info!("shutting down");
    })
}
