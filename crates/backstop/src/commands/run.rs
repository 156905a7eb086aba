//! `backstop run`: the daemon, with the process's signals. SIGHUP reloads
//! the configuration; the first SIGTERM or SIGINT starts the drain (running
//! jobs get `daemon.shutdown_grace`); a second one during the drain exits at
//! once with 143 or 130, as a shell would report the signal.

use std::path::Path;

use backstop_config::Config;
use backstop_daemon::Control;
use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

use crate::error::CmdResult;

pub async fn run(config_path: &Path, config: Config) -> CmdResult {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (reload_tx, reload) = tokio::sync::mpsc::channel(4);
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut stop_tx = Some(stop_tx);
        loop {
            let code = tokio::select! {
                _ = hup.recv() => {
                    // A reload already pending covers this one too.
                    let _ = reload_tx.try_send(());
                    continue;
                }
                _ = term.recv() => 143,
                _ = int.recv() => 130,
            };
            match stop_tx.take() {
                Some(tx) => {
                    let _ = tx.send(());
                }
                None => {
                    warn!("Second signal: quitting now.");
                    std::process::exit(code);
                }
            }
        }
    });
    let shutdown = async {
        let _ = stop.await;
    };
    backstop_daemon::run(
        config_path.to_path_buf(),
        config,
        Control { reload, shutdown },
    )
    .await?;
    Ok(())
}
