//! FHIR dates as ranges: `2020` is all of 2020, `2020-03-04T10:00:00Z` is that second. Every
//! stored date and every searched date becomes an inclusive range of Unix microseconds, which is
//! what the `eq`/`lt`/`sa`/… prefixes compare. Values without a zone are taken as UTC.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// An inclusive range of Unix microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub low: i64,
    pub high: i64,
}

impl DateRange {
    /// The whole representable timeline (an open end of a Period).
    pub const UNBOUNDED: Self = Self {
        low: i64::MIN / 2,
        high: i64::MAX / 2,
    };
}

/// Parses a FHIR `date`, `dateTime` or `instant` to the range it covers.
pub fn parse_range(text: &str) -> Option<DateRange> {
    let text = text.trim();
    let (date_part, time_part) = match text.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (text, None),
    };
    let mut fields = date_part.split('-');
    let year: i32 = parse_digits(fields.next()?, 4)?;
    let month = match fields.next() {
        Some(text) => Some(parse_digits::<u8>(text, 2)?),
        None => None,
    };
    let day = match fields.next() {
        Some(text) => Some(parse_digits::<u8>(text, 2)?),
        None => None,
    };
    if fields.next().is_some() {
        return None;
    }
    match (month, day, time_part) {
        (None, None, None) => {
            let start = Date::from_calendar_date(year, Month::January, 1).ok()?;
            let end = Date::from_calendar_date(year.checked_add(1)?, Month::January, 1).ok()?;
            Some(between(
                start.midnight().assume_utc(),
                end.midnight().assume_utc(),
            ))
        }
        (Some(month), None, None) => {
            let month = Month::try_from(month).ok()?;
            let start = Date::from_calendar_date(year, month, 1).ok()?;
            let (next_year, next_month) = if month == Month::December {
                (year.checked_add(1)?, Month::January)
            } else {
                (year, month.next())
            };
            let end = Date::from_calendar_date(next_year, next_month, 1).ok()?;
            Some(between(
                start.midnight().assume_utc(),
                end.midnight().assume_utc(),
            ))
        }
        (Some(month), Some(day), None) => {
            let date = Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()?;
            let start = date.midnight().assume_utc();
            Some(range_from(start, time::Duration::DAY))
        }
        (Some(month), Some(day), Some(time_text)) => {
            let date = Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()?;
            parse_time_range(date, time_text)
        }
        _ => None,
    }
}

/// `10:00`, `10:00:00`, `10:00:00.123`, each with optional `Z` or `±hh:mm`.
fn parse_time_range(date: Date, text: &str) -> Option<DateRange> {
    let (clock, offset) = split_offset(text)?;
    let mut fields = clock.split(':');
    let hour: u8 = parse_digits(fields.next()?, 2)?;
    let minute: u8 = parse_digits(fields.next()?, 2)?;
    let second_text = fields.next();
    if fields.next().is_some() {
        return None;
    }
    let (second, fraction) = match second_text {
        None => (None, None),
        Some(text) => match text.split_once('.') {
            Some((whole, fraction)) => (Some(parse_digits::<u8>(whole, 2)?), Some(fraction)),
            None => (Some(parse_digits::<u8>(text, 2)?), None),
        },
    };
    let micros = match fraction {
        Some(fraction) if !fraction.is_empty() && fraction.chars().all(|c| c.is_ascii_digit()) => {
            let padded: String = fraction
                .chars()
                .chain(std::iter::repeat('0'))
                .take(6)
                .collect();
            Some(padded.parse::<u32>().ok()?)
        }
        Some(_) => return None,
        None => None,
    };
    let clock_time =
        Time::from_hms_micro(hour, minute, second.unwrap_or(0), micros.unwrap_or(0)).ok()?;
    let start = PrimitiveDateTime::new(date, clock_time).assume_offset(offset);
    let length = match (second, micros) {
        (None, _) => time::Duration::MINUTE,
        (Some(_), None) => time::Duration::SECOND,
        (Some(_), Some(_)) => time::Duration::microseconds(1),
    };
    Some(range_from(start, length))
}

fn split_offset(text: &str) -> Option<(&str, UtcOffset)> {
    if let Some(clock) = text.strip_suffix('Z') {
        return Some((clock, UtcOffset::UTC));
    }
    let Some(sign_position) = text.rfind(['+', '-']) else {
        return Some((text, UtcOffset::UTC));
    };
    let (clock, zone) = text.split_at(sign_position);
    let negative = zone.starts_with('-');
    let (hours, minutes) = zone[1..].split_once(':')?;
    let hours: i8 = parse_digits(hours, 2)?;
    let minutes: i8 = parse_digits(minutes, 2)?;
    let sign = if negative { -1 } else { 1 };
    let offset = UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()?;
    Some((clock, offset))
}

fn parse_digits<T: std::str::FromStr>(text: &str, length: usize) -> Option<T> {
    if text.len() != length || !text.chars().all(|character| character.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `length` from `start`; a range that would end past the last representable instant (the last
/// day of 9999, a common "no end") runs to the end of time instead.
fn range_from(start: OffsetDateTime, length: time::Duration) -> DateRange {
    match start.checked_add(length) {
        Some(end) => between(start, end),
        None => DateRange {
            low: micros_of(start),
            high: DateRange::UNBOUNDED.high,
        },
    }
}

fn between(start: OffsetDateTime, end_exclusive: OffsetDateTime) -> DateRange {
    DateRange {
        low: micros_of(start),
        high: micros_of(end_exclusive) - 1,
    }
}

fn micros_of(moment: OffsetDateTime) -> i64 {
    i64::try_from(moment.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn partial_dates_are_ranges() {
        let year = parse_range("2020").expect("year");
        assert_eq!(year.high - year.low + 1, 366 * DAY);
        let month = parse_range("2021-02").expect("month");
        assert_eq!(month.high - month.low + 1, 28 * DAY);
        let december = parse_range("2021-12").expect("december");
        assert_eq!(december.high - december.low + 1, 31 * DAY);
        let day = parse_range("2021-02-03").expect("day");
        assert_eq!(day.high - day.low + 1, DAY);
        assert!(month.low <= day.low && day.high <= month.high);
    }

    #[test]
    fn times_carry_their_precision_and_zone() {
        let second = parse_range("2021-02-03T10:00:00Z").expect("second");
        assert_eq!(second.high - second.low + 1, 1_000_000);
        let shifted = parse_range("2021-02-03T12:00:00+02:00").expect("offset");
        assert_eq!(shifted, second);
        let exact = parse_range("2021-02-03T10:00:00.5Z").expect("fraction");
        assert_eq!(exact.low, exact.high);
        assert_eq!(exact.low, second.low + 500_000);
        let minute = parse_range("2021-02-03T10:00").expect("minute");
        assert_eq!(minute.high - minute.low + 1, 60_000_000);
    }

    #[test]
    fn garbage_is_refused() {
        for text in [
            "",
            "20",
            "2020-13",
            "2020-02-30",
            "2020-01-01T25:00:00Z",
            "yesterday",
            "2020-1-1",
        ] {
            assert_eq!(parse_range(text), None, "{text}");
        }
    }
}
