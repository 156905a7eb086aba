//! Pre-flight checks of a job's database, made before each dump and by
//! `check-config --probe`: the failures managed PostgreSQL (Supabase, RDS,
//! Cloud SQL) is known for, each found with a message that says what to
//! change, instead of a failed backup at 3 a.m.
//! - a connection pooler in transaction mode between backstop and the
//!   server (PgBouncer, Supavisor, RDS Proxy): pg_dump needs a session of
//!   its own for its snapshot and its settings;
//! - tables of the dump the role cannot read (no USAGE on the schema, no
//!   SELECT, or row security it cannot bypass);
//! - a host that resolves only to IPv6 on a machine without an IPv6 route
//!   (Supabase's direct hosts).
//!
//! The pg_dump older than the server is the dump's own version check.

use std::net::{IpAddr, SocketAddr};

use backstop_config::Filters;
use sqlx::{Connection, Row};

pub use crate::inventory::Unreadable;
use crate::{DumpError, PgTarget, connect, query_error};

/// The server process behind one statement of a fresh session, asked with
/// the simple protocol (a transaction pooler may lose prepared statements).
async fn backend_pid(conn: &mut sqlx::PgConnection, target: &PgTarget) -> Result<i32, DumpError> {
    let row = sqlx::raw_sql("SELECT pg_catalog.pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| query_error(target, &e))?;
    row.try_get::<i32, _>(0)
        .map_err(|e| query_error(target, &e))
}

/// Whether the connection to `target` goes through a pooler in
/// transaction (or statement) mode: two sessions of its own that share one
/// server process, or one session whose server process changes between
/// statements, cannot be a direct connection or a session-mode pooler.
/// Returns the problem, said for the operator.
///
/// # Errors
/// [`DumpError::Connect`] or [`DumpError::Query`].
pub async fn transaction_pooler(target: &PgTarget) -> Result<Option<String>, DumpError> {
    let mut a = connect(target).await?;
    let a1 = backend_pid(&mut a, target).await?;
    let mut b = connect(target).await?;
    let b1 = backend_pid(&mut b, target).await?;
    let a2 = backend_pid(&mut a, target).await?;
    let _ = a.close().await;
    let _ = b.close().await;
    let evidence = if a1 == b1 {
        format!("two separate sessions were served by one server process (pid {a1})")
    } else if a1 != a2 {
        format!("one session moved between server processes (pid {a1}, then {a2})")
    } else {
        return Ok(None);
    };
    Ok(Some(format!(
        "{} goes through a connection pooler in transaction mode (PgBouncer, Supavisor, RDS Proxy): {evidence}. pg_dump needs a session of its own for its snapshot and its settings, so a dump through it is not consistent or fails at random. Point the job at the pooler's session-mode port (Supabase: port 5432 of the pooler host, not 6543) or at the database's direct host",
        target.display()
    )))
}

/// What the role cannot read of what `filters` select, per schema.
///
/// # Errors
/// [`DumpError::Query`].
pub async fn unreadable_tables(
    conn: &mut sqlx::PgConnection,
    target: &PgTarget,
    filters: &Filters,
) -> Result<Vec<Unreadable>, DumpError> {
    crate::inventory::unreadable(conn, filters)
        .await
        .map_err(|e| query_error(target, &e))
}

/// The message for what [`unreadable_tables`] found (None: nothing).
pub fn describe_unreadable(role: &str, found: &[Unreadable]) -> Option<String> {
    if found.is_empty() {
        return None;
    }
    let total: u64 = found.iter().map(|u| u.unreadable).sum();
    let list: Vec<String> = found
        .iter()
        .map(|u| {
            let names: Vec<String> = u
                .examples
                .iter()
                .map(|t| format!("{}.{t}", u.schema))
                .collect();
            let more = u.unreadable.saturating_sub(u.examples.len() as u64);
            let mut s = names.join(", ");
            if more > 0 {
                s.push_str(&format!(" and {more} more"));
            }
            if u.no_usage {
                s.push_str(&format!(" (no USAGE on schema {})", u.schema));
            }
            s
        })
        .collect();
    // Excluding a schema loses nothing readable only if all of it is unreadable.
    let whole: Vec<&str> = found
        .iter()
        .filter(|u| u.unreadable == u.tables)
        .map(|u| u.schema.as_str())
        .collect();
    let fix = if whole.len() == found.len() {
        format!(
            "or, if they need no backup here (a managed platform's own schemas), add exclude_schemas = [{}], which leaves out nothing the role can read",
            whole
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        "or leave them out with exclude_tables (exclude_schemas would also drop tables the role can read)".to_string()
    };
    Some(format!(
        "role \"{role}\" cannot read {total} table(s) the dump includes: {}; pg_dump would fail on them with \"permission denied\" (or row security). Grant access (on PostgreSQL 14+: GRANT pg_read_all_data TO \"{role}\"; for row security also ALTER ROLE \"{role}\" BYPASSRLS), {fix}",
        list.join("; ")
    ))
}

/// When every address of `host` is IPv6 and `routable` says none of them
/// can be reached from here, the message that says so (None otherwise,
/// and for an IP literal that is not IPv6).
pub fn ipv6_only(
    host: &str,
    addrs: &[SocketAddr],
    routable: impl Fn(IpAddr) -> bool,
) -> Option<String> {
    if addrs.is_empty() || addrs.iter().any(SocketAddr::is_ipv4) {
        return None;
    }
    if addrs.iter().any(|a| routable(a.ip())) {
        return None;
    }
    Some(format!(
        "{host} resolves only to IPv6 ({}) and this machine has no route to it: use the provider's IPv4 endpoint (Supabase: the session pooler host, aws-0-<region>.pooler.supabase.com port 5432, with user postgres.<project>) or give this host IPv6 connectivity",
        addrs[0].ip()
    ))
}

/// Whether this machine has a route to `ip` (a UDP connect picks a route
/// and sends nothing).
pub fn has_route(ip: IpAddr) -> bool {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    std::net::UdpSocket::bind(bind)
        .and_then(|s| s.connect(SocketAddr::new(ip, 9)))
        .is_ok()
}

/// [`ipv6_only`] for `target`'s host, resolved now (None when it cannot
/// be resolved: the connection error says that better).
pub async fn ipv6_only_host(target: &PgTarget) -> Option<String> {
    let host = target.host();
    if host.starts_with('/') {
        return None;
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), target.port()))
        .await
        .ok()?
        .collect();
    ipv6_only(&host, &addrs, has_route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_only_hosts_without_a_route_are_named() {
        let v6: SocketAddr = "[2a05:d014:1c06:5f00::1]:5432".parse().unwrap();
        let v4: SocketAddr = "10.0.0.5:5432".parse().unwrap();
        let msg = ipv6_only("db.abc.supabase.co", &[v6], |_| false).unwrap();
        assert!(
            msg.contains("resolves only to IPv6 (2a05:d014:1c06:5f00::1)"),
            "{msg}"
        );
        assert!(msg.contains("pooler"), "{msg}");
        assert_eq!(ipv6_only("h", &[v6], |_| true), None, "routable");
        assert_eq!(ipv6_only("h", &[v6, v4], |_| false), None, "has IPv4");
        assert_eq!(ipv6_only("h", &[], |_| false), None, "unresolved");
        // Loopback always has a route.
        assert!(has_route("::1".parse().unwrap()));
        assert!(has_route("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn unreadable_tables_say_whether_exclude_schemas_fixes_it() {
        let u = |schema: &str, no_usage, unreadable, tables, ex: &[&str]| Unreadable {
            schema: schema.into(),
            no_usage,
            unreadable,
            tables,
            examples: ex.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(describe_unreadable("r", &[]), None);
        let whole = describe_unreadable(
            "backup",
            &[
                u("auth", true, 7, 7, &["audit_log_entries", "users"]),
                u("vault", false, 1, 1, &["secrets"]),
            ],
        )
        .unwrap();
        assert!(whole.contains("cannot read 8 table(s)"), "{whole}");
        assert!(
            whole.contains("auth.users and 5 more (no USAGE on schema auth)"),
            "{whole}"
        );
        assert!(
            whole.contains("exclude_schemas = [\"auth\", \"vault\"]"),
            "{whole}"
        );
        let part =
            describe_unreadable("backup", &[u("public", false, 1, 40, &["payroll"])]).unwrap();
        assert!(part.contains("public.payroll"), "{part}");
        assert!(part.contains("exclude_tables"), "{part}");
        assert!(!part.contains("exclude_schemas = ["), "{part}");
    }
}
