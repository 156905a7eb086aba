//! The `backstop` binary: parses the command line, sets up logging and the
//! runtime, loads the configuration and runs one command. What each command
//! does is in `commands/`; exit statuses are decided in `error.rs`.

use std::process::ExitCode;

use backstop_config::{Config, ConfigError};
use clap::Parser;

mod cli;
mod client;
mod commands;
mod error;
mod interrupt;
mod progress;

use cli::{Cli, LogFormat};
use error::EXIT_USAGE;

fn main() -> ExitCode {
    backstop_vocab::build::set(
        cli::VERSION,
        env!("BACKSTOP_COMMIT"),
        env!("BACKSTOP_BUILD_DATE"),
    );
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The commands that need no configuration: making the key the
    // configuration will name, and what the package generates.
    match &cli.command {
        cli::Command::Keygen { out } => {
            return match commands::keygen::run(out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => e.report(),
            };
        }
        cli::Command::Completions { shell } => return commands::docs::completions(*shell),
        cli::Command::Manpages { dir } => return commands::docs::manpages(dir),
        _ => {}
    }
    let code = runtime.block_on(async {
        let config = match Config::load(&cli.config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: invalid configuration\n{e}");
                if matches!(e, ConfigError::Invalid { .. }) {
                    eprintln!("(fix the lines above, then run `backstop check-config`)");
                }
                return ExitCode::from(EXIT_USAGE);
            }
        };
        // The daemon handles its own signals (reload, drain).
        let interrupt = match cli.command {
            cli::Command::Run => None,
            _ => match interrupt::Interrupt::install() {
                Ok(i) => Some(i),
                Err(e) => {
                    eprintln!("error: cannot install the signal handlers: {e}");
                    return ExitCode::FAILURE;
                }
            },
        };
        let token = interrupt
            .as_ref()
            .map(|i| i.token.clone())
            .unwrap_or_default();
        // These stop cleanly themselves when the token fires; any other
        // command's work is dropped at the signal.
        let stops_itself = matches!(
            cli.command,
            cli::Command::Backup { .. } | cli::Command::RunDue { .. }
        );
        let work = commands::run(cli.command, &cli.config, &config, &token);
        let result = if stops_itself {
            work.await
        } else {
            tokio::select! {
                r = work => r,
                () = token.cancelled() => Ok(()),
            }
        };
        if let Some(code) = interrupt.as_ref().and_then(interrupt::Interrupt::code) {
            if !backstop_pipeline::cleanup::finish(std::time::Duration::from_secs(30)).await {
                eprintln!("warning: clean-up (scratch databases) did not finish within 30 s");
            }
            if let Err(e) = &result {
                let _ = e.report();
            }
            eprintln!(
                "error: interrupted by {}; nothing half-done is left behind",
                interrupt::signal_name(code)
            );
            return ExitCode::from(code);
        }
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => e.report(),
        }
    });
    // Do not wait for blocking threads stuck on a pipe some grandchild still
    // holds open: everything that matters has been recorded by now.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKSTOP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into journald or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(|| LogWriter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Stderr for log lines, written around any progress bars on screen so a
/// line never lands inside a bar (the formatter hands over whole lines).
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::progress::suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
