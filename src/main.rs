//! The `glastonbury` command: serve the appliance, initialize it, and administer clients, keys
//! and patients.

// The command line prints its results: that output is its interface.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

mod audit_cli;
mod bench;
mod deid_cli;
mod fhir_bench;

use glastonbury::access::{Principal, Role, Scope};
use glastonbury::appliance::{Appliance, Initialization};
use glastonbury::auth::NewClient;
use glastonbury::config::{ProcessEnvironment, Settings};

/// Glastonbury: a FHIR R4 server and DICOM gateway that keeps every record encrypted at rest and
/// every access in a verifiable audit journal.
#[derive(Debug, Parser)]
#[command(name = "glastonbury", version, about, propagate_version = true)]
struct Cli {
    /// Settings file (default: $GLASTONBURY_CONFIG, else ./glastonbury.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the appliance. The first start on an empty data dir creates keys and database.
    Serve {
        /// Print the effective settings (secrets masked) and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Initialize a data dir (keys, database, first admin client) without serving.
    Init,
    /// Manage API clients.
    Clients {
        #[command(subcommand)]
        command: ClientsCommand,
    },
    /// Obtain an access token from the running server and print it.
    Token {
        /// The client id.
        #[arg(long)]
        client: String,
        /// The client secret (prefer --secret-file: arguments are visible to other local users).
        #[arg(long, conflicts_with = "secret_file", allow_hyphen_values = true)]
        secret: Option<String>,
        /// A file holding the client secret.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Authenticate with private_key_jwt instead: the client's private key (PKCS#8 PEM,
        /// RSA for RS384 or P-384 for ES384), whose public half the client registered.
        #[arg(long, conflicts_with_all = ["secret", "secret_file"], requires = "kid", value_name = "PEM")]
        key: Option<PathBuf>,
        /// The `kid` of that key in the registered JWKS.
        #[arg(long)]
        kid: Option<String>,
        /// Space-separated scopes to ask for (default: all the client's scopes).
        #[arg(long)]
        scope: Option<String>,
        /// Base URL of the server (default: from the settings' HTTP address).
        #[arg(long)]
        server: Option<String>,
    },
    /// Master key operations.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Per-patient key operations.
    Patient {
        #[command(subcommand)]
        command: PatientCommand,
    },
    /// The audit journal: export, verify, fsck, disclosures, checkpoint keys.
    Audit {
        #[command(subcommand)]
        command: audit_cli::AuditCommand,
    },
    /// De-identify data offline (the input is only read).
    Deid {
        #[command(subcommand)]
        command: DeidCommand,
    },
    /// Write a synthetic patient population as FHIR transaction Bundles (one file per patient),
    /// for tests, demos and benchmarks. Deterministic: the same seed gives the same data.
    Synth {
        /// How many patients.
        #[arg(long, default_value_t = 300)]
        patients: usize,
        /// The population's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The folder to write `patient-NNNNNNN.json` files into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure vault and storage throughput and print the numbers.
    Bench {
        /// How many records each put/get measurement writes and reads.
        #[arg(long, default_value_t = 2000)]
        records: usize,
        /// Also measure PostgreSQL at this URL (default: $GLASTONBURY_TEST_DATABASE_URL).
        #[arg(long)]
        postgres: Option<String>,
        /// Measure the FHIR server over HTTP instead, after loading this many synthetic patients
        /// (about 16 resources each); several sizes, comma-separated, are measured in turn.
        #[arg(long, value_delimiter = ',')]
        fhir_patients: Vec<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum ClientsCommand {
    /// Register an API client; prints its id and, once, its secret.
    Create {
        /// A name to recognize the client by.
        #[arg(long)]
        name: String,
        /// clinician, researcher, compliance, device or admin.
        #[arg(long)]
        role: String,
        /// A SMART scope the client may be granted (repeatable), e.g. system/Observation.cruds.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Authenticate with a generated client secret (the default).
        #[arg(long)]
        secret: bool,
        /// Authenticate with private_key_jwt (SMART Backend Services): a JWKS file of the
        /// client's public keys (RSA ≥ 2048 bits for RS384, EC P-384 for ES384, each with a kid).
        #[arg(long, conflicts_with = "secret", value_name = "FILE")]
        jwks: Option<PathBuf>,
        /// Authenticate with private_key_jwt against the keys the client publishes at this URL
        /// (https; http only on loopback). Fetched when needed, reused for 5 minutes.
        #[arg(long, conflicts_with_all = ["secret", "jwks"], value_name = "URL")]
        jwks_url: Option<String>,
        /// Make the client a DICOM peer calling from this AE title (1 to 16 characters): DIMSE
        /// associations from it are accepted and act with this client's role and scopes.
        #[arg(long, value_name = "AE")]
        ae_title: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DeidCommand {
    /// De-identify a DICOM file, or every DICOM file of a folder, with a PS3.15 profile into a
    /// new file or folder. UIDs map consistently within a run (or across runs with --key-file).
    Dicom {
        /// A DICOM Part 10 file or a folder of them.
        input: PathBuf,
        /// Where to write (a file, or a folder mirroring the input's).
        output: PathBuf,
        /// A profile of policies/deidentification.toml (or of $GLASTONBURY_POLICIES_DIR).
        #[arg(long, default_value = "basic")]
        profile: String,
        /// 64 hex characters keying UID remapping and date shifts (default: fresh per run).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a new master key and re-wrap every patient key under it (payloads untouched).
    Rotate,
    /// Start a new access-token signing key. Running servers pick it up within 30 s (or on
    /// SIGHUP); tokens signed by the previous key stay valid until they expire.
    RotateTokenKey,
}

#[derive(Debug, Subcommand)]
enum PatientCommand {
    /// Destroy one patient's key: their data becomes unreadable (audited).
    Shred {
        /// The patient's logical id.
        id: String,
    },
    /// Write one patient's age identity to a file so the standard `age` CLI can decrypt their
    /// blobs (audited).
    ExportKey {
        /// The patient's logical id.
        id: String,
        /// Where to write the identity (created with mode 0600; must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The allocator of every thread: glibc's per-thread arenas grew and trimmed their heaps with
/// dozens of `mprotect` calls per stored DICOM instance; mimalloc keeps freed pages for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => exit_with_error(&anyhow::Error::from(error)),
    };
    if let Err(error) = runtime.block_on(run(cli)) {
        exit_with_error(&error);
    }
}

fn exit_with_error(error: &anyhow::Error) -> ! {
    let message = format!("{error:#}").replace('\n', " ");
    eprintln!("error: {message}");
    std::process::exit(1)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref(), &ProcessEnvironment)?;
    glastonbury::telemetry::init(settings.log_format);
    match cli.command {
        Command::Serve { print_config: true } => {
            print!("{}", settings.to_masked_toml());
            Ok(())
        }
        Command::Serve {
            print_config: false,
        } => serve(settings).await,
        Command::Init => {
            let (appliance, initialization) = open(settings).await?;
            report_initialization(&appliance, &initialization, cli.json);
            appliance.close().await;
            Ok(())
        }
        Command::Clients { command } => clients(settings, command, cli.json).await,
        Command::Token {
            client,
            key: Some(key),
            kid,
            scope,
            server,
            ..
        } => token_with_key(&settings, &client, &key, kid.as_deref(), scope, server).await,
        Command::Token {
            client,
            secret,
            secret_file,
            scope,
            server,
            ..
        } => token(&settings, &client, secret, secret_file, scope, server).await,
        Command::Keys {
            command: KeysCommand::Rotate,
        } => rotate_keys(settings, cli.json).await,
        Command::Keys {
            command: KeysCommand::RotateTokenKey,
        } => {
            let (appliance, _) = open(settings).await?;
            let generation = glastonbury::auth::token_keys::rotate_token_key(
                &appliance.database,
                &appliance.vault,
            )
            .await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"token_key_generation": generation})
                );
            } else {
                println!("access-token signing key generation {generation} is current");
            }
            appliance.close().await;
            Ok(())
        }
        Command::Patient { command } => patient(settings, command, cli.json).await,
        Command::Audit { command } => audit_cli::run(settings, command, cli.json).await,
        Command::Synth {
            patients,
            seed,
            out,
        } => write_synthetic_population(patients, seed, &out),
        Command::Deid {
            command:
                DeidCommand::Dicom {
                    input,
                    output,
                    profile,
                    key_file,
                },
        } => {
            let profile = deid_cli::load_profile(settings.policies_dir.as_deref(), &profile)?;
            deid_cli::run(&input, &output, &profile, key_file.as_deref(), cli.json)
        }
        Command::Bench {
            records,
            postgres,
            fhir_patients,
        } => {
            let postgres = postgres.or_else(|| std::env::var("GLASTONBURY_TEST_DATABASE_URL").ok());
            if !fhir_patients.is_empty() {
                return bench::run_fhir(&fhir_patients, postgres.as_deref(), cli.json).await;
            }
            bench::run(records, postgres.as_deref(), cli.json).await
        }
    }
}

/// A DICOM AE title: 1 to 16 printable ASCII characters (no backslash), not all spaces.
fn valid_ae_title(title: &str) -> bool {
    !title.trim().is_empty()
        && title.len() <= 16
        && title
            .chars()
            .all(|character| character.is_ascii_graphic() && character != '\\' || character == ' ')
}

fn write_synthetic_population(
    patients: usize,
    seed: u64,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut resources = 0;
    for index in 0..patients {
        let patient = glastonbury_fhir::synthetic::synthetic_patient(seed, index);
        resources += patient.resource_count;
        let path = out.join(format!("patient-{index:07}.json"));
        std::fs::write(&path, patient.bundle.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!(
        "{patients} patients, {resources} resources written to {}",
        out.display()
    );
    Ok(())
}

async fn open(settings: Settings) -> anyhow::Result<(Appliance, Initialization)> {
    let data_dir = settings.data_dir.clone();
    Appliance::open(settings)
        .await
        .with_context(|| format!("cannot open the appliance in {}", data_dir.display()))
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let (appliance, initialization) = open(settings).await?;
    report_initialization(&appliance, &initialization, false);
    if appliance.vault.protector().is_evaluation_only() {
        tracing::warn!(
            "master key is kept in a plain file for evaluation only: set GLASTONBURY_MASTER_PASSPHRASE (or _FILE) for real data"
        );
    }
    tracing::info!(
        data_dir = %appliance.settings.data_dir.display(),
        database = %appliance.settings.database_url_for_logs(),
        blobs = %appliance.settings.blob_url,
        key_protection = appliance.vault.protector().describe(),
        "appliance ready"
    );
    glastonbury::server::serve(appliance).await?;
    Ok(())
}

/// Says once what a first start created; the admin secret is printed only here, only once.
fn report_initialization(appliance: &Appliance, initialization: &Initialization, json: bool) {
    let settings = &appliance.settings;
    if json {
        let admin = initialization.first_admin.as_ref().map(|admin| {
            serde_json::json!({"client_id": admin.client_id, "client_secret": admin.client_secret.expose_secret()})
        });
        println!(
            "{}",
            serde_json::json!({
                "vault_created": initialization.vault_created,
                "data_dir": settings.data_dir,
                "first_admin": admin,
            })
        );
        return;
    }
    if initialization.vault_created {
        println!("Initialized a new Glastonbury appliance:");
        println!("  data dir:   {}", settings.data_dir.display());
        println!("  database:   {}", settings.database_url_for_logs());
        println!("  blobs:      {}", settings.blob_url);
        println!(
            "  master key: {} ({})",
            settings.data_dir.join("keys/master.key").display(),
            appliance.vault.protector().describe()
        );
    }
    if let Some(admin) = &initialization.first_admin {
        println!();
        println!("First admin client (the secret is shown only this once; store it now):");
        println!("  client_id:     {}", admin.client_id);
        println!("  client_secret: {}", admin.client_secret.expose_secret());
        println!();
    }
}

async fn clients(settings: Settings, command: ClientsCommand, json: bool) -> anyhow::Result<()> {
    let ClientsCommand::Create {
        name,
        role,
        scopes,
        secret: _,
        jwks,
        jwks_url,
        ae_title,
    } = command;
    if let Some(title) = &ae_title
        && !valid_ae_title(title)
    {
        bail!(
            "an AE title is 1 to 16 printable ASCII characters, not only spaces, without backslash"
        );
    }
    let role: Role = role.parse().map_err(anyhow::Error::msg)?;
    let scopes = scopes
        .iter()
        .map(|text| text.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()?;
    let new_client = NewClient {
        name,
        role,
        scopes,
        ae_title: ae_title.map(|title| title.trim().to_owned()),
    };
    if let Some(url) = jwks_url {
        glastonbury::auth::assertions::validate_jwks_url(&url).map_err(anyhow::Error::msg)?;
        let (appliance, _) = open(settings).await?;
        let client_id = appliance
            .clients
            .create_with_jwks_url(&new_client, &url)
            .await?;
        if json {
            println!("{}", serde_json::json!({"client_id": client_id}));
        } else {
            println!("client_id: {client_id} (authenticates with private_key_jwt, keys at {url})");
        }
        appliance.close().await;
        return Ok(());
    }
    if let Some(path) = jwks {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        glastonbury::auth::assertions::validate_client_jwks(&text)
            .map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?;
        let (appliance, _) = open(settings).await?;
        let client_id = appliance
            .clients
            .create_with_jwks(&new_client, &text)
            .await?;
        if json {
            println!("{}", serde_json::json!({"client_id": client_id}));
        } else {
            println!("client_id: {client_id} (authenticates with private_key_jwt)");
        }
        appliance.close().await;
        return Ok(());
    }
    let (appliance, _) = open(settings).await?;
    let (client_id, client_secret) = appliance.clients.create_with_secret(&new_client).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"client_id": client_id, "client_secret": client_secret.expose_secret()})
        );
    } else {
        println!("client_id:     {client_id}");
        println!(
            "client_secret: {} (shown once)",
            client_secret.expose_secret()
        );
    }
    appliance.close().await;
    Ok(())
}

async fn token(
    settings: &Settings,
    client: &str,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    scope: Option<String>,
    server: Option<String>,
) -> anyhow::Result<()> {
    let secret = match (secret, secret_file) {
        (Some(secret), _) => secret,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => bail!("give the client secret with --secret or --secret-file"),
    };
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let base = server.unwrap_or_else(|| format!("{scheme}://{}", settings.http_addr));
    let mut form = vec![("grant_type", "client_credentials".to_owned())];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let response = reqwest::Client::new()
        .post(format!("{}/auth/token", base.trim_end_matches('/')))
        .basic_auth(client, Some(secret))
        .form(&form)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .context("the token endpoint answered with something other than JSON")?;
    if !status.is_success() {
        bail!(
            "token request refused ({status}): {}",
            body["error_description"]
                .as_str()
                .unwrap_or("no description")
        );
    }
    let token = body["access_token"]
        .as_str()
        .context("no access_token in the answer")?;
    println!("{token}");
    Ok(())
}

/// `token --key`: SMART Backend Services, signing a client assertion with the client's key.
async fn token_with_key(
    settings: &Settings,
    client: &str,
    key: &std::path::Path,
    kid: Option<&str>,
    scope: Option<String>,
    server: Option<String>,
) -> anyhow::Result<()> {
    use glastonbury::auth::outbound::{OutboundCredential, OutboundTokenSource};
    let pem = std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
    let text = String::from_utf8_lossy(&pem);
    let algorithm = if text.contains("BEGIN RSA PRIVATE KEY") || is_rsa_pkcs8(&pem) {
        jsonwebtoken::Algorithm::RS384
    } else {
        jsonwebtoken::Algorithm::ES384
    };
    let base = server.unwrap_or_else(|| default_server_url(settings));
    let token_url = format!("{}/auth/token", base.trim_end_matches('/'));
    let scopes: Vec<&str> = scope
        .as_deref()
        .map(|text| text.split_whitespace().collect())
        .unwrap_or_default();
    let source = OutboundTokenSource::new(
        &token_url,
        client,
        OutboundCredential::PrivateKey {
            pem: secrecy::SecretBox::new(Box::new(pem)),
            algorithm,
            key_id: kid.unwrap_or_default().to_owned(),
        },
        &scopes,
    )?;
    let token = source
        .access_token()
        .await
        .context("token request refused")?;
    println!("{}", token.expose_secret());
    Ok(())
}

/// Whether a PKCS#8 PEM holds an RSA key (its algorithm identifier is rsaEncryption).
fn is_rsa_pkcs8(pem: &[u8]) -> bool {
    use base64::Engine as _;
    let text = String::from_utf8_lossy(pem);
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body.trim()) else {
        return false;
    };
    const RSA_ENCRYPTION_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    der.windows(RSA_ENCRYPTION_OID.len())
        .take(32)
        .any(|window| window == RSA_ENCRYPTION_OID)
}

fn default_server_url(settings: &Settings) -> String {
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}", settings.http_addr)
}

async fn rotate_keys(settings: Settings, json: bool) -> anyhow::Result<()> {
    let (appliance, _) = open(settings).await?;
    let summary = appliance
        .vault
        .rotate_master()
        .await
        .context("master key rotation failed; the old key stays in force")?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "rotated the master key: re-wrapped {} patient keys and {} vault secrets",
            summary.patient_keys, summary.vault_secrets
        );
    }
    appliance.close().await;
    Ok(())
}

async fn patient(settings: Settings, command: PatientCommand, json: bool) -> anyhow::Result<()> {
    let (appliance, _) = open(settings).await?;
    let operator = Arc::new(Principal::local_administrator("HOPERAT"));
    match command {
        PatientCommand::Shred { id } => {
            let destroyed = appliance.records.shred_patient(&operator, &id).await?;
            if json {
                println!("{}", serde_json::json!({"shredded": destroyed}));
            } else if destroyed {
                println!(
                    "patient key destroyed: this patient's records can no longer be decrypted"
                );
            } else {
                println!("nothing to shred: no live key for this patient");
            }
        }
        PatientCommand::ExportKey { id, out } => {
            let identity = appliance
                .records
                .export_patient_identity(&operator, &id)
                .await?;
            write_new_private_file(&out, identity.expose_secret().as_bytes())?;
            if json {
                println!("{}", serde_json::json!({"identity_file": out}));
            } else {
                println!(
                    "wrote the patient's age identity to {} (mode 0600)",
                    out.display()
                );
            }
        }
    }
    appliance.close().await;
    Ok(())
}

fn write_new_private_file(path: &std::path::Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}
