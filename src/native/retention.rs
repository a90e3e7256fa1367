//! Retention policies: which backups of a group `forget` keeps, and why. Pure: no I/O, no clock
//! (`--keep-within` counts back from the group's newest backup, as restic does, so the local
//! clock never decides what is removed).
//!
//! The rules follow restic's: they are combined with OR; each calendar rule (hourly, daily,
//! weekly, monthly, yearly; UTC, ISO weeks) keeps the newest backup of each of its N most recent
//! periods that hold a backup; `last` keeps the N newest; `within` keeps every backup taken
//! within the duration before the newest; a protected backup is always kept. Backups are
//! considered newest first; a backup can satisfy several rules at once (all are reported).

use std::fmt;

use serde::Serialize;

use crate::native::layout::{Timestamp, civil_from_days};

/// How many periods a rule keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keep {
    /// The rule is off.
    #[default]
    Off,
    /// The N most recent periods (N ≥ 1).
    Count(u32),
    /// Every period.
    Unlimited,
}

impl Keep {
    /// Parses `N` or `unlimited` (`0` is off).
    ///
    /// # Errors
    /// A message naming the text when it is neither.
    pub fn parse(text: &str) -> Result<Keep, String> {
        if text == "unlimited" {
            return Ok(Keep::Unlimited);
        }
        match text.parse::<u32>() {
            Ok(0) => Ok(Keep::Off),
            Ok(n) => Ok(Keep::Count(n)),
            Err(_) => Err(format!("{text:?} is not a count (a number, or `unlimited`)")),
        }
    }
}

/// A calendar duration for `--keep-within`: years and months step the calendar (the day is
/// clamped to the month's length), days and hours are fixed lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Within {
    /// Years.
    pub years: u32,
    /// Months.
    pub months: u32,
    /// Days (a week is 7).
    pub days: u32,
    /// Hours.
    pub hours: u32,
}

impl Within {
    /// Parses `1y2m3w4d5h`-style text: each unit at most once, in any order, not all zero.
    ///
    /// # Errors
    /// A message naming the text.
    pub fn parse(text: &str) -> Result<Within, String> {
        let bad = || format!("{text:?} is not a duration like 7d, 36h, 2w, 6m, 1y2m");
        let mut within = Within::default();
        let mut seen = String::new();
        let mut digits = String::new();
        for c in text.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let value: u32 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            if seen.contains(c) {
                return Err(bad());
            }
            seen.push(c);
            let slot = match c {
                'y' => &mut within.years,
                'm' => &mut within.months,
                'w' => {
                    within.days = within
                        .days
                        .checked_add(value.checked_mul(7).ok_or_else(bad)?)
                        .ok_or_else(bad)?;
                    continue;
                }
                'd' => {
                    within.days = within.days.checked_add(value).ok_or_else(bad)?;
                    continue;
                }
                'h' => &mut within.hours,
                _ => return Err(bad()),
            };
            *slot = value;
        }
        if !digits.is_empty() || within == Within::default() || within.years > 10_000 {
            return Err(bad());
        }
        Ok(within)
    }

    /// The earliest time still within the duration before `latest`.
    pub fn start(&self, latest: Timestamp) -> Timestamp {
        let days = i64::try_from(latest.0 / 86_400).expect("timestamps fit i64");
        let seconds = latest.0 % 86_400;
        let (year, month, day) = civil_from_days(days);
        let months_back = i64::from(self.years) * 12 + i64::from(self.months);
        let total = year * 12 + i64::from(month) - 1 - months_back;
        let (year, month) =
            (total.div_euclid(12), u32::try_from(total.rem_euclid(12)).expect("0..12") + 1);
        let day = day.min(days_in_month(year, month));
        let stepped = days_from_civil(year, month, day) - i64::from(self.days);
        let secs = stepped * 86_400 + i64::try_from(seconds).expect("small")
            - i64::from(self.hours) * 3600;
        Timestamp(u64::try_from(secs).unwrap_or(0))
    }
}

/// A retention policy; rules are combined with OR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// The N newest backups.
    pub last: Keep,
    /// The newest backup of each hour (UTC).
    pub hourly: Keep,
    /// The newest backup of each day (UTC).
    pub daily: Keep,
    /// The newest backup of each ISO week (UTC, weeks start on Monday).
    pub weekly: Keep,
    /// The newest backup of each month (UTC).
    pub monthly: Keep,
    /// The newest backup of each year (UTC).
    pub yearly: Keep,
    /// Every backup taken within this duration before the group's newest.
    pub within: Option<Within>,
}

impl Policy {
    /// True when no rule is set: such a policy would remove everything, and is refused.
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(_, keep)| *keep == Keep::Off) && self.within.is_none()
    }

    fn rules(&self) -> [(Rule, Keep); 6] {
        [
            (Rule::Last, self.last),
            (Rule::Hourly, self.hourly),
            (Rule::Daily, self.daily),
            (Rule::Weekly, self.weekly),
            (Rule::Monthly, self.monthly),
            (Rule::Yearly, self.yearly),
        ]
    }
}

/// Why a backup is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// It is protected (`ferry protect`).
    Protected,
    /// `--keep-last`.
    Last,
    /// `--keep-hourly`.
    Hourly,
    /// `--keep-daily`.
    Daily,
    /// `--keep-weekly`.
    Weekly,
    /// `--keep-monthly`.
    Monthly,
    /// `--keep-yearly`.
    Yearly,
    /// `--keep-within`.
    Within,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self).expect("a rule serializes");
        f.write_str(text.as_str().expect("a string"))
    }
}

/// One backup of a group, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub backup_id: String,
    /// When it was taken (its manifest's `started_at`).
    pub time: Timestamp,
    /// Whether it is protected.
    pub protected: bool,
}

/// What the policy decided for one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The backup.
    pub backup_id: String,
    /// When it was taken.
    pub time: Timestamp,
    /// Whether it is kept.
    pub keep: bool,
    /// The rules that keep it (empty: it is removed).
    pub reasons: Vec<Rule>,
}

/// Applies `policy` to one group; returns a decision per backup, newest first. The newest
/// backup of a group is always kept by a non-empty policy.
///
/// # Panics
/// If the policy is empty (callers refuse it first).
pub fn apply(policy: &Policy, group: &[Candidate]) -> Vec<Decision> {
    assert!(!policy.is_empty(), "an empty policy is refused before it is applied");
    let mut sorted: Vec<&Candidate> = group.iter().collect();
    sorted.sort_by(|a, b| (b.time, &b.backup_id).cmp(&(a.time, &a.backup_id)));
    let latest = sorted.first().map(|candidate| candidate.time);
    let within_start = policy.within.zip(latest).map(|(within, latest)| within.start(latest));
    let mut buckets: Vec<(Rule, Keep, Option<i64>)> =
        policy.rules().into_iter().map(|(rule, keep)| (rule, keep, None)).collect();
    let mut decisions = Vec::with_capacity(sorted.len());
    for (position, candidate) in sorted.iter().enumerate() {
        let mut reasons = Vec::new();
        if candidate.protected {
            reasons.push(Rule::Protected);
        }
        for (rule, keep, last) in &mut buckets {
            if *keep == Keep::Off || *keep == Keep::Count(0) {
                continue;
            }
            let value = period(*rule, candidate.time, position);
            if *last != Some(value) {
                *last = Some(value);
                reasons.push(*rule);
                if let Keep::Count(n) = keep {
                    *keep = if *n == 1 { Keep::Off } else { Keep::Count(*n - 1) };
                }
            }
        }
        if within_start.is_some_and(|start| candidate.time > start) {
            reasons.push(Rule::Within);
        }
        decisions.push(Decision {
            backup_id: candidate.backup_id.clone(),
            time: candidate.time,
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    assert!(decisions.first().is_none_or(|newest| newest.keep), "the newest backup is kept");
    decisions
}

/// The period of `time` for a rule (`Last`: every backup is its own period).
fn period(rule: Rule, time: Timestamp, position: usize) -> i64 {
    let seconds = i64::try_from(time.0).expect("timestamps fit i64");
    let days = seconds.div_euclid(86_400);
    let (year, month, _) = civil_from_days(days);
    match rule {
        Rule::Last => i64::try_from(position).expect("fits"),
        Rule::Hourly => seconds.div_euclid(3600),
        Rule::Daily => days,
        Rule::Weekly => {
            let (iso_year, week) = iso_week(days);
            iso_year * 100 + i64::from(week)
        }
        Rule::Monthly => year * 12 + i64::from(month),
        Rule::Yearly => year,
        Rule::Protected | Rule::Within => unreachable!("not a calendar rule"),
    }
}

/// (ISO week-numbering year, week 1..=53) of `days` since 1970-01-01.
pub fn iso_week(days: i64) -> (i64, u32) {
    // 1970-01-01 was a Thursday; Monday is 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    (year, u32::try_from(week).expect("1..=53"))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days-from-civil).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    let next = if month == 12 {
        days_from_civil(year + 1, 1, 1)
    } else {
        days_from_civil(year, month + 1, 1)
    };
    u32::try_from(next - days_from_civil(year, month, 1)).expect("28..=31")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;
    const DAY: u64 = 86_400;
    /// 2026-01-05T00:00:00Z, a Monday.
    const MONDAY: u64 = 1_767_571_200;

    fn candidates(times: &[u64]) -> Vec<Candidate> {
        times
            .iter()
            .enumerate()
            .map(|(n, &time)| Candidate {
                backup_id: format!("b{n:03}"),
                time: Timestamp(time),
                protected: false,
            })
            .collect()
    }

    fn kept(decisions: &[Decision]) -> Vec<&str> {
        decisions.iter().filter(|d| d.keep).map(|d| d.backup_id.as_str()).collect()
    }

    #[test]
    fn calendar_helpers_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        for days in [-800_000i64, -1, 0, 59, 11_016, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(i64::try_from(MONDAY / DAY).unwrap(), days_from_civil(2026, 1, 5));
        // ISO weeks: 2021-01-03 (Sunday) is in 2020-W53; 2024-12-30 (Monday) is 2025-W01.
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4)), (2021, 1));
        assert_eq!(iso_week(days_from_civil(2024, 12, 30)), (2025, 1));
        assert_eq!(iso_week(days_from_civil(2026, 1, 5)), (2026, 2));
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
    }

    #[test]
    fn counts_and_durations_parse_or_are_refused() {
        assert_eq!(Keep::parse("0"), Ok(Keep::Off));
        assert_eq!(Keep::parse("7"), Ok(Keep::Count(7)));
        assert_eq!(Keep::parse("unlimited"), Ok(Keep::Unlimited));
        assert!(Keep::parse("-1").is_err());
        assert_eq!(
            Within::parse("1y2m3d4h"),
            Ok(Within { years: 1, months: 2, days: 3, hours: 4 })
        );
        assert_eq!(Within::parse("2w1d"), Ok(Within { days: 15, ..Within::default() }));
        for bad in ["", "7", "d", "0d", "1d1d", "3x", "1.5d", "99999999999d"] {
            assert!(Within::parse(bad).is_err(), "{bad}");
        }
        assert!(Policy::default().is_empty());
        assert!(
            !Policy { within: Some(Within { hours: 1, ..Within::default() }), ..Policy::default() }
                .is_empty()
        );
    }

    // Months step the calendar and clamp the day: 31 March minus one month is 28 February.
    #[test]
    fn within_steps_the_calendar() {
        let march_31 = Timestamp(days_from_civil(2026, 3, 31) as u64 * DAY + 7 * HOUR);
        let start = Within { months: 1, ..Within::default() }.start(march_31);
        assert_eq!(start.to_string(), "2026-02-28T07:00:00Z");
        let start = Within { years: 1, days: 1, hours: 8, ..Within::default() }.start(march_31);
        assert_eq!(start.to_string(), "2025-03-29T23:00:00Z");
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let group = candidates(&[MONDAY, MONDAY + 10, MONDAY + 20, MONDAY + 30, MONDAY + 40]);
        let decisions = apply(&Policy { last: Keep::Count(3), ..Policy::default() }, &group);
        assert_eq!(kept(&decisions), ["b004", "b003", "b002"]);
        assert!(decisions[..3].iter().all(|d| d.reasons == [Rule::Last]));
        assert!(decisions[3..].iter().all(|d| !d.keep && d.reasons.is_empty()));
    }

    // Several backups a day: the newest of each of the 3 most recent days with a backup; a day
    // without backups does not use up a slot.
    #[test]
    fn daily_keeps_the_newest_of_each_day_with_a_backup() {
        let mut times = Vec::new();
        for day in [0u64, 1, 3, 4] {
            for hour in [1, 9, 23] {
                times.push(MONDAY + day * DAY + hour * HOUR);
            }
        }
        let group = candidates(&times);
        let decisions = apply(&Policy { daily: Keep::Count(3), ..Policy::default() }, &group);
        // Newest of day 4 (b011), day 3 (b008), day 1 (b005).
        assert_eq!(kept(&decisions), ["b011", "b008", "b005"]);
    }

    // Rules are combined with OR and each kept backup lists every rule it satisfies.
    #[test]
    fn rules_combine_with_or_and_report_every_reason() {
        // One backup a day for 60 days, at 02:00.
        let times: Vec<u64> = (0..60).map(|day| MONDAY + day * DAY + 2 * HOUR).collect();
        let group = candidates(&times);
        let policy = Policy {
            last: Keep::Count(2),
            daily: Keep::Count(7),
            weekly: Keep::Count(4),
            monthly: Keep::Count(3),
            ..Policy::default()
        };
        let decisions = apply(&policy, &group);
        let newest = &decisions[0];
        assert_eq!(newest.reasons, [Rule::Last, Rule::Daily, Rule::Weekly, Rule::Monthly]);
        // Days 59..53 daily; Sundays (newest of ISO weeks) of the 3 weeks before the current
        // one; the last day of the 2 months before the current one.
        let mut expected: Vec<usize> = (53..60).collect();
        // Day 59 (2026-03-05) is a Thursday; the 3 weeks before end on Sundays 55, 48, 41.
        expected.extend([48, 41]);
        // Month ends: 2026-02-28 is day 54, 2026-01-31 is day 26.
        expected.push(26);
        expected.sort_unstable();
        expected.reverse();
        let want: Vec<String> = expected.iter().map(|n| format!("b{n:03}")).collect();
        assert_eq!(kept(&decisions), want);
        let day_41 = decisions.iter().find(|d| d.backup_id == "b041").unwrap();
        assert_eq!(day_41.reasons, [Rule::Weekly]);
        let day_54 = decisions.iter().find(|d| d.backup_id == "b054").unwrap();
        assert_eq!(day_54.reasons, [Rule::Daily, Rule::Monthly]);
        let day_55 = decisions.iter().find(|d| d.backup_id == "b055").unwrap();
        assert_eq!(day_55.reasons, [Rule::Daily, Rule::Weekly]);
    }

    #[test]
    fn within_counts_back_from_the_newest_and_protection_always_keeps() {
        let times =
            [MONDAY, MONDAY + DAY, MONDAY + 5 * DAY, MONDAY + 6 * DAY, MONDAY + 6 * DAY + HOUR];
        let mut group = candidates(&times);
        group[0].protected = true;
        let within = Within::parse("2d").unwrap();
        let decisions = apply(&Policy { within: Some(within), ..Policy::default() }, &group);
        assert_eq!(kept(&decisions), ["b004", "b003", "b002", "b000"]);
        assert_eq!(decisions[2].reasons, [Rule::Within]);
        assert!(!decisions[3].keep);
        assert_eq!(decisions.last().unwrap().reasons, [Rule::Protected]);
        // Exactly at the boundary is outside (restic: strictly after).
        let edge = candidates(&[MONDAY, MONDAY + 2 * DAY]);
        let decisions = apply(&Policy { within: Some(within), ..Policy::default() }, &edge);
        assert_eq!(kept(&decisions), ["b001"]);
    }

    // Unlimited keeps one per period forever; hourly and yearly use their own periods.
    #[test]
    fn unlimited_hourly_and_yearly() {
        let times = [MONDAY, MONDAY + 10, MONDAY + HOUR, MONDAY + 400 * DAY, MONDAY + 800 * DAY];
        let group = candidates(&times);
        let decisions = apply(&Policy { hourly: Keep::Unlimited, ..Policy::default() }, &group);
        assert_eq!(kept(&decisions), ["b004", "b003", "b002", "b001"]);
        let decisions = apply(&Policy { yearly: Keep::Count(2), ..Policy::default() }, &group);
        assert_eq!(kept(&decisions), ["b004", "b003"]);
    }

    // Ties in time are broken by id, so the decision does not depend on listing order.
    #[test]
    fn decisions_do_not_depend_on_input_order() {
        let group = candidates(&[MONDAY, MONDAY, MONDAY + DAY, MONDAY + 3 * DAY]);
        let policy = Policy { daily: Keep::Count(2), ..Policy::default() };
        let forward = apply(&policy, &group);
        let mut reversed = group.clone();
        reversed.reverse();
        assert_eq!(apply(&policy, &reversed), forward);
    }
}
