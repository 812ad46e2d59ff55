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

    #[test]
    fn round_trips_and_rejects_garbage() {
        let t = Timestamp::from_unix_millis(1_795_000_000_123);
        assert_eq!(Timestamp::parse(&t.to_rfc3339()).unwrap(), t);
        assert!(Timestamp::parse("yesterday").is_err());
        assert!(Timestamp::parse("2026-13-01T00:00:00Z").is_err());
    }
}
