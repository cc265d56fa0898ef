//! The pricing engine: every `interval_ms` it reads telemetry and moves each endpoint's price
//! (its multiplier on `base_cost`), off the decision path.
//!
//! The formula (docs/pricing.md has a worked example), per endpoint and tick:
//!
//! ```text
//! cpu_n  = min(cpu / cpu_reference, cap)        endpoint CPU (Prometheus), else node CPU utilisation
//! mem_n  = min(memory / memory_reference, cap)  endpoint memory (Prometheus), else node memory utilisation
//! load_n = min(load1 per CPU / node.load, cap)  the node
//! score  = (w_cpu·cpu_n + w_mem·mem_n + w_load·load_n) / (w_cpu + w_mem + w_load)
//! ema    = α·score + (1 − α)·ema_prev           (ema starts at 1: the base price)
//! surge  = min(base^((load_n − threshold)/span), max) if load_n > threshold, else 1
//! multiplier = max(floor, ema · surge);   price = base_cost · multiplier
//! ```
//!
//! Operational endpoints keep multiplier 1: they stay out of the token economy. Decisions read
//! a price's multiplier with one atomic load ([`crate::price::Price::per_unit`]); the engine
//! never holds anything a decision waits for.
//!
//! The kernel gate must never charge more than userspace: it gets each exact path's lowest
//! multiplier of the last [`KERNEL_WINDOW`], and a price that falls is written into the
//! kernel's map (and acknowledged) **before** userspace charges it; until then userspace keeps
//! charging the higher price. A source that fails or answers nonsense keeps
//! its last good value and is counted in `enforcer_telemetry_errors_total`.
//!
//! The daemon runs the engine inside a [`Pricing`] worker, which a config reload reprices
//! ([`PricingHandle::reprice`]): the engine is rebuilt over the new price book and settings,
//! and an endpoint that stays keeps its telemetry, its smoothed score and its recent
//! multipliers (so its price moves on from where it was); a new endpoint starts at 1. Turning
//! `dynamic` on or off starts or stops the engine.
pub mod calibrate;
pub mod telemetry;

use crate::config::{NodeReferences, PricingConfig, SurgeConfig};
use crate::kernel::GateLink;
use crate::lifecycle::Shutdown;
use crate::metrics::Metrics;
use crate::price::{Price, PriceBook};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::{Signal, TelemetrySource};

/// The pure formula.
#[derive(Debug, Clone)]
pub struct Formula {
    w_cpu: f64,
    w_mem: f64,
    w_load: f64,
    alpha: f64,
    floor: f64,
    cap: f64,
    surge: SurgeConfig,
}

impl Formula {
    /// From validated config (weights normalised to sum 1).
    pub fn new(c: &PricingConfig) -> Self {
        let sum = c.weights.cpu + c.weights.memory + c.weights.load;
        Self {
            w_cpu: c.weights.cpu / sum,
            w_mem: c.weights.memory / sum,
            w_load: c.weights.load / sum,
            alpha: c.alpha,
            floor: c.floor,
            cap: c.cap,
            surge: c.surge.clone(),
        }
    }

    /// `min(value / reference, cap)`, and 0 for anything below 0.
    pub fn normalise(&self, value: f64, reference: f64) -> f64 {
        (value / reference).clamp(0.0, self.cap)
    }

    /// The weighted score of normalised inputs.
    pub fn score(&self, cpu_n: f64, mem_n: f64, load_n: f64) -> f64 {
        self.w_cpu * cpu_n + self.w_mem * mem_n + self.w_load * load_n
    }

    /// One EMA step.
    pub fn ema(&self, prev: f64, score: f64) -> f64 {
        self.alpha * score + (1.0 - self.alpha) * prev
    }

    /// The surge multiplier at normalised load `load_n`.
    pub fn surge(&self, load_n: f64) -> f64 {
        if load_n > self.surge.threshold {
            self.surge
                .base
                .powf((load_n - self.surge.threshold) / self.surge.span)
                .min(self.surge.max)
        } else {
            1.0
        }
    }

    /// The multiplier from the smoothed score and the load.
    pub fn multiplier(&self, ema: f64, load_n: f64) -> f64 {
        (ema * self.surge(load_n)).max(self.floor)
    }

    /// The lowest multiplier the formula can give.
    pub fn floor(&self) -> f64 {
        self.floor
    }
}

/// One line of `GET /v1/costs`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Cost {
    /// The configured path (pattern), or `default`.
    pub endpoint: String,
    /// The configured method, `*` for any.
    pub method: String,
    /// From the cost matrix.
    pub base_cost: f64,
    /// The engine's multiplier.
    pub multiplier: f64,
    /// `base_cost × multiplier`: tokens per unit now.
    pub price: f64,
    /// When the multiplier was last computed (RFC 3339, UTC).
    pub updated_at: String,
    /// What moved it: `prometheus`, `node`, `static` (engine off) or `operational`.
    pub source: String,
}

impl Cost {
    fn of(price: &Price, multiplier: f64, updated_at: &str, source: &str) -> Self {
        Self {
            endpoint: price.class.clone(),
            method: price.method.clone(),
            base_cost: price.base_cost,
            multiplier,
            price: price.base_cost * multiplier,
            updated_at: updated_at.to_owned(),
            source: source.to_owned(),
        }
    }
}

/// The current cost table, shared with the API.
#[derive(Debug, Clone, Default)]
pub struct CostTable(Arc<parking_lot::RwLock<Vec<Cost>>>);

impl CostTable {
    /// A snapshot.
    pub fn get(&self) -> Vec<Cost> {
        self.0.read().clone()
    }

    fn set(&self, costs: Vec<Cost>) {
        *self.0.write() = costs;
    }

    /// Static prices of `book` (the engine off).
    pub(crate) fn set_static(&self, book: &PriceBook) {
        let now = now_rfc3339();
        self.set(
            book.entries()
                .into_iter()
                .map(|p| {
                    let source = if p.operational {
                        "operational"
                    } else {
                        "static"
                    };
                    Cost::of(p, p.multiplier(), &now, source)
                })
                .collect(),
        );
    }
}

/// A Prometheus value not refreshed for this long is dropped: the endpoint falls back to the
/// node's readings (`source = "node"`) until a query answers again.
pub const READING_TTL: Duration = Duration::from_secs(60);

/// What one endpoint's telemetry looked like at the last tick.
#[derive(Debug, Clone, Copy, Default)]
pub struct EndpointReading {
    /// CPU in cores from Prometheus (the last good value), if the endpoint has a query.
    pub cpu: Option<f64>,
    /// Memory in bytes from Prometheus (the last good value), if the endpoint has a query.
    pub memory: Option<f64>,
}

/// The node's readings (last good values).
#[derive(Debug, Clone, Copy)]
pub struct NodeReading {
    /// CPU utilisation, 0–1.
    pub cpu: f64,
    /// Memory utilisation, 0–1.
    pub memory: f64,
    /// Load average per CPU.
    pub load: f64,
}

struct Slot {
    price: Price,
    cpu_query: Option<Signal>,
    cpu_reference: f64,
    memory_query: Option<Signal>,
    memory_reference: f64,
    reading: EndpointReading,
    /// When `reading.cpu` / `reading.memory` were last good.
    fresh: (Option<Instant>, Option<Instant>),
    ema: f64,
    source: &'static str,
    /// Multipliers of the last ticks: the kernel gets their minimum.
    recent: VecDeque<f64>,
    /// The multiplier the kernel's map has (NaN: the plan's, `floor`).
    kernel_sent: f64,
    /// A lower multiplier userspace charges only once the kernel has it.
    pending: Option<f64>,
    gauge: prometheus::Gauge,
    /// `enforcer_price_multiplier` of this endpoint: the price is `base_cost` times it.
    multiplier_gauge: prometheus::Gauge,
}

/// The engine: owns the telemetry sources and the per-endpoint state.
pub struct Engine {
    formula: Formula,
    node_refs: NodeReferences,
    slots: Vec<Slot>,
    node: Arc<dyn TelemetrySource>,
    prometheus: Option<Arc<dyn TelemetrySource>>,
    node_reading: NodeReading,
    metrics: Metrics,
    costs: CostTable,
    gate: Option<GateLink>,
    /// Ticks whose minimum multiplier the kernel gets.
    kernel_window: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("endpoints", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// The kernel's exact-path prices get the lowest multiplier of this window: a price that
/// rises reaches the kernel late, one that falls at once.
pub const KERNEL_WINDOW: Duration = Duration::from_secs(10);

/// How long a round waits for the kernel to take a lower price; without its answer in time,
/// userspace keeps the higher price for this round.
const KERNEL_ACK_WAIT: Duration = Duration::from_secs(1);

impl Slot {
    /// Whether the kernel has this price as an exact-path entry (operational, wildcard and
    /// default prices are at their floor there, which no multiplier goes below).
    fn in_kernel(&self) -> bool {
        !self.price.operational
            && !self.price.class.ends_with('*')
            && self.price.class != "default"
            && !enforcer_common::path_is_ambiguous(self.price.class.as_bytes())
    }
}

impl Engine {
    /// An engine over `book`'s prices (their multipliers are shared with the decisions).
    pub fn new(
        config: &PricingConfig,
        book: &PriceBook,
        node: Arc<dyn TelemetrySource>,
        prometheus: Option<Arc<dyn TelemetrySource>>,
        metrics: Metrics,
        gate: Option<GateLink>,
    ) -> Self {
        // Indexed once: a scan per entry would be quadratic in the endpoints at start-up.
        let configured: std::collections::HashMap<(&str, &str), &crate::config::EndpointConfig> =
            config
                .endpoints
                .iter()
                .map(|e| ((e.path.as_str(), e.method.as_str()), e))
                .collect();
        let by_key = |p: &Price| {
            configured
                .get(&(p.class.as_str(), p.method.as_str()))
                .copied()
        };
        let slots = book
            .entries()
            .into_iter()
            .map(|p| {
                let e = by_key(p);
                let query = |q: Option<&String>| {
                    q.filter(|q| !q.is_empty())
                        .map(|q| Signal::Query(q.clone()))
                };
                Slot {
                    gauge: metrics.price.with_label_values(&[&p.class, &p.method]),
                    multiplier_gauge: metrics
                        .price_multiplier
                        .with_label_values(&[&p.class, &p.method]),
                    price: p.clone(),
                    cpu_query: query(e.map(|e| &e.cpu_query)),
                    cpu_reference: e.map_or(1.0, |e| e.cpu_reference),
                    memory_query: query(e.map(|e| &e.memory_query)),
                    memory_reference: e.map_or(1.0, |e| e.memory_reference),
                    reading: EndpointReading::default(),
                    fresh: (None, None),
                    ema: 1.0,
                    source: if p.operational { "operational" } else { "node" },
                    recent: VecDeque::new(),
                    kernel_sent: f64::NAN,
                    pending: None,
                }
            })
            .collect();
        let interval = Duration::from_millis(config.interval_ms.max(1));
        Self {
            formula: Formula::new(config),
            node_refs: config.node.clone(),
            slots,
            node,
            prometheus,
            node_reading: NodeReading {
                cpu: 0.0,
                memory: 0.0,
                load: 0.0,
            },
            metrics,
            costs: CostTable::default(),
            gate,
            kernel_window: (KERNEL_WINDOW.as_millis() / interval.as_millis()).max(1) as usize,
        }
    }

    /// The table `GET /v1/costs` serves.
    pub fn costs(&self) -> CostTable {
        self.costs.clone()
    }

    /// Takes over what `old` knew of the endpoints that stay (same path pattern and method):
    /// their telemetry, smoothed score and recent multipliers, so a reload does not restart
    /// their prices from 1. The kernel's price map was rebuilt by the reload, so every price is
    /// sent to it again; the gauges of endpoints that are gone are removed.
    fn carry(&mut self, old: Engine) {
        self.node_reading = old.node_reading;
        let mut before: std::collections::HashMap<(String, String), Slot> = old
            .slots
            .into_iter()
            .map(|s| ((s.price.class.clone(), s.price.method.clone()), s))
            .collect();
        for slot in &mut self.slots {
            let key = (slot.price.class.clone(), slot.price.method.clone());
            if let Some(was) = before
                .remove(&key)
                .filter(|was| was.price.operational == slot.price.operational)
            {
                slot.reading = was.reading;
                slot.fresh = was.fresh;
                slot.ema = was.ema;
                slot.source = was.source;
                slot.recent = was.recent;
                while slot.recent.len() > self.kernel_window {
                    slot.recent.pop_front();
                }
            }
        }
        for (class, method) in before.keys() {
            let _ = self.metrics.price.remove_label_values(&[class, method]);
        }
    }

    /// Runs every `interval` until `shutdown`.
    pub async fn run(mut self, interval: Duration, mut shutdown: Shutdown) {
        // `Server::bind` ran the first round: the next one is an interval later (an immediate
        // one would read /proc/stat again before any CPU time elapsed).
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.requested() => break,
                _ = tick.tick() => self.tick().await,
            }
        }
    }

    /// One round: read telemetry, recompute, publish; traced as a `pricing.round` span.
    pub async fn tick(&mut self) {
        use tracing::Instrument as _;
        self.round().instrument(crate::trace::pricing_round()).await;
    }

    async fn round(&mut self) {
        let started = Instant::now();
        self.read_node().await;
        self.read_endpoints().await;
        self.recompute();
        self.publish().await;
        self.metrics
            .pricing_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    async fn read_node(&mut self) {
        let node = Arc::clone(&self.node);
        let (cpu, memory, load) = tokio::join!(
            node.read(&Signal::NodeCpu),
            node.read(&Signal::NodeMemory),
            node.read(&Signal::NodeLoad),
        );
        let keep = |r: Result<f64, telemetry::TelemetryError>, slot: &mut f64| match r
            .and_then(telemetry::sane)
        {
            Ok(v) => *slot = v,
            Err(e) => self
                .metrics
                .telemetry_errors
                .with_label_values(&["node", e.kind()])
                .inc(),
        };
        let mut n = self.node_reading;
        keep(cpu, &mut n.cpu);
        keep(memory, &mut n.memory);
        keep(load, &mut n.load);
        self.node_reading = n;
        for (signal, v) in [("cpu", n.cpu), ("memory", n.memory), ("load", n.load)] {
            self.metrics
                .node_telemetry
                .with_label_values(&[signal])
                .set(v);
        }
    }

    async fn read_endpoints(&mut self) {
        let Some(prom) = self.prometheus.clone() else {
            return;
        };
        let reads = self.slots.iter().map(|s| {
            let prom = Arc::clone(&prom);
            let endpoint = s.price.class.as_str();
            async move {
                let read = |q: &Option<Signal>, signal: &'static str| {
                    let prom = Arc::clone(&prom);
                    let q = q.clone();
                    async move {
                        match &q {
                            // Each query a child span of the round.
                            Some(q @ Signal::Query(text)) => Some(
                                crate::trace::prometheus_query(
                                    endpoint,
                                    signal,
                                    text,
                                    prom.read(q),
                                    telemetry::TelemetryError::kind,
                                )
                                .await,
                            ),
                            Some(q) => Some(prom.read(q).await),
                            None => None,
                        }
                    }
                };
                tokio::join!(read(&s.cpu_query, "cpu"), read(&s.memory_query, "memory"))
            }
        });
        let results = futures_util::future::join_all(reads).await;
        let now = Instant::now();
        for (slot, (cpu, memory)) in self.slots.iter_mut().zip(results) {
            for (result, value, fresh) in [
                (cpu, &mut slot.reading.cpu, &mut slot.fresh.0),
                (memory, &mut slot.reading.memory, &mut slot.fresh.1),
            ] {
                match result {
                    Some(Ok(v)) => {
                        *value = Some(v);
                        *fresh = Some(now);
                    }
                    Some(Err(e)) => {
                        self.metrics
                            .telemetry_errors
                            .with_label_values(&["prometheus", e.kind()])
                            .inc();
                        if fresh.is_some_and(|t| now.duration_since(t) > READING_TTL) {
                            *value = None;
                            *fresh = None;
                        }
                    }
                    None => {}
                }
            }
        }
    }

    /// Recomputes every multiplier from the current readings (no I/O). A rise applies at once;
    /// a fall of a price the kernel has waits for [`Engine::tick`] to hand it to the kernel
    /// first (at once without a kernel gate).
    pub fn recompute(&mut self) {
        let kernel = self.gate.is_some();
        let f = &self.formula;
        let refs = &self.node_refs;
        let node = self.node_reading;
        let load_n = f.normalise(node.load, refs.load);
        for s in &mut self.slots {
            if s.price.operational {
                continue;
            }
            let cpu_n = match s.reading.cpu {
                Some(c) => f.normalise(c, s.cpu_reference),
                None => f.normalise(node.cpu, refs.cpu),
            };
            let mem_n = match s.reading.memory {
                Some(m) => f.normalise(m, s.memory_reference),
                None => f.normalise(node.memory, refs.memory),
            };
            s.source = if s.reading.cpu.is_some() || s.reading.memory.is_some() {
                "prometheus"
            } else {
                "node"
            };
            s.ema = f.ema(s.ema, f.score(cpu_n, mem_n, load_n));
            let m = f.multiplier(s.ema, load_n);
            if kernel && s.in_kernel() && m < s.price.multiplier() {
                s.pending = Some(m);
            } else {
                s.pending = None;
                s.price.set_multiplier(m);
            }
            if s.recent.len() >= self.kernel_window {
                s.recent.pop_front();
            }
            s.recent.push_back(m);
        }
    }

    /// Sets the readings directly (tests, benchmarks).
    pub fn set_readings(&mut self, node: NodeReading, endpoints: &[EndpointReading]) {
        self.node_reading = node;
        for (s, r) in self.slots.iter_mut().zip(endpoints) {
            s.reading = *r;
        }
    }

    /// Hands the kernel its prices (a fall first, and waits for it), then userspace's falls,
    /// then the cost table and gauges.
    async fn publish(&mut self) {
        self.publish_with(false).await;
    }

    /// [`Engine::publish`]; with `replace` (after a reload), the kernel's price map is rebuilt
    /// to the plan's with these prices, and waited for.
    async fn publish_with(&mut self, replace: bool) {
        let mut kernel = Vec::new();
        let mut falls = false;
        for (idx, s) in self.slots.iter().enumerate() {
            // The lowest multiplier of the window, so a rise reaches the kernel only once it
            // has held for the whole window.
            let lowest = s.recent.iter().copied().fold(f64::INFINITY, f64::min);
            if s.in_kernel() && lowest.is_finite() && lowest != s.kernel_sent {
                falls |= lowest < s.kernel_sent;
                let method = (s.price.method != "*").then(|| s.price.method.clone());
                kernel.push((
                    idx,
                    lowest,
                    (method, s.price.class.clone(), s.price.base_cost * lowest),
                ));
            }
        }
        if let Some(gate) = &self.gate
            && (replace || !kernel.is_empty())
        {
            let sent: Vec<(usize, f64)> = kernel.iter().map(|(i, m, _)| (*i, *m)).collect();
            let prices = kernel.into_iter().map(|(_, _, p)| p).collect();
            // Marked as sent only once queued (or, for a fall, applied): a dropped update is
            // sent again next round.
            let delivered = if replace {
                gate.prices_replaced(prices, KERNEL_ACK_WAIT).await
            } else if falls {
                gate.prices_applied(prices, KERNEL_ACK_WAIT).await
            } else {
                gate.prices(prices)
            };
            if delivered {
                for (i, m) in sent {
                    self.slots[i].kernel_sent = m;
                }
            } else if falls {
                tracing::warn!(
                    "the kernel gate did not take lower prices in time: userspace keeps the higher ones this round"
                );
            }
        }
        let now = now_rfc3339();
        let mut costs = Vec::with_capacity(self.slots.len());
        for s in &mut self.slots {
            // The kernel has this price or a lower one now: userspace may charge it.
            if let Some(m) = s.pending
                && s.kernel_sent <= m
            {
                s.price.set_multiplier(m);
                s.pending = None;
            }
            let m = s.price.multiplier();
            s.gauge.set(s.price.base_cost * m);
            s.multiplier_gauge.set(m);
            costs.push(Cost::of(&s.price, m, &now, s.source));
        }
        self.costs.set(costs);
    }
}

/// The cost table of a book with the engine off (static prices).
pub fn static_costs(book: &PriceBook) -> CostTable {
    let table = CostTable::default();
    table.set_static(book);
    table
}

/// A config reload's prices for the [`Pricing`] worker.
#[derive(Debug)]
pub struct Repricing {
    config: PricingConfig,
    book: PriceBook,
    done: tokio::sync::oneshot::Sender<()>,
}

/// How a reload reaches the [`Pricing`] worker.
#[derive(Debug, Clone)]
pub struct PricingHandle(tokio::sync::mpsc::Sender<Repricing>);

/// The pricing worker did not take a reload's prices.
#[derive(Debug, thiserror::Error)]
pub enum RepricingError {
    /// It did not answer in time.
    #[error("the pricing engine did not take the new prices within {0:?}")]
    Timeout(Duration),
    /// It has stopped (the daemon is shutting down).
    #[error("the pricing engine has stopped")]
    Stopped,
}

impl PricingHandle {
    /// Hands the worker `config` and `book` (the book decisions use from now on, built from
    /// `config` with the multipliers of the endpoints that stay carried over) and waits, at
    /// most `wait`, until the engine runs over them and `/v1/costs` shows them.
    pub async fn reprice(
        &self,
        config: PricingConfig,
        book: PriceBook,
        wait: Duration,
    ) -> Result<(), RepricingError> {
        let (done, answered) = tokio::sync::oneshot::channel();
        tokio::time::timeout(wait, async {
            self.0
                .send(Repricing { config, book, done })
                .await
                .map_err(|_| RepricingError::Stopped)?;
            answered.await.map_err(|_| RepricingError::Stopped)
        })
        .await
        .map_err(|_| RepricingError::Timeout(wait))?
    }
}

/// The daemon's pricing worker: runs the [`Engine`] while `pricing.dynamic` is on and keeps
/// static prices in the cost table otherwise; takes a reload's new prices between rounds.
#[derive(Debug)]
pub struct Pricing {
    engine: Option<Engine>,
    interval: Duration,
    costs: CostTable,
    metrics: Metrics,
    gate: Option<GateLink>,
    rx: tokio::sync::mpsc::Receiver<Repricing>,
}

/// The engine's telemetry sources for `config`.
fn sources(config: &PricingConfig) -> (Arc<dyn TelemetrySource>, Option<Arc<dyn TelemetrySource>>) {
    let prometheus = (!config.prometheus.url.is_empty()).then(|| {
        Arc::new(telemetry::Prometheus::from_config(&config.prometheus)) as Arc<dyn TelemetrySource>
    });
    (
        Arc::new(telemetry::ProcNode::at(&config.proc_root)) as Arc<dyn TelemetrySource>,
        prometheus,
    )
}

impl Pricing {
    /// The worker over `book` (the decisions' price book) and the handle that reprices it.
    /// With `dynamic`, the engine runs a first round before this returns, so `/v1/costs`
    /// and the metrics are never empty.
    pub async fn start(
        config: &PricingConfig,
        book: &PriceBook,
        metrics: Metrics,
        gate: Option<GateLink>,
    ) -> (Self, PricingHandle) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut pricing = Self {
            engine: None,
            interval: Duration::from_millis(config.interval_ms.max(1)),
            costs: CostTable::default(),
            metrics,
            gate,
            rx,
        };
        pricing.apply(config, book).await;
        (pricing, PricingHandle(tx))
    }

    /// The table `GET /v1/costs` serves (the same one across reloads).
    pub fn costs(&self) -> CostTable {
        self.costs.clone()
    }

    /// Whether the engine runs.
    pub fn dynamic(&self) -> bool {
        self.engine.is_some()
    }

    /// Runs the engine every interval (while dynamic) and takes reloads, until `shutdown`.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut tick = Self::ticker(self.interval);
        loop {
            tokio::select! {
                () = shutdown.requested() => break,
                _ = tick.tick(), if self.engine.is_some() => {
                    if let Some(engine) = &mut self.engine {
                        engine.tick().await;
                    }
                }
                Some(r) = self.rx.recv() => {
                    let before = self.interval;
                    self.apply(&r.config, &r.book).await;
                    if self.interval != before {
                        tick = Self::ticker(self.interval);
                    }
                    let _ = r.done.send(());
                }
            }
        }
    }

    /// The first round after a start or a reload ran already: the next one is an interval
    /// later (an immediate one would read /proc/stat again before any CPU time elapsed).
    fn ticker(interval: Duration) -> tokio::time::Interval {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    }

    /// Runs over `config` and `book` from now on.
    async fn apply(&mut self, config: &PricingConfig, book: &PriceBook) {
        self.interval = Duration::from_millis(config.interval_ms.max(1));
        let old = self.engine.take();
        if !config.dynamic {
            if old.is_some() {
                // Static prices have no gauges: none of the engine's may linger.
                self.metrics.price.reset();
                // Nor may a price the engine pushed into the kernel: the map goes back to
                // exactly the plan's.
                if let Some(gate) = &self.gate
                    && !gate.prices_replaced(Vec::new(), KERNEL_ACK_WAIT).await
                {
                    tracing::warn!("the kernel gate did not take the static prices in time");
                }
                tracing::info!("pricing engine stopped (pricing.dynamic = false)");
            }
            self.costs.set_static(book);
            return;
        }
        let (node, prometheus) = sources(config);
        let mut engine = Engine::new(
            config,
            book,
            node,
            prometheus,
            self.metrics.clone(),
            self.gate.clone(),
        );
        engine.costs = self.costs.clone();
        match old {
            Some(old) => {
                engine.carry(old);
                // The cost table and the kernel's prices follow the new book now (the map
                // rebuilt, so no push of the old engine survives); the multipliers move at the
                // next round.
                engine.publish_with(true).await;
            }
            None => {
                engine.tick().await;
                tracing::info!(interval_ms = config.interval_ms, "pricing engine running");
            }
        }
        self.engine = Some(engine);
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn formula() -> Formula {
        Formula::new(&Config::default().pricing)
    }

    #[test]
    fn the_formula_on_fixed_inputs() {
        let f = formula();
        // The worked example of docs/pricing.md.
        let cpu_n = f.normalise(0.9, 0.5); // 1.8
        let mem_n = f.normalise(0.4, 0.5); // 0.8
        let load_n = f.normalise(0.85, 1.0); // 0.85
        assert!((cpu_n - 1.8).abs() < 1e-12 && (mem_n - 0.8).abs() < 1e-12);
        let score = f.score(cpu_n, mem_n, load_n);
        assert!((score - (0.65 * 1.8 + 0.25 * 0.8 + 0.10 * 0.85)).abs() < 1e-12);
        assert!((score - 1.455).abs() < 1e-12);
        let ema = f.ema(1.0, score);
        assert!((ema - 1.0455).abs() < 1e-12);
        let surge = f.surge(load_n);
        assert!((surge - 1.5f64.powf(0.5)).abs() < 1e-12, "{surge}");
        let m = f.multiplier(ema, load_n);
        assert!((m - 1.0455 * 1.5f64.sqrt()).abs() < 1e-12);
        assert!((120.0 * m - 153.6565).abs() < 1e-3, "{}", 120.0 * m);
    }

    /// A node whose readings the test sets.
    #[derive(Debug)]
    struct Node(parking_lot::Mutex<(f64, f64, f64)>);

    #[async_trait::async_trait]
    impl TelemetrySource for Node {
        fn name(&self) -> &'static str {
            "node"
        }
        async fn read(&self, s: &Signal) -> Result<f64, telemetry::TelemetryError> {
            let (cpu, mem, load) = *self.0.lock();
            match s {
                Signal::NodeCpu => Ok(cpu),
                Signal::NodeMemory => Ok(mem),
                Signal::NodeLoad => Ok(load),
                Signal::Query(_) => Err(telemetry::TelemetryError::Unsupported),
            }
        }
    }

    #[tokio::test]
    async fn the_kernel_gets_the_lowest_recent_price_and_operational_prices_stay() {
        let config = Config::parse(
            r#"
            [pricing]
            dynamic = true
            alpha = 1.0
            [[pricing.endpoints]]
            method = "POST"
            path = "/generate-report"
            base_cost = 100
            [[pricing.endpoints]]
            path = "/v2/*"
            base_cost = 5
            [[pricing.endpoints]]
            method = "GET"
            path = "/health"
            operational = true
            "#,
        )
        .expect("valid");
        let book = PriceBook::new(&config.pricing);
        let metrics = Metrics::new();
        let (link, mut events) = crate::kernel::sync::test_link(&config, &metrics);
        let node = Arc::new(Node(parking_lot::Mutex::new((0.5, 0.5, 0.5))));
        let mut engine = Engine::new(
            &config.pricing,
            &book,
            Arc::clone(&node) as Arc<dyn TelemetrySource>,
            None,
            metrics,
            Some(link),
        );
        let mut kernel_price = || match events.try_recv() {
            Ok(crate::kernel::sync::Update::Prices { prices, .. }) => Some(prices),
            _ => None,
        };
        // score = 0.65·1 + 0.25·1 + 0.10·0.5 = 0.95.
        engine.tick().await;
        let report_path = book.endpoint("/generate-report").expect("normal form");
        let report = book.price(Some("POST"), &report_path).expect("priced");
        assert!((report.per_unit() - 95.0).abs() < 1e-9);
        let pushed = kernel_price().expect("pushed");
        assert_eq!(
            pushed.len(),
            1,
            "only exact, non-operational paths: {pushed:?}"
        );
        assert_eq!(pushed[0].0.as_deref(), Some("POST"));
        assert!((pushed[0].2 - 95.0).abs() < 1e-9);
        // The price rises: the kernel keeps the lower one (the window's minimum): nothing sent.
        *node.0.lock() = (1.0, 1.0, 0.5);
        engine.tick().await;
        assert!(report.per_unit() > 150.0);
        assert!(kernel_price().is_none());
        // It falls below: sent at once, and userspace charges it only once the kernel has it.
        let before = report.per_unit();
        *node.0.lock() = (0.1, 0.1, 0.1);
        let kernel = async {
            let Some(crate::kernel::sync::Update::Prices {
                prices,
                applied: Some(applied),
                ..
            }) = events.recv().await
            else {
                panic!("a fall waits for the kernel")
            };
            assert_eq!(
                report.per_unit(),
                before,
                "userspace still charges the higher price while the kernel is told"
            );
            let _ = applied.send(());
            prices
        };
        let ((), pushed) = tokio::join!(engine.tick(), kernel);
        assert!(pushed[0].2 < 95.0 && (pushed[0].2 - report.per_unit()).abs() < 1e-9);
        // Without the kernel's answer, userspace keeps the price the kernel has.
        let kernel_has = report.per_unit();
        *node.0.lock() = (0.0, 0.0, 0.0);
        tokio::time::pause();
        engine.tick().await;
        assert_eq!(
            report.per_unit(),
            kernel_has,
            "not lowered without the kernel"
        );
        let health_path = book.endpoint("/health").expect("normal form");
        let health = book.price(Some("GET"), &health_path).expect("priced");
        assert_eq!(health.multiplier(), 1.0, "operational endpoints never move");
    }

    #[tokio::test]
    async fn a_rebuilt_engine_carries_what_stays_and_rebuilds_the_kernels_price_map() {
        let text = |report: f64, extra: &str| {
            Config::parse(&format!(
                r#"
                [pricing]
                dynamic = true
                alpha = 0.5
                [[pricing.endpoints]]
                method = "POST"
                path = "/generate-report"
                base_cost = {report}
                {extra}
                "#
            ))
            .expect("valid")
        };
        let (old_config, new_config) = (
            text(100.0, ""),
            text(
                50.0,
                "[[pricing.endpoints]]\nmethod = \"GET\"\npath = \"/new\"\nbase_cost = 3",
            ),
        );
        let metrics = Metrics::new();
        let (link, mut events) = crate::kernel::sync::test_link(&old_config, &metrics);
        let node = Arc::new(Node(parking_lot::Mutex::new((1.0, 1.0, 1.0))));
        let old_book = PriceBook::new(&old_config.pricing);
        let mut old = Engine::new(
            &old_config.pricing,
            &old_book,
            node.clone(),
            None,
            metrics.clone(),
            Some(link.clone()),
        );
        *node.0.lock() = (2.0, 2.0, 0.5);
        old.tick().await;
        while events.try_recv().is_ok() {}
        let path = old_book.endpoint("/generate-report").expect("normal form");
        let m = old_book
            .price(Some("POST"), &path)
            .expect("priced")
            .multiplier();
        assert!(m > 1.0, "{m}");
        let ema = old.slots[0].ema;

        // The reload's book keeps the multiplier; the engine keeps the score.
        let new_book = PriceBook::new(&new_config.pricing);
        new_book.carry_multipliers(&old_book);
        let report = new_book.price(Some("POST"), &path).expect("priced");
        assert_eq!(report.multiplier(), m);
        let new_path = new_book.endpoint("/new").expect("normal form");
        assert_eq!(
            new_book
                .price(Some("GET"), &new_path)
                .expect("priced")
                .multiplier(),
            1.0
        );
        let mut new = Engine::new(
            &new_config.pricing,
            &new_book,
            node.clone(),
            None,
            metrics,
            Some(link),
        );
        new.carry(old);
        let carried = new
            .slots
            .iter()
            .find(|s| s.price.class == "/generate-report")
            .expect("slot");
        assert_eq!(carried.ema, ema);
        let kernel = async {
            let Some(crate::kernel::sync::Update::Prices {
                prices,
                applied: Some(applied),
                replace: true,
            }) = events.recv().await
            else {
                panic!("the map is rebuilt")
            };
            let _ = applied.send(());
            prices
        };
        let ((), pushed) = tokio::join!(new.publish_with(true), kernel);
        // Every exact path of the new book, at its lowest recent multiplier: the report's is
        // carried (only one round: m), the new endpoint has none yet (the plan's price).
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert_eq!(pushed[0].1, "/generate-report");
        assert!((pushed[0].2 - 50.0 * m).abs() < 1e-9, "{pushed:?}");
        let costs = new.costs().get();
        let line = costs
            .iter()
            .find(|c| c.endpoint == "/generate-report")
            .expect("line");
        assert_eq!((line.base_cost, line.multiplier), (50.0, m));
        // The next round goes on from the carried score, not from 1.
        new.tick().await;
        let f = Formula::new(&new_config.pricing);
        let refs = &new_config.pricing.node;
        let load_n = f.normalise(0.5, refs.load);
        let score = f.score(
            f.normalise(2.0, refs.cpu),
            f.normalise(2.0, refs.memory),
            load_n,
        );
        let expected = f.multiplier(f.ema(ema, score), load_n);
        assert!(expected > m, "a rise: applied at once");
        assert!((report.multiplier() - expected).abs() < 1e-12);
    }

    #[test]
    fn caps_floor_surge_and_ema_convergence() {
        let f = formula();
        assert_eq!(f.normalise(100.0, 1.0), 3.0, "capped");
        assert_eq!(f.normalise(-1.0, 1.0), 0.0);
        assert_eq!(f.surge(0.7), 1.0, "no surge at the threshold");
        assert!((f.surge(1.0) - 1.5).abs() < 1e-12, "one span above: ×1.5");
        assert_eq!(f.surge(3.0), 4.0, "surge capped at max");
        assert_eq!(f.multiplier(0.1, 0.0), 0.5, "never below the floor");
        // An idle node pulls a multiplier of 1 down towards the floor, geometrically (α = 0.1).
        let mut ema = 1.0;
        for _ in 0..10 {
            ema = f.ema(ema, 0.0);
        }
        assert!((ema - 0.9f64.powi(10)).abs() < 1e-12);
        // A steady score is reached: after 60 ticks within 0.2 % of it.
        let mut ema = 1.0;
        for _ in 0..60 {
            ema = f.ema(ema, 2.0);
        }
        assert!((ema - 2.0).abs() < 2.0 * 0.002, "{ema}");
    }
}
