//! The master key: 32 random bytes that wrap every patient key, and the protectors that keep it
//! sealed on disk (a passphrase through age's scrypt, or an evaluation-only plain file).

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::VaultError;

const EVALUATION_HEADER: &str = "GLASTONBURY-EVALUATION-MASTER-KEY-1";
const AGE_HEADER: &[u8] = b"age-encryption.org/v1";

/// The key-encryption key of the vault. Never printed, zeroed on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("MasterKey(********)")
    }
}

impl MasterKey {
    /// A fresh random master key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(array))
    }
}

/// Seals and unseals the master key for storage. The seam for KMS, PKCS#11 or Vault Transit:
/// implement this trait and choose it in [`protector_for`].
pub trait MasterKeyProtector: Send + Sync + std::fmt::Debug {
    /// A short description for the start-up message, never secret.
    fn describe(&self) -> &'static str;
    /// Whether this protection is only fit for evaluation.
    fn is_evaluation_only(&self) -> bool;
    fn seal(&self, key: &MasterKey) -> Result<Vec<u8>, VaultError>;
    fn unseal(&self, sealed: &[u8]) -> Result<MasterKey, VaultError>;
}

/// Protects the master key with a passphrase (age scrypt recipient).
#[derive(Debug)]
pub struct PassphraseProtector {
    passphrase: SecretString,
}

impl PassphraseProtector {
    pub fn new(passphrase: SecretString) -> Self {
        Self { passphrase }
    }
}

impl MasterKeyProtector for PassphraseProtector {
    fn describe(&self) -> &'static str {
        "passphrase (scrypt)"
    }

    fn is_evaluation_only(&self) -> bool {
        false
    }

    fn seal(&self, key: &MasterKey) -> Result<Vec<u8>, VaultError> {
        let recipient = age::scrypt::Recipient::new(self.passphrase.clone());
        age::encrypt(&recipient, key.bytes()).map_err(|error| VaultError::Crypto(error.to_string()))
    }

    fn unseal(&self, sealed: &[u8]) -> Result<MasterKey, VaultError> {
        if !sealed.starts_with(AGE_HEADER) {
            return Err(VaultError::MasterKeyNotPassphraseProtected);
        }
        let identity = age::scrypt::Identity::new(self.passphrase.clone());
        let plaintext = Zeroizing::new(age::decrypt(&identity, sealed).map_err(
            |error| match error {
                age::DecryptError::NoMatchingKeys | age::DecryptError::DecryptionFailed => {
                    VaultError::WrongPassphrase
                }
                other => VaultError::CorruptMasterKeyFile(other.to_string()),
            },
        )?);
        MasterKey::from_slice(&plaintext)
            .ok_or_else(|| VaultError::CorruptMasterKeyFile("unexpected key length".to_owned()))
    }
}

/// Keeps the master key in a plain 0600 file. For evaluation only; every start warns.
#[derive(Debug)]
pub struct EvaluationFileProtector;

impl MasterKeyProtector for EvaluationFileProtector {
    fn describe(&self) -> &'static str {
        "plain key file (evaluation only)"
    }

    fn is_evaluation_only(&self) -> bool {
        true
    }

    fn seal(&self, key: &MasterKey) -> Result<Vec<u8>, VaultError> {
        use base64::Engine as _;
        let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.bytes()));
        Ok(format!("{EVALUATION_HEADER}\n{}\n", encoded.as_str()).into_bytes())
    }

    fn unseal(&self, sealed: &[u8]) -> Result<MasterKey, VaultError> {
        use base64::Engine as _;
        if sealed.starts_with(AGE_HEADER) {
            return Err(VaultError::PassphraseRequired);
        }
        let text = std::str::from_utf8(sealed)
            .map_err(|_| VaultError::CorruptMasterKeyFile("not text".to_owned()))?;
        let mut lines = text.lines();
        if lines.next() != Some(EVALUATION_HEADER) {
            return Err(VaultError::CorruptMasterKeyFile(
                "unknown header".to_owned(),
            ));
        }
        let encoded = lines.next().unwrap_or_default().trim();
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| VaultError::CorruptMasterKeyFile("key is not base64".to_owned()))?,
        );
        MasterKey::from_slice(&bytes)
            .ok_or_else(|| VaultError::CorruptMasterKeyFile("unexpected key length".to_owned()))
    }
}

/// Chooses the protector for the configured settings.
pub fn protector_for(passphrase: Option<&SecretString>) -> Box<dyn MasterKeyProtector> {
    match passphrase {
        Some(passphrase) if !passphrase.expose_secret().is_empty() => {
            Box::new(PassphraseProtector::new(passphrase.clone()))
        }
        _ => Box::new(EvaluationFileProtector),
    }
}

/// Where the sealed master key lives: `<data dir>/keys/master.key`, plus `master.key.next`
/// while a rotation is in flight.
#[derive(Debug, Clone)]
pub struct MasterKeyFile {
    pub current: PathBuf,
    pub next: PathBuf,
}

impl MasterKeyFile {
    pub fn in_data_dir(data_dir: &Path) -> Self {
        let directory = data_dir.join("keys");
        Self {
            current: directory.join("master.key"),
            next: directory.join("master.key.next"),
        }
    }

    pub fn exists(&self) -> bool {
        self.current.exists()
    }

    pub fn read_current(&self) -> Result<Vec<u8>, VaultError> {
        std::fs::read(&self.current).map_err(|source| VaultError::KeyFile {
            path: self.current.clone(),
            source,
        })
    }

    pub fn read_next(&self) -> Option<Vec<u8>> {
        std::fs::read(&self.next).ok()
    }

    /// Writes `master.key` for a brand-new vault (fails if one exists).
    pub fn create(&self, sealed: &[u8]) -> Result<(), VaultError> {
        write_private_file(&self.current, sealed, true)
    }

    /// Writes `master.key.next` durably: the first step of a rotation.
    pub fn stage_next(&self, sealed: &[u8]) -> Result<(), VaultError> {
        write_private_file(&self.next, sealed, false)
    }

    /// Makes the staged key current: the last step of a rotation.
    pub fn promote_next(&self) -> Result<(), VaultError> {
        std::fs::rename(&self.next, &self.current).map_err(|source| VaultError::KeyFile {
            path: self.current.clone(),
            source,
        })?;
        sync_parent_directory(&self.current)
    }

    pub fn discard_next(&self) {
        let _ = std::fs::remove_file(&self.next);
    }
}

fn write_private_file(path: &Path, contents: &[u8], must_be_new: bool) -> Result<(), VaultError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io_error = |source| VaultError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_error)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if must_be_new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    let mut file = options.open(path).map_err(io_error)?;
    file.write_all(contents).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    sync_parent_directory(path)
}

fn sync_parent_directory(path: &Path) -> Result<(), VaultError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    std::fs::File::open(parent)
        .and_then(|directory| directory.sync_all())
        .map_err(|source| VaultError::KeyFile {
            path: parent.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_file_round_trips() {
        let key = MasterKey::generate();
        let sealed = EvaluationFileProtector.seal(&key).unwrap();
        assert_eq!(
            EvaluationFileProtector.unseal(&sealed).unwrap().bytes(),
            key.bytes()
        );
    }

    #[test]
    fn wrong_passphrase_is_reported() {
        let key = MasterKey::generate();
        let mut recipient_protector = PassphraseProtector::new(SecretString::from("right"));
        let sealed = recipient_protector.seal(&key).unwrap();
        recipient_protector = PassphraseProtector::new(SecretString::from("wrong"));
        assert!(matches!(
            recipient_protector.unseal(&sealed),
            Err(VaultError::WrongPassphrase)
        ));
        let right = PassphraseProtector::new(SecretString::from("right"));
        assert_eq!(right.unseal(&sealed).unwrap().bytes(), key.bytes());
    }

    #[test]
    fn debug_never_shows_the_key() {
        assert_eq!(
            format!("{:?}", MasterKey::generate()),
            "MasterKey(********)"
        );
    }
}
