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

/// What a drop-in denies and allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The networks allowed (`localhost` as 127.0.0.0/8 and ::1,
    /// `link-local` and `multicast` as theirs).
    pub allowed: Vec<Prefix>,
}

impl Filter {
    /// The filter a drop-in sets: `None` when it denies nothing
    /// (`IPAddressDeny=any` absent, or later reset with an empty
    /// `IPAddressDeny=`). Words systemd takes besides addresses
    /// (`localhost`, `link-local`, `multicast`, `any`) are understood; a
    /// value it cannot read is skipped (systemd skips it too).
    pub fn parse(text: &str) -> Option<Self> {
        let mut denies = false;
        let mut allowed = Vec::new();
        for line in text.lines().map(str::trim) {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let values: Vec<&str> = value.split_whitespace().collect();
            match key.trim() {
                "IPAddressDeny" if values.is_empty() => denies = false,
                "IPAddressDeny" => {
                    denies |= values.contains(&"any") || values.contains(&"0.0.0.0/0")
                }
                "IPAddressAllow" if values.is_empty() => allowed.clear(),
                "IPAddressAllow" => {
                    for v in values {
                        let words: &[&str] = match v {
                            "localhost" => &["127.0.0.0/8", "::1"],
                            "link-local" => &["169.254.0.0/16", "fe80::/64"],
                            "multicast" => &["224.0.0.0/4", "ff00::/8"],
                            "any" => &["0.0.0.0/0", "::/0"],
                            _ => &[],
                        };
                        if words.is_empty() {
                            allowed.extend(v.parse::<Prefix>().ok());
                        } else {
                            allowed.extend(words.iter().filter_map(|w| w.parse::<Prefix>().ok()));
                        }
                    }
                }
                _ => {}
            }
        }
        denies.then_some(Self { allowed })
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allowed.iter().any(|p| p.contains(ip))
    }
}

/// The drop-in's path: [`DROP_IN`], or in a test build
/// `BACKSTOP_TEST_IP_ALLOW_DROP_IN`.
fn drop_in_path() -> PathBuf {
    PathBuf::from(
        crate::test_env("BACKSTOP_TEST_IP_ALLOW_DROP_IN").unwrap_or_else(|| DROP_IN.into()),
    )
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
/// host's filter, and what to do; `None` when it is not (no drop-in denies,
/// or it allows every address). `refused`: the error was EPERM.
pub fn explain(what: &str, addrs: &[IpAddr], refused: bool) -> Option<Explanation> {
    let path = drop_in_path();
    let filter = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| Filter::parse(&t));
    explain_with(
        what,
        addrs,
        refused,
        filter.as_ref(),
        &path.display().to_string(),
    )
}

/// A failed connection the filter explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The filter certainly drops it (EPERM, or an address the drop-in
    /// does not allow): retrying cannot help.
    pub certain: bool,
    pub hint: String,
}

fn explain_with(
    what: &str,
    addrs: &[IpAddr],
    refused: bool,
    filter: Option<&Filter>,
    path: &str,
) -> Option<Explanation> {
    let rewrite = format!(
        "write it again (`backstop ip-allow --output {path}`), then `systemctl daemon-reload` and restart the service"
    );
    let blocked: Vec<String> = match filter {
        Some(f) => addrs
            .iter()
            .filter(|a| !f.allows(**a))
            .map(ToString::to_string)
            .collect(),
        None => Vec::new(),
    };
    if !blocked.is_empty() {
        return Some(Explanation {
            certain: true,
            hint: format!(
                "the ip-allow drop-in {path} does not allow {} ({what}), so this host drops the connection: the config changed or the name moved since it was written; {rewrite}",
                blocked.join(", ")
            ),
        });
    }
    if refused {
        return Some(Explanation {
            certain: true,
            hint: format!(
                "this host refused the connection to {what} (\"Operation not permitted\"): the service's IPAddressDeny= or a firewall rule blocks its address; if it is the ip-allow drop-in, {rewrite}"
            ),
        });
    }
    match (filter, addrs.is_empty()) {
        (Some(_), true) => Some(Explanation {
            certain: false,
            hint: format!(
                "the ip-allow drop-in {path} is in force: if {what} moved to addresses it does not allow, this host drops the connection; {rewrite}"
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
        assert_eq!(
            "10.20.3.4/16".parse::<Prefix>().unwrap().to_string(),
            "10.20.0.0/16"
        );
        assert_eq!(
            "192.168.7.15".parse::<Prefix>().unwrap().to_string(),
            "192.168.7.15"
        );
        assert_eq!(
            "10.0.0.5/32".parse::<Prefix>().unwrap().to_string(),
            "10.0.0.5"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Prefix>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(
            "2001:db8:1::7/32".parse::<Prefix>().unwrap().to_string(),
            "2001:db8::/32"
        );
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
        for (a, allowed) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("10.0.0.5", true),
            ("10.9.0.77", true),
            ("10.0.0.6", false),
            ("52.218.1.1", false),
        ] {
            assert_eq!(f.allows(ip(a)), allowed, "{a}");
        }
        // Nothing denied: no filter.
        assert_eq!(Filter::parse("[Service]\nIPAddressAllow=10.0.0.5\n"), None);
        assert_eq!(
            Filter::parse("[Service]\nIPAddressDeny=any\nIPAddressDeny=\n"),
            None
        );
        // An empty IPAddressAllow= resets the list.
        let f =
            Filter::parse("IPAddressDeny=any\nIPAddressAllow=10.0.0.5\nIPAddressAllow=\n").unwrap();
        assert!(!f.allows(ip("10.0.0.5")));
    }

    #[test]
    fn a_failed_connection_is_explained_only_when_the_filter_can_be_why() {
        let f = Filter::parse("IPAddressDeny=any\nIPAddressAllow=localhost 10.0.0.5\n").unwrap();
        let path = "/etc/systemd/system/backstop.service.d/ip-allow.conf";
        // An address the drop-in does not allow: certain, named.
        let e = explain_with(
            "db1.internal:5432",
            &[ip("10.0.0.5"), ip("10.0.0.6")],
            false,
            Some(&f),
            path,
        )
        .unwrap();
        assert!(e.certain);
        assert!(e.hint.starts_with("the ip-allow drop-in /etc/systemd/system/backstop.service.d/ip-allow.conf does not allow 10.0.0.6 (db1.internal:5432)"), "{}", e.hint);
        assert!(e.hint.contains("backstop ip-allow --output"), "{}", e.hint);
        // Every address allowed: not the filter.
        assert_eq!(
            explain_with("db", &[ip("10.0.0.5")], false, Some(&f), path),
            None
        );
        // No drop-in: not the filter, unless EPERM says so.
        assert_eq!(
            explain_with("db", &[ip("10.0.0.6")], false, None, path),
            None
        );
        let e = explain_with("store offsite", &[], true, None, path).unwrap();
        assert!(
            e.certain && e.hint.contains("Operation not permitted"),
            "{}",
            e.hint
        );
        // A drop-in and addresses unknown (a name): a possibility, said so.
        let e = explain_with(
            "store offsite (https://s3.example)",
            &[],
            false,
            Some(&f),
            path,
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
