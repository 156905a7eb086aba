//! What this host's packet filter lets the service reach: the systemd
//! drop-in `backstop ip-allow` writes (`IPAddressDeny=any`, then an
//! `IPAddressAllow=` per address), read back when a connection fails so the
//! error can say the filter is why.
//!
//! A TCP connection to an address the filter drops does not fail at once:
//! the kernel takes the dropped SYN for a lost packet, resends it, and the
//! connect times out (only UDP sends, such as DNS queries, get EPERM). So a
//! failed connection is compared with the drop-in instead.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Where `backstop ip-allow` puts the drop-in on a packaged install.
pub const DROP_IN: &str = "/etc/systemd/system/backstop.service.d/ip-allow.conf";

/// An address or a network: `10.0.0.5`, `10.20.0.0/16`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// One address.
    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: max_len(addr),
        }
    }

    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Whether `ip` is in this network (an IPv4 address is never in an
    /// IPv6 network, nor the other way round).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(u32::from(32 - self.len)).unwrap_or(0);
                u32::from(net) == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(u32::from(128 - self.len))
                    .unwrap_or(0);
                u128::from(net) == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl FromStr for Prefix {
    type Err = String;

    /// The network's address is kept as given once its host bits are
    /// cleared (`10.20.3.4/16` is `10.20.0.0/16`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not an address or a network (e.g. 10.20.0.0/16, 192.168.7.15, 2001:db8::/32)"
            )
        };
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = max_len(addr);
        let len = match len {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
            None => max,
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(u32::from(32 - len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(u32::from(128 - len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len == max_len(self.addr) {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

/// What the unit's `IPAddressDeny=` and `IPAddressAllow=` settings do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    denied: Vec<Prefix>,
    allowed: Vec<Prefix>,
}

/// The networks a value of `IPAddressAllow=`/`IPAddressDeny=` names: an
/// address or network, or one of systemd's words.
fn networks(value: &str) -> Vec<Prefix> {
    value
        .split_whitespace()
        .flat_map(|v| {
            let words: &[&str] = match v {
                "localhost" => &["127.0.0.0/8", "::1"],
                "link-local" => &["169.254.0.0/16", "fe80::/64"],
                "multicast" => &["224.0.0.0/4", "ff00::/8"],
                "any" => &["0.0.0.0/0", "::/0"],
                // systemd skips what it cannot read, and so does this.
                _ => return v.parse::<Prefix>().ok().into_iter().collect::<Vec<_>>(),
            };
            words.iter().filter_map(|w| w.parse().ok()).collect()
        })
        .collect()
}

impl Filter {
    /// The filter `[Service]` settings (the unit's files in order, see
    /// [`crate::unit::settings`]) set: `None` when they deny nothing. Lists
    /// add up; an empty assignment clears its list.
    pub fn from_settings(settings: &[(String, String)]) -> Option<Self> {
        let mut denied = Vec::new();
        let mut allowed = Vec::new();
        for (key, value) in settings {
            let list = match key.as_str() {
                "IPAddressDeny" => &mut denied,
                "IPAddressAllow" => &mut allowed,
                _ => continue,
            };
            if value.is_empty() {
                list.clear();
            } else {
                list.extend(networks(value));
            }
        }
        (!denied.is_empty()).then_some(Self { denied, allowed })
    }

    /// [`Filter::from_settings`] of one unit file's text.
    pub fn parse(text: &str) -> Option<Self> {
        Self::from_settings(&crate::unit::settings(&[text.to_string()]))
    }

    /// Whether the filter drops traffic with `ip`: denied and not allowed
    /// (an allowed address wins, as in systemd).
    pub fn blocks(&self, ip: IpAddr) -> bool {
        self.denied.iter().any(|p| p.contains(ip)) && !self.allowed.iter().any(|p| p.contains(ip))
    }
}

/// The unit's filter and files, when this process runs under it: the
/// service's own cgroup (`backstop backup` run from a shell is not
/// filtered). A test build reads one file, `BACKSTOP_TEST_IP_ALLOW_DROP_IN`,
/// as the service's.
fn unit_filter() -> Option<(Filter, Vec<PathBuf>)> {
    let files = match crate::test_env("BACKSTOP_TEST_IP_ALLOW_DROP_IN") {
        Some(p) => vec![PathBuf::from(p)],
        None => {
            let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            if !cgroup.lines().any(|l| l.ends_with("/backstop.service")) {
                return None;
            }
            crate::unit::files(&crate::unit::dirs())
        }
    };
    let texts: Vec<String> = files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect();
    Some((
        Filter::from_settings(&crate::unit::settings(&texts))?,
        files,
    ))
}

/// Whether `e` or one of its causes is EPERM: a send this host's filter
/// refused (a UDP packet, or a TCP connection on kernels that report it).
pub fn refused_by_this_host(e: &(dyn std::error::Error + 'static)) -> bool {
    const EPERM: i32 = 1;
    let mut next = Some(e);
    while let Some(cause) = next {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(EPERM) {
                return true;
            }
            // An io::Error's source() skips the error it wraps.
            if let Some(inner) = io.get_ref()
                && refused_by_this_host(inner)
            {
                return true;
            }
        }
        next = cause.source();
    }
    false
}

/// Why a failed connection to `what` (at `addrs`, when known) may be this
/// host's filter, and what to do; `None` when it is not (not the service,
/// no filter, or it allows every address). `refused`: the error was EPERM.
pub fn explain(what: &str, addrs: &[IpAddr], refused: bool) -> Option<Explanation> {
    let unit = unit_filter();
    // A unit file changed since this process started: the filter in force
    // may be the one before it.
    let changed = unit.as_ref().is_some_and(|(_, files)| {
        files.iter().any(|f| {
            std::fs::metadata(f)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > crate::build::started())
        })
    });
    explain_with(what, addrs, refused, unit.as_ref().map(|(f, _)| f), changed)
}

/// A failed connection the filter explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The filter certainly drops it (EPERM, or it blocks every address):
    /// retrying cannot help.
    pub certain: bool,
    pub hint: String,
}

fn explain_with(
    what: &str,
    addrs: &[IpAddr],
    refused: bool,
    filter: Option<&Filter>,
    changed: bool,
) -> Option<Explanation> {
    let rewrite = format!(
        "if the ip-allow drop-in ({DROP_IN}) is out of date, write it again with `backstop ip-allow --output {DROP_IN}`, then `systemctl daemon-reload` and restart the service"
    );
    let blocked: Vec<String> = match filter {
        Some(f) => addrs
            .iter()
            .filter(|a| f.blocks(**a))
            .map(ToString::to_string)
            .collect(),
        None => Vec::new(),
    };
    let stale = if changed {
        " (the unit changed since the service started: restart it to apply)"
    } else {
        ""
    };
    if !blocked.is_empty() {
        return Some(Explanation {
            certain: (refused || blocked.len() == addrs.len()) && !changed,
            hint: format!(
                "the service's IPAddressDeny=/IPAddressAllow= do not allow {} ({what}), so this host drops the connection{stale}: {rewrite}",
                blocked.join(", ")
            ),
        });
    }
    if refused {
        return Some(Explanation {
            certain: true,
            hint: format!(
                "this host refused the connection to {what} (\"Operation not permitted\"): the service's IPAddressDeny= or a firewall rule blocks its address; {rewrite}"
            ),
        });
    }
    match (filter, addrs.is_empty()) {
        (Some(_), true) => Some(Explanation {
            certain: false,
            hint: format!(
                "the service's IPAddressDeny= is in force: if {what} moved to addresses it does not allow, this host drops the connection; {rewrite}"
            ),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_parse_clear_host_bits_contain_and_refuse_garbage() {
        for (given, said) in [
            ("10.20.3.4/16", "10.20.0.0/16"),
            ("192.168.7.15", "192.168.7.15"),
            ("10.0.0.5/32", "10.0.0.5"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8:1::7/32", "2001:db8::/32"),
        ] {
            assert_eq!(given.parse::<Prefix>().unwrap().to_string(), said);
        }
        for bad in ["10.0.0.0/33", "db.internal", "10.0.0/8", "::1/129", ""] {
            let e = bad.parse::<Prefix>().unwrap_err();
            assert!(e.contains("e.g. 10.20.0.0/16"), "{bad}: {e}");
        }
        let net: Prefix = "10.20.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.20.255.1")) && !net.contains(ip("10.21.0.1")));
        assert!(
            !net.contains(ip("::ffff:10.20.0.1")),
            "IPv6 is never in an IPv4 network"
        );
        assert!(
            "0.0.0.0/0"
                .parse::<Prefix>()
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
        assert!(
            "2001:db8::/32"
                .parse::<Prefix>()
                .unwrap()
                .contains(ip("2001:db8:ffff::1"))
        );
    }

    #[test]
    fn a_drop_in_is_read_as_systemd_reads_it() {
        let f = Filter::parse(
            "# comment\n[Service]\nIPAddressDeny=any\nIPAddressAllow=localhost\nIPAddressAllow=10.0.0.5 10.9.0.0/24\nIPAddressAllow=not-an-address\n",
        )
        .unwrap();
        for (a, blocked) in [
            ("127.0.0.1", false),
            ("::1", false),
            ("10.0.0.5", false),
            ("10.9.0.77", false),
            ("10.0.0.6", true),
            ("52.218.1.1", true),
            ("2a05:d07a:a000::1", true),
        ] {
            assert_eq!(f.blocks(ip(a)), blocked, "{a}");
        }
        // Nothing denied: no filter; a reset denies nothing again.
        assert_eq!(Filter::parse("[Service]\nIPAddressAllow=10.0.0.5\n"), None);
        assert_eq!(
            Filter::parse("[Service]\nIPAddressDeny=any\nIPAddressDeny=\n"),
            None
        );
        // Not in [Service]: not read.
        assert_eq!(Filter::parse("[Unit]\nIPAddressDeny=any\n"), None);
        // An empty IPAddressAllow= resets the list.
        let f = Filter::parse(
            "[Service]\nIPAddressDeny=any\nIPAddressAllow=10.0.0.5\nIPAddressAllow=\n",
        )
        .unwrap();
        assert!(f.blocks(ip("10.0.0.5")));
        // Denying IPv4 only leaves IPv6 alone.
        let f = Filter::parse("[Service]\nIPAddressDeny=0.0.0.0/0\n").unwrap();
        assert!(f.blocks(ip("10.0.0.5")) && !f.blocks(ip("2a05:d07a:a000::1")));
        // The unit's files add up: another drop-in's allow counts.
        let texts = [
            "[Service]\nIPAddressDeny=any\nIPAddressAllow=localhost\n".to_string(),
            "[Service]\nIPAddressAllow=10.0.0.6\n".to_string(),
        ];
        let f = Filter::from_settings(&crate::unit::settings(&texts)).unwrap();
        assert!(!f.blocks(ip("10.0.0.6")));
    }

    #[test]
    fn a_failed_connection_is_explained_only_when_the_filter_can_be_why() {
        let f = Filter::parse("[Service]\nIPAddressDeny=any\nIPAddressAllow=localhost 10.0.0.5\n")
            .unwrap();
        // Every address blocked: certain, named.
        let e = explain_with(
            "db1.internal:5432",
            &[ip("10.0.0.6")],
            false,
            Some(&f),
            false,
        )
        .unwrap();
        assert!(e.certain);
        assert!(
            e.hint.starts_with("the service's IPAddressDeny=/IPAddressAllow= do not allow 10.0.0.6 (db1.internal:5432)"),
            "{}",
            e.hint
        );
        assert!(e.hint.contains("backstop ip-allow --output"), "{}", e.hint);
        // One of two blocked: the connection may have gone to the other.
        let e = explain_with(
            "db",
            &[ip("10.0.0.5"), ip("10.0.0.6")],
            false,
            Some(&f),
            false,
        )
        .unwrap();
        assert!(!e.certain, "{}", e.hint);
        // The unit changed since start: the filter in force may differ.
        let e = explain_with("db", &[ip("10.0.0.6")], false, Some(&f), true).unwrap();
        assert!(
            !e.certain && e.hint.contains("restart it to apply"),
            "{}",
            e.hint
        );
        // Every address allowed: not the filter.
        assert_eq!(
            explain_with("db", &[ip("10.0.0.5")], false, Some(&f), false),
            None
        );
        // No filter (or not the service): not the filter, unless EPERM says so.
        assert_eq!(
            explain_with("db", &[ip("10.0.0.6")], false, None, false),
            None
        );
        let e = explain_with("store offsite", &[], true, None, false).unwrap();
        assert!(
            e.certain && e.hint.contains("Operation not permitted"),
            "{}",
            e.hint
        );
        // A filter and addresses unknown (a name): a possibility, said so.
        let e = explain_with(
            "store offsite (https://s3.example)",
            &[],
            false,
            Some(&f),
            false,
        )
        .unwrap();
        assert!(
            !e.certain
                && e.hint
                    .contains("if store offsite (https://s3.example) moved"),
            "{}",
            e.hint
        );
    }

    #[test]
    fn eperm_anywhere_in_the_chain_is_this_hosts_refusal() {
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("error communicating with database")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let eperm = || std::io::Error::from_raw_os_error(1);
        assert!(refused_by_this_host(&Wrap(eperm())));
        assert!(refused_by_this_host(&eperm()));
        // Wrapped in another io::Error (whose source() skips it).
        assert!(refused_by_this_host(&Wrap(std::io::Error::other(eperm()))));
        // ECONNREFUSED (the server's answer) and a timeout are not.
        assert!(!refused_by_this_host(&Wrap(
            std::io::Error::from_raw_os_error(111)
        )));
        assert!(!refused_by_this_host(&Wrap(std::io::Error::from(
            std::io::ErrorKind::TimedOut
        ))));
    }
}
