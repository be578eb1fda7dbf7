//! API clients: registration (role, scopes, secret shown once) and secret checks in constant time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::access::{Role, Scope};
use crate::storage::{Database, StorageError, now_micros};

/// What `clients create` asks for.
#[derive(Debug, Clone)]
pub struct NewClient {
    pub name: String,
    pub role: Role,
    pub scopes: Vec<Scope>,
    /// The DICOM AE title this client calls from, when it is a DICOM peer (unique).
    pub ae_title: Option<String>,
}

/// A registered client as the token endpoint sees it.
#[derive(Debug, Clone)]
pub struct ClientRegistration {
    pub client_id: String,
    pub name: String,
    pub role: Role,
    pub scopes: Vec<Scope>,
}

/// The client registry.
#[derive(Debug, Clone)]
pub struct Clients {
    database: Database,
    ae_titles: Arc<RegisteredAeTitles>,
}

/// The most clients whose AE title is remembered; past it the memory starts over (a miss only
/// costs the query it saves).
const MAX_REMEMBERED_AE_TITLES: usize = 4096;

/// The AE titles of registered clients, remembered after the first lookup: a client's AE title
/// is fixed when it is registered (no command changes it, and its id is never reused), so a
/// remembered answer cannot go stale, on any replica. Clients not found are not remembered.
/// A command that one day changes a registered AE title must make every replica forget.
#[derive(Debug, Default)]
struct RegisteredAeTitles {
    by_client: Mutex<HashMap<String, Option<String>>>,
}

impl RegisteredAeTitles {
    fn recall(&self, client_id: &str) -> Option<Option<String>> {
        self.lock().get(client_id).cloned()
    }

    fn remember(&self, client_id: &str, ae_title: Option<String>) {
        let mut remembered = self.lock();
        if remembered.len() >= MAX_REMEMBERED_AE_TITLES {
            remembered.clear();
        }
        remembered.insert(client_id.to_owned(), ae_title);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.by_client
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Client secrets are 256 random bits, so one SHA-256 is enough to store them: there is nothing
/// to brute-force (unlike passwords, which would need a slow hash).
fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// How a client proves itself, as stored: never a secret, only its hash or public keys.
enum StoredCredential<'a> {
    SecretHash(Vec<u8>),
    Jwks(&'a str),
    JwksUrl(&'a str),
}

/// A registration from a row whose first three columns are name, role and scopes; `None` when
/// the stored role is unknown (a client from a newer version is refused, not guessed at).
fn registration_from_row(
    client_id: &str,
    row: &sqlx::any::AnyRow,
) -> Result<Option<ClientRegistration>, StorageError> {
    let role_text: String = row.try_get(1)?;
    let scopes_text: String = row.try_get(2)?;
    let Ok(role) = role_text.parse() else {
        return Ok(None);
    };
    Ok(Some(ClientRegistration {
        client_id: client_id.to_owned(),
        name: row.try_get(0)?,
        role,
        scopes: scopes_text
            .split_whitespace()
            .filter_map(|text| text.parse().ok())
            .collect(),
    }))
}

impl Clients {
    pub fn new(database: Database) -> Self {
        Self {
            database,
            ae_titles: Arc::default(),
        }
    }

    /// Registers a client with a fresh secret; the secret is returned once and stored hashed.
    pub async fn create_with_secret(
        &self,
        client: &NewClient,
    ) -> Result<(String, SecretString), StorageError> {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        // Hex, so a secret never starts with `-` and never needs quoting in a shell.
        let secret = SecretString::from(hex::encode(bytes.as_ref()));
        let credential = StoredCredential::SecretHash(hash_secret(secret.expose_secret()));
        let client_id = self.insert(client, credential).await?;
        Ok((client_id, secret))
    }

    /// Registers a client that authenticates with `private_key_jwt` against `jwks` (public keys
    /// only; validated by [`super::assertions::validate_client_jwks`] first).
    pub async fn create_with_jwks(
        &self,
        client: &NewClient,
        jwks: &str,
    ) -> Result<String, StorageError> {
        self.insert(client, StoredCredential::Jwks(jwks)).await
    }

    /// Registers a client that authenticates with `private_key_jwt` against the keys published
    /// at `jwks_url` (checked with [`super::assertions::validate_jwks_url`] first).
    pub async fn create_with_jwks_url(
        &self,
        client: &NewClient,
        jwks_url: &str,
    ) -> Result<String, StorageError> {
        self.insert(client, StoredCredential::JwksUrl(jwks_url))
            .await
    }

    async fn insert(
        &self,
        client: &NewClient,
        credential: StoredCredential<'_>,
    ) -> Result<String, StorageError> {
        let client_id = uuid::Uuid::new_v4().to_string();
        let scopes: Vec<&str> = client
            .scopes
            .iter()
            .map(|scope| scope.text.as_str())
            .collect();
        let (secret_sha256, jwks, jwks_url) = match credential {
            StoredCredential::SecretHash(hash) => (Some(hash), None, None),
            StoredCredential::Jwks(jwks) => (None, Some(jwks), None),
            StoredCredential::JwksUrl(url) => (None, None, Some(url)),
        };
        sqlx::query(
            "INSERT INTO clients (client_id, name, role, scopes, secret_sha256, jwks, jwks_url, created_at, ae_title) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&client_id)
        .bind(&client.name)
        .bind(client.role.as_str())
        .bind(scopes.join(" "))
        .bind(secret_sha256)
        .bind(jwks)
        .bind(jwks_url)
        .bind(now_micros())
        .bind(client.ae_title.clone())
        .execute(self.database.pool())
        .await?;
        Ok(client_id)
    }

    /// The registration of an enabled client, once it has authenticated by other means.
    pub async fn registration(
        &self,
        client_id: &str,
    ) -> Result<Option<ClientRegistration>, StorageError> {
        let row = sqlx::query(
            "SELECT name, role, scopes FROM clients WHERE client_id = $1 AND disabled_at IS NULL",
        )
        .bind(client_id)
        .fetch_optional(self.database.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        registration_from_row(client_id, &row)
    }

    /// The AE title a client calls from, when it is a DICOM peer (looked up once per client:
    /// see [`RegisteredAeTitles`]).
    pub async fn ae_title_of(&self, client_id: &str) -> Result<Option<String>, StorageError> {
        if let Some(ae_title) = self.ae_titles.recall(client_id) {
            return Ok(ae_title);
        }
        let row = sqlx::query("SELECT ae_title FROM clients WHERE client_id = $1")
            .bind(client_id)
            .fetch_optional(self.database.pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let ae_title: Option<String> = row.try_get(0)?;
        self.ae_titles.remember(client_id, ae_title.clone());
        Ok(ae_title)
    }

    /// The enabled DICOM peers by AE title: who may open a DIMSE association, and as whom.
    pub async fn dicom_peers(
        &self,
    ) -> Result<std::collections::HashMap<String, ClientRegistration>, StorageError> {
        let rows = sqlx::query(
            "SELECT name, role, scopes, client_id, ae_title FROM clients WHERE ae_title IS NOT NULL AND disabled_at IS NULL",
        )
        .fetch_all(self.database.pool())
        .await?;
        let mut peers = std::collections::HashMap::new();
        for row in rows {
            let client_id: String = row.try_get(3)?;
            let ae_title: String = row.try_get(4)?;
            if let Some(registration) = registration_from_row(&client_id, &row)? {
                peers.insert(ae_title, registration);
            }
        }
        Ok(peers)
    }

    /// Whether any client with this role exists (first start creates the first admin).
    pub async fn any_with_role(&self, role: Role) -> Result<bool, StorageError> {
        let row = sqlx::query("SELECT COUNT(*) FROM clients WHERE role = $1")
            .bind(role.as_str())
            .fetch_one(self.database.pool())
            .await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// Checks a client's secret in constant time. `None` for unknown clients and wrong secrets
    /// alike, so callers cannot tell which.
    pub async fn authenticate(
        &self,
        client_id: &str,
        secret: &str,
    ) -> Result<Option<ClientRegistration>, StorageError> {
        let row = sqlx::query(
            "SELECT name, role, scopes, secret_sha256 FROM clients WHERE client_id = $1 AND disabled_at IS NULL",
        )
        .bind(client_id)
        .fetch_optional(self.database.pool())
        .await?;
        let presented = hash_secret(secret);
        let Some(row) = row else {
            // Compare against a dummy so unknown ids take as long as wrong secrets.
            let _ = presented.ct_eq(&[0u8; 32]);
            return Ok(None);
        };
        let stored: Option<Vec<u8>> = row.try_get(3)?;
        let matches = stored.is_some_and(|stored| bool::from(stored.ct_eq(&presented)));
        if !matches {
            return Ok(None);
        }
        registration_from_row(client_id, &row)
    }
}
