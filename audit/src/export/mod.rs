//! The versioned audit export (`glastonbury-audit-export/v1`): selected leaves, a signed
//! checkpoint, a signed manifest of the selection, proofs of every entry (range proofs for
//! contiguous runs, inclusion proofs for single entries) and an optional consistency proof from
//! the previous export.

mod build;
mod manifest;
mod verify;

use serde::{Deserialize, Serialize};

use crate::hash::Hash;

pub use build::{
    ExportBuildError, ExportEntryInput, ExportRequest, build_export, export_nodes_needed,
};
pub use verify::{VerifyError, VerifySummary, verify_export};

/// Format tag of exports written by this crate.
pub const EXPORT_FORMAT: &str = "glastonbury-audit-export/v1";

/// Contiguous runs are proven in aligned chunks of this many leaves, so a bad range names a
/// small window of entries.
pub const RANGE_CHUNK: u64 = 1024;

/// A self-verifying audit export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// Always [`EXPORT_FORMAT`].
    pub format: String,
    /// Signed checkpoint note (C2SP tlog-checkpoint) all proofs lead to.
    pub checkpoint: String,
    /// Signed note listing origin, size, root, the query and the selected indexes, so a
    /// dropped entry is detected and named.
    pub manifest: String,
    /// Selected entries, strictly increasing by index.
    pub entries: Vec<ExportEntry>,
    /// Range proofs for contiguous runs of entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<ExportRange>,
    /// Link to the previous export's checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousLink>,
}

/// One exported leaf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportEntry {
    /// Leaf index in the log.
    pub index: u64,
    /// Base64 of the canonical leaf bytes (RFC 8785 JSON of an [`crate::AuditEvent`]).
    pub leaf: String,
    /// The opened sealed detail, for the compliance officer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<OpenedDetail>,
    /// Inclusion proof to the checkpoint, when no range proof covers this entry.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_b64_hashes"
    )]
    pub inclusion: Option<Vec<Hash>>,
}

/// A sealed detail opened for the officer: the commitment nonce and the plaintext.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenedDetail {
    /// Base64 of the 32-byte commitment nonce.
    pub nonce: String,
    /// Base64 of the plaintext.
    pub plaintext: String,
}

/// A range proof: leaves `begin..end` (all present as entries) plus the left border
/// (decomposition of `0..begin`) then the right border (decomposition of `end..size`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRange {
    /// First leaf index.
    pub begin: u64,
    /// One past the last leaf index.
    pub end: u64,
    /// Border hashes, base64.
    #[serde(with = "b64_hashes")]
    pub proof: Vec<Hash>,
}

/// The previous export's checkpoint and a consistency proof from it to this checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousLink {
    /// The previous signed checkpoint note.
    pub checkpoint: String,
    /// RFC 9162 consistency proof, base64 hashes.
    #[serde(with = "b64_hashes")]
    pub consistency: Vec<Hash>,
}

/// Serde for `Vec<Hash>` as an array of base64 strings.
mod b64_hashes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use crate::hash::Hash;

    pub(super) fn serialize<S: Serializer>(
        hashes: &[Hash],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(hashes.iter().map(|hash| BASE64.encode(hash)))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Hash>, D::Error> {
        let texts = Vec::<String>::deserialize(deserializer)?;
        texts
            .iter()
            .map(|text| {
                let bytes = BASE64.decode(text).map_err(D::Error::custom)?;
                Hash::try_from(bytes.as_slice())
                    .map_err(|_| D::Error::custom("proof hash is not 32 bytes"))
            })
            .collect()
    }
}

/// Serde for `Option<Vec<Hash>>` as an optional array of base64 strings.
mod opt_b64_hashes {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::hash::Hash;

    #[derive(Deserialize)]
    struct Wrapped(#[serde(with = "super::b64_hashes")] Vec<Hash>);

    pub(super) fn serialize<S: Serializer>(
        hashes: &Option<Vec<Hash>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match hashes {
            Some(hashes) => super::b64_hashes::serialize(hashes, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<Hash>>, D::Error> {
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|wrapped| wrapped.0))
    }
}
