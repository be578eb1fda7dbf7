//! PHI-bearing audit detail (query text, free text): sealed to the patient's key with a hiding
//! commitment in the leaf, so the leaf verifies forever and the text dies with the key.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use glastonbury_audit::{DetailCommitment, DetailNonce, SealedDetail};
use zeroize::Zeroizing;

use super::JournalError;
use crate::vault::{Vault, VaultError};

/// Seals `plaintext` for `patient_ref`: age ciphertext of nonce ‖ plaintext, plus the commitment.
pub async fn seal(
    vault: &Vault,
    patient_ref: &str,
    plaintext: &[u8],
) -> Result<SealedDetail, JournalError> {
    let (commitment, nonce) = DetailCommitment::make(plaintext);
    let mut sealed = Zeroizing::new(Vec::with_capacity(32 + plaintext.len()));
    sealed.extend_from_slice(nonce.as_bytes());
    sealed.extend_from_slice(plaintext);
    let ciphertext = vault.encrypt_for_patient(patient_ref, &sealed).await?;
    Ok(SealedDetail {
        ciphertext: BASE64.encode(ciphertext),
        commitment: commitment.to_base64(),
        key_id: Some(patient_ref.to_owned()),
    })
}

/// Opens a sealed detail for a compliance officer; `None` once the patient was crypto-shredded.
pub async fn open(
    vault: &Vault,
    detail: &SealedDetail,
) -> Result<Option<(DetailNonce, Vec<u8>)>, JournalError> {
    let Some(patient_ref) = detail.key_id.as_deref() else {
        return Ok(None);
    };
    let damaged = || JournalError::Damaged("sealed audit detail is malformed".to_owned());
    let ciphertext = BASE64.decode(&detail.ciphertext).map_err(|_| damaged())?;
    let sealed = match vault.decrypt_for_patient(patient_ref, &ciphertext).await {
        Ok(sealed) => Zeroizing::new(sealed),
        Err(VaultError::PatientShredded | VaultError::UnknownPatient) => return Ok(None),
        Err(other) => return Err(other.into()),
    };
    if sealed.len() < 32 {
        return Err(damaged());
    }
    let (nonce_bytes, plaintext) = sealed.split_at(32);
    let nonce = DetailNonce::from_bytes(nonce_bytes.try_into().map_err(|_| damaged())?);
    let commitment = DetailCommitment::from_base64(&detail.commitment).map_err(|_| damaged())?;
    commitment.check(&nonce, plaintext).map_err(|_| {
        JournalError::Damaged("sealed audit detail does not match its commitment".to_owned())
    })?;
    Ok(Some((nonce, plaintext.to_vec())))
}
