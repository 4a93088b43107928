//! Indexing: the scan channel and the worker that runs each job through its phases —
//! walk the tree and compare it with the database, probe changed files, store rows in bulk.

pub mod dir_tree;
pub mod discover;
pub mod file_names;
pub mod job;
pub mod phase_1_walk;
pub mod phase_2_probe;
pub mod phase_3_store;
pub mod queue;
pub mod worker;
