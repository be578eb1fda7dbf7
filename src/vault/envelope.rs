//! The vault's one symmetric envelope: XChaCha20-Poly1305 under a 32-byte key, with a fresh random
//! nonce stored in front of the ciphertext. Wrapped keys and index values both use it.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

const NONCE_BYTES: usize = 24;

/// Why an envelope did not open: too short, altered, another key or other associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EnvelopeRefused;

/// `nonce ‖ ciphertext and tag` of `plaintext`, bound to `associated_data`.
pub(crate) fn seal(
    key: &[u8; 32],
    associated_data: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeRefused> {
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ciphertext = XChaCha20Poly1305::new(key.into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: associated_data,
            },
        )
        .map_err(|_| EnvelopeRefused)?;
    let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&ciphertext);
    Ok(sealed)
}

/// The plaintext of an envelope [`seal`] made with the same key and associated data.
pub(crate) fn open(
    key: &[u8; 32],
    associated_data: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, EnvelopeRefused> {
    if sealed.len() < NONCE_BYTES {
        return Err(EnvelopeRefused);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
    XChaCha20Poly1305::new(key.into())
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: associated_data,
            },
        )
        .map_err(|_| EnvelopeRefused)
}
