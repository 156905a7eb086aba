//! A deterministic simulation of a fleet (in the manner of FoundationDB's
//! and TigerBeetle's simulators): the real scheduler, node and ledger code
//! of several nodes, driven by tokio's paused clock against an in-memory
//! catalog with PostgreSQL's semantics, with faults drawn from one seed,
//! and the fleet's invariants checked as it goes. One seed, one outcome.

pub mod catalog;
pub mod faults;
pub mod world;

pub use catalog::SimCatalog;
pub use world::{Params, Summary, Violation, run, sim_now};

#[cfg(test)]
mod tests;
