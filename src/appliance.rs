//! One appliance: opens (or on first start creates) the database, vault, blob store and record
//! path from the settings, and says once what it created.

use std::sync::Arc;

use secrecy::SecretString;

use crate::access::deidentification::DeidentificationPolicies;
use crate::access::{Authorizer, PolicyError, PolicyStore, Role, Scope};
use crate::auth::{Clients, NewClient, TokenIssuer};
use crate::config::Settings;
use crate::journal::{CheckpointService, JournalError, JournalIdentity};
use crate::records::Records;
use crate::storage::{BlobError, BlobStore, Database, StorageError};
use crate::vault::master_key::MasterKeyFile;
use crate::vault::{Vault, VaultError, VaultOpening, protector_for};

/// Why the appliance could not start. One line each, no secrets.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path} is not usable: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    TokenKeys(#[from] crate::auth::token_keys::TokenKeyError),
    #[error(transparent)]
    Discovery(#[from] crate::auth::external::DiscoveryError),
}

/// The first administrator client, created on first start; its secret is shown once.
#[derive(Debug)]
pub struct FirstAdmin {
    pub client_id: String,
    pub client_secret: SecretString,
}

/// What the first start created, for the one-time message.
#[derive(Debug)]
pub struct Initialization {
    pub vault_created: bool,
    pub first_admin: Option<FirstAdmin>,
}

/// Everything a running appliance holds.
#[derive(Debug, Clone)]
pub struct Appliance {
    pub settings: Arc<Settings>,
    pub database: Database,
    pub blobs: BlobStore,
    pub vault: Arc<Vault>,
    pub records: Arc<Records>,
    pub clients: Clients,
    pub tokens: Arc<TokenIssuer>,
    pub checkpoints: Arc<CheckpointService>,
    pub policies: Arc<PolicyStore>,
    /// De-identification profiles and ingest sources (`deidentification.toml`).
    pub deidentification: Arc<DeidentificationPolicies>,
    /// When token keys were last reloaded because a token named an unknown key.
    pub token_key_reload: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// The hospital's OpenID provider, when `oidc_issuer` is set.
    pub external_issuer: Option<Arc<crate::auth::external::ExternalIssuer>>,
}

impl Appliance {
    /// Opens the appliance, initializing an empty data dir.
    pub async fn open(settings: Settings) -> Result<(Self, Initialization), StartError> {
        let policies = Arc::new(PolicyStore::load(settings.policies_dir.as_deref())?);
        let deidentification = Arc::new(DeidentificationPolicies::load(
            settings.policies_dir.as_deref(),
        )?);
        ensure_data_dir(&settings.data_dir)?;
        let database = Database::connect(&settings.database_url).await?;
        database.migrate().await?;
        let blobs = BlobStore::open(&settings.blob_url)?;
        let key_file = MasterKeyFile::in_data_dir(&settings.data_dir);
        let protector = protector_for(settings.master_passphrase.as_ref());
        let (vault, opening) = Vault::open_or_create(database.clone(), key_file, protector).await?;
        let vault = Arc::new(vault);
        let (_, token_seeds) = crate::auth::token_keys::token_seeds(&database, &vault).await?;
        let issuer = format!(
            "{}://{}",
            if settings.tls.is_some() {
                "https"
            } else {
                "http"
            },
            settings.http_addr
        );
        let tokens = Arc::new(TokenIssuer::with_keys(
            &token_seeds,
            issuer,
            settings.token_lifetime_seconds,
        ));
        let identity = JournalIdentity {
            appliance_id: settings.appliance_id.clone(),
        };
        let records = Arc::new(
            Records::new(
                database.clone(),
                blobs.clone(),
                Arc::clone(&vault),
                identity,
                Authorizer::new(Arc::clone(&policies)),
                Arc::clone(&deidentification),
            )
            .with_export_expiry(settings.bulk_export_expiry_seconds),
        );
        let checkpoints = Arc::new(
            CheckpointService::open(database.clone(), Arc::clone(&vault), &settings.appliance_id)
                .await?,
        );
        let external_issuer = match &settings.oidc_issuer {
            Some(issuer) => {
                let audience = settings
                    .oidc_audience
                    .clone()
                    .unwrap_or_else(|| tokens.issuer().to_owned());
                Some(Arc::new(
                    crate::auth::external::ExternalIssuer::discover(
                        issuer,
                        &audience,
                        &settings.oidc_role_claim,
                    )
                    .await?,
                ))
            }
            None => None,
        };
        let clients = Clients::new(database.clone());
        let first_admin = create_first_admin(&clients).await?;
        let appliance = Self {
            settings: Arc::new(settings),
            database,
            blobs,
            vault,
            records,
            clients,
            tokens,
            checkpoints,
            policies,
            deidentification,
            token_key_reload: Arc::new(std::sync::Mutex::new(None)),
            external_issuer,
        };
        Ok((
            appliance,
            Initialization {
                vault_created: opening == VaultOpening::Created,
                first_admin,
            },
        ))
    }

    /// Re-reads the token keys when a token names an unknown key, at most every 5 seconds (a
    /// key rotated by another replica is picked up at once, forged kids cause no storm).
    pub async fn reload_token_keys_if_due(&self) {
        {
            let mut last = self
                .token_key_reload
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(5)) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        if let Err(error) = self.reload_token_keys().await {
            tracing::error!(error = %error, "token signing keys not reloaded");
        }
    }

    /// Re-reads the token signing keys (after `keys rotate-token-key` in another process).
    pub async fn reload_token_keys(&self) -> Result<(), crate::auth::token_keys::TokenKeyError> {
        let (_, seeds) = crate::auth::token_keys::token_seeds(&self.database, &self.vault).await?;
        self.tokens.replace_keys(&seeds);
        Ok(())
    }

    /// Flushes and closes what the appliance holds open.
    pub async fn close(&self) {
        self.database.close().await;
    }
}

async fn create_first_admin(clients: &Clients) -> Result<Option<FirstAdmin>, StorageError> {
    if clients.any_with_role(Role::Admin).await? {
        return Ok(None);
    }
    let admin = NewClient {
        name: "first-admin".to_owned(),
        role: Role::Admin,
        scopes: Vec::<Scope>::new(),
        ae_title: None,
    };
    let (client_id, client_secret) = clients.create_with_secret(&admin).await?;
    Ok(Some(FirstAdmin {
        client_id,
        client_secret,
    }))
}

fn ensure_data_dir(path: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    let data_dir_error = |source| StartError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(data_dir_error)?;
    let probe = path.join(".write-probe");
    std::fs::write(&probe, b"").map_err(data_dir_error)?;
    std::fs::remove_file(&probe).map_err(data_dir_error)?;
    Ok(())
}
