//! The database a job dumps, with its secret kept out of every rendering.

use std::str::FromStr;

use backstop_config::{DatabaseConfig, Secret};
use sqlx::postgres::PgConnectOptions;
use url::Url;

/// Connection details for one database. `Debug` and [`PgTarget::display`]
/// never include the password.
#[derive(Clone)]
pub struct PgTarget {
    /// The URL with any password removed.
    url: Url,
    password: Option<Secret>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("url", &self.display())
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl PgTarget {
    /// Builds a target from a job's database settings. A password in the URL
    /// (possible with `url_env`) is moved out of it; `password_file` or
    /// `password_env` wins over it.
    ///
    /// # Errors
    /// A message (without the URL's secret) if the URL does not parse.
    pub fn from_config(db: &DatabaseConfig) -> Result<Self, String> {
        Self::new(db.url.expose(), db.password.as_ref().map(|p| p.expose()))
    }

    /// # Errors
    /// A message (without the URL's secret) if the URL does not parse.
    pub fn new(url: &str, password: Option<&str>) -> Result<Self, String> {
        let mut url = Url::parse(url).map_err(|e| {
            format!("database URL is not valid ({e}); expected postgres://user@host:port/database")
        })?;
        if let Some(param) = backstop_config::secret_query_parameter(&url) {
            return Err(format!(
                "the database URL has a {param}= query parameter, which would put a secret on pg_dump's and pg_restore's command line: remove it and pass the password from a file or the environment (--target-password-file, password_file, password_env)"
            ));
        }
        let in_url = url.password().map(percent_decode);
        let _ = url.set_password(None);
        let password = password.map(str::to_string).or(in_url).map(Secret::new);
        Ok(Self { url, password })
    }

    /// `postgres://user@host:port/db` without the password, for argv and logs.
    pub fn url_without_password(&self) -> String {
        self.url.to_string()
    }

    /// [`PgTarget::url_without_password`] without an `application_name`
    /// query parameter, for the dump tools: libpq lets the URL's name win
    /// over `PGAPPNAME`, and the lock guard and the stall watchdog find a
    /// dump's sessions by the name backstop gives them (an operator's
    /// `application_name` would leave the guard blind and `yield` unable
    /// to yield).
    pub fn url_for_dump_tools(&self) -> String {
        let mut url = self.url.clone();
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "application_name")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        url.to_string()
    }

    /// What to call this database in messages: `user@host:port/db`.
    pub fn display(&self) -> String {
        let user = self.url.username();
        let host = self.host();
        let port = self.port();
        let db = self.database();
        if user.is_empty() {
            format!("{host}:{port}/{db}")
        } else {
            format!("{user}@{host}:{port}/{db}")
        }
    }

    pub fn host(&self) -> String {
        self.url.host_str().unwrap_or("localhost").to_string()
    }

    pub fn port(&self) -> u16 {
        self.url.port().unwrap_or(5432)
    }

    pub fn database(&self) -> String {
        let path = self.url.path().trim_start_matches('/');
        if path.is_empty() {
            self.url.username().to_string()
        } else {
            percent_decode(path)
        }
    }

    pub fn user(&self) -> String {
        percent_decode(self.url.username())
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.expose())
    }

    /// The same server, another database (used for scratch databases).
    pub fn with_database(&self, db: &str) -> Self {
        let mut t = self.clone();
        if let Ok(u) = Url::parse(&backstop_config::url_with_database(self.url.as_str(), db)) {
            t.url = u;
        }
        t
    }

    pub fn sqlx_options(&self) -> PgConnectOptions {
        let opts = PgConnectOptions::from_str(self.url.as_str())
            .unwrap_or_else(|_| PgConnectOptions::new().host(&self.host()).port(self.port()))
            .application_name("backstop");
        match &self.password {
            Some(p) => opts.password(p.expose()),
            None => opts,
        }
    }

    /// Replaces the password (raw and percent-encoded) in `text` with `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        if let Some(p) = self.password()
            && !p.is_empty()
        {
            out = out.replace(p, "***");
            let encoded: String = url::form_urlencoded::byte_serialize(p.as_bytes()).collect();
            if encoded != p {
                out = out.replace(&encoded, "***");
            }
        }
        out
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 12, item 5): `?password=` passed validation and
    /// landed in pg_dump's argv.
    #[test]
    fn secret_query_parameters_are_refused_without_echoing_them() {
        for url in [
            "postgres://app@db:5432/app?password=hunter2",
            "postgres://app@db:5432/app?sslmode=require&sslpassword=hunter2",
            "postgresql://app@db/app?PassWord=hunter2",
        ] {
            let err = PgTarget::new(url, None).unwrap_err();
            assert!(err.contains("query parameter"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        PgTarget::new(
            "postgres://app@db/app?sslmode=require&application_name=x",
            None,
        )
        .unwrap();
    }

    /// Issue 31, item 4: the dump tools never get the URL's
    /// application_name (it would win over the name the guard looks for);
    /// every other parameter stays.
    #[test]
    fn the_dump_tools_url_drops_application_name_only() {
        let t = PgTarget::new(
            "postgres://app@db:5432/app?sslmode=require&application_name=reports&connect_timeout=5",
            None,
        )
        .unwrap();
        assert_eq!(
            t.url_for_dump_tools(),
            "postgres://app@db:5432/app?sslmode=require&connect_timeout=5"
        );
        let only = PgTarget::new("postgres://app@db/app?application_name=x", None).unwrap();
        assert_eq!(only.url_for_dump_tools(), "postgres://app@db/app");
        assert!(only.url_without_password().contains("application_name=x"));
    }

    #[test]
    fn password_is_moved_out_of_the_url() {
        let t = PgTarget::new(
            "postgres://app:s%40cret@db.internal:6543/shop?sslmode=require",
            None,
        )
        .unwrap();
        assert_eq!(t.password(), Some("s@cret"));
        assert_eq!(
            t.url_without_password(),
            "postgres://app@db.internal:6543/shop?sslmode=require"
        );
        assert_eq!(t.display(), "app@db.internal:6543/shop");
        assert!(!format!("{t:?}").contains("s@cret"));
    }

    #[test]
    fn explicit_password_wins_and_is_redacted() {
        let t = PgTarget::new("postgres://app@localhost/shop", Some("hunter2 x")).unwrap();
        assert_eq!(t.password(), Some("hunter2 x"));
        assert_eq!(
            t.redact("auth failed for hunter2 x and hunter2+x"),
            "auth failed for *** and ***"
        );
        assert_eq!(t.port(), 5432);
        assert_eq!(t.database(), "shop");
        assert_eq!(t.with_database("scratch").database(), "scratch");
    }
}
