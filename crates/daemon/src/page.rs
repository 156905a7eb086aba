//! The status page: server-rendered HTML (maud checks the templates at
//! compile time; every interpolated string is escaped), one stylesheet and
//! no script. The charts are inline SVG drawn here.

use backstop_pipeline::human_bytes;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::status::{self, HistoryPoint, JobDetail, JobStatus};

/// The stylesheet, served at [`CSS_PATH`] (the CSP allows no inline style).
pub const CSS: &str = include_str!("page.css");
pub const CSS_PATH: &str = "/static/backstop.css";

/// Who rendered the page, for its footer.
pub struct Origin<'a> {
    pub host: &'a str,
    pub version: &'a str,
    pub now: DateTime<Utc>,
}

/// `/`: every job, attention first.
pub fn overview(rows: &[JobStatus], origin: &Origin<'_>) -> String {
    let attention = rows.iter().filter(|r| r.needs_attention()).count();
    let title = if attention == 0 {
        format!("backstop: all {} jobs ok", rows.len())
    } else {
        format!(
            "backstop: {attention} of {} jobs need attention",
            rows.len()
        )
    };
    let body = html! {
        header {
            h1 { "backstop" }
            p.summary.(if attention == 0 { "ok" } else { "failing" }) {
                @if attention == 0 {
                    "All " (rows.len()) " jobs are protected."
                } @else {
                    (attention) " of " (rows.len()) " jobs need attention."
                }
            }
        }
        main {
            (jobs_table(rows, origin.now, true))
        }
        (footer(origin))
    };
    document(&title, 60, body)
}

/// `/jobs/NAME`.
///
/// Length: the HTML of one job's row, top to bottom as it renders.
pub fn job(d: &JobDetail, origin: &Origin<'_>) -> String {
    let s = &d.status;
    let now = origin.now;
    let body = html! {
        header {
            p.back { a href="/" { "← all jobs" } }
            h1 { "Job " (s.job) }
        }
        main {
            (jobs_table(std::slice::from_ref(s), now, false))
            section #backups {
                h2 { "Backups" }
                @for store in &d.backups {
                    h3 { "Store " (store.store) }
                    @if let Some(e) = &store.error {
                        p.error { "Cannot list this store: " (e) }
                    } @else if store.backups.is_empty() {
                        p { "No complete backups in this store." }
                    } @else {
                        table.list {
                            thead { tr {
                                th { "Backup ID" } th { "Started (UTC)" } th.num { "Duration" }
                                th.num { "Dump" } th.num { "Stored" } th.num { "Tables" }
                                th.num { "Rows" } th { "Verified" }
                            } }
                            tbody {
                                @for b in &store.backups {
                                    tr.backup.suspect[b.suspect] {
                                        td data-label="Backup ID" {
                                            @if b.series != s.job { span.series { (series_label(&b.series)) } " " }
                                            code { (b.backup_id) }
                                        }
                                        td data-label="Started" { (b.started_at.format("%Y-%m-%d %H:%M:%S")) }
                                        td.num data-label="Duration" { (seconds(b.duration_seconds)) }
                                        td.num data-label="Dump" { (human_bytes(b.dump_bytes)) }
                                        td.num data-label="Stored" { (human_bytes(b.stored_bytes)) }
                                        td.num data-label="Tables" { (b.tables) }
                                        td.num data-label="Rows" {
                                            @match b.rows {
                                                Some(r) if b.rows_estimated => { "~" (r) }
                                                Some(r) => { (r) }
                                                None => { "-" }
                                            }
                                        }
                                        td data-label="Verified" {
                                            @match &b.verification {
                                                Some(v) => span.(if v.ok { "ok" } else { "failing" }) {
                                                    (if v.ok { "ok " } else { "FAILED " }) (v.level) " " (v.at.format("%Y-%m-%d %H:%M"))
                                                },
                                                None => "-",
                                            }
                                            @if b.suspect { " " span.badge.suspect { "SUSPECT" } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section #runs {
                h2 { "Runs" }
                (runs_table(d.runs.iter().filter(|r| r.kind != "verify"), &s.job))
            }
            section #verifications {
                h2 { "Verifications" }
                (runs_table(d.runs.iter().filter(|r| r.kind == "verify"), &s.job))
            }
            section #retention {
                h2 { "Retention plan" }
                @match &d.retention {
                    None => p { "This job has no retention policy: every backup is kept." },
                    Some(plans) => {
                        p.note { "What the next prune would do, planned now (nothing is deleted from this page)." }
                        @for p in plans {
                            h3 { "Store " (p.store) @if p.series != s.job { " · " (series_label(&p.series)) } }
                            @if let Some(e) = &p.error {
                                p.error { "Cannot plan: " (e) }
                            } @else if p.decisions.is_empty() {
                                p { "No complete backups." }
                            } @else {
                                table.list {
                                    thead { tr { th { "Decision" } th { "Backup ID" } th { "Why" } } }
                                    tbody {
                                        @for d in &p.decisions {
                                            tr.plan.(if d.keep { "keep" } else { "delete" }) {
                                                td data-label="Decision" { (if d.keep { "keep" } else { "DELETE" }) }
                                                td data-label="Backup ID" { code { (d.backup_id) } }
                                                td data-label="Why" { (d.reasons.join(", ")) }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (footer(origin))
    };
    document(&format!("backstop: job {}", s.job), 60, body)
}

/// `/jobs/NAME` of a job the configuration does not have.
pub fn not_found(name: &str, origin: &Origin<'_>) -> String {
    let body = html! {
        header { p.back { a href="/" { "← all jobs" } } h1 { "No such job" } }
        main { p { "The configuration has no job named " code { (name) } "." } }
        (footer(origin))
    };
    document("backstop: no such job", 0, body)
}

fn document(title: &str, refresh: u32, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh > 0 { meta http-equiv="refresh" content=(refresh); }
                title { (title) }
                link rel="stylesheet" href=(CSS_PATH);
            }
            body { (body) }
        }
    }
    .into_string()
}

fn footer(o: &Origin<'_>) -> Markup {
    html! {
        footer {
            "Rendered " (o.now.format("%Y-%m-%d %H:%M:%S UTC")) " by backstop " (o.version)
            " on " (o.host) ". Read-only; refreshes every minute."
        }
    }
}

/// `<job>/<segment>` as `database NAME` (globals for `@globals`).
fn series_label(series: &str) -> String {
    match backstop_vocab::series::split(series).1 {
        Some(seg) => match backstop_vocab::series::database_of(seg) {
            Some(db) => format!("database {db}"),
            None => "globals".into(),
        },
        None => series.to_string(),
    }
}

/// The path of a job's page, its name percent-encoded.
pub fn job_href(name: &str) -> String {
    let mut out = String::from("/jobs/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1} s")
    } else {
        humantime::format_duration(std::time::Duration::from_secs(s.round() as u64)).to_string()
    }
}

fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Markup {
    match t {
        Some(t) => html! {
            time datetime=(t.to_rfc3339()) title=(t.format("%Y-%m-%d %H:%M:%S UTC")) {
                (status::age(Some(t), now))
            }
        },
        None => html! { "never" },
    }
}

fn jobs_table(rows: &[JobStatus], now: DateTime<Utc>, link: bool) -> Markup {
    html! {
        table.jobs {
            thead { tr {
                th { "State" } th { "Job" } th { "Last success (RPO)" } th { "Last run" }
                th { "Next run" } th.num { "Latest size" } th { "Backups" } th { "Verified" }
                th { "Restore (RTO)" } th { "Last " (status::HISTORY) " backups" }
            } }
            tbody {
                @for r in rows {
                    (job_row(r, now, link))
                }
            }
        }
    }
}

fn job_row(r: &JobStatus, now: DateTime<Utc>, link: bool) -> Markup {
    let class = r.state_class();
    let stale = matches!((r.last_success_at, r.rpo_seconds), (Some(t), Some(rpo)) if (now - t).num_seconds() > rpo);
    html! {
        tr.job.(format!("state-{class}")) data-job=(r.job) data-state=(class) {
            td data-label="State" { span.badge.(class) { (r.state.to_uppercase()) } }
            td.name data-label="Job" {
                @if link { a href=(job_href(&r.job)) { (r.job) } } @else { (r.job) }
            }
            td data-label="Last success" {
                span.stale[stale] { (when(r.last_success_at, now)) }
                @if let Some(rpo) = r.rpo_seconds {
                    " " span.dim { "(RPO " (seconds(rpo as f64)) ")" }
                }
            }
            td data-label="Last run" {
                @match (r.last_run_outcome, r.last_run_at) {
                    (Some(o), t) => { span.(format!("outcome-{o}")) { (o) } " " (when(t, now)) },
                    _ => "-",
                }
            }
            td data-label="Next run" {
                @match r.next_run_at {
                    Some(t) => time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%MZ")) },
                    None => span.dim { "on demand" },
                }
            }
            td.num data-label="Latest size" { (size_cell(r)) }
            td data-label="Backups" {
                @for (i, s) in r.stores.iter().enumerate() {
                    @if i > 0 { ", " }
                    @match (s.backups, &s.error) {
                        (Some(n), _) if s.untrusted > 0 => {
                            (s.store) ": " (n) " "
                            span.failing title="objects posing as backups that no trusted key signed: see docs/SECURITY.md" {
                                "+" (s.untrusted) " NOT TRUSTED"
                            }
                        },
                        (Some(n), _) => { (s.store) ": " (n) },
                        (None, Some(e)) => span.failing title=(e) { (s.store) ": unreachable" },
                        (None, None) if s.listed_at.is_none() => span.dim title="the daemon lists its stores at start, after its runs and when the catalog shows a newer backup" { (s.store) ": not listed yet" },
                        (None, None) => { (s.store) ": ?" },
                    }
                }
            }
            td data-label="Verified" {
                @match &r.verification {
                    Some(v) => span.(if v.ok { "ok" } else { "failing" }) {
                        (if v.ok { "ok " } else { "FAILED " }) (v.level) " " (when(Some(v.at), now))
                    },
                    None => span.dim { "not yet" },
                }
            }
            td data-label="Restore (RTO)" {
                @match r.restore_seconds {
                    Some(s) => {
                        span.over[r.rto_seconds.is_some_and(|rto| s > rto as f64)] { (seconds(s)) }
                    },
                    None => span.dim { "not measured" },
                }
                @if let Some(rto) = r.rto_seconds { " " span.dim { "(RTO " (seconds(rto as f64)) ")" } }
            }
            td.chart data-label="History" { (chart(&r.history)) }
        }
        @if r.state == "failing" && let Some(e) = &r.last_error {
            tr.error-row { td colspan="10" { span.label { "Last error" } pre.error { (e) } } }
        }
        @for d in &r.databases {
            tr.database.(format!("state-{}", status::state_class(&d.state))) data-database=(d.database) {
                td data-label="State" { span.badge.(status::state_class(&d.state)) { (d.state.to_uppercase()) } }
                td.name data-label="Database" { "↳ " (d.database) }
                td data-label="Last success" { (when(d.last_success_at, now)) }
                td colspan="7" data-label="Latest dump" {
                    @if let Some(b) = d.latest_dump_bytes { "dump " (human_bytes(b.max(0) as u64)) }
                    @if let Some(e) = &d.last_error { pre.error { (e) } }
                }
            }
        }
    }
}

fn size_cell(r: &JobStatus) -> Markup {
    let Some(latest) = r.latest_stored_bytes else {
        return html! { "-" };
    };
    let change = r
        .median_stored_bytes
        .filter(|m| *m > 0)
        .map(|m| (latest as f64 - m as f64) * 100.0 / m as f64);
    html! {
        (human_bytes(latest))
        @if let Some(c) = change {
            " " span.change.drop[c <= -10.0] title="against the median of the earlier backups" {
                (format!("{c:+.0}%")) " vs median"
            }
        }
        @if let Some(d) = r.latest_dump_bytes { br; span.dim { "dump " (human_bytes(d)) } }
    }
}

const CHART_W: f64 = 240.0;
const CHART_H: f64 = 48.0;
const PAD: f64 = 4.0;

/// The dump size (dots, a line through them) and duration (a dashed line)
/// of the latest backups, each scaled to its own maximum.
fn chart(points: &[HistoryPoint]) -> Markup {
    if points.is_empty() {
        return html! { span.dim { "no backups yet" } };
    }
    let n = points.len();
    let x = |i: usize| {
        if n == 1 {
            CHART_W / 2.0
        } else {
            PAD + i as f64 * (CHART_W - 2.0 * PAD) / (n - 1) as f64
        }
    };
    let scale = |v: f64, max: f64| {
        let h = CHART_H - 2.0 * PAD;
        if max <= 0.0 {
            CHART_H - PAD
        } else {
            CHART_H - PAD - v / max * h
        }
    };
    let max_size = points
        .iter()
        .map(|p| p.dump_bytes.unwrap_or(0) as f64)
        .fold(0.0, f64::max);
    let max_secs = points.iter().map(|p| p.seconds).fold(0.0, f64::max);
    let size_xy: Vec<(f64, f64)> = points
        .iter()
        .enumerate()
        .map(|(i, p)| (x(i), scale(p.dump_bytes.unwrap_or(0) as f64, max_size)))
        .collect();
    let line = |xy: &[(f64, f64)]| {
        xy.iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let secs_xy: Vec<(f64, f64)> = points
        .iter()
        .enumerate()
        .map(|(i, p)| (x(i), scale(p.seconds, max_secs)))
        .collect();
    let label = format!(
        "Dump size (dots, up to {}) and duration (dashed, up to {}) of the last {n} backups",
        human_bytes(max_size as u64),
        seconds(max_secs)
    );
    html! {
        svg.history xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {CHART_W} {CHART_H}"))
            width=(CHART_W) height=(CHART_H) role="img" aria-label=(label) data-points=(n) {
            title { (label) }
            polyline.duration points=(line(&secs_xy)) {}
            polyline.size-line points=(line(&size_xy)) {}
            @for (p, (cx, cy)) in points.iter().zip(&size_xy) {
                circle.size.suspect[p.suspect] cx=(format!("{cx:.1}")) cy=(format!("{cy:.1}")) r="2.5" {
                    title {
                        (p.finished_at.format("%Y-%m-%d %H:%MZ")) ": dump "
                        (p.dump_bytes.map_or_else(|| "?".to_string(), human_bytes))
                        " in " (seconds(p.seconds))
                        @if p.suspect { " (SUSPECT)" }
                    }
                }
            }
        }
    }
}

/// Runs as rows; errors shown whole (escaped).
fn runs_table<'a>(runs: impl Iterator<Item = &'a status::RunRow>, job: &str) -> Markup {
    let runs: Vec<_> = runs.collect();
    html! {
        @if runs.is_empty() {
            p { "None recorded." }
        } @else {
            table.list {
                thead { tr {
                    th { "Started (UTC)" } th { "Kind" } th { "Outcome" } th.num { "Duration" }
                    th { "Backup ID" } th { "Error" }
                } }
                tbody {
                    @for r in runs {
                        tr.run.(format!("outcome-{}", r.outcome)) {
                            td data-label="Started" { (r.started_at.format("%Y-%m-%d %H:%M:%S")) }
                            td data-label="Kind" {
                                (r.kind) @if let Some(l) = &r.level { " " (l) }
                                @if r.series != job { " · " (series_label(&r.series)) }
                            }
                            td data-label="Outcome" { span.(format!("outcome-{}", r.outcome)) { (r.outcome) } }
                            td.num data-label="Duration" { (r.seconds.map_or_else(|| "-".to_string(), seconds)) }
                            td data-label="Backup ID" { @if let Some(b) = &r.backup_id { code { (b) } } }
                            td data-label="Error" { @if let Some(e) = &r.error { pre.error { (e) } } }
                        }
                    }
                }
            }
        }
    }
}

/// `s` escaped for HTML text.
pub fn escape(s: &str) -> String {
    html! { (s) }.into_string()
}
