//! Prices: what one unit of a request to an endpoint costs, in tokens.
//!
//! Today the price is the static cost matrix of `[pricing]` (an endpoint's `base_cost`, or the
//! default cost); the telemetry-driven pricing engine moves these prices later. Lookups happen
//! on every decision, so they are hash lookups plus a short scan of wildcard prefixes.
use crate::config::PricingConfig;
use std::collections::HashMap;

/// Longest endpoint path accepted.
pub const MAX_PATH_LEN: usize = 2048;

/// The price of a request, before units.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    /// Tokens per unit.
    pub per_unit: f64,
    /// Operational endpoint: charged to the key's operational bucket.
    pub operational: bool,
    /// Low-cardinality name for metric labels: the configured path pattern, or `default`.
    pub class: String,
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
            let price = Price {
                per_unit: e.base_cost,
                operational: e.operational,
                class: e.path.clone(),
            };
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
            default: Price {
                per_unit: config.default_cost,
                operational: false,
                class: "default".to_owned(),
            },
        }
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
                .map(|p| p.per_unit),
            Ok(120.0)
        );
        assert_eq!(
            b.price(Some("GET"), "/generate-report").map(|p| p.per_unit),
            Ok(1.0)
        );
        assert!(
            b.price(Some("GET"), "/health")
                .map(|p| p.operational)
                .unwrap_or(false)
        );
        assert_eq!(
            b.price(Some("GET"), "/v2/bulk/x").map(|p| p.per_unit),
            Ok(50.0)
        );
        assert_eq!(b.price(Some("GET"), "/v2/x").map(|p| p.per_unit), Ok(5.0));
        assert_eq!(
            b.price(None, "/generate-report").map(|p| p.per_unit),
            Ok(120.0)
        );
    }

    #[test]
    fn bad_paths_and_methods() {
        let b = book();
        assert_eq!(b.price(Some("GET"), "health"), Err(PriceError::BadPath));
        assert_eq!(
            b.price(Some("GET"), &format!("/{}", "a".repeat(3000))),
            Err(PriceError::BadPath)
        );
        assert_eq!(b.price(Some("get"), "/x"), Err(PriceError::BadMethod));
    }
}
