//! The integration suite: one test binary (fast to link) whose modules drive the real appliance,
//! through its library API and as a separate `glastonbury` process with real clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[macro_use]
mod common;
mod audit_journal;
mod e2e_audit;
mod e2e_auth;
mod e2e_core;
mod e2e_dicom;
mod e2e_fhir;
mod e2e_fhir_bulk;
mod e2e_fhir_safe_harbor;
mod e2e_oidc;
mod storage_suite;
