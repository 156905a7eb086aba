//! The shared catalog as the scheduler's ledger: ticks, claims, retries
//! and releases of a fleet node.

use std::sync::Arc;

use backstop_scheduler::{Claim, ClaimError, Ending, Ledger, Outcome, RunCtx, RunKind, Trigger};
use chrono::{DateTime, Utc};
use tracing::warn;

use crate::catalog::Release;
use crate::node::FleetNode;

/// How many attempts a run of a job may have (its retries + 1), from the
/// config in force.
pub trait Attempts: Send + Sync {
    fn max_attempts(&self, job: &str, kind: RunKind) -> u32;
}

/// A fleet node's ledger.
pub struct FleetLedger {
    pub node: Arc<FleetNode>,
    pub attempts: Arc<dyn Attempts>,
}

impl Ledger for FleetLedger {
    async fn last_success(&self, job: &str, kind: RunKind) -> Result<Option<DateTime<Utc>>, String> {
        self.node
            .catalog
            .last_success(job, kind)
            .await
            .map_err(|e| e.to_string())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn record_tick(&self, job: &str, kind: RunKind, at: DateTime<Utc>) {
        let max = self.attempts.max_attempts(job, kind);
        if let Err(e) = self.node.catalog.record_tick(job, kind, at, max).await {
            warn!(job, kind = kind.as_str(), tick = %at, error = %e, "Cannot record the tick in the catalog; another node may (this one retries it with its next pick-up if it got in).");
        }
    }

    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, String> {
        self.node
            .catalog
            .last_tick(job, kind, at_or_before)
            .await
            .map_err(|e| e.to_string())
    }

    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: Vec<DateTime<Utc>>,
        why: String,
    ) -> Result<(), String> {
        self.node
            .catalog
            .skip_ticks(job, kind, &ticks, &why, self.node.now())
            .await
            .map(|n| {
                if n > 0 {
                    self.node.hooks.ticks_skipped(job, kind, n);
                }
            })
            .map_err(|e| e.to_string())
    }

    async fn claim(&self, run: &RunCtx) -> Result<Option<Claim>, ClaimError> {
        let node = &self.node;
        if !node.trusted() {
            return Err(ClaimError::Elsewhere);
        }
        // Asked of this node (the run API): it runs here, now, as a new run,
        // or says who runs the job, as one host refuses a busy job.
        if run.trigger == Trigger::Api {
            return match node
                .catalog
                .claim_now(&node.id(), &run.job, run.kind, None, node.now())
                .await
            {
                Ok(Ok(c)) => Ok(Some(c)),
                Ok(Err(holder)) => Err(ClaimError::Failed(format!(
                    "a {} of job \"{}\" is already running on {holder}",
                    run.kind, run.job
                ))),
                Err(e) => Err(ClaimError::Failed(format!(
                    "cannot claim the run in the catalog: {e}"
                ))),
            };
        }
        match node
            .catalog
            .claim(&node.id(), &run.job, run.kind, node.now())
            .await
        {
            Ok(Some(c)) => Ok(Some(c)),
            Ok(None) => Err(ClaimError::Elsewhere),
            Err(e) => {
                warn!(job = %run.job, error = %e, "Cannot claim a run in the catalog; the run stays pending for any node.");
                Err(ClaimError::Elsewhere)
            }
        }
    }

    async fn next_attempt(&self, run: &mut RunCtx, error: &str) -> Result<(), String> {
        let Some(claim) = run.claim.clone() else {
            return Ok(());
        };
        match self.node.catalog.next_attempt(&claim, error).await {
            Ok(Some(next)) => {
                run.claim = Some(next);
                Ok(())
            }
            Ok(None) => Err("this node lost its claim on the run before retrying it".into()),
            Err(e) => Err(format!("cannot record the retry in the catalog: {e}")),
        }
    }

    async fn release(&self, run: &RunCtx, ending: Ending<'_>) {
        let Some(claim) = &run.claim else {
            return;
        };
        let how = match ending {
            Ending::Done(o) => Release::Done(o, None),
            Ending::Failed(e) => Release::Done(Outcome::Failed, Some(e)),
            Ending::Interrupted(e) => Release::Interrupted(e),
        };
        match self.node.catalog.release(claim, how, self.node.now()).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(job = %run.job, run = claim.run, attempt = claim.attempt, "This node's claim on the run was gone when it ended (its lease expired): nothing was recorded; the node that reaped it owns the run now.");
            }
            Err(e) => {
                warn!(job = %run.job, run = claim.run, error = %e, "Cannot record the run's end in the catalog; once this node's lease expires it is reaped and re-run.");
            }
        }
    }
}
