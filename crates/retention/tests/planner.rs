//! Table-driven planner cases. Backup ids are their start times, so a kept
//! list reads as a calendar.
//!
//! Length: one table case per policy rule; they read as a calendar.

use std::time::Duration;

use backstop_retention::{Backup, Plan, Policy, plan};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn b(s: &str) -> Backup {
    Backup {
        id: s.to_string(),
        started_at: t(s),
        verify_failed: false,
        suspect: false,
    }
}

/// Backups every `step` from `first`, `n` of them.
fn series(first: &str, step: chrono::Duration, n: usize) -> Vec<Backup> {
    (0..n)
        .map(|i| {
            let at = t(first) + step * i as i32;
            Backup {
                id: at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                started_at: at,
                verify_failed: false,
                suspect: false,
            }
        })
        .collect()
}

fn days(first: &str, n: usize) -> Vec<Backup> {
    series(first, chrono::Duration::days(1), n)
}

fn kept(p: &Plan) -> Vec<String> {
    p.kept().map(|d| d.id.clone()).collect()
}

fn utc() -> Tz {
    chrono_tz::UTC
}

fn policy(f: impl FnOnce(&mut Policy)) -> Policy {
    let mut p = Policy {
        min_keep: 0,
        ..Default::default()
    };
    f(&mut p);
    p
}

#[test]
fn c01_nothing_to_plan() {
    assert!(
        plan(&policy(|p| p.keep_last = 3), &[], utc())
            .decisions
            .is_empty()
    );
}

#[test]
fn c02_a_single_backup_is_kept() {
    let p = plan(
        &policy(|p| p.keep_daily = 1),
        &[b("2026-01-01T02:00:00Z")],
        utc(),
    );
    assert_eq!(p.decisions[0].reasons, ["daily 2026-01-01", "newest"]);
}

#[test]
fn c03_keep_last() {
    let p = plan(
        &policy(|p| p.keep_last = 3),
        &days("2026-01-01T02:00:00Z", 10),
        utc(),
    );
    assert_eq!(
        kept(&p),
        [
            "2026-01-10T02:00:00Z",
            "2026-01-09T02:00:00Z",
            "2026-01-08T02:00:00Z"
        ]
    );
    assert_eq!(p.deleted().count(), 7);
    assert_eq!(p.deleted().next().unwrap().reasons, ["no rule keeps it"]);
}

#[test]
fn c04_keep_daily() {
    let p = plan(
        &policy(|p| p.keep_daily = 7),
        &days("2026-01-01T02:00:00Z", 30),
        utc(),
    );
    assert_eq!(kept(&p).len(), 7);
    assert_eq!(kept(&p).last().unwrap(), "2026-01-24T02:00:00Z");
}

#[test]
fn c05_gfs_over_400_days() {
    // 2025-01-01 … 2026-02-04, one backup a day.
    let backups = days("2025-01-01T02:00:00Z", 400);
    let pol = policy(|p| {
        p.keep_daily = 7;
        p.keep_weekly = 4;
        p.keep_monthly = 12;
        p.keep_yearly = 3;
    });
    let p = plan(&pol, &backups, utc());
    let k = kept(&p);
    // 7 days (Jan 29 – Feb 4), weeks W04 and W03 (Jan 25, Jan 18; W06 and
    // W05 are already kept by days), months 2025-03 … 2025-12 (their last
    // days), years already covered.
    let want: Vec<String> = [
        "2026-02-04",
        "2026-02-03",
        "2026-02-02",
        "2026-02-01",
        "2026-01-31",
        "2026-01-30",
        "2026-01-29",
        "2026-01-25",
        "2026-01-18",
        "2025-12-31",
        "2025-11-30",
        "2025-10-31",
        "2025-09-30",
        "2025-08-31",
        "2025-07-31",
        "2025-06-30",
        "2025-05-31",
        "2025-04-30",
        "2025-03-31",
    ]
    .iter()
    .map(|d| format!("{d}T02:00:00Z"))
    .collect();
    assert_eq!(k, want);
    let dec = |id: &str| {
        p.decisions
            .iter()
            .find(|d| d.id == id)
            .unwrap()
            .reasons
            .clone()
    };
    assert_eq!(
        dec("2026-02-04T02:00:00Z"),
        [
            "daily 2026-02-04",
            "weekly 2026-W06",
            "monthly 2026-02",
            "yearly 2026",
            "newest"
        ]
    );
    assert_eq!(
        dec("2025-12-31T02:00:00Z"),
        ["monthly 2025-12", "yearly 2025"]
    );
}

#[test]
fn c06_gfs_over_400_days_in_berlin_shifts_month_ends() {
    // 23:30 UTC is 00:30 the next day in Berlin, so each month's last backup
    // in Berlin time was taken on the UTC day before its last day.
    let backups = days("2025-01-01T23:30:00Z", 400);
    let pol = policy(|p| p.keep_monthly = 3);
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    assert_eq!(
        kept(&plan(&pol, &backups, berlin)),
        [
            "2026-02-04T23:30:00Z",
            "2026-01-30T23:30:00Z",
            "2025-12-30T23:30:00Z"
        ]
    );
    assert_eq!(
        kept(&plan(&pol, &backups, utc())),
        [
            "2026-02-04T23:30:00Z",
            "2026-01-31T23:30:00Z",
            "2025-12-31T23:30:00Z"
        ]
    );
}

#[test]
fn c07_hourly() {
    let backups = series("2026-01-01T00:05:00Z", chrono::Duration::hours(1), 48);
    let p = plan(&policy(|p| p.keep_hourly = 24), &backups, utc());
    assert_eq!(kept(&p).len(), 24);
    assert_eq!(kept(&p).last().unwrap(), "2026-01-02T00:05:00Z");
}

#[test]
fn c08_hourly_keeps_the_newest_of_each_hour() {
    let backups = series("2026-01-01T00:00:00Z", chrono::Duration::minutes(30), 10);
    let p = plan(&policy(|p| p.keep_hourly = 3), &backups, utc());
    assert_eq!(
        kept(&p),
        [
            "2026-01-01T04:30:00Z",
            "2026-01-01T03:30:00Z",
            "2026-01-01T02:30:00Z"
        ]
    );
}

#[test]
fn c09_gaps_of_weeks_count_only_buckets_with_backups() {
    let backups = vec![
        b("2026-01-01T02:00:00Z"),
        b("2026-01-15T02:00:00Z"),
        b("2026-02-05T02:00:00Z"),
    ];
    let p = plan(&policy(|p| p.keep_daily = 7), &backups, utc());
    assert_eq!(kept(&p).len(), 3);
}

#[test]
fn c10_daily_across_a_gap() {
    let mut backups = days("2026-01-01T02:00:00Z", 3);
    backups.extend(days("2026-01-20T02:00:00Z", 2));
    let p = plan(&policy(|p| p.keep_daily = 3), &backups, utc());
    assert_eq!(
        kept(&p),
        [
            "2026-01-21T02:00:00Z",
            "2026-01-20T02:00:00Z",
            "2026-01-03T02:00:00Z"
        ]
    );
}

#[test]
fn c11_keep_within_counts_from_the_newest_backup_not_now() {
    // The job stalled weeks ago: nothing ages out while no new backup comes.
    let backups = days("2026-01-01T02:00:00Z", 20);
    let p = plan(
        &policy(|p| p.keep_within = Some(Duration::from_secs(7 * 86400))),
        &backups,
        utc(),
    );
    assert_eq!(kept(&p).len(), 8, "Jan 13 … Jan 20, the boundary included");
    assert_eq!(kept(&p).last().unwrap(), "2026-01-13T02:00:00Z");
}

#[test]
fn c12_all_recent_runs_failed_leaves_the_old_backups() {
    // Only old complete backups exist (recent attempts failed and have no
    // manifest, so they are not here): the rules still keep the newest ones.
    let backups = days("2025-06-01T02:00:00Z", 10);
    let p = plan(
        &policy(|p| {
            p.keep_daily = 3;
            p.min_keep = 3;
        }),
        &backups,
        utc(),
    );
    assert_eq!(
        kept(&p),
        [
            "2025-06-10T02:00:00Z",
            "2025-06-09T02:00:00Z",
            "2025-06-08T02:00:00Z"
        ]
    );
}

#[test]
fn c13_min_keep_tops_up_the_rules() {
    let backups = days("2026-01-01T02:00:00Z", 10);
    let p = plan(
        &policy(|p| {
            p.keep_last = 1;
            p.min_keep = 5;
        }),
        &backups,
        utc(),
    );
    assert_eq!(kept(&p).len(), 5);
    assert_eq!(p.decisions[1].reasons, ["min_keep"]);
}

#[test]
fn c14_failed_verifications_do_not_count_toward_min_keep() {
    let mut backups = days("2026-01-01T02:00:00Z", 5);
    for x in backups.iter_mut().skip(2) {
        x.verify_failed = true; // the three newest
    }
    let p = plan(
        &policy(|p| {
            p.keep_last = 1;
            p.min_keep = 2;
        }),
        &backups,
        utc(),
    );
    assert_eq!(
        kept(&p),
        [
            "2026-01-05T02:00:00Z",
            "2026-01-02T02:00:00Z",
            "2026-01-01T02:00:00Z"
        ]
    );
}

#[test]
fn c15_duplicate_timestamps_are_ordered_by_id() {
    let mut a = b("2026-01-01T02:00:00Z");
    a.id = "2026-01-01T02-00-00Z-aaaa".into();
    let mut z = b("2026-01-01T02:00:00Z");
    z.id = "2026-01-01T02-00-00Z-zzzz".into();
    let p = plan(&policy(|p| p.keep_last = 1), &[a.clone(), z.clone()], utc());
    assert_eq!(kept(&p), [z.id.clone()]);
    let q = plan(&policy(|p| p.keep_last = 1), &[z, a], utc());
    assert_eq!(p, q, "input order does not matter");
}

#[test]
fn c16_several_per_day_daily_keeps_the_newest() {
    let backups = vec![
        b("2026-01-02T01:00:00Z"),
        b("2026-01-02T13:00:00Z"),
        b("2026-01-02T23:00:00Z"),
        b("2026-01-01T12:00:00Z"),
    ];
    let p = plan(&policy(|p| p.keep_daily = 2), &backups, utc());
    assert_eq!(kept(&p), ["2026-01-02T23:00:00Z", "2026-01-01T12:00:00Z"]);
}

#[test]
fn c17_the_newest_is_always_marked() {
    let p = plan(
        &policy(|p| p.keep_yearly = 1),
        &days("2026-01-01T02:00:00Z", 3),
        utc(),
    );
    assert!(p.decisions[0].reasons.contains(&"newest".to_string()));
    assert_eq!(kept(&p).len(), 1);
}

#[test]
fn c18_the_newest_is_kept_even_when_its_verification_failed() {
    let mut backups = days("2026-01-01T02:00:00Z", 3);
    backups[2].verify_failed = true;
    let p = plan(
        &policy(|p| {
            p.keep_within = Some(Duration::from_secs(1));
            p.min_keep = 1;
        }),
        &backups,
        utc(),
    );
    assert_eq!(kept(&p), ["2026-01-03T02:00:00Z", "2026-01-02T02:00:00Z"]);
    assert_eq!(p.decisions[1].reasons, ["min_keep"]);
}

#[test]
fn c19_iso_weeks_cross_the_year() {
    // Mon 2025-12-29 … Sun 2026-01-04 is 2026-W01.
    let backups = vec![
        b("2025-12-28T12:00:00Z"),
        b("2025-12-29T12:00:00Z"),
        b("2026-01-04T12:00:00Z"),
    ];
    let p = plan(&policy(|p| p.keep_weekly = 2), &backups, utc());
    assert_eq!(kept(&p), ["2026-01-04T12:00:00Z", "2025-12-28T12:00:00Z"]);
    assert_eq!(p.decisions[0].reasons[0], "weekly 2026-W01");
    assert_eq!(p.decisions[2].reasons[0], "weekly 2025-W52");
}

#[test]
fn c20_yearly() {
    let backups: Vec<Backup> = (2019..2026)
        .map(|y| b(&format!("{y}-06-01T00:00:00Z")))
        .collect();
    let p = plan(&policy(|p| p.keep_yearly = 3), &backups, utc());
    assert_eq!(
        kept(&p),
        [
            "2025-06-01T00:00:00Z",
            "2024-06-01T00:00:00Z",
            "2023-06-01T00:00:00Z"
        ]
    );
}

#[test]
fn c21_hours_repeat_on_the_autumn_dst_change() {
    // 00:30Z and 01:30Z on 2026-10-25 are both 02:30 in Berlin: one hour bucket.
    let backups = vec![
        b("2026-10-24T23:30:00Z"),
        b("2026-10-25T00:30:00Z"),
        b("2026-10-25T01:30:00Z"),
    ];
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let p = plan(&policy(|p| p.keep_hourly = 2), &backups, berlin);
    assert_eq!(kept(&p), ["2026-10-25T01:30:00Z", "2026-10-24T23:30:00Z"]);
    assert_eq!(p.decisions[0].reasons[0], "hourly 2026-10-25T02");
}

#[test]
fn c22_spring_dst_gap_in_hourly_buckets() {
    // 01:00Z on 2026-03-29 is 03:00 CEST; the 02:xx hour does not exist.
    let backups = series("2026-03-28T23:00:00Z", chrono::Duration::hours(1), 4);
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let p = plan(&policy(|p| p.keep_hourly = 4), &backups, berlin);
    let labels: Vec<String> = p.decisions.iter().map(|d| d.reasons[0].clone()).collect();
    assert_eq!(
        labels,
        [
            "hourly 2026-03-29T04",
            "hourly 2026-03-29T03",
            "hourly 2026-03-29T01",
            "hourly 2026-03-29T00"
        ]
    );
}

#[test]
fn c23_all_verifications_failed_keeps_the_rules_and_the_newest() {
    let mut backups = days("2026-01-01T02:00:00Z", 4);
    for x in &mut backups {
        x.verify_failed = true;
    }
    let p = plan(
        &policy(|p| {
            p.keep_last = 1;
            p.min_keep = 3;
        }),
        &backups,
        utc(),
    );
    assert_eq!(
        kept(&p),
        ["2026-01-04T02:00:00Z"],
        "no good backup to top up with"
    );
}

#[test]
fn c24_keep_last_larger_than_the_count() {
    let p = plan(
        &policy(|p| p.keep_last = 50),
        &days("2026-01-01T02:00:00Z", 5),
        utc(),
    );
    assert_eq!(p.deleted().count(), 0);
}

#[test]
fn c25_new_york_month_boundary() {
    // 2026-03-01T03:00Z is Feb 28, 22:00 in New York.
    let ny: Tz = "America/New_York".parse().unwrap();
    let backups = vec![
        b("2026-03-01T03:00:00Z"),
        b("2026-02-27T03:00:00Z"),
        b("2026-01-30T03:00:00Z"),
    ];
    let p = plan(&policy(|p| p.keep_monthly = 2), &backups, ny);
    assert_eq!(kept(&p), ["2026-03-01T03:00:00Z", "2026-01-30T03:00:00Z"]);
    assert_eq!(p.decisions[0].reasons[0], "monthly 2026-02");
}

#[test]
fn c26_keep_within_boundary_is_inclusive() {
    let backups = series("2026-01-01T00:00:00Z", chrono::Duration::hours(1), 100);
    let p = plan(
        &policy(|p| p.keep_within = Some(Duration::from_secs(36 * 3600))),
        &backups,
        utc(),
    );
    assert_eq!(kept(&p).len(), 37);
}

#[test]
fn c27_rules_are_ored() {
    let backups = series("2026-01-01T00:00:00Z", chrono::Duration::hours(6), 12);
    let p = plan(
        &policy(|p| {
            p.keep_last = 2;
            p.keep_daily = 2;
        }),
        &backups,
        utc(),
    );
    // last 2 = Jan 3 18:00, 12:00; daily = Jan 3 18:00 and Jan 2 18:00.
    assert_eq!(
        kept(&p),
        [
            "2026-01-03T18:00:00Z",
            "2026-01-03T12:00:00Z",
            "2026-01-02T18:00:00Z"
        ]
    );
    assert_eq!(
        p.decisions[0].reasons,
        ["last 1", "daily 2026-01-03", "newest"]
    );
}

#[test]
fn c28_input_order_does_not_matter() {
    let mut backups = days("2026-01-01T02:00:00Z", 30);
    let pol = policy(|p| {
        p.keep_daily = 5;
        p.keep_weekly = 3;
    });
    let a = plan(&pol, &backups, utc());
    backups.reverse();
    backups.swap(3, 17);
    assert_eq!(plan(&pol, &backups, utc()), a);
}

#[test]
fn c29_every_backup_is_in_the_plan_newest_first() {
    let backups = days("2026-01-01T02:00:00Z", 9);
    let p = plan(&policy(|p| p.keep_daily = 2), &backups, utc());
    assert_eq!(p.decisions.len(), 9);
    assert!(
        p.decisions
            .windows(2)
            .all(|w| w[0].started_at > w[1].started_at)
    );
}

#[test]
fn c30_min_keep_default_of_three_with_a_small_policy() {
    let p = plan(
        &Policy {
            keep_last: 1,
            min_keep: 3,
            ..Default::default()
        },
        &days("2026-01-01T02:00:00Z", 6),
        utc(),
    );
    assert_eq!(kept(&p).len(), 3);
}

#[test]
fn c31_min_keep_never_exceeds_what_exists() {
    let p = plan(
        &policy(|p| {
            p.keep_last = 1;
            p.min_keep = 10;
        }),
        &days("2026-01-01T02:00:00Z", 4),
        utc(),
    );
    assert_eq!(kept(&p).len(), 4);
}

#[test]
fn c32_empty_policy_is_detectable() {
    assert!(!Policy::default().has_rules());
    assert!(policy(|p| p.keep_within = Some(Duration::from_secs(60))).has_rules());
}

#[test]
fn c33_a_suspect_backup_takes_no_slot_and_pushes_out_nothing() {
    let mut backups = days("2026-01-01T02:00:00Z", 10);
    // Today's second backup, much smaller: suspect.
    let mut small = b("2026-01-10T14:00:00Z");
    small.suspect = true;
    backups.push(small);
    let p = plan(
        &policy(|p| {
            p.keep_daily = 3;
            p.min_keep = 3;
        }),
        &backups,
        utc(),
    );
    assert_eq!(
        kept(&p),
        [
            "2026-01-10T14:00:00Z",
            "2026-01-10T02:00:00Z",
            "2026-01-09T02:00:00Z",
            "2026-01-08T02:00:00Z"
        ],
        "the good backup of Jan 10 keeps its daily slot"
    );
    assert_eq!(
        p.decisions[0].reasons,
        ["suspect: kept for inspection", "newest"]
    );
}

#[test]
fn c34_suspects_do_not_count_toward_min_keep_and_old_ones_go() {
    let mut backups = days("2026-01-01T02:00:00Z", 6);
    backups[5].suspect = true; // Jan 6
    backups[4].suspect = true; // Jan 5
    backups[0].suspect = true; // Jan 1, older than every good backup kept
    let p = plan(
        &policy(|p| {
            p.keep_last = 1;
            p.min_keep = 2;
        }),
        &backups,
        utc(),
    );
    assert_eq!(
        kept(&p),
        [
            "2026-01-06T02:00:00Z",
            "2026-01-05T02:00:00Z",
            "2026-01-04T02:00:00Z",
            "2026-01-03T02:00:00Z"
        ]
    );
    let jan1 = p
        .decisions
        .iter()
        .find(|d| d.id.starts_with("2026-01-01"))
        .unwrap();
    assert!(!jan1.keep);
    assert_eq!(jan1.reasons, ["suspect, older than every good backup kept"]);
}
