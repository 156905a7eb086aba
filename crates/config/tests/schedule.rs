//! Schedule math: the fire times of cron expressions in IANA time zones,
//! across DST changes, month ends and leap days.

use backstop_config::{Schedule, parse_schedule};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// The first `n` fire times strictly after `from`.
fn fires(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
    let s: Schedule = parse_schedule(expr).unwrap();
    let tz: Tz = tz.parse().unwrap();
    let mut t = utc(from);
    let mut out = Vec::new();
    for _ in 0..n {
        t = s.next_after(t, tz).expect("fires");
        out.push(t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
    }
    out
}

#[test]
fn daily_0230_berlin_across_both_2026_dst_changes() {
    // Spring: 2026-03-29 02:00 CET jumps to 03:00 CEST; 02:30 does not exist,
    // the job runs once at the next valid time (03:00 CEST = 01:00Z).
    assert_eq!(
        fires("30 2 * * *", "Europe/Berlin", "2026-03-27T12:00:00Z", 4),
        [
            "2026-03-28T01:30:00Z", // 02:30 CET
            "2026-03-29T01:00:00Z", // 03:00 CEST, the first valid instant after the gap
            "2026-03-30T00:30:00Z", // 02:30 CEST
            "2026-03-31T00:30:00Z",
        ]
    );
    // Autumn: 2026-10-25 03:00 CEST falls back to 02:00 CET; 02:30 happens
    // twice, the job runs once (the first).
    assert_eq!(
        fires("30 2 * * *", "Europe/Berlin", "2026-10-23T12:00:00Z", 4),
        [
            "2026-10-24T00:30:00Z", // 02:30 CEST
            "2026-10-25T00:30:00Z", // 02:30 CEST, first of the two
            "2026-10-26T01:30:00Z", // 02:30 CET
            "2026-10-27T01:30:00Z",
        ]
    );
}

#[test]
fn new_york_dst_and_quarter_hours() {
    // 2026-03-08 02:00 EST → 03:00 EDT: every 15 minutes skips the gap, no duplicates.
    assert_eq!(
        fires(
            "*/15 * * * *",
            "America/New_York",
            "2026-03-08T06:40:00Z",
            4
        ),
        [
            "2026-03-08T06:45:00Z", // 01:45 EST
            "2026-03-08T07:00:00Z", // 03:00 EDT
            "2026-03-08T07:15:00Z",
            "2026-03-08T07:30:00Z",
        ]
    );
    // 2026-11-01 02:00 EDT → 01:00 EST: the repeated hour fires again (each
    // quarter hour is a distinct instant), never twice at one instant.
    assert_eq!(
        fires(
            "*/30 * * * *",
            "America/New_York",
            "2026-11-01T05:10:00Z",
            4
        ),
        [
            "2026-11-01T05:30:00Z", // 01:30 EDT
            "2026-11-01T06:00:00Z", // 01:00 EST
            "2026-11-01T06:30:00Z", // 01:30 EST
            "2026-11-01T07:00:00Z", // 02:00 EST
        ]
    );
}

#[test]
fn month_ends_leap_days_and_seconds() {
    assert_eq!(
        fires("0 3 31 * *", "UTC", "2026-01-31T04:00:00Z", 3),
        [
            "2026-03-31T03:00:00Z",
            "2026-05-31T03:00:00Z",
            "2026-07-31T03:00:00Z"
        ]
    );
    assert_eq!(
        fires("0 0 29 2 *", "UTC", "2026-01-01T00:00:00Z", 2),
        ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"]
    );
    assert_eq!(
        fires("0 4 L * *", "Europe/Berlin", "2026-02-01T00:00:00Z", 2),
        ["2026-02-28T03:00:00Z", "2026-03-31T02:00:00Z"]
    );
    assert_eq!(
        fires("* * * * * *", "UTC", "2026-05-01T00:00:00Z", 3),
        [
            "2026-05-01T00:00:01Z",
            "2026-05-01T00:00:02Z",
            "2026-05-01T00:00:03Z"
        ]
    );
    assert_eq!(
        fires("15 2 * * sun", "Asia/Kolkata", "2026-05-01T00:00:00Z", 2),
        ["2026-05-02T20:45:00Z", "2026-05-09T20:45:00Z"]
    );
}
