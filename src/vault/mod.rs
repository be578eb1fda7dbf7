//! The vault: the master key, the per-patient age identities it wraps, the blind-index key, and
//! payload encryption. Rotating the master re-wraps keys, never payloads; destroying a patient key
//! crypto-shreds that patient's data.

pub mod blind_index;
mod envelope;
mod index_key;
pub mod master_key;

use std::collections::HashMap;
use std::io::Write;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sqlx::Row;
use zeroize::Zeroizing;

pub use blind_index::{BlindIndex, BlindIndexKey};
use index_key::IndexKey;
pub use master_key::{MasterKey, MasterKeyFile, MasterKeyProtector, protector_for};

use crate::storage::{Database, Engine, StorageError, now_micros};

/// The patient reference used for records that belong to no patient.
pub const NO_PATIENT: &str = "no-patient";

/// A patient's age recipient, with the patient's index key: encrypts payloads only that
/// patient's key opens.
#[derive(Debug, Clone)]
pub struct PatientRecipient {
    recipient: age::x25519::Recipient,
    index_key: Arc<IndexKey>,
}

/// An upper bound of the length of an age file to one X25519 recipient holding `plaintext_length`
/// bytes: its header (under 512 bytes: the version line, the X25519 stanza, a random "grease"
/// stanza of at most about 210 bytes and the MAC line), the payload nonce (16) and a 16-byte tag
/// for each 64 KiB chunk (one chunk at least).
fn age_file_length(plaintext_length: usize) -> usize {
    const HEADER_AT_MOST: usize = 512;
    const PAYLOAD_NONCE: usize = 16;
    const CHUNK: usize = 64 * 1024;
    const TAG: usize = 16;
    HEADER_AT_MOST + PAYLOAD_NONCE + (plaintext_length / CHUNK + 1) * TAG + plaintext_length
}

impl PatientRecipient {
    /// The public half of a patient's key pair.
    fn of(key_pair: &PatientKeyPair) -> Self {
        Self {
            recipient: key_pair.recipient.clone(),
            index_key: Arc::clone(&key_pair.index_key),
        }
    }
}

/// A patient's unwrapped identity with what derives from it (its recipient and index key),
/// cached together so that a write to a patient does no X25519 multiplication to find them.
struct PatientKeyPair {
    identity: age::x25519::Identity,
    recipient: age::x25519::Recipient,
    index_key: Arc<IndexKey>,
}

impl PatientKeyPair {
    /// The key pair of an unwrapped identity in age's text form (`AGE-SECRET-KEY-1…`).
    fn from_secret_text(secret_text: &[u8], patient_ref: &str) -> Result<Self, VaultError> {
        let text = std::str::from_utf8(secret_text).map_err(|_| VaultError::WrappedKeyInvalid)?;
        let identity =
            age::x25519::Identity::from_str(text).map_err(|_| VaultError::WrappedKeyInvalid)?;
        Ok(Self {
            recipient: identity.to_public(),
            index_key: Arc::new(IndexKey::derive(secret_text, patient_ref)),
            identity,
        })
    }

    fn decrypt_age_file(&self, ciphertext: &[u8]) -> Result<Vec<u8>, VaultError> {
        age::decrypt(&self.identity, ciphertext)
            .map_err(|error| VaultError::Payload(error.to_string()))
    }

    /// Opens an index value: one [`PatientRecipient::seal_for_index`] sealed, or one stored as
    /// an age file before index keys existed.
    fn open_index_value(&self, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        if index_key::is_sealed(sealed) {
            return self.index_key.open(sealed);
        }
        self.decrypt_age_file(sealed)
    }
}

/// The patient keys one read (a query, a retrieval listing, a derivation) opens values with.
/// Each patient's key is looked up, and whether the patient was shredded checked, once per read
/// instead of once per value: a study of 10 000 instances is one lookup, not 10 000. A patient
/// shredded while the read runs is still read until the read ends (the keyring holds the key
/// pair until it is dropped); the next read sees the shred. Writes do not need one: the
/// `refuse_records_of_shredded_patients` trigger checks them.
pub struct PatientKeyring<'vault> {
    vault: &'vault Vault,
    /// Each patient looked up so far: its key pair, or `None` when it was shredded.
    looked_up: HashMap<String, Option<Arc<PatientKeyPair>>>,
}

/// One patient's key pair, taken from a [`PatientKeyring`] for work that outlives the read that
/// looked it up (a retrieval streamed after its listing): opens what the keyring opens, with no
/// further lookup. Held only as long as that work runs.
#[derive(Clone)]
pub struct PatientOpener(Arc<PatientKeyPair>);

impl PatientOpener {
    /// Opens an index value sealed to the patient (see [`Vault::open_index_value`]).
    pub fn open_index_value(&self, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        self.0.open_index_value(sealed)
    }

    /// Decrypts a payload (an age file) with the patient's identity.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, VaultError> {
        self.0.decrypt_age_file(ciphertext)
    }
}

impl std::fmt::Debug for PatientOpener {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("PatientOpener")
    }
}

impl std::fmt::Debug for PatientKeyring<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PatientKeyring")
            .field("patients", &self.looked_up.len())
            .finish_non_exhaustive()
    }
}

impl PatientKeyring<'_> {
    /// Opens an index value sealed to the patient (see [`Vault::open_index_value`]).
    pub async fn open_index_value(
        &mut self,
        patient_ref: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        self.key_pair(patient_ref).await?.open_index_value(sealed)
    }

    /// The patient's key for work that outlives this read (see [`PatientOpener`]).
    pub async fn opener(&mut self, patient_ref: &str) -> Result<PatientOpener, VaultError> {
        Ok(PatientOpener(self.key_pair(patient_ref).await?))
    }

    /// Decrypts a payload (an age file) with the patient's identity (see
    /// [`Vault::decrypt_for_patient`]).
    pub async fn decrypt(
        &mut self,
        patient_ref: &str,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        self.key_pair(patient_ref)
            .await?
            .decrypt_age_file(ciphertext)
    }

    async fn key_pair(&mut self, patient_ref: &str) -> Result<Arc<PatientKeyPair>, VaultError> {
        if let Some(looked_up) = self.looked_up.get(patient_ref) {
            return looked_up.clone().ok_or(VaultError::PatientShredded);
        }
        match self.vault.patient_key_pair(patient_ref, false).await {
            Ok(key_pair) => {
                self.looked_up
                    .insert(patient_ref.to_owned(), Some(Arc::clone(&key_pair)));
                Ok(key_pair)
            }
            Err(VaultError::PatientShredded) => {
                self.looked_up.insert(patient_ref.to_owned(), None);
                Err(VaultError::PatientShredded)
            }
            Err(error) => Err(error),
        }
    }
}

impl PatientRecipient {
    /// Encrypts a payload to the patient (a fresh age file each time): for record bodies and
    /// blobs, which `patient export-key` and the `age` CLI can open.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        let crypto_error = |error: &dyn std::fmt::Display| VaultError::Crypto(error.to_string());
        let encryptor = age::Encryptor::with_recipients(std::iter::once(
            &self.recipient as &dyn age::Recipient,
        ))
        .map_err(|error| crypto_error(&error))?;
        // Sized for the whole file up front: `age::encrypt` reserves only the plaintext's
        // length, and growing the vector at the end copied every C-STORE's ciphertext once more.
        let mut ciphertext = Vec::with_capacity(age_file_length(plaintext.len()));
        let mut writer = encryptor
            .wrap_output(&mut ciphertext)
            .map_err(|error| crypto_error(&error))?;
        writer
            .write_all(plaintext)
            .map_err(|error| crypto_error(&error))?;
        writer.finish().map_err(|error| crypto_error(&error))?;
        Ok(ciphertext)
    }

    /// Seals a value only the appliance reads back (an index copy of data the record itself
    /// holds) with the patient's index key: no X25519 agreement, shredded with the patient.
    /// [`Vault::open_index_value`] opens it.
    pub fn seal_for_index(&self, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        self.index_key.seal(plaintext)
    }
}

/// Errors of the vault. Messages never contain key material or PHI.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("cannot access key file {path}: {source}")]
    KeyFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the master key file is corrupt: {0}")]
    CorruptMasterKeyFile(String),
    #[error("wrong master passphrase: the master key file cannot be unsealed with it")]
    WrongPassphrase,
    #[error(
        "the master key file is passphrase-protected: set GLASTONBURY_MASTER_PASSPHRASE (or _FILE)"
    )]
    PassphraseRequired,
    #[error(
        "a master passphrase is set but the master key file is an evaluation key file without one"
    )]
    MasterKeyNotPassphraseProtected,
    #[error(
        "the master key does not belong to this database (key id mismatch): wrong data dir or key file"
    )]
    MasterKeyMismatch,
    #[error("the database has a vault but the master key file is missing: {0}")]
    MissingMasterKeyFile(std::path::PathBuf),
    #[error("the patient's key was destroyed: their data is shredded")]
    PatientShredded,
    #[error("no key exists for this patient")]
    UnknownPatient,
    #[error(
        "a wrapped key failed authentication: the key store was altered or belongs to another master key"
    )]
    WrappedKeyInvalid,
    #[error("encrypted payload cannot be decrypted: {0}")]
    Payload(String),
    #[error("encryption failed: {0}")]
    Crypto(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<sqlx::Error> for VaultError {
    fn from(error: sqlx::Error) -> Self {
        Self::Storage(StorageError::from(error))
    }
}

/// A wrapped secret as stored: nonce ‖ XChaCha20-Poly1305 ciphertext, bound to its purpose.
fn wrap(master: &MasterKey, associated_data: &[u8], secret: &[u8]) -> Result<Vec<u8>, VaultError> {
    envelope::seal(master.bytes(), associated_data, secret)
        .map_err(|_| VaultError::Crypto("key wrap failed".to_owned()))
}

fn unwrap(
    master: &MasterKey,
    associated_data: &[u8],
    wrapped: &[u8],
) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    envelope::open(master.bytes(), associated_data, wrapped)
        .map(Zeroizing::new)
        .map_err(|_| VaultError::WrappedKeyInvalid)
}

/// An identifier of a master key that reveals nothing about it.
fn master_key_id(master: &MasterKey) -> String {
    use hmac::Mac;
    let mut mac = match <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(master.bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(b"glastonbury master key id v1");
    hex::encode(&mac.finalize().into_bytes()[..12])
}

fn patient_key_associated_data(patient_ref: &str) -> Vec<u8> {
    format!("glastonbury patient key v1\0{patient_ref}").into_bytes()
}

const BLIND_INDEX_SECRET: &str = "blind-index";
const AUDIT_SIGNING_SECRET: &str = "audit-signing";
const TOKEN_SIGNING_SECRET: &str = "token-signing";
const DEIDENTIFICATION_SECRET: &str = "dicom-deidentification";

fn secret_associated_data(name: &str) -> Vec<u8> {
    format!("glastonbury vault secret v1\0{name}").into_bytes()
}

/// What opening a vault found or created, for the start-up message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultOpening {
    Created,
    Opened,
}

/// The key hierarchy of one appliance.
pub struct Vault {
    database: Database,
    key_file: MasterKeyFile,
    protector: Box<dyn MasterKeyProtector>,
    master: RwLock<Arc<MasterKey>>,
    blind_index: BlindIndex,
    identities: Mutex<HashMap<String, Arc<PatientKeyPair>>>,
    deidentification: glastonbury_dicom::deidentify::DeidentificationKey,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Vault")
            .field("protector", &self.protector.describe())
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens the vault of a migrated database, creating the master key and vault secrets on
    /// first start. Refuses to create a new master key for a database that already has a vault.
    pub async fn open_or_create(
        database: Database,
        key_file: MasterKeyFile,
        protector: Box<dyn MasterKeyProtector>,
    ) -> Result<(Self, VaultOpening), VaultError> {
        let stored_id: Option<String> =
            sqlx::query("SELECT master_key_id FROM vault_meta WHERE id = 1")
                .fetch_optional(database.pool())
                .await?
                .map(|row| row.try_get::<String, _>(0))
                .transpose()?;
        let (master, opening) = match stored_id {
            None => (
                Self::create_master(&database, &key_file, protector.as_ref()).await?,
                VaultOpening::Created,
            ),
            Some(stored_id) => (
                Self::load_master(&key_file, protector.as_ref(), &stored_id)?,
                VaultOpening::Opened,
            ),
        };
        let blind_index_key =
            Self::load_or_create_secret(&database, &master, BLIND_INDEX_SECRET).await?;
        let blind_index = BlindIndex::new(BlindIndexKey(*blind_index_key));
        let deidentification_seed =
            Self::load_or_create_secret(&database, &master, DEIDENTIFICATION_SECRET).await?;
        let vault = Self {
            database,
            key_file,
            protector,
            master: RwLock::new(Arc::new(master)),
            blind_index,
            identities: Mutex::new(HashMap::new()),
            deidentification: glastonbury_dicom::deidentify::DeidentificationKey::new(
                *deidentification_seed,
            ),
        };
        Ok((vault, opening))
    }

    async fn create_master(
        database: &Database,
        key_file: &MasterKeyFile,
        protector: &dyn MasterKeyProtector,
    ) -> Result<MasterKey, VaultError> {
        if key_file.exists() {
            // A key file without a vault row: a previous init stopped half-way. Reuse the key.
            let master = protector.unseal(&key_file.read_current()?)?;
            Self::record_master(database, &master).await?;
            return Ok(master);
        }
        let master = MasterKey::generate();
        key_file.create(&protector.seal(&master)?)?;
        Self::record_master(database, &master).await?;
        Ok(master)
    }

    async fn record_master(database: &Database, master: &MasterKey) -> Result<(), VaultError> {
        sqlx::query("INSERT INTO vault_meta (id, master_key_id, created_at) VALUES (1, $1, $2)")
            .bind(master_key_id(master))
            .bind(now_micros())
            .execute(database.pool())
            .await?;
        Ok(())
    }

    /// Loads the master key matching the database, finishing a rotation that stopped between
    /// its database commit and the key-file rename.
    fn load_master(
        key_file: &MasterKeyFile,
        protector: &dyn MasterKeyProtector,
        stored_id: &str,
    ) -> Result<MasterKey, VaultError> {
        if !key_file.exists() {
            if key_file.read_next().is_none() {
                return Err(VaultError::MissingMasterKeyFile(key_file.current.clone()));
            }
        } else {
            let current = protector.unseal(&key_file.read_current()?)?;
            if master_key_id(&current) == stored_id {
                key_file.discard_next();
                return Ok(current);
            }
        }
        let Some(next_sealed) = key_file.read_next() else {
            return Err(VaultError::MasterKeyMismatch);
        };
        let next = protector.unseal(&next_sealed)?;
        if master_key_id(&next) != stored_id {
            return Err(VaultError::MasterKeyMismatch);
        }
        key_file.promote_next()?;
        Ok(next)
    }

    async fn load_or_create_secret(
        database: &Database,
        master: &MasterKey,
        name: &str,
    ) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let associated_data = secret_associated_data(name);
        let existing = sqlx::query("SELECT wrapped FROM vault_secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(database.pool())
            .await?;
        if existing.is_none() {
            let mut fresh = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(fresh.as_mut());
            sqlx::query("INSERT INTO vault_secrets (name, wrapped) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .bind(wrap(master, &associated_data, fresh.as_ref())?)
                .execute(database.pool())
                .await?;
        }
        let row = sqlx::query("SELECT wrapped FROM vault_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(database.pool())
            .await?;
        let wrapped: Vec<u8> = row.try_get(0)?;
        let plain = unwrap(master, &associated_data, &wrapped)?;
        let array: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::WrappedKeyInvalid)?;
        Ok(Zeroizing::new(array))
    }

    /// The secret seed of one generation (1, 2, …) of the audit checkpoint signer, created on
    /// first use. Old generations stay so their public keys keep verifying old checkpoints.
    pub async fn audit_signing_seed(
        &self,
        generation: u32,
    ) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let master = self.current_master();
        let name = match generation {
            0 | 1 => AUDIT_SIGNING_SECRET.to_owned(),
            later => format!("{AUDIT_SIGNING_SECRET}-{later}"),
        };
        Self::load_or_create_secret(&self.database, &master, &name).await
    }

    /// The secret seed of one generation (1, 2, …) of the access-token signer, created on
    /// first use.
    pub async fn token_signing_seed(
        &self,
        generation: u32,
    ) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let master = self.current_master();
        let name = match generation {
            0 | 1 => TOKEN_SIGNING_SECRET.to_owned(),
            later => format!("{TOKEN_SIGNING_SECRET}-{later}"),
        };
        Self::load_or_create_secret(&self.database, &master, &name).await
    }

    /// The key DICOM de-identification remaps UIDs and shifts dates under (created on first
    /// use), so the same original maps the same way in every de-identified instance.
    pub fn deidentification_key(&self) -> &glastonbury_dicom::deidentify::DeidentificationKey {
        &self.deidentification
    }

    pub fn protector(&self) -> &dyn MasterKeyProtector {
        self.protector.as_ref()
    }

    pub fn blind_index(&self) -> &BlindIndex {
        &self.blind_index
    }

    /// The pseudonymous reference of a patient: what keys, index rows and audit leaves carry.
    pub fn patient_ref(&self, patient_id: Option<&str>) -> String {
        match patient_id {
            Some(id) => self.blind_index.pseudonym("patient", id),
            None => NO_PATIENT.to_owned(),
        }
    }

    fn current_master(&self) -> Arc<MasterKey> {
        match self.master.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Encrypts a payload to the patient's age recipient, creating the patient key if needed.
    pub async fn encrypt_for_patient(
        &self,
        patient_ref: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        let key_pair = self.patient_key_pair(patient_ref, true).await?;
        PatientRecipient::of(&key_pair).encrypt(plaintext)
    }

    /// The patient's age recipient (creating the patient key if needed), for a writer of a
    /// `records` row that encrypts several payloads of it.
    ///
    /// A key this process already holds is used without asking the database whether the patient
    /// was shredded since: the `refuse_records_of_shredded_patients` trigger (migration 0010)
    /// refuses the row inside the writing transaction, so nothing encrypted here can land for a
    /// shredded patient. Payloads that do not go into a `records` row use
    /// [`Vault::encrypt_for_patient`], which always checks.
    pub async fn patient_recipient(
        &self,
        patient_ref: &str,
    ) -> Result<PatientRecipient, VaultError> {
        if let Some(key_pair) = self.cached(patient_ref) {
            return Ok(PatientRecipient::of(&key_pair));
        }
        let key_pair = self.patient_key_pair(patient_ref, true).await?;
        Ok(PatientRecipient::of(&key_pair))
    }

    /// Decrypts a payload (an age file) with the patient's identity.
    pub async fn decrypt_for_patient(
        &self,
        patient_ref: &str,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        let key_pair = self.patient_key_pair(patient_ref, false).await?;
        key_pair.decrypt_age_file(ciphertext)
    }

    /// Opens an index value: one [`PatientRecipient::seal_for_index`] sealed, or one stored as an
    /// age file before index keys existed.
    pub async fn open_index_value(
        &self,
        patient_ref: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        let key_pair = self.patient_key_pair(patient_ref, false).await?;
        key_pair.open_index_value(sealed)
    }

    /// A keyring for one read that opens many values, of one patient or a few.
    pub fn keyring(&self) -> PatientKeyring<'_> {
        PatientKeyring {
            vault: self,
            looked_up: HashMap::new(),
        }
    }

    /// The patient's identity in age's text form (`AGE-SECRET-KEY-1…`), for the audited
    /// `patient export-key` command, so the standard `age` CLI can decrypt their blobs.
    pub async fn export_patient_identity(
        &self,
        patient_ref: &str,
    ) -> Result<SecretString, VaultError> {
        let key_pair = self.patient_key_pair(patient_ref, false).await?;
        Ok(key_pair.identity.to_string())
    }

    async fn patient_key_pair(
        &self,
        patient_ref: &str,
        create: bool,
    ) -> Result<Arc<PatientKeyPair>, VaultError> {
        let row = sqlx::query(
            "SELECT wrapped_identity, shredded_at FROM patient_keys WHERE patient_ref = $1",
        )
        .bind(patient_ref)
        .fetch_optional(self.database.pool())
        .await?;
        let Some(row) = row else {
            if !create {
                return Err(VaultError::UnknownPatient);
            }
            self.create_patient_key(patient_ref).await?;
            return Box::pin(self.patient_key_pair(patient_ref, false)).await;
        };
        let wrapped: Option<Vec<u8>> = row.try_get(0)?;
        let shredded_at: Option<i64> = row.try_get(1)?;
        let Some(wrapped) = wrapped.filter(|_| shredded_at.is_none()) else {
            self.forget_cached(patient_ref);
            return Err(VaultError::PatientShredded);
        };
        if let Some(cached) = self.cached(patient_ref) {
            return Ok(cached);
        }
        let key_pair = Arc::new(self.unwrap_patient_key_pair(patient_ref, &wrapped)?);
        if let Ok(mut cache) = self.identities.lock() {
            cache.insert(patient_ref.to_owned(), Arc::clone(&key_pair));
        }
        Ok(key_pair)
    }

    fn unwrap_patient_key_pair(
        &self,
        patient_ref: &str,
        wrapped: &[u8],
    ) -> Result<PatientKeyPair, VaultError> {
        let associated_data = patient_key_associated_data(patient_ref);
        let plain = match unwrap(&self.current_master(), &associated_data, wrapped) {
            Ok(plain) => plain,
            Err(_) => {
                // The master may have been rotated by `keys rotate` while this process ran.
                self.reload_master()?;
                unwrap(&self.current_master(), &associated_data, wrapped)?
            }
        };
        PatientKeyPair::from_secret_text(&plain, patient_ref)
    }

    fn reload_master(&self) -> Result<(), VaultError> {
        let sealed = self.key_file.read_current()?;
        let master = self.protector.unseal(&sealed)?;
        if let Ok(mut guard) = self.master.write() {
            *guard = Arc::new(master);
        }
        Ok(())
    }

    fn cached(&self, patient_ref: &str) -> Option<Arc<PatientKeyPair>> {
        self.identities.lock().ok()?.get(patient_ref).cloned()
    }

    fn forget_cached(&self, patient_ref: &str) {
        if let Ok(mut cache) = self.identities.lock() {
            cache.remove(patient_ref);
        }
    }

    async fn create_patient_key(&self, patient_ref: &str) -> Result<(), VaultError> {
        let identity = age::x25519::Identity::generate();
        let secret = identity.to_string();
        let master = self.current_master();
        let wrapped = wrap(
            &master,
            &patient_key_associated_data(patient_ref),
            secret.expose_secret().as_bytes(),
        )?;
        // The insert only lands while the master it was wrapped with is still the current one.
        let guard = match self.database.engine() {
            Engine::Postgres => {
                "SELECT 1 FROM vault_meta WHERE id = 1 AND master_key_id = $4 FOR SHARE"
            }
            Engine::Sqlite => "SELECT 1 FROM vault_meta WHERE id = 1 AND master_key_id = $4",
        };
        let statement = format!(
            "INSERT INTO patient_keys (patient_ref, wrapped_identity, created_at) \
             SELECT $1, $2, $3 WHERE EXISTS ({guard}) ON CONFLICT (patient_ref) DO NOTHING"
        );
        let result = sqlx::query(&statement)
            .bind(patient_ref)
            .bind(wrapped)
            .bind(now_micros())
            .bind(master_key_id(&master))
            .execute(self.database.pool())
            .await?;
        if result.rows_affected() == 0 {
            // Either another request created it, or the master was rotated meanwhile.
            let exists = sqlx::query("SELECT 1 FROM patient_keys WHERE patient_ref = $1")
                .bind(patient_ref)
                .fetch_optional(self.database.pool())
                .await?
                .is_some();
            if !exists {
                self.reload_master()?;
                return Box::pin(self.create_patient_key(patient_ref)).await;
            }
        }
        Ok(())
    }

    /// Destroys a patient's key. Returns false when there was no key to destroy.
    pub async fn shred_patient(&self, patient_ref: &str) -> Result<bool, VaultError> {
        let result = sqlx::query(
            "UPDATE patient_keys SET wrapped_identity = NULL, shredded_at = $1 \
             WHERE patient_ref = $2 AND wrapped_identity IS NOT NULL",
        )
        .bind(now_micros())
        .bind(patient_ref)
        .execute(self.database.pool())
        .await?;
        self.forget_cached(patient_ref);
        self.database.reclaim_deleted_space().await?;
        Ok(result.rows_affected() > 0)
    }

    /// Generates a new master key and re-wraps every patient key and vault secret under it in one
    /// transaction; payloads are untouched. Crash-safe: the new key is staged on disk first.
    pub async fn rotate_master(&self) -> Result<RotationSummary, VaultError> {
        let old = self.current_master();
        let new = MasterKey::generate();
        self.key_file.stage_next(&self.protector.seal(&new)?)?;
        let summary = match self.rewrap_everything(&old, &new).await {
            Ok(summary) => summary,
            Err(error) => {
                self.key_file.discard_next();
                return Err(error);
            }
        };
        self.key_file.promote_next()?;
        if let Ok(mut guard) = self.master.write() {
            *guard = Arc::new(new);
        }
        Ok(summary)
    }

    async fn rewrap_everything(
        &self,
        old: &MasterKey,
        new: &MasterKey,
    ) -> Result<RotationSummary, VaultError> {
        let mut transaction = self.database.pool().begin().await?;
        let locked = sqlx::query("UPDATE vault_meta SET master_key_id = $1, rotated_at = $2 WHERE id = 1 AND master_key_id = $3")
            .bind(master_key_id(new))
            .bind(now_micros())
            .bind(master_key_id(old))
            .execute(&mut *transaction)
            .await?;
        if locked.rows_affected() != 1 {
            return Err(VaultError::MasterKeyMismatch);
        }
        let rows = sqlx::query("SELECT patient_ref, wrapped_identity FROM patient_keys WHERE wrapped_identity IS NOT NULL")
            .fetch_all(&mut *transaction)
            .await?;
        let mut patient_keys = 0u64;
        for row in rows {
            let patient_ref: String = row.try_get(0)?;
            let wrapped: Vec<u8> = row.try_get(1)?;
            let associated_data = patient_key_associated_data(&patient_ref);
            let plain = unwrap(old, &associated_data, &wrapped)?;
            sqlx::query("UPDATE patient_keys SET wrapped_identity = $1 WHERE patient_ref = $2")
                .bind(wrap(new, &associated_data, &plain)?)
                .bind(&patient_ref)
                .execute(&mut *transaction)
                .await?;
            patient_keys += 1;
        }
        let secrets = sqlx::query("SELECT name, wrapped FROM vault_secrets")
            .fetch_all(&mut *transaction)
            .await?;
        let mut vault_secrets = 0u64;
        for row in secrets {
            let name: String = row.try_get(0)?;
            let wrapped: Vec<u8> = row.try_get(1)?;
            let associated_data = secret_associated_data(&name);
            let plain = unwrap(old, &associated_data, &wrapped)?;
            sqlx::query("UPDATE vault_secrets SET wrapped = $1 WHERE name = $2")
                .bind(wrap(new, &associated_data, &plain)?)
                .bind(&name)
                .execute(&mut *transaction)
                .await?;
            vault_secrets += 1;
        }
        transaction.commit().await?;
        Ok(RotationSummary {
            patient_keys,
            vault_secrets,
        })
    }
}

/// What a master-key rotation re-wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RotationSummary {
    pub patient_keys: u64,
    pub vault_secrets: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_sealed_into_room_reserved_for_it_and_opens_again() {
        let identity = age::x25519::Identity::generate();
        let recipient = PatientRecipient {
            recipient: identity.to_public(),
            index_key: Arc::new(IndexKey::derive(b"test identity", "patient")),
        };
        for length in [0, 1, 40_000, 64 * 1024, 64 * 1024 + 1, 300_000] {
            let plaintext: Vec<u8> = (0..length).map(|byte| (byte % 251) as u8).collect();
            let ciphertext = recipient.encrypt(&plaintext).unwrap();
            assert!(
                ciphertext.len() <= age_file_length(length),
                "{length} bytes became {}",
                ciphertext.len()
            );
            assert_eq!(age::decrypt(&identity, &ciphertext).unwrap(), plaintext);
        }
    }
}
