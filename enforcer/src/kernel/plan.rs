//! What the kernel gate enforces, derived from the config: the settings for `CONFIG` and
//! `PORTS`, the exact-path prices for `PRICES`, and the config generation that fingerprints them.
//!
//! The kernel may under-price (and pass), never over-price (and wrongly reject): see [`plan`].
use crate::config::Config;
use crate::endpoint::TrailingSlash;
use crate::kernel::loader::GateSettings;
use std::time::Duration;

/// The price table as the kernel sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelPlan {
    /// Settings for `CONFIG` and `PORTS`.
    pub settings: GateSettings,
    /// `(method, exact path, price)` entries for `PRICES`.
    pub prices: Vec<(Option<String>, String, f64)>,
    /// The most expensive price: a key below it might be unable to pay for something.
    pub max_price: f64,
}

/// Derives what the kernel needs from the config.
///
/// The kernel may under-price (and pass), never over-price (and wrongly reject):
///
/// - Operational endpoints are priced 0 (they never touch the main budget, and a price of 0
///   always passes).
/// - Wildcard prefixes cannot be matched in the kernel, nor configured paths the gate never
///   looks up (`enforcer_common::path_is_ambiguous`: longer than it hashes, or with a `%`,
///   whose raw spellings are either ambiguous or match no entry). Requests to them get the
///   kernel's default price, so that default is the cheapest of the config's default cost and
///   every such price (an operational wildcard makes it 0).
/// - A request path that may not be in normal form (`//`, dot segments, `%`, `\`) could be any
///   endpoint once normalised: the ambiguous price is the cheapest price of all, 0 when there
///   is an operational endpoint.
/// - The trailing-slash rule reaches the gate, which hashes `/a/` as `/a` when it is `strip`.
///
/// The cheapest price (for L4 identities whose request line was not read) is over main-budget
/// endpoints and the default cost.
pub fn plan(config: &Config) -> KernelPlan {
    let mut prices = Vec::new();
    let mut kernel_default = config.pricing.default_cost;
    let mut min_price = config.pricing.default_cost;
    let mut max_price = config.pricing.default_cost;
    let mut ambiguous_price = config.pricing.default_cost;
    for e in &config.pricing.endpoints {
        let method = (e.method != "*").then(|| e.method.clone());
        let price = if e.operational { 0.0 } else { e.base_cost };
        ambiguous_price = ambiguous_price.min(price);
        if !e.operational {
            min_price = min_price.min(price);
            max_price = max_price.max(price);
        }
        if e.path.ends_with('*') || enforcer_common::path_is_ambiguous(e.path.as_bytes()) {
            kernel_default = kernel_default.min(price);
        } else {
            prices.push((method, e.path.clone(), price));
        }
    }
    // With the pricing engine, a price can fall to `floor × base`: the kernel starts from
    // there (the engine then pushes exact-path prices, never above what userspace charges),
    // and its default and cheapest prices stay there.
    if config.pricing.dynamic {
        let floor = config.pricing.floor;
        kernel_default *= floor;
        min_price *= floor;
        ambiguous_price *= floor;
        for p in &mut prices {
            p.2 *= floor;
        }
    }
    let mut settings = GateSettings {
        ports: config.kernel.protect_ports.clone(),
        key_header: config.kernel_key_header().to_owned(),
        value_prefix: config.kernel.value_prefix.clone(),
        max_staleness: Duration::from_millis(config.kernel.max_staleness_ms),
        default_price: kernel_default,
        min_price,
        ambiguous_price,
        strip_trailing_slash: config.pricing.trailing_slash == TrailingSlash::Strip,
        generation: 0,
        reset: config.kernel.action == "reset",
    };
    let fingerprint = format!("{settings:?}{prices:?}");
    settings.generation = (enforcer_common::fnv(fingerprint.as_bytes()) as u32) | 1;
    KernelPlan {
        settings,
        prices,
        max_price,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_never_over_prices() {
        let config = Config::parse(
            r#"
            [pricing]
            default_cost = 2
            [[pricing.endpoints]]
            method = "POST"
            path = "/generate-report"
            base_cost = 120
            [[pricing.endpoints]]
            path = "/cheap/*"
            base_cost = 0.5
            [[pricing.endpoints]]
            method = "GET"
            path = "/health"
            operational = true
            "#,
        )
        .expect("valid");
        let p = plan(&config);
        assert_eq!(
            p.settings.default_price, 0.5,
            "wildcards fall back to the cheapest default"
        );
        assert_eq!(p.settings.min_price, 0.5);
        assert_eq!(p.max_price, 120.0);
        assert!(
            p.prices
                .contains(&(Some("GET".into()), "/health".into(), 0.0))
        );
        assert!(
            p.prices
                .contains(&(Some("POST".into()), "/generate-report".into(), 120.0))
        );
        assert_ne!(p.settings.generation, 0);
    }

    #[test]
    fn ambiguous_paths_are_priced_at_the_cheapest_price_of_all() {
        let text = |trailing: &str, health: bool| {
            let mut t = format!(
                r#"
                [pricing]
                default_cost = 2
                trailing_slash = "{trailing}"
                [[pricing.endpoints]]
                method = "POST"
                path = "/generate-report"
                base_cost = 120
                [[pricing.endpoints]]
                path = "/cheap"
                base_cost = 0.5
                [[pricing.endpoints]]
                path = "/a%7Bb"
                base_cost = 0.25
                [[pricing.endpoints]]
                path = "/.well-known/x"
                base_cost = 3
                "#
            );
            if health {
                t.push_str("[[pricing.endpoints]]\npath = \"/health\"\noperational = true\n");
            }
            Config::parse(&t).expect("valid")
        };
        let p = plan(&text("strip", false));
        assert_eq!(p.settings.ambiguous_price, 0.25, "the cheapest of all");
        assert_eq!(
            p.settings.default_price, 0.25,
            "a path with % is never looked up: its raw spellings get the default"
        );
        assert_eq!(p.settings.min_price, 0.25);
        assert!(p.settings.strip_trailing_slash);
        let paths: Vec<&str> = p.prices.iter().map(|(_, path, _)| path.as_str()).collect();
        assert_eq!(
            paths,
            ["/generate-report", "/cheap"],
            "only paths the gate looks up"
        );
        assert_eq!(
            plan(&text("strip", true)).settings.ambiguous_price,
            0.0,
            "an ambiguous path may be an operational endpoint"
        );
        let keep = plan(&text("keep", false));
        assert!(!keep.settings.strip_trailing_slash);
        assert_ne!(keep.settings.generation, p.settings.generation);
    }

    #[test]
    fn unmatchable_paths_lower_the_kernel_default() {
        let long = format!("/{}", "a".repeat(enforcer_common::MAX_PATH_LEN));
        let config = Config::parse(&format!(
            r#"
            [pricing]
            default_cost = 2
            [[pricing.endpoints]]
            path = "{long}"
            base_cost = 1.5
            "#
        ))
        .expect("valid");
        let p = plan(&config);
        assert_eq!(
            p.settings.default_price, 1.5,
            "a path the kernel cannot hash"
        );
        assert!(p.prices.is_empty());
        let config = Config::parse(
            r#"
            [[pricing.endpoints]]
            path = "/health/*"
            operational = true
            "#,
        )
        .expect("valid");
        assert_eq!(
            plan(&config).settings.default_price,
            0.0,
            "an operational wildcard: unknown paths may be operational, so they pass"
        );
    }

    #[test]
    fn with_the_pricing_engine_the_kernel_starts_at_the_floor() {
        let config = Config::parse(
            r#"
            [pricing]
            default_cost = 2
            dynamic = true
            floor = 0.5
            [[pricing.endpoints]]
            method = "POST"
            path = "/generate-report"
            base_cost = 120
            "#,
        )
        .expect("valid");
        let p = plan(&config);
        assert_eq!(p.settings.default_price, 1.0);
        assert_eq!(p.settings.min_price, 1.0);
        assert!(
            p.prices
                .contains(&(Some("POST".into()), "/generate-report".into(), 60.0))
        );
    }

    #[test]
    fn the_generation_changes_with_the_config_only() {
        let a = plan(&Config::default());
        let b = plan(&Config::default());
        assert_eq!(a.settings.generation, b.settings.generation);
        let mut changed = Config::default();
        changed.pricing.default_cost = 3.0;
        assert_ne!(plan(&changed).settings.generation, a.settings.generation);
    }
}
