//! Holds no code: the tests in `tests/` drive the `glastonbury` binary with fhir-sdk's Rust
//! client, as an EHR integration written in Rust would.
