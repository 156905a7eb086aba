//! How a command failed, and the one place that turns that into an exit
//! status: 2 for a mistake in what was asked (unknown job or store, an
//! impossible combination of options, an invalid configuration), 1 for an
//! operation that ran and failed.

use std::fmt::Display;
use std::process::ExitCode;

use backstop_config::Config;
use backstop_pipeline::read::restore::RestoreError;
use backstop_pipeline::read::select::SelectError;
use backstop_pipeline::read::verify::VerifyError;

/// Exit status for an invalid configuration or command line.
pub const EXIT_USAGE: u8 = 2;

/// A failed command.
#[derive(Debug)]
pub enum CliError {
    /// What was asked cannot be done as asked; nothing was touched.
    Usage(anyhow::Error),
    /// The operation ran and failed.
    Failed(anyhow::Error),
}

/// What a command returns.
pub type CmdResult = Result<(), CliError>;

impl CliError {
    pub fn usage(message: impl Display + std::fmt::Debug + Send + Sync + 'static) -> Self {
        CliError::Usage(anyhow::Error::msg(message))
    }

    pub fn failed(message: impl Display + std::fmt::Debug + Send + Sync + 'static) -> Self {
        CliError::Failed(anyhow::Error::msg(message))
    }

    /// The same failure, said in the terms of what was being done.
    #[must_use]
    pub fn context(self, context: impl Display + Send + Sync + 'static) -> Self {
        match self {
            CliError::Usage(e) => CliError::Usage(e.context(context)),
            CliError::Failed(e) => CliError::Failed(e.context(context)),
        }
    }

    /// The exit status: 2 for a usage mistake, 1 for a failure.
    pub fn code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Failed(_) => 1,
        }
    }

    /// Prints the error with its causes and returns the exit status.
    pub fn report(&self) -> ExitCode {
        let (CliError::Usage(e) | CliError::Failed(e)) = self;
        eprintln!("error: {e:#}");
        ExitCode::from(self.code())
    }
}

impl From<SelectError> for CliError {
    fn from(e: SelectError) -> Self {
        match e {
            SelectError::Usage(_) => CliError::Usage(e.into()),
            _ => CliError::Failed(e.into()),
        }
    }
}

impl From<VerifyError> for CliError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::Select(e) => e.into(),
            e => CliError::Failed(e.into()),
        }
    }
}

impl From<RestoreError> for CliError {
    fn from(e: RestoreError) -> Self {
        match e {
            RestoreError::Usage(_) => CliError::Usage(e.into()),
            _ => CliError::Failed(e.into()),
        }
    }
}

/// Errors that are always failures of the operation.
macro_rules! failures {
    ($($t:ty),* $(,)?) => {
        $(impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                CliError::Failed(e.into())
            }
        })*
    };
}

failures!(
    anyhow::Error,
    backstop_catalog::CatalogError,
    backstop_dump::DumpError,
    backstop_pipeline::BackupError,
    backstop_storage::StorageError,
    serde_json::Error,
    std::io::Error,
);

/// "no job named "x" in /etc/backstop/backstop.toml (defined: a, b)".
pub fn not_defined<'a>(
    config: &Config,
    what: &str,
    name: &str,
    known: impl Iterator<Item = &'a str>,
) -> CliError {
    let known: Vec<_> = known.collect();
    CliError::usage(format!(
        "no {what} named \"{name}\" in {} (defined: {})",
        config.source.display(),
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_mistakes_exit_2_and_failures_exit_1() {
        let no_backup = || SelectError::NoBackup {
            which: "latest".into(),
            job: "app".into(),
            store: "local".into(),
        };
        let cases: Vec<(CliError, u8)> = vec![
            (SelectError::Usage("unknown store".into()).into(), 2),
            (no_backup().into(), 1),
            (
                VerifyError::Select(SelectError::Usage("no identity".into())).into(),
                2,
            ),
            (VerifyError::Select(no_backup()).into(), 1),
            (
                RestoreError::Usage("plain dump with --table".into()).into(),
                2,
            ),
            (RestoreError::Refused("database not empty".into()).into(), 1),
            (anyhow::anyhow!("pg_restore failed").into(), 1),
            (CliError::usage("no job named x"), 2),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e:?}");
        }
    }

    #[test]
    fn context_keeps_the_kind_and_the_cause() {
        let e = CliError::from(SelectError::Usage("unknown store".into())).context("list failed");
        assert_eq!(e.code(), 2);
        let CliError::Usage(inner) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(format!("{inner:#}"), "list failed: unknown store");
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
    }
}
