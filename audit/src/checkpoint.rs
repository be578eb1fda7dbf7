//! C2SP tlog checkpoints (<https://c2sp.org/tlog-checkpoint>): the body
//! `<origin>\n<size>\n<base64 root>\n`, signed as a signed note.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::hash::Hash;
use crate::note::{NoteError, NoteSigner, NoteVerifier, open_note, sign_note};

/// A tree head: origin (log identity), size and root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Log identity, e.g. `glastonbury.example.org/audit/<appliance id>`.
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// RFC 9162 root of the first `size` leaves.
    pub root: Hash,
}

/// Why a checkpoint was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The signed note did not verify.
    #[error(transparent)]
    Note(#[from] NoteError),
    /// The body is not a checkpoint.
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
}

impl Checkpoint {
    /// The checkpoint body `<origin>\n<size>\n<base64 root>\n`.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root)
        )
    }

    /// Parses a checkpoint body; extension lines after the root are allowed and ignored.
    pub fn parse_body(body: &str) -> Result<Self, CheckpointError> {
        let mut lines = body.split_terminator('\n');
        let origin = lines
            .next()
            .ok_or(CheckpointError::Malformed("missing origin"))?;
        let size = lines
            .next()
            .ok_or(CheckpointError::Malformed("missing size"))?;
        let root = lines
            .next()
            .ok_or(CheckpointError::Malformed("missing root"))?;
        if !body.ends_with('\n') || origin.is_empty() {
            return Err(CheckpointError::Malformed("bad origin line"));
        }
        Ok(Self {
            origin: origin.to_owned(),
            size: parse_size(size)?,
            root: parse_root(root)?,
        })
    }

    /// Signs the checkpoint as a signed note with each signer.
    pub fn sign(&self, signers: &[&NoteSigner]) -> Result<String, CheckpointError> {
        if self.origin.is_empty() || self.origin.contains('\n') {
            return Err(CheckpointError::Malformed("bad origin line"));
        }
        Ok(sign_note(&self.body(), signers)?)
    }

    /// Verifies a signed checkpoint note against trusted keys and parses it.
    pub fn open(note: &str, trusted: &[NoteVerifier]) -> Result<Self, CheckpointError> {
        Self::parse_body(&open_note(note, trusted)?.body)
    }
}

/// A decimal size without sign or leading zeros.
fn parse_size(text: &str) -> Result<u64, CheckpointError> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return Err(CheckpointError::Malformed("bad size line"));
    }
    text.parse()
        .map_err(|_| CheckpointError::Malformed("bad size line"))
}

fn parse_root(text: &str) -> Result<Hash, CheckpointError> {
    let bytes = BASE64
        .decode(text)
        .map_err(|_| CheckpointError::Malformed("bad root line"))?;
    bytes
        .try_into()
        .map_err(|_| CheckpointError::Malformed("root is not 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trip() {
        let checkpoint = Checkpoint {
            origin: "example.com/log".into(),
            size: 42,
            root: [7; 32],
        };
        let body = checkpoint.body();
        assert_eq!(Checkpoint::parse_body(&body).unwrap(), checkpoint);
        assert!(
            Checkpoint::parse_body("o\n042\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n")
                .is_err()
        );
        assert!(
            Checkpoint::parse_body("o\n+42\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n")
                .is_err()
        );
        assert!(Checkpoint::parse_body("o\n42\nBwcH\n").is_err());
        assert!(Checkpoint::parse_body("o\n42\n").is_err());
    }
}
