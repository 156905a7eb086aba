//! `backstop ip-allow`: the systemd drop-in that lets the service reach
//! only what its configuration needs (`IPAddressDeny=any`, then one
//! `IPAddressAllow=` per address: loopback, every job's database and
//! verify server, a PostgreSQL catalog, every S3 store and notifier, and
//! the DNS resolvers when a name is resolved).
//!
//! systemd takes addresses, not names: a name is resolved when the drop-in
//! is written, and the drop-in says so beside each. What cannot be pinned
//! to addresses (AWS S3's public endpoints, a name that does not resolve,
//! a listener off loopback whose scrapers are not named) is refused with
//! what to do, and nothing is written: a drop-in that cuts off a store
//! would fail every backup.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use backstop_config::{Channel, Config, StorageConfig};
pub use backstop_vocab::ipfilter::Prefix;

use crate::error::{CliError, CmdResult};

use backstop_vocab::ipfilter::DROP_IN;

/// What the operator gave besides the config.
#[derive(Debug, Default)]
pub struct Inputs {
    /// `--allow`: more addresses (the scrapers of a listener off loopback).
    pub allow: Vec<Prefix>,
    /// `--aws-ip-ranges`: AWS's published ranges, as read.
    pub aws_ip_ranges: Option<AwsRanges>,
    /// The nameservers of /etc/resolv.conf.
    pub resolvers: Vec<IpAddr>,
}

/// The S3 prefixes of AWS's `ip-ranges.json`, by region.
#[derive(Debug, Default)]
pub struct AwsRanges {
    /// Its `createDate`, to say which list the drop-in was made from.
    created: String,
    s3: BTreeMap<String, Vec<Prefix>>,
}

impl AwsRanges {
    /// Reads `ip-ranges.json` (`{"createDate", "prefixes": [{"ip_prefix",
    /// "region", "service"}], "ipv6_prefixes": [{"ipv6_prefix", …}]}`).
    ///
    /// # Errors
    /// What is wrong with the file, naming the entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("not AWS's ip-ranges.json (JSON: {e})"))?;
        // Written into a comment: its digits and dashes only.
        let created: String = v["createDate"]
            .as_str()
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == '-')
            .take(32)
            .collect();
        let created = if created.is_empty() {
            "an unknown date".to_string()
        } else {
            created
        };
        let mut s3: BTreeMap<String, Vec<Prefix>> = BTreeMap::new();
        let mut seen = 0;
        for (list, key) in [("prefixes", "ip_prefix"), ("ipv6_prefixes", "ipv6_prefix")] {
            let Some(entries) = v[list].as_array() else {
                return Err(format!(
                    "not AWS's ip-ranges.json: it has no \"{list}\" list"
                ));
            };
            for (i, e) in entries.iter().enumerate() {
                seen += 1;
                if e["service"].as_str() != Some("S3") {
                    continue;
                }
                let (Some(p), Some(region)) = (e[key].as_str(), e["region"].as_str()) else {
                    return Err(format!("{list}[{i}] has no {key} or region"));
                };
                let p: Prefix = p.parse().map_err(|m| format!("{list}[{i}]: {m}"))?;
                s3.entry(region.to_string()).or_default().push(p);
            }
        }
        if seen == 0 {
            return Err("not AWS's ip-ranges.json: it lists no prefixes".into());
        }
        Ok(Self { created, s3 })
    }
}

/// The nameservers a resolv.conf names.
pub fn resolvers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                // A scoped IPv6 address (fe80::1%eth0): the address alone.
                .and_then(|a| a.split('%').next()?.parse().ok())
        })
        .collect()
}

/// What the drop-in allows, and why.
#[derive(Debug, Default)]
pub struct Plan {
    /// Each address or network with what needs it.
    pub allow: BTreeMap<Prefix, Vec<String>>,
    /// What the operator should know (addresses that may move).
    pub notes: Vec<String>,
}

/// Resolves a name to its addresses (the system's resolver; a table in tests).
pub type Resolve<'a> = dyn FnMut(&str) -> std::io::Result<Vec<IpAddr>> + 'a;

/// One place the service connects to.
struct Host {
    host: String,
    port: u16,
    why: String,
}

/// Works out the drop-in.
///
/// # Errors
/// Every problem found (a name that does not resolve, an AWS store without
/// its ranges, a listener off loopback without `--allow`), each saying what
/// to do.
pub fn plan(
    config: &Config,
    inputs: &Inputs,
    resolve: &mut Resolve<'_>,
) -> Result<Plan, Vec<String>> {
    let mut plan = Plan::default();
    let mut problems = Vec::new();
    let mut named = false;
    for h in hosts(config, &mut problems) {
        if let Ok(ip) = h.host.trim_matches(['[', ']']).parse::<IpAddr>() {
            plan.add(ip, &h.why);
            continue;
        }
        if h.host.eq_ignore_ascii_case("localhost") {
            continue;
        }
        named = true;
        let addrs = match resolve(&h.host) {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                problems.push(format!("{} ({}) resolves to no address", h.host, h.why));
                continue;
            }
            Err(e) => {
                problems.push(format!(
                    "cannot resolve {} ({}): {e}; the drop-in would cut it off. Fix the name (or DNS) first",
                    h.host, h.why
                ));
                continue;
            }
        };
        let public: Vec<String> = addrs
            .iter()
            .filter(|a| is_public(**a))
            .map(ToString::to_string)
            .collect();
        if !public.is_empty() {
            plan.notes.push(format!(
                "{} ({}) resolves to public addresses ({}): a hosted service may move to others without notice; write the drop-in again when it does (the error then says this host refused the connection), or allow the provider's published ranges with --allow",
                h.host, h.why, public.join(", ")
            ));
        }
        let why = format!("{} ({}:{}, resolved now)", h.why, h.host, h.port);
        for ip in addrs {
            plan.add(ip, &why);
        }
    }
    for (name, storage) in &config.storages {
        let StorageConfig::S3(s3) = storage else {
            continue;
        };
        if s3.endpoint.is_none() {
            // bucket.s3.REGION.amazonaws.com is resolved by the service.
            named = true;
            match inputs.aws_ip_ranges.as_ref().map(|r| (r, r.s3.get(&s3.region))) {
                Some((ranges, Some(prefixes))) => {
                    let why = format!("store {name}: AWS S3 in {} (ip-ranges.json of {})", s3.region, ranges.created);
                    for p in prefixes {
                        plan.allow.entry(*p).or_default().push(why.clone());
                    }
                }
                Some((_, None)) => problems.push(format!(
                    "store {name}: the ip-ranges file lists no S3 prefixes for region {}; check storage.{name}.region",
                    s3.region
                )),
                None => problems.push(format!(
                    "store {name} is AWS S3 (s3.{region}.amazonaws.com), whose addresses change every few minutes: download https://ip-ranges.amazonaws.com/ip-ranges.json and pass --aws-ip-ranges FILE (the S3 prefixes of {region} are allowed), or reach S3 through an interface VPC endpoint and set storage.{name}.endpoint to it",
                    region = s3.region
                )),
            }
        }
        if s3.credentials.is_none() {
            // The credential chain's link-local services: instance metadata
            // (IPv4 and IPv6), ECS task credentials, EKS Pod Identity.
            let why = format!(
                "store {name} has no static credentials: the AWS credential chain's metadata services (delete this line if they come from the environment)"
            );
            for a in [
                "169.254.169.254",
                "fd00:ec2::254",
                "169.254.170.2",
                "169.254.170.23",
                "fd00:ec2::23",
            ] {
                plan.add(a.parse().expect("literal"), &why);
            }
            plan.notes.push(format!(
                "store {name} has no static credentials: if they come from a web identity (EKS IRSA), an assumed role (role_arn) or SSO, the service must also reach AWS STS (sts.{}.amazonaws.com) or SSO, whose addresses this drop-in does not pin: allow them with --allow, or use an STS interface VPC endpoint",
                s3.region
            ));
        }
    }
    if named {
        for r in &inputs.resolvers {
            plan.add(
                *r,
                "a DNS resolver of /etc/resolv.conf (names are resolved by the service)",
            );
        }
    }
    let listen = config.daemon.listen;
    // `backstop backup --wait` on this host reaches the listener at its own
    // address.
    if !listen.ip().is_loopback() && !listen.ip().is_unspecified() {
        plan.add(listen.ip(), "daemon.listen (this host's own address)");
    }
    if !listen.ip().is_loopback() && inputs.allow.is_empty() {
        problems.push(format!(
            "daemon.listen is {listen}: with IPAddressDeny=any only loopback could scrape /metrics or read the status page; pass --allow with the Prometheus servers' addresses or network (e.g. --allow 10.0.0.0/24), or listen on 127.0.0.1"
        ));
    }
    for p in &inputs.allow {
        plan.allow.entry(*p).or_default().push("--allow".into());
    }
    // Loopback is allowed as a whole (`localhost`).
    plan.allow.retain(|p, _| !p.addr().is_loopback());
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(problems)
    }
}

impl Plan {
    fn add(&mut self, ip: IpAddr, why: &str) {
        let whys = self.allow.entry(Prefix::host(ip)).or_default();
        if !whys.iter().any(|w| w == why) {
            whys.push(why.to_string());
        }
    }

    /// The drop-in's text.
    pub fn render(
        &self,
        config: &Path,
        version: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let mut out = format!(
            "# Written by `backstop ip-allow` (backstop {version}) at {}\n# from {}.\n",
            now.format("%Y-%m-%dT%H:%M:%SZ"),
            config.display()
        );
        out.push_str(&format!(
            "# Install as {DROP_IN}, then\n#   systemctl daemon-reload && systemctl restart backstop\n"
        ));
        out.push_str(
            "# The service reaches loopback and the addresses below and nothing else\n\
             # (in both directions: scrapes of its listener too). Write this file again\n\
             # after changing a database, store, notifier or the listener, and when a\n\
             # name below moves: a connection this filter drops times out, and the\n\
             # error names the address this file does not allow and this command.\n",
        );
        for n in &self.notes {
            out.push_str("#\n");
            for line in wrap(&format!("Note: {n}"), 74) {
                out.push_str(&format!("# {line}\n"));
            }
        }
        out.push_str("[Service]\nIPAddressDeny=any\n# loopback: local databases, the listener on 127.0.0.1, a local resolver\nIPAddressAllow=localhost\n");
        for (p, whys) in &self.allow {
            for w in whys {
                for line in wrap(w, 74) {
                    out.push_str(&format!("# {line}\n"));
                }
            }
            out.push_str(&format!("IPAddressAllow={p}\n"));
        }
        out
    }
}

/// Words of `text` in lines of at most `width` characters (a longer word
/// stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Whether an address is reached over the internet (not loopback, private,
/// link-local, shared or documentation space): a hosted service's, which
/// may change.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [b0, b1, ..] = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_documentation()
                || a.is_unspecified()
                || a.is_broadcast()
                // 100.64.0.0/10, carrier-grade NAT (and Tailscale).
                || (b0 == 100 && (64..128).contains(&b1)))
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}

/// Every host the service connects to over TCP, with what for; a URL that
/// does not parse is a problem (validation has parsed each already).
fn hosts(config: &Config, problems: &mut Vec<String>) -> Vec<Host> {
    let mut out = Vec::new();
    if config.catalog.starts_with("postgres") {
        add_postgres(&mut out, problems, &config.catalog, "the catalog");
    }
    let mut seen = std::collections::BTreeSet::new();
    for job in &config.jobs {
        // A cluster job's members share its server.
        let name = job.name.split('/').next().unwrap_or(&job.name);
        if seen.insert((name, "db")) {
            let why = format!("job {name:?} database");
            add_postgres(&mut out, problems, job.database.url.expose(), &why);
        }
        if let Some(target) = job.verify.as_ref().and_then(|v| v.target.as_ref())
            && seen.insert((name, "verify"))
        {
            let why = format!("job {name:?} verify server");
            add_postgres(&mut out, problems, target.url.expose(), &why);
        }
    }
    for (name, storage) in &config.storages {
        if let StorageConfig::S3(s3) = storage
            && let Some(e) = &s3.endpoint
        {
            let at = out.len();
            add_http(&mut out, problems, e, &format!("store {name}"));
            // Virtual-hosted style (force_path_style = false): the SDK
            // connects to BUCKET.HOST, which may have other addresses.
            if let Some(h) = out.get_mut(at)
                && !s3.force_path_style
                && !s3.bucket.contains('.')
                && h.host.parse::<IpAddr>().is_err()
                && !h.host.starts_with('[')
            {
                h.host = format!("{}.{}", s3.bucket, h.host);
            }
        }
    }
    for (name, n) in &config.notifiers {
        let why = format!("notifier {name}");
        match &n.channel {
            // The URL is secret (a Slack webhook's path is its token): only
            // its host is written.
            Channel::Webhook { url, .. }
            | Channel::Slack { url }
            | Channel::Heartbeat { url, .. } => {
                add_http(&mut out, problems, url.expose(), &why);
            }
            Channel::Email(e) => out.push(Host {
                host: e.host.clone(),
                port: e.port,
                why,
            }),
        }
    }
    out
}

fn add_postgres(out: &mut Vec<Host>, problems: &mut Vec<String>, url: &str, why: &str) {
    match backstop_config::postgres_hosts(url) {
        Ok(hosts) => out.extend(hosts.into_iter().map(|(host, port)| Host {
            host,
            port,
            why: why.to_string(),
        })),
        Err(e) => problems.push(format!("{why}: {e}")),
    }
}

fn add_http(out: &mut Vec<Host>, problems: &mut Vec<String>, url: &str, why: &str) {
    match url::Url::parse(url) {
        Ok(u) => match u.host_str() {
            Some(h) if !h.is_empty() => out.push(Host {
                host: h.to_string(),
                port: u.port_or_known_default().unwrap_or(443),
                why: why.to_string(),
            }),
            _ => problems.push(format!("{why}: the URL names no host")),
        },
        // The parser's words only: the URL itself may be secret.
        Err(e) => problems.push(format!("{why}: the URL does not parse ({e})")),
    }
}

/// `backstop ip-allow`: prints the drop-in, or writes it to `output`.
pub async fn run(
    config: &Config,
    allow: Vec<Prefix>,
    aws_ip_ranges: Option<PathBuf>,
    output: Option<PathBuf>,
) -> CmdResult {
    let aws = match &aws_ip_ranges {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| CliError::usage(format!("cannot read {}: {e}", p.display())))?;
            Some(
                AwsRanges::parse(&text)
                    .map_err(|e| CliError::usage(format!("{}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    let inputs = Inputs {
        allow,
        aws_ip_ranges: aws,
        resolvers: resolvers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
    };
    let config_owned = config.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let mut resolve = |host: &str| -> std::io::Result<Vec<IpAddr>> {
            use std::net::ToSocketAddrs;
            let mut ips: Vec<IpAddr> = (host, 0).to_socket_addrs()?.map(|a| a.ip()).collect();
            ips.sort();
            ips.dedup();
            Ok(ips)
        };
        plan(&config_owned, &inputs, &mut resolve)
    })
    .await
    .map_err(|e| CliError::failed(format!("resolving failed: {e}")))?;
    let plan = planned.map_err(|problems| {
        CliError::failed(format!(
            "no drop-in written; {} thing(s) cannot be pinned to addresses:\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        ))
    })?;
    for n in &plan.notes {
        eprintln!("note: {n}");
    }
    let text = plan.render(
        &config.source,
        backstop_vocab::build::version(),
        backstop_vocab::now(),
    );
    match output {
        None => {
            print!("{text}");
            Ok(())
        }
        Some(path) => {
            write_atomically(&path, &text)
                .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))?;
            eprintln!(
                "wrote {} ({} address(es) besides loopback); now run: systemctl daemon-reload && systemctl restart backstop",
                path.display(),
                plan.allow.len()
            );
            Ok(())
        }
    }
}

/// Writes `text` to `path` through a temporary file in the same folder
/// (made if missing), 0644 like every unit file: a reader sees the old
/// file or the new one, never half of one.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, text: &str) -> Config {
        let path = dir.join("backstop.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A table of names; anything else does not resolve.
    fn table(names: &[(&str, &[&str])]) -> impl FnMut(&str) -> std::io::Result<Vec<IpAddr>> {
        let names: Vec<(String, Vec<IpAddr>)> = names
            .iter()
            .map(|(n, a)| {
                (
                    n.to_string(),
                    a.iter().map(|a| a.parse().unwrap()).collect(),
                )
            })
            .collect();
        move |host: &str| {
            names
                .iter()
                .find(|(n, _)| n == host)
                .map(|(_, a)| a.clone())
                .ok_or_else(|| std::io::Error::other("Name or service not known"))
        }
    }

    fn allowed(plan: &Plan) -> Vec<String> {
        plan.allow.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let r = resolvers(
            "# generated\nsearch corp\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\noptions ndots:2\nnameserver   127.0.0.53\n",
        );
        assert_eq!(
            r,
            ["10.0.0.2", "fe80::1", "127.0.0.53"].map(|a| a.parse::<IpAddr>().unwrap())
        );
    }

    /// Every database, verify server, catalog, store and notifier of a
    /// config is allowed by address, names resolved now, with what needs
    /// it; sockets and loopback need nothing beyond `localhost`; the
    /// resolvers are allowed because names are resolved; a secret URL's
    /// path is never written.
    #[test]
    fn every_destination_is_allowed_with_what_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "x\n").unwrap();
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let pw = pw.display();
        let text = format!(
            r#"[daemon]
catalog = "postgres://backstop@catalog.internal:5433/backstop"
catalog_password_file = "{pw}"

[storage.minio]
type = "s3"
bucket = "backups"
region = "us-east-1"
endpoint = "http://10.20.0.9:9000"
access_key_id = "AK"
secret_access_key_file = "{pw}"

[storage.r2]
type = "s3"
bucket = "backups"
region = "auto"
endpoint = "https://abc.r2.cloudflarestorage.com"
access_key_id = "AK"
secret_access_key_file = "{pw}"

[notify.slack]
type = "slack"
url = "https://hooks.slack.com/services/T0/B0/SECRETTOKEN"

[notify.mail]
type = "email"
host = "10.30.0.25"
port = 587
from = "b@example.com"
to = ["o@example.com"]

[[job]]
name = "orders"
database = {{ url = "postgres://u@db1.internal:5432/orders", password_file = "{pw}" }}
storage = ["minio", "r2"]
encryption = "none"

[[job]]
name = "local"
database = {{ url = "postgres://u@localhost/app?host=/var/run/postgresql", password_file = "{pw}" }}
storage = ["minio"]
encryption = "none"

[[job]]
name = "replica"
database = {{ url = "postgres://u@db2.internal/app?hostaddr=10.0.0.7&port=6432", password_file = "{pw}" }}
storage = ["minio"]
encryption = "none"

[[job]]
name = "lo"
database = {{ url = "postgres://u@localhost:5432/app", password_file = "{pw}" }}
storage = ["minio"]
encryption = "none"
"#
        );
        let c = config(dir.path(), &text);
        let mut resolve = table(&[
            ("catalog.internal", &["10.0.0.3"]),
            ("db1.internal", &["10.0.0.5", "fd00::5"]),
            // Virtual-hosted style: the bucket's own name.
            ("backups.abc.r2.cloudflarestorage.com", &["172.66.0.243"]),
            ("db2.internal", &["10.0.0.7"]),
            ("hooks.slack.com", &["34.226.36.165"]),
        ]);
        let inputs = Inputs {
            resolvers: resolvers("nameserver 10.0.0.2\nnameserver 127.0.0.53\n"),
            ..Inputs::default()
        };
        let plan = plan(&c, &inputs, &mut resolve).unwrap();
        assert_eq!(
            allowed(&plan),
            [
                "10.0.0.2",
                "10.0.0.3",
                "10.0.0.5",
                "10.0.0.7",
                "10.20.0.9",
                "10.30.0.25",
                "34.226.36.165",
                "172.66.0.243",
                "fd00::5"
            ]
        );
        let whys = |a: &str| plan.allow[&a.parse::<Prefix>().unwrap()].join(" | ");
        assert_eq!(
            whys("10.0.0.5"),
            "job \"orders\" database (db1.internal:5432, resolved now)"
        );
        // hostaddr and host both (libpq takes one, sqlx the other).
        assert_eq!(
            whys("10.0.0.7"),
            "job \"replica\" database (db2.internal:6432, resolved now) | job \"replica\" database"
        );
        assert_eq!(
            whys("172.66.0.243"),
            "store r2 (backups.abc.r2.cloudflarestorage.com:443, resolved now)"
        );
        assert_eq!(
            whys("10.0.0.3"),
            "the catalog (catalog.internal:5433, resolved now)"
        );
        assert!(whys("10.0.0.2").contains("DNS resolver"));
        assert_eq!(whys("10.20.0.9"), "store minio");
        // Public addresses of hosted services are named as may-move.
        assert_eq!(plan.notes.len(), 2, "{:?}", plan.notes);
        assert!(plan.notes.iter().any(|n| n.starts_with(
            "hooks.slack.com (notifier slack) resolves to public addresses (34.226.36.165)"
        )));
        let text = plan.render(
            Path::new("/etc/backstop/backstop.toml"),
            "9.9.9 (commit abc, built 2026-12-07)",
            chrono::Utc::now(),
        );
        assert!(
            !text.contains("SECRETTOKEN") && !text.contains("services/"),
            "{text}"
        );
        assert!(text.contains("[Service]\nIPAddressDeny=any\n"), "{text}");
        assert!(text.contains("\nIPAddressAllow=localhost\n"), "{text}");
        assert!(text.contains("# job \"orders\" database (db1.internal:5432, resolved now)\nIPAddressAllow=10.0.0.5\n"), "{text}");
        assert!(
            text.contains("(backstop 9.9.9 (commit abc, built 2026-12-07))"),
            "{text}"
        );
        // Every comment line stays a comment line.
        for line in text.lines() {
            assert!(
                line.starts_with('#') || line.starts_with('[') || line.starts_with("IPAddress"),
                "{line}"
            );
        }
    }

    /// What cannot be pinned is refused, all at once, each with its fix:
    /// a name that does not resolve, AWS S3 without its ranges, a listener
    /// off loopback without --allow.
    #[test]
    fn what_cannot_be_pinned_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "x\n").unwrap();
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let text = format!(
            r#"[daemon]
catalog = "sqlite://{dir}/c.db"
listen = "0.0.0.0:9871"
status_page = false

[storage.aws]
type = "s3"
bucket = "backups"
region = "eu-west-1"

[[job]]
name = "orders"
database = {{ url = "postgres://u@gone.internal:5432/orders", password_file = "{pw}" }}
storage = ["aws"]
encryption = "none"
"#,
            dir = dir.path().display(),
            pw = pw.display()
        );
        let c = config(dir.path(), &text);
        let problems = plan(&c, &Inputs::default(), &mut table(&[])).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(
            problems[0].starts_with("cannot resolve gone.internal (job \"orders\" database)"),
            "{problems:#?}"
        );
        assert!(
            problems[1].contains("--aws-ip-ranges") && problems[1].contains("eu-west-1"),
            "{problems:#?}"
        );
        assert!(
            problems[2].contains("daemon.listen is 0.0.0.0:9871")
                && problems[2].contains("--allow"),
            "{problems:#?}"
        );

        // With AWS's ranges, the scrapers' network and a name that resolves:
        // the region's S3 prefixes (not another region's, not another
        // service's), the metadata service (no static credentials) and the
        // scrapers.
        let ranges = AwsRanges::parse(
            r#"{"syncToken":"1","createDate":"2026-12-01-10-00-00","prefixes":[
            {"ip_prefix":"52.218.0.0/17","region":"eu-west-1","service":"S3","network_border_group":"eu-west-1"},
            {"ip_prefix":"52.95.0.0/20","region":"us-east-1","service":"S3","network_border_group":"us-east-1"},
            {"ip_prefix":"3.5.64.0/21","region":"eu-west-1","service":"AMAZON","network_border_group":"eu-west-1"}],
            "ipv6_prefixes":[{"ipv6_prefix":"2a05:d07a:a000::/40","region":"eu-west-1","service":"S3","network_border_group":"eu-west-1"}]}"#,
        )
        .unwrap();
        let inputs = Inputs {
            allow: vec!["10.9.0.0/24".parse().unwrap()],
            aws_ip_ranges: Some(ranges),
            resolvers: vec![],
        };
        let plan = plan(&c, &inputs, &mut table(&[("gone.internal", &["10.0.0.8"])])).unwrap();
        assert_eq!(
            allowed(&plan),
            [
                "10.0.0.8",
                "10.9.0.0/24",
                "52.218.0.0/17",
                "169.254.169.254",
                "169.254.170.2",
                "169.254.170.23",
                "2a05:d07a:a000::/40",
                "fd00:ec2::23",
                "fd00:ec2::254"
            ]
        );
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("sts.eu-west-1.amazonaws.com")),
            "{:?}",
            plan.notes
        );
        assert!(
            plan.allow[&"52.218.0.0/17".parse().unwrap()][0]
                .contains("ip-ranges.json of 2026-12-01-10-00-00")
        );
        assert!(plan.allow[&"169.254.169.254".parse().unwrap()][0].contains("metadata services"));
    }

    #[test]
    fn a_file_that_is_not_aws_ranges_is_refused() {
        for (text, says) in [
            ("not json", "JSON"),
            (r#"{"prefixes": []}"#, "\"ipv6_prefixes\""),
            (
                r#"{"prefixes": [], "ipv6_prefixes": []}"#,
                "lists no prefixes",
            ),
            (
                r#"{"prefixes": [{"ip_prefix": "52.0.0.0/99", "region": "x", "service": "S3"}], "ipv6_prefixes": []}"#,
                "prefixes[0]",
            ),
        ] {
            let e = AwsRanges::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn the_drop_in_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backstop.service.d/ip-allow.conf");
        write_atomically(&path, "[Service]\nIPAddressDeny=any\n").unwrap();
        write_atomically(&path, "[Service]\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "[Service]\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left");
    }
}
