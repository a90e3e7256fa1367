//! `UtcTime`: the one timestamp type, rendered the three ways Cinder renders time.

use std::fmt::Write as _;

/// A UTC instant with microsecond precision, as Cinder's tz-aware `datetime`s.
///
/// Never read from the clock here: callers pass the instant in, so every document is a pure
/// function of its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcTime {
    /// Year, 1000..=9999 for the renderings to be fixed-width like Python's.
    pub year: i32,
    /// Month, 1..=12.
    pub month: u8,
    /// Day of month, 1..=31.
    pub day: u8,
    /// Hour, 0..=23.
    pub hour: u8,
    /// Minute, 0..=59.
    pub minute: u8,
    /// Second, 0..=59.
    pub second: u8,
    /// Microseconds, 0..=999_999.
    pub micros: u32,
}

impl UtcTime {
    /// The instant `secs` seconds and `micros` microseconds after the Unix epoch.
    ///
    /// # Panics
    /// If `micros` is 1,000,000 or more (a caller bug).
    pub fn from_unix(secs: i64, micros: u32) -> UtcTime {
        assert!(micros < 1_000_000, "micros out of range: {micros}");
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = crate::native::layout::civil_from_days(days);
        UtcTime {
            year: i32::try_from(year).unwrap_or(i32::MAX),
            month: small(i64::from(month)),
            day: small(i64::from(day)),
            hour: small(rem / 3600),
            minute: small(rem / 60 % 60),
            second: small(rem % 60),
            micros,
        }
    }

    /// `strftime("%Y%m%d%H%M%S")`, the timestamp inside an S3 object prefix.
    pub fn prefix_stamp(&self) -> String {
        format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// Python's `str()` of a tz-aware UTC `datetime`: `2025-03-01 12:00:05+00:00`, with
    /// `.ffffff` before the offset only when the microseconds are not zero. This is the
    /// `created_at` of `_metadata` and `_sha256file`.
    pub fn python_str(&self) -> String {
        let mut s = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
        if self.micros != 0 {
            let _ = write!(s, ".{:06}", self.micros);
        }
        s.push_str("+00:00");
        s
    }

    /// oslo.versionedobjects' `isotime()`: `2025-03-01T12:00:05Z` (no sub-seconds), which is how
    /// a `DateTimeField` appears in an exported backup record.
    pub fn iso_z(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// Narrows a calendar component already known to be in 0..=366.
fn small(v: i64) -> u8 {
    u8::try_from(v).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epoch conversion and the three renderings agree with Python for known instants.
    #[test]
    fn renderings() {
        // python3: datetime.fromtimestamp(1740830405, timezone.utc) -> 2025-03-01 12:00:05+00:00
        let t = UtcTime::from_unix(1_740_830_405, 0);
        assert_eq!(t.prefix_stamp(), "20250301120005");
        assert_eq!(t.python_str(), "2025-03-01 12:00:05+00:00");
        assert_eq!(t.iso_z(), "2025-03-01T12:00:05Z");
        let t = UtcTime::from_unix(951_782_400, 42); // 2000-02-29 00:00:00.000042
        assert_eq!(t.python_str(), "2000-02-29 00:00:00.000042+00:00");
        let t = UtcTime::from_unix(0, 0);
        assert_eq!(t.python_str(), "1970-01-01 00:00:00+00:00");
        let t = UtcTime::from_unix(4_102_444_799, 999_999); // 2099-12-31 23:59:59.999999
        assert_eq!(t.python_str(), "2099-12-31 23:59:59.999999+00:00");
    }
}
