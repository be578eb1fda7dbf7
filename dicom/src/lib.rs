//! DICOM domain logic of Glastonbury, free of I/O: Part 10 instances checked and identified,
//! the attributes QIDO-RS matches on, DICOM JSON, `multipart/related`, DIMSE command sets,
//! frames and rendered images, and PS3.15 de-identification. The binary crate stores, indexes,
//! serves and audits what this crate parses; nothing here touches a socket, a file or a key
//! store.

pub mod attributes;
pub mod deidentify;
pub mod dimse;
pub mod frames;
pub mod guard;
pub mod instance;
pub mod json;
pub mod json_writer;
pub mod multipart;
pub mod qido;
pub mod render;

pub use instance::{Instance, InstanceError};
