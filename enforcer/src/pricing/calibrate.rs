//! Cost calibration (`enforcer audit calibrate`): are tokens proportional to what requests
//! really cost? For each configured endpoint it compares the tokens the ledger charged over a
//! window with the CPU-seconds Prometheus measured for that endpoint's backends over the same
//! window, and proposes the `base_cost` that makes tokens per CPU-second equal across
//! endpoints.
//!
//! The arithmetic ([`fit`]), for endpoints `e` with tokens `t_e` and CPU-seconds `c_e`:
//!
//! ```text
//! r_e   = t_e / c_e                     tokens per CPU-second of e
//! K     = Σt / Σc                       the reference: the fleet-wide tokens per CPU-second
//! err_e = r_e / K − 1                   e's calibration error: +10 % = e is 10 % overpriced
//! base'_e = base_e · K / r_e            (4 significant digits): r'_e = K for every e, Σt kept
//! ```
//!
//! The error reported is the largest `|err_e|` (the seed's "within ±3.2 %") and the
//! CPU-weighted mean of `|err_e|`. "After" is the proposal's error on the same window (only
//! rounding is left), and the honest figure is the out-of-sample one: the proposal fitted on
//! the window's first half, applied to its second half.
//!
//! Nothing here changes prices: `--write` produces a diff for review ([`proposal_diff`]).
use crate::config::{Config, EndpointConfig};
use crate::ledger::postgres::{self, Charged};
use crate::price::PriceBook;
use crate::pricing::telemetry::Prometheus;
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;

/// Why calibration could not run.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    /// The ledger could not be read.
    #[error("reading the ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    /// No endpoint has both tokens and measured CPU.
    #[error("nothing to calibrate: {0}")]
    NothingToCalibrate(String),
    /// The config could not be rewritten.
    #[error("rewriting the config: {0}")]
    Rewrite(String),
}

/// One endpoint's measurements over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    /// Configured method (`*`: any).
    pub method: String,
    /// Configured path (exact, or a prefix ending in `/*`).
    pub path: String,
    /// Its `base_cost` now.
    pub base_cost: f64,
    /// Charged requests.
    pub requests: i64,
    /// Tokens charged (net of refunds and settles).
    pub tokens: f64,
    /// CPU-seconds measured, or why not.
    pub cpu_seconds: Result<f64, String>,
}

/// One endpoint's line of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointCalibration {
    /// Configured method.
    pub method: String,
    /// Configured path.
    pub path: String,
    /// Its `base_cost` now.
    pub base_cost: f64,
    /// Charged requests.
    pub requests: i64,
    /// Tokens charged.
    pub tokens: f64,
    /// CPU-seconds measured.
    pub cpu_seconds: f64,
    /// Tokens per CPU-second.
    pub tokens_per_cpu_second: f64,
    /// `r_e / K − 1` now.
    pub error: f64,
    /// The proposed `base_cost`.
    pub proposed_base_cost: f64,
    /// `r_e / K − 1` with the proposal (rounding only).
    pub error_after: f64,
}

/// Largest and CPU-weighted mean absolute error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ErrorSummary {
    /// Largest `|err_e|`.
    pub max_abs: f64,
    /// `Σ (c_e / Σc) · |err_e|`.
    pub weighted_mean_abs: f64,
}

/// The whole result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// Endpoints calibrated.
    pub endpoints: Vec<EndpointCalibration>,
    /// Endpoints left out, and why (no tokens, no CPU measured, the query failed).
    pub skipped: Vec<Skipped>,
    /// `K`: tokens per CPU-second over all calibrated endpoints.
    pub reference_tokens_per_cpu_second: f64,
    /// Highest over lowest tokens per CPU-second (1 = perfectly proportional).
    pub spread: f64,
    /// The error now.
    pub error_before: ErrorSummary,
    /// The proposal's error on the same window.
    pub error_after: ErrorSummary,
    /// The proposal fitted on the first half of the window, measured on the second half;
    /// `None` when a half has too little data.
    pub error_out_of_sample: Option<ErrorSummary>,
}

/// An endpoint left out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    /// Configured method.
    pub method: String,
    /// Configured path.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// `base'_e` rounded to 4 significant digits: a config value a person can read.
fn round_significant(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// The usable endpoints of `measured`: tokens > 0 and CPU > 0, the rest skipped.
fn usable(measured: &[Measured]) -> (Vec<(&Measured, f64)>, Vec<Skipped>) {
    let mut ok = Vec::new();
    let mut skipped = Vec::new();
    for m in measured {
        let skip = |reason: String| Skipped {
            method: m.method.clone(),
            path: m.path.clone(),
            reason,
        };
        match &m.cpu_seconds {
            Err(e) => skipped.push(skip(format!("CPU not measured: {e}"))),
            Ok(c) if *c <= 0.0 => skipped.push(skip("no CPU measured in the window".into())),
            Ok(_) if m.tokens <= 0.0 => {
                skipped.push(skip("no tokens charged in the window".into()));
            }
            Ok(c) => ok.push((m, *c)),
        }
    }
    (ok, skipped)
}

/// Errors of `(tokens, cpu)` pairs against their own reference.
fn errors(pairs: &[(f64, f64)]) -> (f64, Vec<f64>, ErrorSummary) {
    let tokens: f64 = pairs.iter().map(|p| p.0).sum();
    let cpu: f64 = pairs.iter().map(|p| p.1).sum();
    let k = tokens / cpu;
    let errs: Vec<f64> = pairs.iter().map(|(t, c)| t / c / k - 1.0).collect();
    let summary = ErrorSummary {
        max_abs: errs.iter().fold(0.0, |m, e| m.max(e.abs())),
        weighted_mean_abs: pairs
            .iter()
            .zip(&errs)
            .map(|((_, c), e)| c / cpu * e.abs())
            .sum(),
    };
    (k, errs, summary)
}

/// The proposed base costs of `measured` (by method and path) and the calibration.
pub fn fit(measured: &[Measured]) -> Result<Calibration, CalibrateError> {
    let (ok, skipped) = usable(measured);
    if ok.is_empty() {
        return Err(CalibrateError::NothingToCalibrate(
            skipped
                .iter()
                .map(|s| format!("{} {}: {}", s.method, s.path, s.reason))
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    let pairs: Vec<(f64, f64)> = ok.iter().map(|(m, c)| (m.tokens, *c)).collect();
    let (k, errs, before) = errors(&pairs);
    let proposed: Vec<f64> = ok
        .iter()
        .map(|(m, c)| round_significant(m.base_cost * k / (m.tokens / c)))
        .collect();
    let after_pairs: Vec<(f64, f64)> = ok
        .iter()
        .zip(&proposed)
        .map(|((m, c), p)| (m.tokens * p / m.base_cost, *c))
        .collect();
    let (_, errs_after, after) = errors(&after_pairs);
    let rates: Vec<f64> = pairs.iter().map(|(t, c)| t / c).collect();
    let max = rates.iter().copied().fold(f64::MIN, f64::max);
    let min = rates.iter().copied().fold(f64::MAX, f64::min);
    let endpoints = ok
        .iter()
        .enumerate()
        .map(|(i, (m, c))| EndpointCalibration {
            method: m.method.clone(),
            path: m.path.clone(),
            base_cost: m.base_cost,
            requests: m.requests,
            tokens: m.tokens,
            cpu_seconds: *c,
            tokens_per_cpu_second: rates[i],
            error: errs[i],
            proposed_base_cost: proposed[i],
            error_after: errs_after[i],
        })
        .collect();
    Ok(Calibration {
        endpoints,
        skipped,
        reference_tokens_per_cpu_second: k,
        spread: max / min,
        error_before: before,
        error_after: after,
        error_out_of_sample: None,
    })
}

/// The error on `second` of the base costs fitted on `first`: `None` unless every endpoint
/// usable in `second` was also fitted in `first`, and there are at least two.
pub fn out_of_sample(first: &[Measured], second: &[Measured]) -> Option<ErrorSummary> {
    let fitted = fit(first).ok()?;
    let (ok, _) = usable(second);
    if ok.len() < 2 {
        return None;
    }
    let pairs = ok
        .iter()
        .map(|(m, c)| {
            let e = fitted
                .endpoints
                .iter()
                .find(|e| e.method == m.method && e.path == m.path)?;
            Some((m.tokens * e.proposed_base_cost / m.base_cost, *c))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(errors(&pairs).2)
}

/// The PromQL measuring `endpoint` over `window_secs`: its `calibration_query`, else
/// `template`, with `$method`, `$path` and `$window` replaced; `None` when neither is set.
pub fn query_for(endpoint: &EndpointConfig, template: &str, window_secs: u64) -> Option<String> {
    let q = if endpoint.calibration_query.is_empty() {
        template
    } else {
        &endpoint.calibration_query
    };
    (!q.is_empty()).then(|| {
        q.replace("$method", &endpoint.method)
            .replace("$path", &endpoint.path)
            .replace("$window", &format!("{window_secs}s"))
    })
}

/// Tokens charged per configured endpoint: the ledger's request paths matched to the
/// endpoints of `config` as the price book matches them (so a wildcard collects its paths).
/// Operational endpoints and the default price are not in the cost matrix and are left out.
fn by_endpoint(config: &Config, charged: &[Charged]) -> BTreeMap<(String, String), (i64, f64)> {
    let book = PriceBook::new(&config.pricing);
    let mut out: BTreeMap<(String, String), (i64, f64)> = BTreeMap::new();
    for row in charged {
        let Ok(endpoint) = book.endpoint(&row.endpoint) else {
            continue;
        };
        let method = (row.method != "*").then_some(row.method.as_str());
        let Ok(price) = book.price(method, &endpoint) else {
            continue;
        };
        if price.operational || price.class == "default" {
            continue;
        }
        let e = out
            .entry((price.method.clone(), price.class.clone()))
            .or_default();
        e.0 += row.requests;
        e.1 += row.tokens;
    }
    out
}

/// Where a calibration reads from: the config's endpoints, the ledger, Prometheus, and the
/// PromQL template of an endpoint's CPU-seconds.
#[derive(Debug)]
pub struct Calibrator<'a> {
    /// The config whose cost matrix is calibrated.
    pub config: &'a Config,
    /// The ledger.
    pub pool: &'a PgPool,
    /// Where CPU is measured.
    pub prometheus: &'a Prometheus,
    /// `[pricing.calibration] cpu_seconds_query` or `--query`.
    pub template: &'a str,
}

impl Calibrator<'_> {
    /// Measures every non-operational endpoint over `[from_us, to_us)`.
    pub async fn measure(&self, from_us: i64, to_us: i64) -> Result<Vec<Measured>, CalibrateError> {
        let charged = by_endpoint(
            self.config,
            &postgres::charged_by_endpoint(self.pool, from_us, to_us).await?,
        );
        let window_secs = u64::try_from((to_us - from_us) / 1_000_000)
            .unwrap_or(0)
            .max(1);
        let at = to_us as f64 / 1e6;
        let mut out = Vec::new();
        for e in self
            .config
            .pricing
            .endpoints
            .iter()
            .filter(|e| !e.operational)
        {
            let (requests, tokens) = charged
                .get(&(e.method.clone(), e.path.clone()))
                .copied()
                .unwrap_or_default();
            let cpu_seconds = match query_for(e, self.template, window_secs) {
                None => Err(
                    "no calibration_query, and [pricing.calibration] cpu_seconds_query is empty"
                        .to_owned(),
                ),
                Some(q) => self
                    .prometheus
                    .instant(&q, Some(at))
                    .await
                    .map_err(|err| format!("{q}: {err}")),
            };
            out.push(Measured {
                method: e.method.clone(),
                path: e.path.clone(),
                base_cost: e.base_cost,
                requests,
                tokens,
                cpu_seconds,
            });
        }
        Ok(out)
    }

    /// The calibration of `[from_us, to_us)`, with the out-of-sample check over its halves.
    pub async fn run(&self, from_us: i64, to_us: i64) -> Result<Calibration, CalibrateError> {
        let mut calibration = fit(&self.measure(from_us, to_us).await?)?;
        let mid = from_us + (to_us - from_us) / 2;
        let first = self.measure(from_us, mid).await?;
        let second = self.measure(mid, to_us).await?;
        calibration.error_out_of_sample = out_of_sample(&first, &second);
        Ok(calibration)
    }
}

/// `text` (the config file) with each calibrated endpoint's `base_cost` set to its proposal,
/// comments and layout kept. The result is parsed and validated before it is returned.
pub fn rewrite_config(text: &str, calibration: &Calibration) -> Result<String, CalibrateError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| CalibrateError::Rewrite(e.to_string()))?;
    let endpoints = doc
        .get_mut("pricing")
        .and_then(|p| p.get_mut("endpoints"))
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| CalibrateError::Rewrite("no [[pricing.endpoints]] in the file".into()))?;
    for table in endpoints.iter_mut() {
        let method = table.get("method").and_then(|v| v.as_str()).unwrap_or("*");
        let Some(path) = table.get("path").and_then(|v| v.as_str()) else {
            continue;
        };
        if let Some(e) = calibration
            .endpoints
            .iter()
            .find(|e| e.method == method && e.path == path)
        {
            let value = toml_edit::value(e.proposed_base_cost);
            match table.get_mut("base_cost") {
                // Keep the line's comment and spacing: only the value changes.
                Some(item) => {
                    let decor = item.as_value().map(|v| v.decor().clone());
                    *item = value;
                    if let (Some(decor), Some(v)) = (decor, item.as_value_mut()) {
                        *v.decor_mut() = decor;
                    }
                }
                None => {
                    table.insert("base_cost", value);
                }
            }
        }
    }
    let out = doc.to_string();
    let parsed = Config::parse(&out).map_err(|e| CalibrateError::Rewrite(e.to_string()))?;
    for e in &calibration.endpoints {
        let written = parsed
            .pricing
            .endpoints
            .iter()
            .find(|c| c.method == e.method && c.path == e.path)
            .map(|c| c.base_cost);
        if written != Some(e.proposed_base_cost) {
            return Err(CalibrateError::Rewrite(format!(
                "{} {}: could not set base_cost (is it written in another form?)",
                e.method, e.path
            )));
        }
    }
    Ok(out)
}

/// A unified diff (`diff -u`, 3 lines of context) from `old` to `new`, naming both `path`:
/// what `--write` saves for review, and `patch` applies.
pub fn proposal_diff(path: &str, old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence table (config files are small).
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // The edit script: (' ' | '-' | '+', line).
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Removals before additions, as `diff -u` writes them.
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    let mut out = format!("--- {path}\n+++ {path}\n");
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != ' ').collect();
    let mut k = 0;
    while k < changed.len() {
        // A hunk: changes closer than 2 × context lines apart go together.
        let start = changed[k].saturating_sub(3);
        let mut end = changed[k];
        while k + 1 < changed.len() && changed[k + 1] <= end + 6 {
            k += 1;
            end = changed[k];
        }
        let end = (end + 3).min(ops.len() - 1);
        let old_start = ops[..start].iter().filter(|o| o.0 != '+').count();
        let new_start = ops[..start].iter().filter(|o| o.0 != '-').count();
        let hunk = &ops[start..=end];
        let old_len = hunk.iter().filter(|o| o.0 != '+').count();
        let new_len = hunk.iter().filter(|o| o.0 != '-').count();
        out.push_str(&format!(
            "@@ -{},{old_len} +{},{new_len} @@\n",
            old_start + 1,
            new_start + 1
        ));
        for (op, line) in hunk {
            out.push(*op);
            out.push_str(line);
            out.push('\n');
        }
        k += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str, base: f64, tokens: f64, cpu: f64) -> Measured {
        Measured {
            method: "GET".into(),
            path: path.into(),
            base_cost: base,
            requests: 1,
            tokens,
            cpu_seconds: Ok(cpu),
        }
    }

    #[test]
    fn fit_makes_tokens_proportional_to_cpu_and_keeps_the_total() {
        // Equal prices, CPU 1:3:8: /a is overpriced, /c underpriced.
        let measured = [
            m("/a", 10.0, 1000.0, 1.0),
            m("/b", 10.0, 1000.0, 3.0),
            m("/c", 10.0, 1000.0, 8.0),
        ];
        let c = fit(&measured).expect("fit");
        // K = 3000 tokens / 12 CPU-seconds = 250.
        assert!((c.reference_tokens_per_cpu_second - 250.0).abs() < 1e-9);
        let p: Vec<f64> = c.endpoints.iter().map(|e| e.proposed_base_cost).collect();
        // base' = 10 · 250 / (1000 / c) = 2.5 c.
        assert_eq!(p, vec![2.5, 7.5, 20.0]);
        assert!(
            (c.error_before.max_abs - 3.0).abs() < 1e-9,
            "/a: 1000/250 − 1"
        );
        assert!((c.spread - 8.0).abs() < 1e-9);
        assert!(c.error_after.max_abs < 1e-9);
        // The tokens charged in total stay the same under the proposal.
        let after: f64 = c
            .endpoints
            .iter()
            .map(|e| e.tokens * e.proposed_base_cost / e.base_cost)
            .sum();
        assert!((after - 3000.0).abs() < 1e-6);
    }

    #[test]
    fn endpoints_without_data_are_skipped_with_a_reason() {
        let mut broken = m("/x", 1.0, 5.0, 0.0);
        broken.cpu_seconds = Err("connection refused".into());
        let measured = [
            m("/a", 1.0, 10.0, 1.0),
            m("/b", 1.0, 10.0, 2.0),
            m("/idle", 1.0, 0.0, 2.0),
            broken,
        ];
        let c = fit(&measured).expect("fit");
        assert_eq!(c.endpoints.len(), 2);
        let reasons: Vec<&str> = c.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert!(reasons[0].contains("no tokens"), "{reasons:?}");
        assert!(reasons[1].contains("connection refused"), "{reasons:?}");
        assert!(fit(&[m("/idle", 1.0, 0.0, 1.0)]).is_err());
    }

    #[test]
    fn out_of_sample_applies_the_first_half_fit_to_the_second() {
        let first = [m("/a", 1.0, 100.0, 1.0), m("/b", 1.0, 100.0, 2.0)];
        // The second half's costs moved: /b now 3× /a.
        let second = [m("/a", 1.0, 100.0, 1.0), m("/b", 1.0, 100.0, 3.0)];
        let e = out_of_sample(&first, &second).expect("both halves");
        // Fitted: /a 0.6667, /b 1.333 (ratio 2). Applied to the second half: tokens 66.67 and
        // 133.3 for CPU 1 and 3: K = 50, errors +33 % and −11 %.
        assert!((e.max_abs - 1.0 / 3.0).abs() < 1e-3, "{e:?}");
        assert!(out_of_sample(&first, &second[..1]).is_none());
    }

    #[test]
    fn rounding_keeps_four_significant_digits() {
        assert_eq!(round_significant(123.456), 123.5);
        assert_eq!(round_significant(0.012345), 0.01235);
        assert_eq!(round_significant(98765.0), 98770.0);
    }

    #[test]
    fn the_rewrite_keeps_comments_and_the_diff_applies() {
        let text = "# costs\n[pricing]\ndefault_cost = 1\n\n[[pricing.endpoints]]\nmethod = \"POST\"\npath = \"/a\"\nbase_cost = 10   # tokens per unit\n\n[[pricing.endpoints]]\nmethod = \"GET\"\npath = \"/b\"\n";
        let calibration = Calibration {
            endpoints: [("POST", "/a", 2.5), ("GET", "/b", 7.5)]
                .iter()
                .map(|(method, path, p)| EndpointCalibration {
                    method: (*method).into(),
                    path: (*path).into(),
                    base_cost: 1.0,
                    requests: 1,
                    tokens: 1.0,
                    cpu_seconds: 1.0,
                    tokens_per_cpu_second: 1.0,
                    error: 0.0,
                    proposed_base_cost: *p,
                    error_after: 0.0,
                })
                .collect(),
            skipped: vec![],
            reference_tokens_per_cpu_second: 1.0,
            spread: 1.0,
            error_before: ErrorSummary {
                max_abs: 0.0,
                weighted_mean_abs: 0.0,
            },
            error_after: ErrorSummary {
                max_abs: 0.0,
                weighted_mean_abs: 0.0,
            },
            error_out_of_sample: None,
        };
        let new = rewrite_config(text, &calibration).expect("rewrite");
        assert!(new.contains("base_cost = 2.5   # tokens per unit"), "{new}");
        assert!(new.contains("path = \"/b\"\nbase_cost = 7.5"), "{new}");
        assert!(new.starts_with("# costs\n"));
        let diff = proposal_diff("enforcer.toml", text, &new);
        assert!(
            diff.contains(
                "-base_cost = 10   # tokens per unit\n+base_cost = 2.5   # tokens per unit\n"
            ),
            "{diff}"
        );
        assert!(diff.contains("+base_cost = 7.5\n"), "{diff}");
        assert!(
            diff.starts_with("--- enforcer.toml\n+++ enforcer.toml\n@@ -"),
            "{diff}"
        );
    }
}
