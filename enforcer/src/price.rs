//! Prices: what one unit of a request to an endpoint costs, in tokens.
//!
//! The cost matrix of `[pricing]` gives every endpoint (and the default) a `base_cost`; the
//! pricing engine ([`crate::pricing`]) moves each one by a multiplier it recomputes from
//! telemetry. Lookups happen on every decision, so they are hash lookups plus a short scan of
//! wildcard prefixes, and the multiplier is one atomic load: pricing never waits on the engine.
use crate::config::PricingConfig;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest endpoint path accepted.
pub const MAX_PATH_LEN: usize = 2048;

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
}

impl Price {
    fn new(base_cost: f64, operational: bool, class: &str, method: &str) -> Self {
        Self {
            base_cost,
            multiplier: Arc::new(AtomicU64::new(1f64.to_bits())),
            operational,
            class: class.to_owned(),
            method: method.to_owned(),
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

/// Why an endpoint could not be priced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PriceError {
    /// The path is empty, relative or too long.
    #[error("endpoint must be a path starting with / and at most {MAX_PATH_LEN} bytes")]
    BadPath,
    /// The method is not an HTTP method token.
    #[error("method must be an HTTP method such as GET or POST")]
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
}

impl PriceBook {
    /// Builds the book from validated config.
    pub fn new(config: &PricingConfig) -> Self {
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        for e in &config.endpoints {
            let price = Price::new(e.base_cost, e.operational, &e.path, &e.method);
            match e.path.strip_suffix('*') {
                Some(prefix) => prefixes.push((e.method.clone(), prefix.to_owned(), price)),
                None => exact
                    .entry(e.path.clone())
                    .or_insert_with(Vec::new)
                    .push((e.method.clone(), price)),
            }
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.1.len()));
        Self {
            exact,
            prefixes,
            default: Price::new(config.default_cost, false, "default", "*"),
        }
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

    /// The price of `method path`; without a method, the first configured entry for the path
    /// matches. The query string, if any, is ignored.
    pub fn price(&self, method: Option<&str>, endpoint: &str) -> Result<&Price, PriceError> {
        let path = endpoint.split(['?', '#']).next().unwrap_or_default();
        if !path.starts_with('/') || endpoint.len() > MAX_PATH_LEN {
            return Err(PriceError::BadPath);
        }
        if let Some(m) = method
            && (m.is_empty() || m.len() > 16 || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(PriceError::BadMethod);
        }
        let matches = |configured: &str| method.is_none_or(|m| m == configured);
        if let Some(by_method) = self.exact.get(path) {
            let exact = by_method.iter().find(|(m, _)| matches(m));
            if let Some((_, p)) = exact.or_else(|| by_method.iter().find(|(m, _)| m == "*")) {
                return Ok(p);
            }
        }
        Ok(self
            .prefixes
            .iter()
            .find(|(m, prefix, _)| (m == "*" || matches(m)) && path.starts_with(prefix.as_str()))
            .map(|(_, _, p)| p)
            .unwrap_or(&self.default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn book() -> PriceBook {
        let c = Config::parse(
            r#"
            [pricing]
            default_cost = 1
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
            "#,
        )
        .expect("valid");
        PriceBook::new(&c.pricing)
    }

    #[test]
    fn exact_prefix_and_default() {
        let b = book();
        assert_eq!(
            b.price(Some("POST"), "/generate-report?x=1")
                .map(|p| p.per_unit()),
            Ok(120.0)
        );
        assert_eq!(
            b.price(Some("GET"), "/generate-report")
                .map(|p| p.per_unit()),
            Ok(1.0)
        );
        assert!(
            b.price(Some("GET"), "/health")
                .map(|p| p.operational)
                .unwrap_or(false)
        );
        assert_eq!(
            b.price(Some("GET"), "/v2/bulk/x").map(|p| p.per_unit()),
            Ok(50.0)
        );
        assert_eq!(b.price(Some("GET"), "/v2/x").map(|p| p.per_unit()), Ok(5.0));
        assert_eq!(
            b.price(None, "/generate-report").map(|p| p.per_unit()),
            Ok(120.0)
        );
    }

    #[test]
    fn multipliers_move_prices_and_are_shared_by_clones() {
        let b = book();
        let report = b.price(Some("POST"), "/generate-report").expect("priced");
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
        let err = |m: Option<&str>, p: &str| b.price(m, p).err();
        assert_eq!(err(Some("GET"), "health"), Some(PriceError::BadPath));
        assert_eq!(
            err(Some("GET"), &format!("/{}", "a".repeat(3000))),
            Some(PriceError::BadPath)
        );
        assert_eq!(err(Some("get"), "/x"), Some(PriceError::BadMethod));
    }
}
