//! The fleet: several backstop processes sharing one catalog, every
//! scheduled run executed exactly once. This crate holds the protocol's
//! code that does not depend on PostgreSQL (a node's lease, the claims and
//! releases the scheduler asks for) and a deterministic simulation of many
//! nodes that checks the fleet's invariants against an in-memory catalog
//! with PostgreSQL's semantics ([`sim`]).

pub mod catalog;
pub mod history;
pub mod ledger;
pub mod node;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub use catalog::{
    ClaimableEntry, FleetCatalog, FleetError, FleetResult, HeldRun, MAX_INTERRUPTIONS, NodeInfo,
    NodeStatus, Reaped, Release, Waiting,
};
pub use ledger::{Attempts, FleetLedger};
pub use node::{FleetNode, Hooks, NoHooks};
