//! Timestamps in manifests: seconds since the Unix epoch, rendered as RFC 3339 UTC for people.
//! Kept here (not a date crate) because the format only needs whole-second UTC times.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Seconds since 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `YYYYMMDDTHHMMSSZ`, the compact form used in backup ids.
    pub fn compact(&self) -> String {
        let (year, month, day, hour, minute, second) = self.civil();
        format!("{year:04}{month:02}{day:02}T{hour:02}{minute:02}{second:02}Z")
    }

    fn civil(&self) -> (i64, u32, u32, u32, u32, u32) {
        let days = i64::try_from(self.0 / 86_400).expect("timestamps fit i64");
        let rem = self.0 % 86_400;
        let (year, month, day) = civil_from_days(days);
        let small_rem = |v: u64| u32::try_from(v).expect("calendar fields are small");
        (year, month, day, small_rem(rem / 3600), small_rem(rem / 60 % 60), small_rem(rem % 60))
    }
}

/// (year, month 1..=12, day 1..=31) of `days` since 1970-01-01, proleptic Gregorian
/// (Howard Hinnant's days-to-civil algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let small = |v: i64| u32::try_from(v).expect("calendar fields are small");
    (year, small(month), small(day))
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day, hour, minute, second) = self.civil();
        write!(f, "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_known_dates() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(Timestamp(1_795_694_523).compact(), "20261126T120203Z");
    }
}
