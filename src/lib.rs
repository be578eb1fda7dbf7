//! Glastonbury: a HIPAA-focused medical data appliance. This library is the binary's body, split
//! out so integration tests and benchmarks can drive the same code the server runs.

pub mod access;
pub mod appliance;
pub mod auth;
pub mod config;
pub mod dimse;
pub mod journal;
pub mod records;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod vault;
