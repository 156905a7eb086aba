//! Using a backup: every path that reads one back out of a store.
//!
//! [`select`] chooses the backups (and the age identity that opens them);
//! [`readback`] reads one artifact back (store → hash → age → zstd → hash →
//! a consumer) and [`consume`] feeds it to pg_restore or psql. On top of
//! those: [`restore`] into a database (a backup in streams through
//! [`sections`]), [`download`] to a file, [`verify`]
//! against the manifest (checksum, decrypt, restore), and [`recovery`]
//! (a whole server's restore, and the drill that measures it).

pub mod consume;
pub mod copy_select;
pub mod download;
pub mod options;
pub mod readback;
pub mod recovery;
pub mod restore;
pub mod sections;
pub mod select;
pub mod verify;
