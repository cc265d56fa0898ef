//! Calendar quotas: a per-tier allowance (`quota = { amount, period, anchor_day, timezone }`)
//! that resets at calendar boundaries (a day, an ISO week, a month, in an IANA time zone),
//! charged beside the continuous-refill token bucket, all or nothing (docs/credits.md).
//!
//! Lua in Redis has no time-zone database, so the daemon computes the boundaries here and hands
//! the script four consecutive period starts around its own clock (`[b0, b1, b2, b3]`: the
//! previous, current and next periods); the script picks the period that contains Redis `TIME`,
//! so clock skew between the daemon and Redis cannot pick a wrong period. [`decide`] is the
//! rule the script mirrors (`lua/debit.lua`'s quota block); the in-process store calls it.
use chrono::{Datelike, Days, Months, NaiveDate, NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use serde::Deserialize;

/// The length of a quota period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// From local midnight to local midnight.
    Day,
    /// Seven days from local midnight of the anchor weekday.
    Week,
    /// From local midnight of the anchor day of one month to that of the next.
    Month,
}

/// `[tiers.<name>].quota`, as written in the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Tokens a key may spend per period.
    pub amount: f64,
    /// `"day"`, `"week"` or `"month"`.
    pub period: Period,
    /// The day the period starts on: for `month` the day of the month (1..=28, so every month
    /// has it), for `week` the ISO weekday (1 = Monday ..= 7 = Sunday); ignored for `day`.
    /// Default 1.
    pub anchor_day: Option<u32>,
    /// IANA time zone whose local midnight starts a period; default `"UTC"`.
    pub timezone: Option<String>,
}

/// A validated quota.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// Tokens per period.
    pub amount: f64,
    /// The period.
    pub period: Period,
    /// Day of month (month) or ISO weekday (week); 1 for day.
    pub anchor_day: u32,
    /// The zone the calendar is read in.
    pub tz: Tz,
}

/// Why a quota config is refused: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct QuotaError {
    /// The field under `quota` (`amount`, `anchor_day`, `timezone`).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl QuotaConfig {
    /// Checks every field; the errors name the field.
    pub fn build(&self) -> Result<Quota, Vec<QuotaError>> {
        let mut errors = Vec::new();
        if !(self.amount.is_finite() && self.amount > 0.0 && self.amount <= 1e15) {
            errors.push(QuotaError {
                field: "amount",
                message: "must be > 0 and <= 1e15".into(),
            });
        }
        let anchor = self.anchor_day.unwrap_or(1);
        match self.period {
            Period::Month if !(1..=28).contains(&anchor) => errors.push(QuotaError {
                field: "anchor_day",
                message: format!(
                    "a monthly quota starts on a day of the month 1..=28 (every month has it), got {anchor}"
                ),
            }),
            Period::Week if !(1..=7).contains(&anchor) => errors.push(QuotaError {
                field: "anchor_day",
                message: format!(
                    "a weekly quota starts on an ISO weekday 1 (Monday) ..= 7 (Sunday), got {anchor}"
                ),
            }),
            _ => {}
        }
        let zone = self.timezone.as_deref().unwrap_or("UTC");
        let tz = match zone.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                errors.push(QuotaError {
                    field: "timezone",
                    message: format!(
                        "{zone:?} is not an IANA time zone name (e.g. \"UTC\", \"Europe/Berlin\")"
                    ),
                });
                None
            }
        };
        match tz {
            Some(tz) if errors.is_empty() => Ok(Quota {
                amount: self.amount,
                period: self.period,
                anchor_day: if self.period == Period::Day {
                    1
                } else {
                    anchor
                },
                tz,
            }),
            _ => Err(errors),
        }
    }
}

impl Quota {
    /// Four consecutive period starts, seconds since the Unix epoch: `[b0, b1, b2, b3]` with
    /// `b1 <= now < b2` (the period containing `now`, and one on either side).
    pub fn boundaries(&self, now: f64) -> [f64; 4] {
        let today = self
            .tz
            .timestamp_opt(now.floor() as i64, 0)
            .single()
            .map(|t| t.date_naive())
            // Out of chrono's range (an absurd clock): the epoch's day, still a valid answer
            // shape; the script then finds Redis TIME outside and refuses, writing nothing.
            .unwrap_or_default();
        let start = self.start_date(today);
        let dates = [-1i32, 0, 1, 2].map(|k| self.shift(start, k));
        let mut b = dates.map(|d| self.midnight(d));
        // The local date of `now` is the period's, but its midnight may lie after `now` only
        // if midnight was skipped by a transition at an instant after now: impossible, as a
        // skipped midnight starts the day at the transition, which precedes any local time of
        // that day. Kept as a guard so the answer always contains `now`.
        if now < b[1] {
            b = [-2i32, -1, 0, 1].map(|k| self.midnight(self.shift(start, k)));
        }
        b
    }

    /// The first date of the period containing `date`.
    fn start_date(&self, date: NaiveDate) -> NaiveDate {
        match self.period {
            Period::Day => date,
            Period::Week => {
                let back = (date.weekday().number_from_monday() + 7 - self.anchor_day) % 7;
                date - Days::new(u64::from(back))
            }
            Period::Month => {
                let first = date.with_day(self.anchor_day).unwrap_or(date);
                if date.day() >= self.anchor_day {
                    first
                } else {
                    first - Months::new(1)
                }
            }
        }
    }

    /// The start date `k` periods after `start` (negative: before).
    fn shift(&self, start: NaiveDate, k: i32) -> NaiveDate {
        let n = k.unsigned_abs();
        match (self.period, k >= 0) {
            (Period::Day, true) => start + Days::new(u64::from(n)),
            (Period::Day, false) => start - Days::new(u64::from(n)),
            (Period::Week, true) => start + Days::new(7 * u64::from(n)),
            (Period::Week, false) => start - Days::new(7 * u64::from(n)),
            (Period::Month, true) => start + Months::new(n),
            (Period::Month, false) => start - Months::new(n),
        }
    }

    /// The instant the local day `date` starts: local midnight; the earlier one when midnight
    /// happens twice (clocks set back at midnight); the first local time that exists when it
    /// is skipped (clocks set forward at midnight, e.g. America/Santiago, or a whole day
    /// skipped, as Pacific/Apia did on 2011-12-30).
    fn midnight(&self, date: NaiveDate) -> f64 {
        let local = date.and_hms_opt(0, 0, 0).unwrap_or_default();
        if let Some(t) = self.tz.from_local_datetime(&local).earliest() {
            return t.timestamp() as f64;
        }
        // Skipped: the transition instant. Walk UTC minutes from a point certainly before
        // local midnight (no zone is ahead of UTC by 15 h) to the first whose local time is
        // at or after it; transitions fall on whole minutes. At most 2 days: bounded.
        let mut t = local.and_utc().timestamp() - 15 * 3600;
        let end = t + 2 * 86_400;
        while t < end {
            if self.local(t) >= local {
                return t as f64;
            }
            t += 60;
        }
        t as f64
    }

    fn local(&self, t: i64) -> NaiveDateTime {
        self.tz
            .timestamp_opt(t, 0)
            .single()
            .map(|d| d.naive_local())
            .unwrap_or_default()
    }
}

/// What the quota part of a debit decided ([`decide`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaDecision {
    /// The start of the period containing the store's now (what the usage key and the
    /// request record keep).
    pub start: f64,
    /// Its end: when the quota resets.
    pub end: f64,
    /// Tokens used in this period before the debit.
    pub used: f64,
    /// Whether the quota can pay `cost` (a forced debit always can).
    pub allows: bool,
}

/// The store's now lies in none of the periods the daemon passed: its clock and the store's
/// are further apart than a period. Nothing is charged.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error(
    "the store's clock ({now}) is outside the quota periods the daemon computed ({from} .. {to}): \
     daemon and store clocks disagree by more than a period"
)]
pub struct OutsidePeriods {
    /// The store's now.
    pub now: f64,
    /// The first boundary passed.
    pub from: f64,
    /// The last.
    pub to: f64,
}

/// The quota rule: the period containing `now` among `bounds`; usage stored for that period
/// start counts, usage stored for any other period is over (a new period starts at 0);
/// the quota allows when `used + cost <= amount`, or always when `forced`.
pub fn decide(
    bounds: &[f64; 4],
    stored: Option<(f64, f64)>,
    now: f64,
    amount: f64,
    cost: f64,
    forced: bool,
) -> Result<QuotaDecision, OutsidePeriods> {
    let Some(i) = (0..3).find(|&i| bounds[i] <= now && now < bounds[i + 1]) else {
        return Err(OutsidePeriods {
            now,
            from: bounds[0],
            to: bounds[3],
        });
    };
    let (start, end) = (bounds[i], bounds[i + 1]);
    let used = match stored {
        Some((s, used)) if s == start => used,
        _ => 0.0,
    };
    Ok(QuotaDecision {
        start,
        end,
        used,
        allows: forced || used + cost <= amount,
    })
}

/// Milliseconds until a quota that denied `cost` can pay it: the reset, or `None` when the
/// cost is above the whole allowance (it never will).
pub fn retry_after_ms(d: &QuotaDecision, now: f64, amount: f64, cost: f64) -> Option<u64> {
    (cost <= amount).then(|| ((d.end - now) * 1000.0).ceil().max(0.0) as u64)
}

/// Usage given back or charged after the debit (a refund, a settle): only while the usage
/// stored is still that of the period the request was charged in; never below 0.
pub fn adjust(stored: Option<(f64, f64)>, charged_start: f64, delta: f64) -> Option<(f64, f64)> {
    match stored {
        Some((s, used)) if s == charged_start => Some((s, (used + delta).max(0.0))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(period: Period, anchor: u32, tz: &str) -> Quota {
        QuotaConfig {
            amount: 100.0,
            period,
            anchor_day: Some(anchor),
            timezone: Some(tz.to_owned()),
        }
        .build()
        .expect("valid")
    }

    fn at(tz: &str, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> f64 {
        let tz: Tz = tz.parse().expect("tz");
        tz.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .earliest()
            .expect("local time exists")
            .timestamp() as f64
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> f64 {
        at("UTC", y, mo, d, h, mi)
    }

    #[test]
    fn monthly_utc_on_the_first() {
        let q = quota(Period::Month, 1, "UTC");
        let b = q.boundaries(utc(2026, 3, 15, 12, 0));
        assert_eq!(
            b,
            [
                utc(2026, 2, 1, 0, 0),
                utc(2026, 3, 1, 0, 0),
                utc(2026, 4, 1, 0, 0),
                utc(2026, 5, 1, 0, 0)
            ]
        );
        // The boundary itself belongs to the new period; a second before, to the old one.
        assert_eq!(
            q.boundaries(utc(2026, 4, 1, 0, 0))[1],
            utc(2026, 4, 1, 0, 0)
        );
        assert_eq!(
            q.boundaries(utc(2026, 4, 1, 0, 0) - 1.0)[1],
            utc(2026, 3, 1, 0, 0)
        );
    }

    #[test]
    fn monthly_anchor_day_before_and_after_it_and_across_the_year() {
        let q = quota(Period::Month, 15, "UTC");
        // The 10th is before the 15th: the period started on the 15th of the month before.
        assert_eq!(
            q.boundaries(utc(2026, 1, 10, 0, 0)),
            [
                utc(2025, 11, 15, 0, 0),
                utc(2025, 12, 15, 0, 0),
                utc(2026, 1, 15, 0, 0),
                utc(2026, 2, 15, 0, 0)
            ]
        );
        assert_eq!(
            q.boundaries(utc(2026, 1, 20, 0, 0))[1],
            utc(2026, 1, 15, 0, 0)
        );
        // Anchor 28 through February of a leap year and of a common year.
        let q = quota(Period::Month, 28, "UTC");
        assert_eq!(
            q.boundaries(utc(2028, 2, 29, 12, 0))[1..3],
            [utc(2028, 2, 28, 0, 0), utc(2028, 3, 28, 0, 0)]
        );
        assert_eq!(
            q.boundaries(utc(2027, 3, 1, 0, 0))[1..3],
            [utc(2027, 2, 28, 0, 0), utc(2027, 3, 28, 0, 0)]
        );
    }

    #[test]
    fn monthly_in_a_zone_starts_at_local_midnight() {
        // Berlin is UTC+1 in winter: 1 March local midnight is 28 Feb 23:00 UTC. At 23:30 UTC
        // on 28 Feb it is already March in Berlin.
        let q = quota(Period::Month, 1, "Europe/Berlin");
        let now = utc(2026, 2, 28, 23, 30);
        assert_eq!(q.boundaries(now)[1], utc(2026, 2, 28, 23, 0));
        // April starts in summer time (UTC+2).
        assert_eq!(q.boundaries(now)[2], utc(2026, 3, 31, 22, 0));
    }

    #[test]
    fn daily_across_dst_days_are_23_and_25_hours() {
        let q = quota(Period::Day, 1, "Europe/Berlin");
        // 29 March 2026: clocks go 02:00 -> 03:00, a 23-hour day.
        let b = q.boundaries(at("Europe/Berlin", 2026, 3, 29, 12, 0));
        assert_eq!(b[1], at("Europe/Berlin", 2026, 3, 29, 0, 0));
        assert_eq!(b[2] - b[1], 23.0 * 3600.0);
        // 25 October 2026: 03:00 -> 02:00, a 25-hour day.
        let b = q.boundaries(at("Europe/Berlin", 2026, 10, 25, 12, 0));
        assert_eq!(b[2] - b[1], 25.0 * 3600.0);
        // Neighbours are ordinary days.
        assert_eq!(b[1] - b[0], 24.0 * 3600.0);
        assert_eq!(b[3] - b[2], 24.0 * 3600.0);
    }

    #[test]
    fn a_skipped_midnight_starts_the_day_at_the_transition() {
        // America/Santiago set clocks forward at 24:00 on 2026-09-05 (local midnight of 6
        // September does not exist; the day starts at 01:00 -03 = 04:00 UTC).
        let q = quota(Period::Day, 1, "America/Santiago");
        let noon = at("America/Santiago", 2026, 9, 6, 12, 0);
        let b = q.boundaries(noon);
        assert_eq!(b[1], utc(2026, 9, 6, 4, 0));
        assert!(b[0] < b[1] && b[1] <= noon && noon < b[2] && b[2] < b[3]);
        assert_eq!(b[1] - b[0], 24.0 * 3600.0, "5 September ran to its 24:00");
        assert_eq!(
            b[2] - b[1],
            23.0 * 3600.0,
            "6 September lost its first hour"
        );
        // Samoa skipped 30 December 2011 whole: the 29th ends where the 31st begins.
        let q = quota(Period::Day, 1, "Pacific/Apia");
        let b = q.boundaries(at("Pacific/Apia", 2011, 12, 29, 12, 0));
        assert_eq!(b[2], at("Pacific/Apia", 2011, 12, 31, 0, 0));
        assert_eq!(b[2], b[3], "the skipped day is an empty period");
    }

    #[test]
    fn weekly_on_the_anchor_weekday() {
        // Wednesday 2026-12-02; weeks starting on Monday (1) and on Sunday (7).
        let now = utc(2026, 12, 2, 10, 0);
        let monday = quota(Period::Week, 1, "UTC").boundaries(now);
        assert_eq!(monday[1], utc(2026, 11, 30, 0, 0));
        assert_eq!(monday[2], utc(2026, 12, 7, 0, 0));
        let sunday = quota(Period::Week, 7, "UTC").boundaries(now);
        assert_eq!(sunday[1], utc(2026, 11, 29, 0, 0));
        // On the anchor day itself the period starts that day.
        let wednesday = quota(Period::Week, 3, "UTC").boundaries(now);
        assert_eq!(wednesday[1], utc(2026, 12, 2, 0, 0));
        // Tokyo (UTC+9): Monday local midnight is Sunday 15:00 UTC.
        let tokyo = quota(Period::Week, 1, "Asia/Tokyo").boundaries(now);
        assert_eq!(tokyo[1], utc(2026, 11, 29, 15, 0));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let base = QuotaConfig {
            amount: 100.0,
            period: Period::Month,
            anchor_day: Some(1),
            timezone: Some("UTC".into()),
        };
        let fields = |c: QuotaConfig| -> Vec<&'static str> {
            c.build()
                .expect_err("invalid")
                .iter()
                .map(|e| e.field)
                .collect()
        };
        assert_eq!(
            fields(QuotaConfig {
                anchor_day: Some(29),
                ..base.clone()
            }),
            ["anchor_day"]
        );
        assert_eq!(
            fields(QuotaConfig {
                period: Period::Week,
                anchor_day: Some(8),
                ..base.clone()
            }),
            ["anchor_day"]
        );
        assert_eq!(
            fields(QuotaConfig {
                timezone: Some("Mars/Olympus".into()),
                amount: f64::NAN,
                ..base.clone()
            }),
            ["amount", "timezone"]
        );
        assert_eq!(
            fields(QuotaConfig {
                amount: 0.0,
                ..base.clone()
            }),
            ["amount"]
        );
        // Ignored for a daily quota.
        assert!(
            QuotaConfig {
                period: Period::Day,
                anchor_day: Some(99),
                ..base
            }
            .build()
            .is_ok()
        );
    }

    #[test]
    fn the_config_file_names_every_bad_quota_field() {
        use crate::config::{Config, ConfigError};
        let tier = |quota: &str| {
            format!("[tiers.free]\nmax_tokens = 100\nrefill_per_sec = 1\nquota = {quota}\n")
        };
        let ok = Config::parse(&tier(
            r#"{ amount = 1_000_000, period = "month", anchor_day = 1, timezone = "UTC" }"#,
        ))
        .expect("valid");
        let q = ok.budget_policy().tiers[0].quota.expect("built");
        assert_eq!((q.amount, q.period, q.tz), (1e6, Period::Month, Tz::UTC));
        // Semantic errors, each with its path.
        let Err(ConfigError::Invalid(errors)) = Config::parse(&tier(
            r#"{ amount = -5, period = "week", anchor_day = 0, timezone = "Europe/Nowhere" }"#,
        )) else {
            panic!("invalid");
        };
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "tiers.free.quota.amount",
                "tiers.free.quota.anchor_day",
                "tiers.free.quota.timezone"
            ]
        );
        // Unknown periods and fields are refused by the parser, with the path.
        for (quota, says) in [
            (r#"{ amount = 5, period = "year" }"#, "year"),
            (r#"{ amount = 5, period = "day", reset = "cron" }"#, "reset"),
            (r#"{ period = "day" }"#, "amount"),
        ] {
            let e = Config::parse(&tier(quota)).expect_err(quota).to_string();
            assert!(
                e.contains("tiers.free.quota") && e.contains(says),
                "{quota}: {e}"
            );
        }
    }

    #[test]
    fn the_rule_picks_the_period_of_the_store_clock_and_resets_usage() {
        let b = [0.0, 100.0, 200.0, 300.0];
        // Usage of the current period counts.
        let d = decide(&b, Some((100.0, 60.0)), 150.0, 100.0, 40.0, false).expect("inside");
        assert_eq!(
            (d.start, d.end, d.used, d.allows),
            (100.0, 200.0, 60.0, true)
        );
        assert!(
            !decide(&b, Some((100.0, 61.0)), 150.0, 100.0, 40.0, false)
                .expect("inside")
                .allows
        );
        // A forced debit is always allowed.
        assert!(
            decide(&b, Some((100.0, 100.0)), 150.0, 100.0, 40.0, true)
                .expect("inside")
                .allows
        );
        // The store's clock is ahead of the daemon's: the next period, usage reset.
        let d = decide(&b, Some((100.0, 100.0)), 250.0, 100.0, 40.0, false).expect("inside");
        assert_eq!((d.start, d.used, d.allows), (200.0, 0.0, true));
        // Behind: the previous period.
        assert_eq!(
            decide(&b, None, 50.0, 100.0, 1.0, false)
                .expect("inside")
                .start,
            0.0
        );
        // Outside all of them: refused.
        assert!(decide(&b, None, 300.0, 100.0, 1.0, false).is_err());
        assert!(decide(&b, None, -1.0, 100.0, 1.0, false).is_err());
        // Retry: at the reset, never for a cost above the allowance.
        assert_eq!(retry_after_ms(&d, 250.0, 100.0, 40.0), Some(50_000));
        assert_eq!(retry_after_ms(&d, 250.0, 100.0, 101.0), None);
    }

    #[test]
    fn usage_moves_back_only_within_the_period_charged() {
        assert_eq!(
            adjust(Some((100.0, 50.0)), 100.0, -30.0),
            Some((100.0, 20.0))
        );
        assert_eq!(
            adjust(Some((100.0, 20.0)), 100.0, -30.0),
            Some((100.0, 0.0))
        );
        assert_eq!(adjust(Some((200.0, 50.0)), 100.0, -30.0), None);
        assert_eq!(adjust(None, 100.0, 10.0), None);
    }
}
