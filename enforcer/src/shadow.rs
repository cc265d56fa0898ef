//! The shadow candidate policy (`[shadow]`): a second tier table and cost matrix, evaluated on
//! the same requests as the enforced policy against buckets of its own, deciding nothing.
//!
//! Where it goes: the decider prices each check a second time with [`CandidatePrices`] (the
//! enforced price × candidate `base_cost` / enforced `base_cost`, so the pricing engine's
//! multiplier and the request's units apply alike), and the token store debits the candidate's
//! bucket in the same call as the real one (`lua/debit.lua`'s CANDIDATE block, the memory
//! store's), with the candidate's numbers of the tier the real debit resolved
//! ([`candidate_buckets`], carried by [`crate::budget::BudgetPolicy::candidate`]). The real
//! decision never depends on it. The ledger records the candidate's would-be decision beside
//! the real one; `enforcer audit shadow-report` compares them (`ledger::shadow`).
//!
//! The candidate is a plain token bucket per key (per shared budget, for its members): it
//! ignores wallet grants and operator grants, calendar quotas, shared budgets' `key_limit`s,
//! refunds and settles. It is evaluated only where the real policy decided by budget: not for
//! unknown keys, request-id conflicts, replays, bad input, operational endpoints, decisions
//! without the store, or forced debits.
//!
//! Not to be confused with shadow *mode* (`budget.shadow`, `tiers.*.shadow`): that one always
//! allows and records what the enforced policy would have denied.
use crate::budget::BucketParams;
use crate::config::{Config, FieldError, TierConfig};
use crate::price::Price;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// `[shadow]`: the candidate policy. Present (even empty), it is evaluated.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowConfig {
    /// `[shadow.tiers.<name>]`: a tier's candidate bucket; tiers not listed keep the enforced
    /// tier's numbers.
    pub tiers: BTreeMap<String, CandidateTierConfig>,
    /// `[[shadow.endpoints]]`: candidate `base_cost`s of enforced endpoints; endpoints not
    /// listed keep their price.
    pub endpoints: Vec<CandidateEndpointConfig>,
    /// The candidate `pricing.default_cost` (endpoints the cost matrix does not list); unset:
    /// unchanged.
    pub default_cost: Option<f64>,
}

/// `[shadow.tiers.<name>]`: every field defaults to the enforced tier's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CandidateTierConfig {
    /// Capacity.
    pub max_tokens: Option<f64>,
    /// Tokens per second earned back.
    pub refill_per_sec: Option<f64>,
    /// Fraction of capacity refill may reach for an idle key.
    pub idle_cap: Option<f64>,
    /// Balance of a key the candidate sees for the first time; default: the enforced tier's
    /// when the candidate changes neither `max_tokens` nor `idle_cap`, else `idle_cap ×
    /// max_tokens` of the candidate.
    pub initial_tokens: Option<f64>,
}

/// `[[shadow.endpoints]]`: names an entry of `[[pricing.endpoints]]` by method and path.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateEndpointConfig {
    /// The enforced entry's method (`*` by default, as there).
    #[serde(default = "any_method")]
    pub method: String,
    /// The enforced entry's path (or `/prefix/*`), exactly as configured.
    pub path: String,
    /// The candidate's tokens per unit.
    pub base_cost: f64,
}

fn any_method() -> String {
    "*".to_owned()
}

/// The candidate bucket of one enforced tier.
pub fn candidate_bucket(enforced: &TierConfig, c: Option<&CandidateTierConfig>) -> BucketParams {
    let resolved_initial = enforced
        .initial_tokens
        .unwrap_or(enforced.idle_cap * enforced.max_tokens);
    let Some(c) = c else {
        return BucketParams {
            max_tokens: enforced.max_tokens,
            refill_per_sec: enforced.refill_per_sec,
            idle_cap: enforced.idle_cap,
            initial_tokens: resolved_initial,
        };
    };
    let max_tokens = c.max_tokens.unwrap_or(enforced.max_tokens);
    let idle_cap = c.idle_cap.unwrap_or(enforced.idle_cap);
    let initial_tokens = c.initial_tokens.unwrap_or(
        // The enforced tier's start fits the candidate only when its bucket has the same size.
        if c.max_tokens.is_none() && c.idle_cap.is_none() {
            resolved_initial
        } else {
            idle_cap * max_tokens
        },
    );
    BucketParams {
        max_tokens,
        refill_per_sec: c.refill_per_sec.unwrap_or(enforced.refill_per_sec),
        idle_cap,
        initial_tokens,
    }
}

/// The candidate buckets of every tier, in the order of [`crate::budget::BudgetPolicy::tiers`]
/// (the config's tier order); `None` without `[shadow]`.
pub fn candidate_buckets(config: &Config) -> Option<Vec<BucketParams>> {
    let shadow = config.shadow.as_ref()?;
    Some(
        config
            .tiers
            .iter()
            .map(|(name, t)| candidate_bucket(t, shadow.tiers.get(name)))
            .collect(),
    )
}

/// The candidate's cost matrix, as factors on the enforced prices.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidatePrices {
    /// Configured path of an enforced entry → (its configured method, candidate / enforced
    /// `base_cost`): looked up by the price's path without allocating.
    ratios: HashMap<String, Vec<(String, f64)>>,
    /// Candidate / enforced `default_cost`.
    default_ratio: f64,
}

impl CandidatePrices {
    /// The candidate prices of a validated `config`; `None` without `[shadow]`.
    pub fn of(config: &Config) -> Option<Self> {
        let shadow = config.shadow.as_ref()?;
        let mut ratios: HashMap<String, Vec<(String, f64)>> = HashMap::new();
        for c in &shadow.endpoints {
            if let Some(enforced) = config
                .pricing
                .endpoints
                .iter()
                .find(|e| e.method == c.method && e.path == c.path)
            {
                ratios
                    .entry(c.path.clone())
                    .or_default()
                    .push((c.method.clone(), c.base_cost / enforced.base_cost));
            }
        }
        Some(Self {
            ratios,
            default_ratio: shadow
                .default_cost
                .map_or(1.0, |d| d / config.pricing.default_cost),
        })
    }

    /// The factor the candidate applies to `price` (an entry of the global cost matrix or of
    /// an Envoy domain's table: a domain's entry of the same method and path as a global one
    /// changes by the same factor, a domain's default by the default's).
    pub fn ratio(&self, price: &Price) -> f64 {
        if price.class == "default" {
            return self.default_ratio;
        }
        self.ratios
            .get(price.class.as_str())
            .and_then(|by_method| by_method.iter().find(|(m, _)| *m == price.method))
            .map_or(1.0, |(_, r)| *r)
    }
}

/// Every semantic error of `[shadow]`, with its field path.
pub fn validate(config: &Config) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let Some(shadow) = &config.shadow else {
        return errors;
    };
    let mut err = |path: String, message: &str| {
        errors.push(FieldError {
            path,
            message: message.to_owned(),
        });
    };
    let positive = |v: f64| v.is_finite() && v > 0.0;
    for (name, c) in &shadow.tiers {
        let p = |field: &str| format!("shadow.tiers.{name}.{field}");
        let Some(enforced) = config.tiers.get(name) else {
            err(
                format!("shadow.tiers.{name}"),
                "must name a tier of [tiers]: the candidate changes an enforced tier's numbers",
            );
            continue;
        };
        if c.max_tokens.is_some_and(|v| !(positive(v) && v <= 1e15)) {
            err(p("max_tokens"), "must be > 0 and <= 1e15");
        }
        if c.refill_per_sec
            .is_some_and(|v| !(v.is_finite() && (0.0..=1e15).contains(&v)))
        {
            err(p("refill_per_sec"), "must be a number >= 0 and <= 1e15");
        }
        if c.idle_cap
            .is_some_and(|v| !(v.is_finite() && (0.0..=1.0).contains(&v)))
        {
            err(p("idle_cap"), "must be between 0 and 1");
        }
        let bucket = candidate_bucket(enforced, Some(c));
        if c.initial_tokens.is_some()
            && !(bucket.initial_tokens.is_finite()
                && (0.0..=bucket.max_tokens).contains(&bucket.initial_tokens))
        {
            err(p("initial_tokens"), "must be between 0 and max_tokens");
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, c) in shadow.endpoints.iter().enumerate() {
        let p = |field: &str| format!("shadow.endpoints[{i}].{field}");
        match config
            .pricing
            .endpoints
            .iter()
            .find(|e| e.method == c.method && e.path == c.path)
        {
            None => err(
                p("path"),
                "must be the method and path of an entry of [[pricing.endpoints]] (the \
                 candidate reprices enforced endpoints)",
            ),
            Some(e) if e.operational => err(
                p("path"),
                "operational endpoints are outside the token economy: the candidate does not \
                 price them",
            ),
            Some(_) => {}
        }
        if !(positive(c.base_cost) && c.base_cost <= 1e15) {
            err(p("base_cost"), "must be > 0 and <= 1e15");
        }
        if !seen.insert((c.method.clone(), c.path.clone())) {
            err(p("path"), "duplicate method and path");
        }
    }
    if shadow
        .default_cost
        .is_some_and(|v| !(positive(v) && v <= 1e15))
    {
        err("shadow.default_cost".into(), "must be > 0 and <= 1e15");
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    const ENFORCED: &str = r#"
        [tiers.free]
        max_tokens = 100
        refill_per_sec = 1
        idle_cap = 0.5
        [tiers.pro]
        max_tokens = 1000
        refill_per_sec = 10
        initial_tokens = 900
        [[pricing.endpoints]]
        method = "POST"
        path = "/generate-report"
        base_cost = 120
        [[pricing.endpoints]]
        path = "/health"
        base_cost = 1
        operational = true
    "#;

    fn errors(shadow: &str) -> Vec<String> {
        match Config::parse(&format!("{ENFORCED}\n{shadow}")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(e)) => e.iter().map(|e| e.path.clone()).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn tiers_not_listed_keep_their_numbers_and_listed_ones_default_field_by_field() {
        let c = Config::parse(&format!(
            "{ENFORCED}\n[shadow.tiers.pro]\nrefill_per_sec = 2\n[shadow.tiers.free]\nmax_tokens = 40\n"
        ))
        .expect("valid");
        assert_eq!(c.budget_policy().candidate, candidate_buckets(&c));
        let [free, pro] = candidate_buckets(&c)
            .expect("candidate")
            .try_into()
            .expect("two");
        // A changed capacity: a new key starts at the candidate's idle ceiling.
        assert_eq!(
            free,
            BucketParams {
                max_tokens: 40.0,
                refill_per_sec: 1.0,
                idle_cap: 0.5,
                initial_tokens: 20.0
            }
        );
        // Same size: the enforced start.
        assert_eq!((pro.max_tokens, pro.refill_per_sec), (1000.0, 2.0));
        assert_eq!(pro.initial_tokens, 900.0);
        assert_eq!(
            Config::parse(ENFORCED)
                .expect("valid")
                .budget_policy()
                .candidate,
            None
        );
    }

    #[test]
    fn candidate_prices_are_ratios_of_the_enforced_entries() {
        let c = Config::parse(&format!(
            "{ENFORCED}\n[shadow]\ndefault_cost = 3\n[[shadow.endpoints]]\nmethod = \"POST\"\npath = \"/generate-report\"\nbase_cost = 180\n"
        ))
        .expect("valid");
        let prices = CandidatePrices::of(&c).expect("candidate");
        let book = crate::price::PriceBook::new(&c.pricing);
        let endpoint = book.endpoint("/generate-report").expect("path");
        let report = book.price(Some("POST"), &endpoint).expect("price");
        assert_eq!(prices.ratio(report), 1.5);
        let other = book
            .price(Some("GET"), &book.endpoint("/other").expect("path"))
            .expect("price");
        assert_eq!(prices.ratio(other), 3.0, "the default, 1 → 3");
        let empty = Config::parse(&format!("{ENFORCED}\n[shadow]\n")).expect("valid");
        assert_eq!(CandidatePrices::of(&empty).expect("on").ratio(report), 1.0);
    }

    #[tokio::test]
    async fn a_decision_prices_the_candidate_with_the_engines_multiplier_units_and_domains() {
        use crate::decision::{Check, Decider, event::Outbox};
        use crate::key::ApiKey;
        let c = Config::parse(&format!(
            "{ENFORCED}\n[pricing.domains.edge]\n[[pricing.domains.edge.endpoints]]\n\
             method = \"POST\"\npath = \"/generate-report\"\nbase_cost = 60\n\
             [[shadow.endpoints]]\nmethod = \"POST\"\npath = \"/generate-report\"\n\
             base_cost = 180\n"
        ))
        .expect("valid");
        let store = std::sync::Arc::new(crate::store::MemoryStore::new(
            c.budget_policy(),
            std::sync::Arc::new(crate::clock::ManualClock::at(1_000_000.0)),
        ));
        let metrics = crate::metrics::Metrics::new();
        let decider = Decider::new(&c, store, metrics.clone(), Outbox::new());
        // The pricing engine doubled the report's price (the domain's entry shares it).
        let book = decider.prices();
        let endpoint = book.endpoint("/generate-report").expect("path");
        book.price(Some("POST"), &endpoint)
            .expect("price")
            .set_multiplier(2.0);
        let ask = |units: f64| Check {
            key: ApiKey::parse("shadow-unit-key").expect("key"),
            endpoint: "/generate-report".into(),
            method: Some("POST".into()),
            client_ip: None,
            units,
            request_id: None,
            reserve: false,
        };
        // 120 × 2 × 3 units; the candidate 180 × 2 × 3. A new free key has 50 (idle cap 0.5):
        // both deny.
        let d = decider.check(ask(3.0)).await.expect("valid");
        assert_eq!((d.allowed, d.cost), (false, 720.0));
        let candidate = d.candidate.expect("a candidate decision");
        assert_eq!((candidate.allowed, candidate.cost), (false, 1080.0));
        // An Envoy domain's entry of the same method and path changes by the same factor
        // (× 1.5): 60 × 2 → 180.
        let d = decider
            .check_all("edge", &mut [ask(1.0)])
            .await
            .expect("valid");
        assert_eq!(d.cost, 120.0);
        assert_eq!(d.candidate.map(|c| c.cost), Some(180.0));
        // An operational endpoint: no candidate decision.
        let mut health = ask(1.0);
        health.endpoint = "/health".into();
        health.method = Some("GET".into());
        let d = decider.check(health).await.expect("valid");
        assert!(d.allowed && d.candidate.is_none(), "{d:?}");
        let count = |o: &str| {
            metrics
                .shadow_candidate_decisions
                .with_label_values(&[o])
                .get()
        };
        assert_eq!((count("allow"), count("deny")), (0, 2));
    }

    #[test]
    fn config_errors_name_their_fields() {
        assert_eq!(
            errors(
                "[[shadow.endpoints]]\nmethod = \"GET\"\npath = \"/generate-report\"\nbase_cost = 5"
            ),
            ["shadow.endpoints[0].path"],
            "an endpoint the enforced matrix does not have (method differs)"
        );
        assert_eq!(
            errors("[[shadow.endpoints]]\npath = \"/health\"\nbase_cost = 5"),
            ["shadow.endpoints[0].path"]
        );
        assert_eq!(
            errors(
                "[[shadow.endpoints]]\nmethod = \"POST\"\npath = \"/generate-report\"\nbase_cost = -1"
            ),
            ["shadow.endpoints[0].base_cost"]
        );
        assert_eq!(
            errors("[shadow.tiers.free]\nmax_tokens = -5\nrefill_per_sec = -1\nidle_cap = 2"),
            [
                "shadow.tiers.free.max_tokens",
                "shadow.tiers.free.refill_per_sec",
                "shadow.tiers.free.idle_cap"
            ]
        );
        assert_eq!(
            errors("[shadow.tiers.gold]\nmax_tokens = 5"),
            ["shadow.tiers.gold"]
        );
        assert_eq!(
            errors("[shadow.tiers.free]\nmax_tokens = 10\ninitial_tokens = 11"),
            ["shadow.tiers.free.initial_tokens"]
        );
        assert_eq!(
            errors("[shadow]\ndefault_cost = 0"),
            ["shadow.default_cost"]
        );
        assert!(errors("[shadow]").is_empty());
    }
}
