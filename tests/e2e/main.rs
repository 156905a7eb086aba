//! End-to-end tests against real services: throwaway PostgreSQL clusters, the
//! stock age/zstd/pg_restore tools, and the real `backstop` binary. One test
//! binary for all of them: each links the whole stack.

mod harness;

mod attacks;
mod backup;
mod claims;
mod cli;
mod cluster;
mod daemon;
mod deploy;
mod faults;
mod fleet;
mod fleet_sim;
mod guard;
mod history;
mod managed;
mod notify;
mod page;
mod progress;
mod prune;
mod restore;
mod s3;
mod standby;
mod streams;
mod verify;
