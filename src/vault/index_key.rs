//! A patient's index key: a symmetric key derived from the patient's age identity that seals the
//! values only the appliance itself reads back (the DICOM header kept beside each instance for
//! QIDO-RS and C-FIND). Sealing costs no X25519 agreement, unlike an age file, and the key dies
//! with the identity, so crypto-shredding covers these values too.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::{VaultError, envelope};

/// What every sealed value starts with; an age file starts with `age-encryption.org/`, so the
/// two never collide and values sealed before this format existed still open.
const SEALED_PREFIX: &[u8] = b"GBIK1";

/// The HMAC message the key is derived with, followed by the patient reference.
const DERIVATION_DOMAIN: &[u8] = b"glastonbury patient index key v1\0";

/// A patient's index key (XChaCha20-Poly1305), zeroized on drop.
pub(crate) struct IndexKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("IndexKey(redacted)")
    }
}

impl IndexKey {
    /// HMAC-SHA256 keyed with the identity's secret (its age text form, as unwrapped), over a
    /// domain string and the patient reference: deterministic, so every process derives the
    /// same key from the same identity.
    pub(crate) fn derive(identity_secret_text: &[u8], patient_ref: &str) -> Self {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(identity_secret_text) {
            Ok(mac) => mac,
            Err(_) => super::blind_index::unreachable_hmac_key(),
        };
        mac.update(DERIVATION_DOMAIN);
        mac.update(patient_ref.as_bytes());
        let mut digest = mac.finalize().into_bytes();
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&digest);
        digest.as_mut_slice().zeroize();
        Self(key)
    }

    /// `GBIK1 ‖ nonce ‖ ciphertext and tag`, with a fresh random nonce.
    pub(crate) fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        let envelope = envelope::seal(&self.0, SEALED_PREFIX, plaintext)
            .map_err(|_| VaultError::Crypto("sealing an index value failed".to_owned()))?;
        let mut sealed = Vec::with_capacity(SEALED_PREFIX.len() + envelope.len());
        sealed.extend_from_slice(SEALED_PREFIX);
        sealed.extend_from_slice(&envelope);
        Ok(sealed)
    }

    /// Opens a value [`IndexKey::seal`] produced; a damaged value or another patient's is an
    /// error.
    pub(crate) fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        let damaged = || VaultError::Payload("a sealed index value is damaged".to_owned());
        let envelope = sealed.strip_prefix(SEALED_PREFIX).ok_or_else(damaged)?;
        envelope::open(&self.0, SEALED_PREFIX, envelope).map_err(|_| damaged())
    }
}

/// Whether `ciphertext` was sealed with an index key (rather than being an age file).
pub(crate) fn is_sealed(ciphertext: &[u8]) -> bool {
    ciphertext.starts_with(SEALED_PREFIX)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn secret_text(identity: &age::x25519::Identity) -> Vec<u8> {
        identity.to_string().expose_secret().as_bytes().to_vec()
    }

    #[test]
    fn a_sealed_value_opens_with_the_same_patients_key_only() {
        let identity = secret_text(&age::x25519::Identity::generate());
        let key = IndexKey::derive(&identity, "patient-a");
        let sealed = key.seal(b"{\"00100010\":{}}").expect("seals");
        assert!(is_sealed(&sealed));
        assert_eq!(key.open(&sealed).expect("opens"), b"{\"00100010\":{}}");
        let same_identity_again = IndexKey::derive(&identity, "patient-a");
        assert_eq!(
            same_identity_again.open(&sealed).expect("opens"),
            b"{\"00100010\":{}}"
        );
        let other_patient = IndexKey::derive(&identity, "patient-b");
        assert!(other_patient.open(&sealed).is_err());
        let other_identity = IndexKey::derive(
            &secret_text(&age::x25519::Identity::generate()),
            "patient-a",
        );
        assert!(other_identity.open(&sealed).is_err());
    }

    #[test]
    fn a_tampered_or_truncated_value_is_refused() {
        let key = IndexKey::derive(
            &secret_text(&age::x25519::Identity::generate()),
            "patient-a",
        );
        let mut sealed = key.seal(b"header").expect("seals");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(key.open(&sealed).is_err());
        assert!(key.open(&sealed[..SEALED_PREFIX.len() + 3]).is_err());
        assert!(key.open(b"age-encryption.org/v1").is_err());
    }
}
