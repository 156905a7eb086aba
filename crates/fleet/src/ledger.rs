//! The shared catalog as the scheduler's ledger: ticks, claims, retries
//! and releases of a fleet node.

use std::sync::Arc;

use backstop_scheduler::{Claim, ClaimError, Ending, Ledger, Outcome, RunCtx, RunKind, Trigger};
use chrono::{DateTime, Utc};
use tracing::warn;

use crate::catalog::Release;
use crate::node::{Ended, FleetNode};

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
    async fn last_success(
        &self,
        job: &str,
        kind: RunKind,
    ) -> Result<Option<DateTime<Utc>>, String> {
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
            warn!(job, kind = kind.as_str(), tick = %at, error = %e, "Cannot record the tick in the catalog; another node may, and this one tries again at each heartbeat until it is recorded.");
            self.node.unrecorded(job, kind, at, max);
        }
    }

    async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Option<Vec<DateTime<Utc>>>, String> {
        self.node
            .catalog
            .recorded_ticks(job, kind, from, to)
            .await
            .map(Some)
            .map_err(|e| e.to_string())
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
            node.claiming(&run.job, run.kind, true);
            let got = node
                .catalog
                .claim_now(&node.id(), &run.job, run.kind, None, node.now())
                .await;
            if let Ok(Ok(c)) = &got {
                node.holds(c);
            }
            node.claiming(&run.job, run.kind, false);
            return match got {
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
        // While the call is out, a run the catalog shows held by this node
        // for the job may be this claim's: the heartbeat leaves it be.
        node.claiming(&run.job, run.kind, true);
        let asked = tokio::time::Instant::now();
        let got = node
            .catalog
            .claim(&node.id(), &run.job, run.kind, node.now())
            .await;
        node.hooks.claimed(asked.elapsed());
        if let Ok(Some(c)) = &got {
            node.holds(c);
        }
        node.claiming(&run.job, run.kind, false);
        match got {
            // A reply that came back after the lease could no longer be
            // trusted: the run may be another node's by now.
            Ok(Some(c)) if !node.trusted() => {
                warn!(job = %run.job, run = c.run, "The claim's reply came after this node's lease could no longer be trusted: not running it; it goes back to pending.");
                let why = "claimed by a node whose lease lapsed before it learnt of the claim";
                match node
                    .catalog
                    .release(&c, Release::Interrupted(why), node.now())
                    .await
                {
                    Ok(_) => node.ended(&c, true, Ended::Interrupted(why.into())),
                    Err(_) => node.ended(&c, false, Ended::Interrupted(why.into())),
                }
                Err(ClaimError::Elsewhere)
            }
            Ok(Some(c)) => Ok(Some(c)),
            Ok(None) => Err(ClaimError::Elsewhere),
            Err(e) => {
                // It may have committed with the reply lost: the heartbeat
                // finds the run held here and not running, and gives it back.
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
                self.node.holds(&next);
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
        let ended = match ending {
            Ending::Done(o, then) => Ended::Done(o, None, then),
            Ending::Failed(e) => Ended::Done(Outcome::Failed, Some(e.to_string()), None),
            Ending::Interrupted(e) => Ended::Interrupted(e.to_string()),
        };
        match self
            .node
            .catalog
            .release(claim, ended.release(), self.node.now())
            .await
        {
            Ok(true) => self.node.ended(claim, true, ended),
            Ok(false) => {
                warn!(job = %run.job, run = claim.run, attempt = claim.attempt, "This node's claim on the run was gone when it ended (its lease expired): nothing was recorded; the node that reaped it owns the run now.");
                self.node.ended(claim, true, ended);
            }
            Err(e) => {
                warn!(job = %run.job, run = claim.run, error = %e, "Cannot record the run's end in the catalog; this node tries again at each heartbeat (the run stays held by it meanwhile).");
                self.node.ended(claim, false, ended);
            }
        }
    }
}
