//! C2SP signed notes (<https://c2sp.org/signed-note>) with Ed25519 keys, compatible with
//! `golang.org/x/mod/sumdb/note`: key texts, signing, parsing and verification.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Algorithm byte for Ed25519 keys in key texts and key hashes.
const ALG_ED25519: u8 = 0x01;
/// Prefix of every signature line: an em dash and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Most signature lines a note may carry (as the Go implementation).
const MAX_SIGNATURES: usize = 100;

/// Why a note, key or signature was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// The note text is not a well-formed signed note.
    #[error("malformed signed note: {0}")]
    Malformed(&'static str),
    /// A key text is not well formed or its hash does not match.
    #[error("malformed key text: {0}")]
    BadKey(&'static str),
    /// A key name is empty, has whitespace or a plus sign.
    #[error("invalid key name")]
    BadName,
    /// A trusted key's signature does not verify.
    #[error("signature by {name} does not verify")]
    BadSignature {
        /// The signing key's name.
        name: String,
    },
    /// No signature by any trusted key.
    #[error("note has no signature by a trusted key")]
    Untrusted,
}

/// A note whose signature by at least one trusted key verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedNote {
    /// The signed text (ends with a newline).
    pub body: String,
    /// Names of the trusted keys whose signatures verified.
    pub verified_by: Vec<String>,
}

/// An Ed25519 note signing key; the secret is zeroized on drop and never printed.
pub struct NoteSigner {
    name: String,
    key_hash: u32,
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .field("key_hash", &format_args!("{:08x}", self.key_hash))
            .finish_non_exhaustive()
    }
}

impl NoteSigner {
    /// A new random key named `name` (for a checkpoint key, the log origin).
    pub fn generate(name: &str) -> Result<Self, NoteError> {
        Self::from_key(name, SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// A key from its 32-byte Ed25519 seed.
    pub fn from_seed(name: &str, seed: &Zeroizing<[u8; 32]>) -> Result<Self, NoteError> {
        Self::from_key(name, SigningKey::from_bytes(seed))
    }

    fn from_key(name: &str, key: SigningKey) -> Result<Self, NoteError> {
        check_name(name)?;
        let key_hash = key_hash(name, key.verifying_key().as_bytes());
        Ok(Self {
            name: name.to_owned(),
            key_hash,
            key,
        })
    }

    /// Parses `PRIVATE+KEY+<name>+<hash>+<base64(0x01 ‖ seed)>`.
    pub fn from_key_text(text: &str) -> Result<Self, NoteError> {
        let rest = text
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::BadKey("missing prefix"))?;
        let (name, hash, key) = split_key_text(rest)?;
        let decoded = Zeroizing::new(
            BASE64
                .decode(key)
                .map_err(|_| NoteError::BadKey("base64"))?,
        );
        let seed = match decoded.split_first() {
            Some((&ALG_ED25519, seed)) if seed.len() == 32 => {
                let mut bytes = Zeroizing::new([0u8; 32]);
                bytes.copy_from_slice(seed);
                bytes
            }
            _ => return Err(NoteError::BadKey("not an ed25519 key")),
        };
        let signer = Self::from_seed(name, &seed)?;
        if signer.key_hash != hash {
            return Err(NoteError::BadKey("key hash mismatch"));
        }
        Ok(signer)
    }

    /// The secret key text `PRIVATE+KEY+<name>+<hash>+<base64(0x01 ‖ seed)>`.
    pub fn to_key_text(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(Vec::with_capacity(33));
        raw.push(ALG_ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        let encoded = Zeroizing::new(BASE64.encode(raw.as_slice()));
        Zeroizing::new(format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name, self.key_hash, *encoded
        ))
    }

    /// The matching public verifier.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            key_hash: self.key_hash,
            key: self.key.verifying_key(),
        }
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn signature_line(&self, body: &str) -> String {
        let signature = self.key.sign(body.as_bytes());
        let mut raw = Vec::with_capacity(68);
        raw.extend_from_slice(&self.key_hash.to_be_bytes());
        raw.extend_from_slice(&signature.to_bytes());
        format!("{SIG_PREFIX}{} {}\n", self.name, BASE64.encode(raw))
    }
}

/// An Ed25519 note verifier key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key_hash: u32,
    key: VerifyingKey,
}

impl NoteVerifier {
    /// Parses `<name>+<8 hex hash>+<base64(0x01 ‖ pubkey)>`.
    pub fn from_key_text(text: &str) -> Result<Self, NoteError> {
        let (name, hash, key) = split_key_text(text)?;
        let decoded = BASE64
            .decode(key)
            .map_err(|_| NoteError::BadKey("base64"))?;
        let public: [u8; 32] = match decoded.split_first() {
            Some((&ALG_ED25519, public)) => public
                .try_into()
                .map_err(|_| NoteError::BadKey("public key length"))?,
            _ => return Err(NoteError::BadKey("not an ed25519 key")),
        };
        if key_hash(name, &public) != hash {
            return Err(NoteError::BadKey("key hash mismatch"));
        }
        let key =
            VerifyingKey::from_bytes(&public).map_err(|_| NoteError::BadKey("invalid point"))?;
        Ok(Self {
            name: name.to_owned(),
            key_hash: hash,
            key,
        })
    }

    /// The public key text `<name>+<hash>+<base64(0x01 ‖ pubkey)>`.
    pub fn to_key_text(&self) -> String {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.key_hash, BASE64.encode(raw))
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 4-byte key hash as a number.
    pub fn key_hash(&self) -> u32 {
        self.key_hash
    }
}

/// SHA-256(name ‖ 0x0A ‖ 0x01 ‖ pubkey), first four bytes, big-endian.
fn key_hash(name: &str, public: &[u8; 32]) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([b'\n', ALG_ED25519]);
    hasher.update(public);
    let digest = hasher.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty() || name.contains('+') || name.chars().any(char::is_whitespace) {
        return Err(NoteError::BadName);
    }
    Ok(())
}

/// Splits `<name>+<hash>+<key>` and parses the 8-hex-digit hash.
fn split_key_text(text: &str) -> Result<(&str, u32, &str), NoteError> {
    let mut parts = text.splitn(3, '+');
    let (Some(name), Some(hash), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(NoteError::BadKey("expected name+hash+key"));
    };
    check_name(name)?;
    if hash.len() != 8 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NoteError::BadKey("hash must be 8 hex digits"));
    }
    let hash = u32::from_str_radix(hash, 16).map_err(|_| NoteError::BadKey("hash"))?;
    Ok((name, hash, key))
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if text.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::Malformed("control character"));
    }
    Ok(())
}

/// Signs `body` (non-empty, newline-terminated, no blank lines) with each signer.
pub fn sign_note(body: &str, signers: &[&NoteSigner]) -> Result<String, NoteError> {
    check_text(body)?;
    if body.is_empty() || !body.ends_with('\n') || body.contains("\n\n") {
        return Err(NoteError::Malformed(
            "body must be non-empty lines ending in a newline",
        ));
    }
    if signers.is_empty() {
        return Err(NoteError::Malformed("no signers"));
    }
    let mut note = String::with_capacity(body.len() + 1 + signers.len() * 110);
    note.push_str(body);
    note.push('\n');
    for signer in signers {
        note.push_str(&signer.signature_line(body));
    }
    Ok(note)
}

/// One parsed signature line.
struct SignatureLine<'a> {
    name: &'a str,
    key_hash: u32,
    signature: Vec<u8>,
}

fn parse_signature_line(line: &str) -> Result<SignatureLine<'_>, NoteError> {
    let rest = line
        .strip_prefix(SIG_PREFIX)
        .ok_or(NoteError::Malformed("signature prefix"))?;
    let (name, encoded) = rest
        .split_once(' ')
        .ok_or(NoteError::Malformed("signature line"))?;
    check_name(name).map_err(|_| NoteError::Malformed("signature key name"))?;
    let raw = BASE64
        .decode(encoded)
        .map_err(|_| NoteError::Malformed("signature base64"))?;
    if raw.len() < 5 {
        return Err(NoteError::Malformed("signature too short"));
    }
    let (hash, signature) = raw.split_at(4);
    let key_hash = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]);
    Ok(SignatureLine {
        name,
        key_hash,
        signature: signature.to_vec(),
    })
}

/// Splits a note into its body and signature lines.
fn split_note(text: &str) -> Result<(&str, Vec<&str>), NoteError> {
    check_text(text)?;
    let split = text
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no signature block"))?;
    let (body, signatures) = (&text[..=split], &text[split + 2..]);
    if signatures.is_empty() || !signatures.ends_with('\n') {
        return Err(NoteError::Malformed(
            "signature block must end in a newline",
        ));
    }
    let lines: Vec<&str> = signatures.split_terminator('\n').collect();
    if lines.len() > MAX_SIGNATURES {
        return Err(NoteError::Malformed("too many signatures"));
    }
    Ok((body, lines))
}

/// The body of a signed note, without checking any signature (for reading a checkpoint the
/// caller already trusts, e.g. one it signed earlier with a since-rotated key).
pub(crate) fn unverified_body(text: &str) -> Result<&str, NoteError> {
    let (body, lines) = split_note(text)?;
    for line in lines {
        parse_signature_line(line)?;
    }
    Ok(body)
}

/// Verifies a signed note: every signature by a trusted key (same name and key hash) must
/// verify, signatures by unknown keys are ignored, and at least one trusted key must have
/// signed. Several trusted keys allow key rotation.
pub fn open_note(text: &str, trusted: &[NoteVerifier]) -> Result<VerifiedNote, NoteError> {
    let (body, lines) = split_note(text)?;
    let mut seen = HashSet::new();
    let mut verified_by = Vec::new();
    for line in lines {
        let parsed = parse_signature_line(line)?;
        let Some(verifier) = trusted
            .iter()
            .find(|v| v.name == parsed.name && v.key_hash == parsed.key_hash)
        else {
            continue;
        };
        if !seen.insert((parsed.name, parsed.key_hash)) {
            continue;
        }
        let bad = || NoteError::BadSignature {
            name: parsed.name.to_owned(),
        };
        let signature = Signature::from_slice(&parsed.signature).map_err(|_| bad())?;
        verifier
            .key
            .verify_strict(body.as_bytes(), &signature)
            .map_err(|_| bad())?;
        verified_by.push(parsed.name.to_owned());
    }
    if verified_by.is_empty() {
        return Err(NoteError::Untrusted);
    }
    Ok(VerifiedNote {
        body: body.to_owned(),
        verified_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_texts_round_trip_and_hide_secret() {
        let signer = NoteSigner::generate("example.com/log").unwrap();
        let text = signer.to_key_text();
        assert!(text.starts_with("PRIVATE+KEY+example.com/log+"));
        let again = NoteSigner::from_key_text(&text).unwrap();
        assert_eq!(again.verifier(), signer.verifier());
        let public = signer.verifier().to_key_text();
        assert_eq!(
            NoteVerifier::from_key_text(&public).unwrap(),
            signer.verifier()
        );
        let debug = format!("{signer:?}");
        assert!(!debug.contains(&text[text.len() - 20..]));
    }

    /// Vector from golang.org/x/mod/sumdb/note's tests.
    #[test]
    fn go_note_known_answer() {
        let skey = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
        let vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        let signer = NoteSigner::from_key_text(skey).unwrap();
        assert_eq!(signer.verifier().to_key_text(), vkey);
        let body = "If you think cryptography is the answer to your problem,\n\
                    then you don't know what your problem is.\n";
        let note = sign_note(body, &[&signer]).unwrap();
        let want_sig = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
        assert!(note.ends_with(want_sig), "{note}");
        let verifier = NoteVerifier::from_key_text(vkey).unwrap();
        assert_eq!(open_note(&note, &[verifier]).unwrap().body, body);
    }

    /// Example from the C2SP signed-note specification.
    #[test]
    fn c2sp_spec_example_verifies() {
        let vkey = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
        let note = "This is an example message.\n\n\u{2014} example.com/foo \
                    Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
        let verifier = NoteVerifier::from_key_text(vkey).unwrap();
        let opened = open_note(note, &[verifier]).unwrap();
        assert_eq!(opened.body, "This is an example message.\n");
    }
}
