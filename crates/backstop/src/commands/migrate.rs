//! `backstop migrate [--url URL]`: applies the catalog's schema migrations.

use backstop_catalog::{Catalog, Location, SchemaState};
use backstop_config::Config;

use crate::error::{CliError, CmdResult};

pub async fn run(config: &Config, url: Option<&str>) -> CmdResult {
    let url = url.unwrap_or(&config.catalog);
    if backstop_catalog::pg_url_has_password(url) {
        return Err(CliError::usage(
            "--url contains a password, which every user can read in `ps`; remove it (the config's daemon.catalog_password_file or catalog_password_env is used)",
        ));
    }
    let password = config
        .daemon
        .catalog_password
        .as_ref()
        .map(backstop_config::Secret::expose);
    let (before, after) = Catalog::migrate(Location::new(url, password))
        .await
        .map_err(|e| CliError::failed(format!("migrating the catalog failed: {e}")))?;
    if before == after {
        println!("catalog schema is {after}: nothing to do");
    } else {
        let from = match before {
            SchemaState::Empty => "empty".to_string(),
            other => other.to_string(),
        };
        println!("catalog schema migrated from {from} to {after}");
    }
    Ok(())
}
