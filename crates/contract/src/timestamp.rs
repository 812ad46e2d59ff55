//! Millisecond timestamps, RFC 3339 UTC on the wire.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use crate::error::ValidationError;

/// An instant as milliseconds since the Unix epoch.
///
/// On the wire it is an RFC 3339 string in UTC with exactly three fractional digits, for example
/// `2026-11-22T10:00:00.000Z`. Any RFC 3339 offset is accepted on input and converted to UTC; finer
/// precision than a millisecond is truncated.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Timestamp(i64);

const DAY_MS: i64 = 86_400_000;

const WIRE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

impl Timestamp {
    /// The instant `millis` milliseconds after the Unix epoch.
    pub const fn from_unix_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    /// This instant moved `millis` later, saturating.
    pub const fn plus_millis(self, millis: i64) -> Self {
        Self(self.0.saturating_add(millis))
    }

    /// Milliseconds from `earlier` to `self`, or 0 if `earlier` is later.
    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0)
    }

    /// The first instant of this instant's UTC calendar day.
    pub const fn start_of_utc_day(self) -> Self {
        Self(self.0.div_euclid(DAY_MS).saturating_mul(DAY_MS))
    }

    /// The first instant of this instant's UTC calendar month. Beyond what the calendar library
    /// represents (years past ±9999), the start of the day.
    pub fn start_of_utc_month(self) -> Self {
        let day = self.start_of_utc_day();
        let first = OffsetDateTime::from_unix_timestamp(day.0.div_euclid(1000))
            .ok()
            .and_then(|t| t.replace_day(1).ok())
            .map(|t| t.unix_timestamp().saturating_mul(1000));
        first.map_or(day, Self)
    }

    /// Parses an RFC 3339 timestamp.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
            ValidationError::new("", format!("`{text}` is not an RFC 3339 timestamp such as `2026-01-31T09:30:00Z`"))
        })?;
        let millis = parsed.unix_timestamp_nanos() / 1_000_000;
        let millis =
            i64::try_from(millis).map_err(|_| ValidationError::new("", format!("`{text}` is out of range")))?;
        Ok(Self(millis))
    }

    /// The RFC 3339 UTC form with millisecond precision.
    pub fn to_rfc3339(self) -> String {
        // Every answer, ledger entry and record formats several timestamps: the fixed layout is written
        // directly, and `time`'s general formatter (ten times the instructions) only takes what lies
        // outside years 0000–9999.
        if let Some(text) = wire_text(self.0) {
            return text;
        }
        self.to_rfc3339_general()
    }

    fn to_rfc3339_general(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .map(|t| t.to_offset(UtcOffset::UTC))
            .ok()
            .and_then(|t| t.format(WIRE_FORMAT).ok())
        {
            Some(text) => text,
            // Only instants beyond year 9999 fail to format; keep them representable.
            None => format!("@{}ms", self.0),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for an instant in years 0000–9999 (the proleptic Gregorian calendar, as
/// `time` has it); `None` outside them.
fn wire_text(millis: i64) -> Option<String> {
    let (year, month, day) = civil_date(millis.div_euclid(DAY_MS));
    let (hour, minute, second, milli) = day_time(millis);
    if !(0..=9999).contains(&year) {
        return None;
    }
    let mut text = String::with_capacity(24);
    // Each field with its width and the character after it.
    let fields = [
        (year, 4, '-'),
        (month, 2, '-'),
        (day, 2, 'T'),
        (hour, 2, ':'),
        (minute, 2, ':'),
        (second, 2, '.'),
        (milli, 3, 'Z'),
    ];
    for (value, width, then) in fields {
        push_digits(&mut text, value, width);
        text.push(then);
    }
    Some(text)
}

/// Hour, minute, second and millisecond of the UTC day of `millis`.
fn day_time(millis: i64) -> (i64, i64, i64, i64) {
    let of_day = millis.rem_euclid(DAY_MS);
    (of_day / 3_600_000, of_day / 60_000 % 60, of_day / 1_000 % 60, of_day % 1_000)
}

/// Year, month and day of the day `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era.saturating_add(era.saturating_mul(400)) + i64::from(month <= 2);
    (year, month, day)
}

/// `value` (0 ≤ value < 10^width) in exactly `width` decimal digits.
fn push_digits(text: &mut String, value: i64, width: u32) {
    let mut scale = 10_i64.pow(width.saturating_sub(1));
    while scale > 0 {
        let digit = u8::try_from(value / scale % 10).unwrap_or(0);
        text.push(char::from(b'0' + digit));
        scale /= 10;
    }
}

/// Accepted: any RFC 3339 instant. Answered: UTC with exactly three fractional digits.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        if generator.contract().is_serialize() {
            schemars::json_schema!({
                "type": "string",
                "format": "date-time",
                "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z$",
            })
        } else {
            schemars::json_schema!({ "type": "string", "format": "date-time" })
        }
    }
}

impl TryFrom<String> for Timestamp {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Timestamp> for String {
    fn from(value: Timestamp) -> String {
        value.to_rfc3339()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_rfc3339())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_three_fractional_digits_in_utc() {
        let t = Timestamp::parse("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-22T10:00:00.000Z");
        let t = Timestamp::parse("2026-11-22T11:00:00.1234+01:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-22T10:00:00.123Z");
    }

    proptest::proptest! {
        /// The direct layout writes what `time`'s formatter writes, over years 0000–9999 and the first
        /// instants outside them (which take the general path).
        #[test]
        fn the_direct_layout_matches_the_general_formatter(
            millis in -62_167_219_200_000_i64 - 10 * DAY_MS..253_402_300_800_000_i64 + 10 * DAY_MS,
        ) {
            let t = Timestamp::from_unix_millis(millis);
            proptest::prop_assert_eq!(t.to_rfc3339(), t.to_rfc3339_general());
        }
    }

    #[test]
    fn the_direct_layout_matches_at_the_edges() {
        for millis in [
            0,
            -1,
            1,
            DAY_MS - 1,
            951_782_400_000,     // 2000-02-29
            4_107_542_400_000,   // 2100-03-01
            -62_167_219_200_000, // 0000-01-01T00:00:00.000Z
            -62_167_219_200_001, // one millisecond before year 0
            253_402_300_799_999, // 9999-12-31T23:59:59.999Z
            253_402_300_800_000, // 10000-01-01
            i64::MIN,
            i64::MAX,
        ] {
            let t = Timestamp::from_unix_millis(millis);
            assert_eq!(t.to_rfc3339(), t.to_rfc3339_general(), "{millis}");
        }
        assert_eq!(Timestamp::from_unix_millis(951_782_400_000).to_rfc3339(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn round_trips_and_rejects_garbage() {
        let t = Timestamp::from_unix_millis(1_795_000_000_123);
        assert_eq!(Timestamp::parse(&t.to_rfc3339()).unwrap(), t);
        assert!(Timestamp::parse("yesterday").is_err());
        assert!(Timestamp::parse("2026-13-01T00:00:00Z").is_err());
    }
}
