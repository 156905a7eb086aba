//! [`FleetCatalog`] on the PostgreSQL catalog: the fleet crate's protocol,
//! each call within [`FLEET_CALL_TIMEOUT`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;
use crate::{Catalog, Claim, RunKind};

/// The fleet protocol on the PostgreSQL catalog: the methods above, each
/// within [`FLEET_CALL_TIMEOUT`].
#[async_trait::async_trait]
impl FleetCatalog for Catalog {
    async fn register_node(&self, info: &NodeInfo, lease: Duration) -> FleetResult<String> {
        within(Catalog::register_node(self, info, lease)).await
    }

    async fn renew_lease(&self, node: &str, lease: Duration) -> FleetResult<bool> {
        within(Catalog::renew_lease(self, node, lease)).await
    }

    async fn deregister_node(&self, node: &str, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>> {
        within(Catalog::deregister_node(self, node, now)).await
    }

    async fn reap(&self, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>> {
        within(Catalog::reap(self, now)).await
    }

    async fn record_tick(
        &self,
        job: &str,
        kind: RunKind,
        at: DateTime<Utc>,
        max_attempts: u32,
    ) -> FleetResult<bool> {
        let now = backstop_vocab::now();
        within(Catalog::record_tick(self, job, kind, at, max_attempts, now)).await
    }

    async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> FleetResult<Vec<DateTime<Utc>>> {
        within(Catalog::recorded_ticks(self, job, kind, from, to)).await
    }

    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: &[DateTime<Utc>],
        why: &str,
        now: DateTime<Utc>,
    ) -> FleetResult<u64> {
        within(Catalog::skip_ticks(self, job, kind, ticks, why, now)).await
    }

    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> FleetResult<Option<DateTime<Utc>>> {
        within(Catalog::last_tick(self, job, kind, at_or_before)).await
    }

    async fn claimable(
        &self,
        entries: &[ClaimableEntry],
        now: DateTime<Utc>,
    ) -> FleetResult<Vec<(String, RunKind)>> {
        within(Catalog::claimable(self, entries, now)).await
    }

    async fn claim(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        now: DateTime<Utc>,
    ) -> FleetResult<Option<Claim>> {
        within(Catalog::claim(self, node, job, kind, now)).await
    }

    async fn claim_now(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        backup_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> FleetResult<Result<Claim, String>> {
        within(Catalog::claim_now(self, node, job, kind, backup_id, now)).await
    }

    async fn next_attempt(&self, claim: &Claim, error: &str) -> FleetResult<Option<Claim>> {
        within(Catalog::next_attempt(self, claim, error)).await
    }

    async fn fence(&self, claim: &Claim) -> FleetResult<bool> {
        within(Catalog::fence(self, claim)).await
    }

    async fn release(
        &self,
        claim: &Claim,
        how: Release<'_>,
        now: DateTime<Utc>,
    ) -> FleetResult<bool> {
        within(Catalog::release(self, claim, how, now)).await
    }

    async fn last_success(&self, job: &str, kind: RunKind) -> FleetResult<Option<DateTime<Utc>>> {
        within(Catalog::last_success(self, job, kind)).await
    }

    async fn fleet(&self) -> FleetResult<Vec<NodeStatus>> {
        within(Catalog::fleet(self)).await
    }

    async fn held(&self, node: &str) -> FleetResult<Vec<HeldRun>> {
        within(Catalog::held(self, node)).await
    }

    async fn waiting(&self) -> FleetResult<Vec<Waiting>> {
        within(Catalog::waiting(self)).await
    }

    async fn forget_history(&self, before: DateTime<Utc>, limit: u32) -> FleetResult<u64> {
        within(Catalog::forget_history(self, before, limit)).await
    }
}
