//! A database to connect to (a job's, or a verify target): URL, password
//! source, and no secret where anyone can read it.

use std::ops::Range;

use toml::Spanned;

use crate::raw::RawDatabase;
use crate::{DatabaseConfig, Secret};

use crate::check::*;

pub(crate) fn validate_database(
    c: &mut Checker<'_>,
    db: &Spanned<RawDatabase>,
) -> Option<DatabaseConfig> {
    let raw = db.get_ref();
    let url = match (&raw.url, &raw.url_env) {
        (Some(_), Some(env)) => {
            c.error(
                env.span(),
                "set either database.url or database.url_env, not both",
            );
            None
        }
        (None, None) => {
            c.error(
                db.span(),
                "database needs url_env = \"VAR\" (a postgres:// URL in the environment) or url = \"postgres://user@host:5432/db\" with password_file",
            );
            None
        }
        (Some(url), None) => match url::Url::parse(url.get_ref()) {
            Ok(u) if u.password().is_some() => {
                c.error(
                        url.span(),
                        "database.url contains a password; never inline secrets: move it to password_file, or put the whole URL in the environment and use url_env",
                    );
                None
            }
            _ => check_url(c, url.span(), url.get_ref(), "database.url"),
        },
        (None, Some(env)) => match std::env::var(env.get_ref()) {
            Ok(v) if !v.is_empty() => check_url(
                c,
                env.span(),
                &v,
                &format!("environment variable {}", env.get_ref()),
            ),
            _ => {
                c.error(
                    env.span(),
                    format!(
                        "environment variable {} is not set; export it (e.g. in the systemd unit's EnvironmentFile=) or use url + password_file",
                        env.get_ref()
                    ),
                );
                None
            }
        },
    };
    let password = match (&raw.password_file, &raw.password_env) {
        (Some(_), Some(env)) => {
            c.error(
                env.span(),
                "set either database.password_file or database.password_env, not both",
            );
            None
        }
        (Some(file), None) => c.read_secret_file("password_file", file).map(Secret::new),
        (None, Some(env)) => match std::env::var(env.get_ref()) {
            Ok(v) => Some(Secret::new(v)),
            Err(_) => {
                c.error(
                    env.span(),
                    format!("environment variable {} is not set", env.get_ref()),
                );
                None
            }
        },
        (None, None) => None,
    };
    Some(DatabaseConfig {
        url: url?,
        password,
    })
}

pub(crate) fn check_url(
    c: &mut Checker<'_>,
    span: Range<usize>,
    value: &str,
    what: &str,
) -> Option<Secret> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") && u.host_str().is_some() => {
            if let Some(param) = crate::secret_query_parameter(&u) {
                c.error(
                    span,
                    format!(
                        "{what} has a {param}= query parameter; it would reach pg_dump's command line, visible to every user in `ps`: remove it and use password_file or password_env (target_password_file for verify.target)"
                    ),
                );
                return None;
            }
            Some(Secret::new(value))
        }
        // The value may hold a password: describe it without echoing it.
        _ => {
            c.error(
                span,
                format!(
                    "{what} is not a valid PostgreSQL URL; expected postgres://user@host:port/database"
                ),
            );
            None
        }
    }
}
