//! SIGINT and SIGTERM for every one-shot command (Ctrl-C, `timeout`, a
//! systemd or Kubernetes deadline). The first signal cancels: a backup
//! kills pg_dump, aborts its uploads, gives back its standby's replay pause
//! and records the run as interrupted; any other command's work is dropped,
//! and the clean-up it leaves (scratch databases) is waited for. The
//! process then exits 130 (SIGINT) or 143 (SIGTERM), as a shell reports
//! the signal. A second signal quits at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The signals of one command's run.
pub struct Interrupt {
    /// Fires at the first signal.
    pub token: CancellationToken,
    code: Arc<AtomicU8>,
}

impl Interrupt {
    /// Starts listening (on the current runtime).
    ///
    /// # Errors
    /// When the handlers cannot be installed.
    pub fn install() -> std::io::Result<Self> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let token = CancellationToken::new();
        let code = Arc::new(AtomicU8::new(0));
        let (fire, seen) = (token.clone(), code.clone());
        tokio::spawn(async move {
            loop {
                let (code, name) = tokio::select! {
                    _ = term.recv() => (143, "SIGTERM"),
                    _ = int.recv() => (130, "SIGINT"),
                };
                if seen.swap(code, Ordering::SeqCst) != 0 {
                    warn!("Second signal: quitting now.");
                    std::process::exit(i32::from(code));
                }
                warn!(
                    signal = name,
                    "Interrupted: stopping cleanly (a second signal quits at once)."
                );
                fire.cancel();
            }
        });
        Ok(Self { token, code })
    }

    /// The exit status the first signal asks for, once one came.
    pub fn code(&self) -> Option<u8> {
        match self.code.load(Ordering::SeqCst) {
            0 => None,
            c => Some(c),
        }
    }
}

/// The signal an exit status reports.
pub fn signal_name(code: u8) -> &'static str {
    if code == 130 { "SIGINT" } else { "SIGTERM" }
}
