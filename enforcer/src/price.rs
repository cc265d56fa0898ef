//! Prices: what one unit of a request to an endpoint costs, in tokens.
//!
//! The cost matrix of `[pricing]` gives every endpoint (and the default) a `base_cost`; the
//! pricing engine ([`crate::pricing`]) moves each one by a multiplier it recomputes from
//! telemetry. Lookups happen on every decision, so they are hash lookups plus a short scan of
//! wildcard prefixes, and the multiplier is one atomic load: pricing never waits on the engine.
//!
//! Only an [`Endpoint`] (a path in normal form, [`crate::endpoint`]) can be priced, so no
//! spelling of a path (`//x`, `/x/`, `/%78`) reaches the matrix as another path. Configured paths
//! are in normal form too (the config refuses others).
use crate::config::PricingConfig;
use crate::endpoint::{Endpoint, EndpointError, TrailingSlash};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest method accepted (bytes).
pub const MAX_METHOD_LEN: usize = 16;

/// The price of a request, before units.
#[derive(Debug, Clone)]
pub struct Price {
    /// Tokens per unit at the reference profile (the cost matrix).
    pub base_cost: f64,
    /// The engine's multiplier, as `f64` bits (1.0 until it runs; shared by clones).
    multiplier: Arc<AtomicU64>,
    /// Operational endpoint: charged to the key's operational bucket.
    pub operational: bool,
    /// Low-cardinality name for metric labels: the configured path pattern, or `default`.
    pub class: String,
    /// The configured method, `*` for any.
    pub method: String,
    /// The most a settle may charge for one request (`max_cost`); `None`: no cap.
    pub max_cost: Option<f64>,
    /// `settle = "after"`: a check is a reservation.
    pub settle_after: bool,
}

impl Price {
    fn new(base_cost: f64, operational: bool, class: &str, method: &str) -> Self {
        Self::sharing(
            base_cost,
            operational,
            class,
            method,
            Arc::new(AtomicU64::new(1f64.to_bits())),
        )
    }

    fn sharing(
        base_cost: f64,
        operational: bool,
        class: &str,
        method: &str,
        multiplier: Arc<AtomicU64>,
    ) -> Self {
        Self {
            base_cost,
            multiplier,
            operational,
            class: class.to_owned(),
            method: method.to_owned(),
            max_cost: None,
            settle_after: false,
        }
    }

    /// With the settle terms of its config entry.
    fn settled_as(self, e: &crate::config::EndpointConfig) -> Self {
        Self {
            max_cost: e.max_cost,
            settle_after: e.settle == crate::config::SettleWhen::After,
            ..self
        }
    }

    /// The current multiplier.
    pub fn multiplier(&self) -> f64 {
        f64::from_bits(self.multiplier.load(Ordering::Relaxed))
    }

    /// Sets the multiplier (the pricing engine).
    pub fn set_multiplier(&self, m: f64) {
        self.multiplier.store(m.to_bits(), Ordering::Relaxed);
    }

    /// Tokens per unit now: `base_cost × multiplier`.
    pub fn per_unit(&self) -> f64 {
        self.base_cost * self.multiplier()
    }
}

/// Why a request could not be priced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PriceError {
    /// The endpoint has no normal form (not a path, control characters, bad escapes, too long).
    #[error(transparent)]
    BadEndpoint(#[from] EndpointError),
    /// The method is not an upper-case HTTP method token.
    #[error("method must be 1-{MAX_METHOD_LEN} upper-case letters, such as GET or POST")]
    BadMethod,
}

/// The cost matrix.
#[derive(Debug, Clone)]
pub struct PriceBook {
    /// path → `(method, price)`; keyed by path alone so a lookup needs no allocation.
    exact: HashMap<String, Vec<(String, Price)>>,
    /// `(method, prefix without the *, price)`, longest prefix first.
    prefixes: Vec<(String, String, Price)>,
    default: Price,
    trailing_slash: TrailingSlash,
    /// Per-domain tables of the Envoy API (`[pricing.domains.NAME]`), empty in a domain's own
    /// book.
    domains: HashMap<String, PriceBook>,
}

impl PriceBook {
    /// Builds the book from validated config.
    pub fn new(config: &PricingConfig) -> Self {
        let mut book = Self::table(
            &config.endpoints,
            config.trailing_slash,
            |e| Price::new(e.base_cost, e.operational, &e.path, &e.method).settled_as(e),
            Price::new(config.default_cost, false, "default", "*"),
        );
        let domains = config
            .domains
            .iter()
            .map(|(name, d)| {
                let default_cost = d.default_cost.unwrap_or(config.default_cost);
                let table = Self::table(
                    &d.endpoints,
                    config.trailing_slash,
                    // A domain's price moves with the global entry of the same method and path
                    // (else the global default): the engine measures endpoints, not domains.
                    // Operational entries never move.
                    |e| {
                        let multiplier = if e.operational {
                            Arc::new(AtomicU64::new(1f64.to_bits()))
                        } else {
                            book.same_entry(&e.method, &e.path)
                                .unwrap_or(&book.default)
                                .multiplier
                                .clone()
                        };
                        Price::sharing(e.base_cost, e.operational, &e.path, &e.method, multiplier)
                            .settled_as(e)
                    },
                    Price::sharing(
                        default_cost,
                        false,
                        "default",
                        "*",
                        book.default.multiplier.clone(),
                    ),
                );
                (name.clone(), table)
            })
            .collect();
        book.domains = domains;
        book
    }

    fn table(
        endpoints: &[crate::config::EndpointConfig],
        trailing_slash: TrailingSlash,
        mut price: impl FnMut(&crate::config::EndpointConfig) -> Price,
        default: Price,
    ) -> Self {
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        for e in endpoints {
            let p = price(e);
            match e.path.strip_suffix('*') {
                Some(prefix) => prefixes.push((e.method.clone(), prefix.to_owned(), p)),
                None => exact
                    .entry(e.path.clone())
                    .or_insert_with(Vec::new)
                    .push((e.method.clone(), p)),
            }
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.1.len()));
        Self {
            exact,
            prefixes,
            default,
            trailing_slash,
            domains: HashMap::new(),
        }
    }

    /// The configured entry of exactly this method and path pattern.
    fn same_entry(&self, method: &str, path: &str) -> Option<&Price> {
        match path.strip_suffix('*') {
            Some(prefix) => self
                .prefixes
                .iter()
                .find(|(m, p, _)| m == method && p == prefix)
                .map(|(_, _, p)| p),
            None => self
                .exact
                .get(path)?
                .iter()
                .find(|(m, _)| m == method)
                .map(|(_, p)| p),
        }
    }

    /// Gives this book's prices the multipliers of `from`'s entries of the same method and
    /// path pattern (and default), for a config reload with the pricing engine: an endpoint
    /// that stays keeps its price movement; a new one starts at 1. Operational prices never
    /// move.
    pub fn carry_multipliers(&self, from: &PriceBook) {
        for p in self.entries() {
            if p.operational {
                continue;
            }
            let was = if p.class == "default" {
                Some(&from.default)
            } else {
                from.same_entry(&p.method, &p.class)
            };
            if let Some(was) = was.filter(|w| !w.operational) {
                p.set_multiplier(was.multiplier());
            }
        }
    }

    /// The cost table of an Envoy rate-limit `domain`: its own when `[pricing.domains]` has
    /// one, else this (global) one.
    pub fn for_domain(&self, domain: &str) -> &PriceBook {
        self.domains.get(domain).unwrap_or(self)
    }

    /// `raw` (a request target as the gateway saw it) in normal form, under this book's
    /// `trailing_slash` rule: the form that is priced, answered and recorded.
    pub fn endpoint(&self, raw: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(raw, self.trailing_slash)
    }

    /// Every price of the book: the configured endpoints (exact, then wildcards), then the
    /// default. The pricing engine sets their multipliers.
    pub fn entries(&self) -> Vec<&Price> {
        let mut all: Vec<&Price> = self
            .exact
            .values()
            .flat_map(|v| v.iter().map(|(_, p)| p))
            .collect();
        all.sort_by(|a, b| (&a.class, &a.method).cmp(&(&b.class, &b.method)));
        all.extend(self.prefixes.iter().map(|(_, _, p)| p));
        all.push(&self.default);
        all
    }

    /// The price of `method endpoint`; without a method, the cheapest entry that matches the
    /// path (of the longest matching wildcard, for wildcards) at the current multipliers: the
    /// request may be any of them, and the kernel gate, which sees the method, never charges
    /// more than that. A wildcard `/p/*` covers the paths below `/p/`, and `/p` itself when
    /// trailing slashes are stripped (`/p/` is `/p` then, and `/p/` was always covered).
    pub fn price(&self, method: Option<&str>, endpoint: &Endpoint) -> Result<&Price, PriceError> {
        if let Some(m) = method
            && (m.is_empty()
                || m.len() > MAX_METHOD_LEN
                || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(PriceError::BadMethod);
        }
        let path = endpoint.as_str();
        let cheapest = |a: &&Price, b: &&Price| a.per_unit().total_cmp(&b.per_unit());
        if let Some(by_method) = self.exact.get(path) {
            let found = match method {
                Some(m) => by_method
                    .iter()
                    .find(|(c, _)| c == m)
                    .or_else(|| by_method.iter().find(|(c, _)| c == "*"))
                    .map(|(_, p)| p),
                None => by_method.iter().map(|(_, p)| p).min_by(cheapest),
            };
            if let Some(p) = found {
                return Ok(p);
            }
        }
        let strip = self.trailing_slash == TrailingSlash::Strip;
        let under = |prefix: &str| {
            path.starts_with(prefix) || (strip && prefix.strip_suffix('/') == Some(path))
        };
        let mut matching = self
            .prefixes
            .iter()
            .filter(|(m, prefix, _)| (m == "*" || method.is_none_or(|x| x == m)) && under(prefix));
        let Some(first) = matching.next() else {
            return Ok(&self.default);
        };
        if method.is_some() {
            return Ok(&first.2);
        }
        // Longest prefix first: the cheapest among the equally long (most specific) ones.
        let len = first.1.len();
        Ok(std::iter::once(first)
            .chain(matching.take_while(|(_, prefix, _)| prefix.len() == len))
            .map(|(_, _, p)| p)
            .min_by(cheapest)
            .unwrap_or(&first.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MATRIX: &str = r#"
            [[pricing.endpoints]]
            method = "POST"
            path = "/generate-report"
            base_cost = 120
            [[pricing.endpoints]]
            method = "GET"
            path = "/health"
            operational = true
            [[pricing.endpoints]]
            path = "/v2/*"
            base_cost = 5
            [[pricing.endpoints]]
            path = "/v2/bulk/*"
            base_cost = 50
            "#;

    fn book_with(trailing: &str) -> PriceBook {
        let c = Config::parse(&format!(
            "[pricing]\ndefault_cost = 1\ntrailing_slash = \"{trailing}\"\n{MATRIX}"
        ))
        .expect("valid");
        PriceBook::new(&c.pricing)
    }

    fn book() -> PriceBook {
        book_with("strip")
    }

    /// What `raw` costs per unit: normal form first, as the decider does.
    fn cost(b: &PriceBook, method: Option<&str>, raw: &str) -> Result<f64, PriceError> {
        let e = b.endpoint(raw)?;
        Ok(b.price(method, &e)?.per_unit())
    }

    #[test]
    fn a_domain_table_reprices_and_moves_with_the_global_multipliers() {
        let config = Config::parse(&format!(
            "[pricing]\ndefault_cost = 2\n{MATRIX}\n\
             [pricing.domains.premium]\ndefault_cost = 7\n\
             [[pricing.domains.premium.endpoints]]\nmethod = \"POST\"\npath = \"/generate-report\"\nbase_cost = 200\n\
             [[pricing.domains.premium.endpoints]]\npath = \"/only-here\"\nbase_cost = 9\n"
        ))
        .expect("valid");
        let book = PriceBook::new(&config.pricing);
        let ep = |p: &str| book.endpoint(p).expect("path");
        let premium = book.for_domain("premium");
        let report = premium
            .price(Some("POST"), &ep("/generate-report"))
            .expect("priced");
        assert_eq!(report.base_cost, 200.0);
        assert_eq!(
            premium
                .price(None, &ep("/elsewhere"))
                .expect("priced")
                .base_cost,
            7.0
        );
        // An unknown domain is priced by the global table.
        assert_eq!(
            book.for_domain("nope")
                .price(Some("POST"), &ep("/generate-report"))
                .expect("priced")
                .base_cost,
            120.0
        );
        // The engine moves the global entries; the domain's follow: the same method and path,
        // else the global default.
        let global = book
            .price(Some("POST"), &ep("/generate-report"))
            .expect("priced");
        global.set_multiplier(1.5);
        assert_eq!(report.per_unit(), 300.0);
        book.price(None, &ep("/elsewhere"))
            .expect("default")
            .set_multiplier(2.0);
        let only_here = premium.price(None, &ep("/only-here")).expect("priced");
        assert_eq!(only_here.per_unit(), 18.0);
    }

    #[test]
    fn exact_prefix_and_default() {
        let b = book();
        assert_eq!(cost(&b, Some("POST"), "/generate-report?x=1"), Ok(120.0));
        assert_eq!(cost(&b, Some("GET"), "/generate-report"), Ok(1.0));
        let health = b.endpoint("/health").expect("normal");
        assert!(
            b.price(Some("GET"), &health)
                .map(|p| p.operational)
                .unwrap_or(false)
        );
        assert_eq!(cost(&b, Some("GET"), "/v2/bulk/x"), Ok(50.0));
        assert_eq!(cost(&b, Some("GET"), "/v2/x"), Ok(5.0));
        assert_eq!(cost(&b, None, "/generate-report"), Ok(120.0));
    }

    #[test]
    fn without_a_method_the_cheapest_matching_entry_is_charged() {
        let c = Config::parse(
            r#"
            [pricing]
            default_cost = 1
            [[pricing.endpoints]]
            method = "POST"
            path = "/report"
            base_cost = 120
            [[pricing.endpoints]]
            method = "GET"
            path = "/report"
            base_cost = 2
            [[pricing.endpoints]]
            method = "POST"
            path = "/v2/*"
            base_cost = 50
            [[pricing.endpoints]]
            method = "GET"
            path = "/v2/*"
            base_cost = 5
            [[pricing.endpoints]]
            path = "/v2/bulk/*"
            base_cost = 80
            "#,
        )
        .expect("valid");
        let b = PriceBook::new(&c.pricing);
        assert_eq!(cost(&b, None, "/report"), Ok(2.0), "not the first entry");
        assert_eq!(cost(&b, Some("POST"), "/report"), Ok(120.0));
        assert_eq!(cost(&b, None, "/v2/x"), Ok(5.0));
        assert_eq!(cost(&b, Some("POST"), "/v2/x"), Ok(50.0));
        assert_eq!(
            cost(&b, None, "/v2/bulk/x"),
            Ok(80.0),
            "the most specific wildcard still decides"
        );
        // At the current multipliers: the engine may make the first one cheaper.
        let post = b
            .entries()
            .into_iter()
            .find(|p| p.class == "/report" && p.method == "POST")
            .expect("entry")
            .clone();
        post.set_multiplier(0.01);
        assert_eq!(cost(&b, None, "/report"), Ok(1.2));
    }

    #[test]
    fn every_spelling_of_an_endpoint_costs_the_same() {
        let b = book();
        for raw in [
            "/generate-report/",
            "//generate-report",
            "/%67enerate-report",
            "/./generate-report",
            "/generate-report/.",
            "/cheap/../generate-report",
            "/%2e%2e/generate-report",
            "/x\\..\\generate-report",
            "/generate-report#frag",
        ] {
            assert_eq!(cost(&b, Some("POST"), raw), Ok(120.0), "{raw}");
        }
        // Wildcards and operational endpoints alike.
        assert_eq!(cost(&b, Some("GET"), "/v2//bulk/./x"), Ok(50.0));
        assert_eq!(cost(&b, Some("GET"), "/v2/bulk/../x"), Ok(5.0));
        let health = b.endpoint("//health/").expect("normal");
        assert!(b.price(Some("GET"), &health).is_ok_and(|p| p.operational));
        // An encoded slash is not a separator: another endpoint.
        assert_eq!(cost(&b, Some("POST"), "/generate-report%2F"), Ok(1.0));
    }

    #[test]
    fn trailing_slashes_follow_the_switch() {
        let strip = book();
        assert_eq!(cost(&strip, Some("POST"), "/generate-report/"), Ok(120.0));
        // `/v2/` was always under `/v2/*`; stripped, it is `/v2`, which stays there.
        assert_eq!(cost(&strip, Some("GET"), "/v2/"), Ok(5.0));
        assert_eq!(cost(&strip, Some("GET"), "/v2"), Ok(5.0));
        assert_eq!(cost(&strip, Some("GET"), "/v2x"), Ok(1.0));
        let keep = book_with("keep");
        assert_eq!(cost(&keep, Some("POST"), "/generate-report/"), Ok(1.0));
        assert_eq!(cost(&keep, Some("POST"), "/generate-report//"), Ok(1.0));
        assert_eq!(cost(&keep, Some("POST"), "/generate-report/x/.."), Ok(1.0));
        assert_eq!(cost(&keep, Some("GET"), "/v2/"), Ok(5.0));
        assert_eq!(cost(&keep, Some("GET"), "/v2"), Ok(1.0));
    }

    #[test]
    fn multipliers_move_prices_and_are_shared_by_clones() {
        let b = book();
        let e = b.endpoint("/generate-report").expect("normal");
        let report = b.price(Some("POST"), &e).expect("priced");
        assert_eq!(
            report.multiplier(),
            1.0,
            "the base price until the engine runs"
        );
        let engine_side = b.clone();
        let handle = engine_side
            .entries()
            .into_iter()
            .find(|p| p.class == "/generate-report")
            .expect("entry")
            .clone();
        handle.set_multiplier(1.25);
        assert_eq!(report.per_unit(), 150.0);
        assert_eq!(
            b.entries().last().map(|p| p.class.as_str()),
            Some("default")
        );
    }

    #[test]
    fn bad_paths_and_methods() {
        let b = book();
        let err = |m: Option<&str>, p: &str| cost(&b, m, p).err();
        assert_eq!(
            err(Some("GET"), "health"),
            Some(PriceError::BadEndpoint(EndpointError::NotAbsolute))
        );
        assert_eq!(
            err(Some("GET"), &format!("/{}", "a".repeat(3000))),
            Some(PriceError::BadEndpoint(EndpointError::TooLong))
        );
        assert_eq!(
            err(Some("GET"), "/a\u{0}"),
            Some(PriceError::BadEndpoint(EndpointError::ControlCharacter))
        );
        for m in ["get", "", "G\u{0}T", "GE\u{7}", "GET ", &"A".repeat(17)] {
            assert_eq!(err(Some(m), "/x"), Some(PriceError::BadMethod), "{m:?}");
        }
    }
}
