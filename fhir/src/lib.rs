//! FHIR R4 domain logic of Glastonbury, free of I/O: the published search parameters, the
//! FHIRPath subset that evaluates them, index extraction, search-query parsing, JSON Patch and
//! transaction planning. The binary crate stores, hashes and serves what this crate computes.

pub mod dates;
pub mod extract;
pub mod patch;
pub mod path;
pub mod query;
pub mod safe_harbor;
pub mod search_parameters;
pub mod synthetic;
pub mod validate;

pub use search_parameters::{ParameterType, SearchParameter, SearchParameters};
