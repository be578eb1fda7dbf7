//! Settings: `glastonbury.toml` overlaid by `GLASTONBURY_*` environment variables (environment wins),
//! secrets also from `*_FILE` paths or systemd credentials, unknown keys rejected by name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Environment variables with the `GLASTONBURY_` prefix that are not settings but are still allowed.
const NON_SETTING_ENVIRONMENT: &[&str] = &[
    "GLASTONBURY_CONFIG",
    "GLASTONBURY_LOG",
    "GLASTONBURY_TEST_DATABASE_URL",
];

/// Errors while reading settings; each names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("unknown environment variable {name}: expected one of {expected}")]
    UnknownEnvironment { name: String, expected: String },
    #[error("invalid value for {key}: {message}")]
    InvalidValue { key: String, message: String },
    #[error("cannot read secret for {key} from {path}: {source}")]
    ReadSecret {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, human-readable otherwise.
    Auto,
    Json,
    Pretty,
}

/// The settings as they may appear in `glastonbury.toml`; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    data_dir: Option<PathBuf>,
    http_addr: Option<String>,
    dicom_addr: Option<String>,
    dicom_aet: Option<String>,
    dicom_tls_addr: Option<String>,
    dicom_tls_cert: Option<PathBuf>,
    dicom_tls_key: Option<PathBuf>,
    database_url: Option<String>,
    blob_url: Option<String>,
    mqtt_url: Option<String>,
    oidc_issuer: Option<String>,
    oidc_audience: Option<String>,
    oidc_role_claim: Option<String>,
    oidc_client_id: Option<String>,
    oidc_client_secret: Option<SecretString>,
    console_idle_seconds: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    master_passphrase: Option<SecretString>,
    appliance_id: Option<String>,
    log_format: Option<LogFormat>,
    max_body_bytes: Option<usize>,
    request_timeout_seconds: Option<u64>,
    token_lifetime_seconds: Option<u64>,
    rate_limit_per_second: Option<u32>,
    bulk_export_expiry_seconds: Option<u64>,
    policies_dir: Option<PathBuf>,
}

/// Every setting a key can have, in file order; the environment name is `GLASTONBURY_` + upper case.
const SETTING_KEYS: &[&str] = &[
    "data_dir",
    "http_addr",
    "dicom_addr",
    "dicom_aet",
    "dicom_tls_addr",
    "dicom_tls_cert",
    "dicom_tls_key",
    "database_url",
    "blob_url",
    "mqtt_url",
    "oidc_issuer",
    "oidc_audience",
    "oidc_role_claim",
    "oidc_client_id",
    "oidc_client_secret",
    "console_idle_seconds",
    "tls_cert",
    "tls_key",
    "master_passphrase",
    "appliance_id",
    "log_format",
    "max_body_bytes",
    "request_timeout_seconds",
    "token_lifetime_seconds",
    "rate_limit_per_second",
    "bulk_export_expiry_seconds",
    "policies_dir",
];

/// Settings that are secrets: also read from `<ENV>_FILE` or `$CREDENTIALS_DIRECTORY/<key>`.
const SECRET_KEYS: &[&str] = &["master_passphrase", "database_url", "oidc_client_secret"];

/// TLS certificate chain and private key, both PEM files.
#[derive(Debug, Clone, Serialize)]
pub struct TlsSettings {
    pub certificate_path: PathBuf,
    pub private_key_path: PathBuf,
}

/// Where DICOM over TLS listens, with its certificate chain and key (by default the HTTPS ones).
#[derive(Debug, Clone, Serialize)]
pub struct DicomTlsSettings {
    pub address: SocketAddr,
    pub certificate_path: PathBuf,
    pub private_key_path: PathBuf,
}

/// The effective settings of one appliance process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub dicom_addr: SocketAddr,
    pub dicom_aet: String,
    /// DICOM over TLS (PS3.15 B.1; the well-known port is 2762).
    pub dicom_tls: Option<DicomTlsSettings>,
    pub database_url: SecretString,
    pub blob_url: String,
    pub mqtt_url: Option<String>,
    pub oidc_issuer: Option<String>,
    /// The audience access tokens from the external issuer must name (default: our base URL).
    pub oidc_audience: Option<String>,
    /// The claim holding the caller's role (a string or an array of strings).
    pub oidc_role_claim: String,
    /// The console's client at the OpenID provider (authorization code + PKCE).
    pub oidc_client_id: Option<String>,
    pub oidc_client_secret: Option<SecretString>,
    /// Console sessions end after this many seconds without a request.
    pub console_idle_seconds: u64,
    pub tls: Option<TlsSettings>,
    pub master_passphrase: Option<SecretString>,
    pub appliance_id: String,
    pub log_format: LogFormat,
    pub max_body_bytes: usize,
    pub request_timeout_seconds: u64,
    pub token_lifetime_seconds: u64,
    /// Requests per second allowed per client and per source address (bursts of twice that).
    pub rate_limit_per_second: u32,
    /// How long a finished Bulk Data export's files stay available before they are destroyed.
    pub bulk_export_expiry_seconds: u64,
    /// Folder of Cedar policies (`*.cedar` + `schema.cedarschema`); `None`: the built-in set.
    pub policies_dir: Option<PathBuf>,
    /// Where the settings came from, for `--print-config`.
    pub config_file: Option<PathBuf>,
}

/// A source of environment variables, so tests need not touch the process environment.
pub trait Environment {
    fn get(&self, name: &str) -> Option<String>;
    fn names(&self) -> Vec<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn names(&self) -> Vec<String> {
        std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .collect()
    }
}

/// A fixed set of variables, for tests, benchmarks and embedding.
#[derive(Debug, Clone, Default)]
pub struct MapEnvironment(pub std::collections::HashMap<String, String>);

impl MapEnvironment {
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.insert(name.to_owned(), value.into());
        self
    }
}

impl Environment for MapEnvironment {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

impl Settings {
    /// Loads settings from the config file (explicit path, `GLASTONBURY_CONFIG`, or
    /// `./glastonbury.toml` if present) and the environment.
    pub fn load(
        explicit_config: Option<&Path>,
        environment: &dyn Environment,
    ) -> Result<Self, ConfigError> {
        reject_unknown_environment(environment)?;
        let config_file = explicit_config
            .map(Path::to_path_buf)
            .or_else(|| environment.get("GLASTONBURY_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let default = PathBuf::from("glastonbury.toml");
                default.exists().then_some(default)
            });
        let file = match &config_file {
            Some(path) => read_settings_file(path)?,
            None => SettingsFile::default(),
        };
        Self::resolve(file, environment, config_file)
    }

    fn resolve(
        file: SettingsFile,
        environment: &dyn Environment,
        config_file: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let overlay =
            |key: &str, from_file: Option<String>| -> Result<Option<String>, ConfigError> {
                Ok(read_environment_value(environment, key)?.or(from_file))
            };
        let data_dir = PathBuf::from(
            overlay(
                "data_dir",
                file.data_dir.map(|path| path.display().to_string()),
            )?
            .unwrap_or_else(|| "./data".to_owned()),
        );
        let http_addr = parse_addr(
            "http_addr",
            overlay("http_addr", file.http_addr)?,
            "127.0.0.1:8080",
        )?;
        let dicom_addr = parse_addr(
            "dicom_addr",
            overlay("dicom_addr", file.dicom_addr)?,
            "127.0.0.1:11112",
        )?;
        let dicom_aet =
            overlay("dicom_aet", file.dicom_aet)?.unwrap_or_else(|| "GLASTONBURY".to_owned());
        validate_ae_title(&dicom_aet)?;
        let database_url = overlay("database_url", file.database_url.clone())?
            .unwrap_or_else(|| format!("sqlite://{}/glastonbury.db", data_dir.display()));
        let blob_url = overlay("blob_url", file.blob_url)?
            .unwrap_or_else(|| format!("file://{}/blobs", data_dir.display()));
        let tls_cert = overlay(
            "tls_cert",
            file.tls_cert.map(|path| path.display().to_string()),
        )?;
        let tls_key = overlay(
            "tls_key",
            file.tls_key.map(|path| path.display().to_string()),
        )?;
        let tls = match (tls_cert, tls_key) {
            (Some(certificate), Some(key)) => Some(TlsSettings {
                certificate_path: PathBuf::from(certificate),
                private_key_path: PathBuf::from(key),
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::InvalidValue {
                    key: "tls_cert".to_owned(),
                    message: "tls_cert and tls_key must be set together".to_owned(),
                });
            }
        };
        let dicom_tls = match overlay("dicom_tls_addr", file.dicom_tls_addr)? {
            Some(text) => {
                let address = parse_addr("dicom_tls_addr", Some(text), "")?;
                let certificate = overlay(
                    "dicom_tls_cert",
                    file.dicom_tls_cert.map(|path| path.display().to_string()),
                )?
                .map(PathBuf::from)
                .or_else(|| tls.as_ref().map(|tls| tls.certificate_path.clone()));
                let key = overlay(
                    "dicom_tls_key",
                    file.dicom_tls_key.map(|path| path.display().to_string()),
                )?
                .map(PathBuf::from)
                .or_else(|| tls.as_ref().map(|tls| tls.private_key_path.clone()));
                let (Some(certificate_path), Some(private_key_path)) = (certificate, key) else {
                    return Err(ConfigError::InvalidValue {
                        key: "dicom_tls_addr".to_owned(),
                        message: "DICOM TLS needs dicom_tls_cert and dicom_tls_key (or tls_cert and tls_key)".to_owned(),
                    });
                };
                Some(DicomTlsSettings {
                    address,
                    certificate_path,
                    private_key_path,
                })
            }
            None => None,
        };
        let master_passphrase = overlay(
            "master_passphrase",
            file.master_passphrase
                .map(|secret| secret.expose_secret().to_owned()),
        )?
        .map(SecretString::from);
        let log_format = match read_environment_value(environment, "log_format")? {
            Some(text) => parse_log_format(&text)?,
            None => file.log_format.unwrap_or(LogFormat::Auto),
        };
        Ok(Self {
            appliance_id: overlay("appliance_id", file.appliance_id)?
                .unwrap_or_else(default_appliance_id),
            max_body_bytes: parse_number(
                "max_body_bytes",
                overlay("max_body_bytes", None)?,
                file.max_body_bytes,
                64 << 20,
            )?,
            request_timeout_seconds: parse_number(
                "request_timeout_seconds",
                overlay("request_timeout_seconds", None)?,
                file.request_timeout_seconds,
                60,
            )?,
            token_lifetime_seconds: parse_number(
                "token_lifetime_seconds",
                overlay("token_lifetime_seconds", None)?,
                file.token_lifetime_seconds,
                300,
            )?,
            rate_limit_per_second: parse_number(
                "rate_limit_per_second",
                overlay("rate_limit_per_second", None)?,
                file.rate_limit_per_second,
                1000,
            )?,
            bulk_export_expiry_seconds: parse_number(
                "bulk_export_expiry_seconds",
                overlay("bulk_export_expiry_seconds", None)?,
                file.bulk_export_expiry_seconds,
                crate::records::bulk_export::DEFAULT_EXPORT_EXPIRY_SECONDS,
            )?,
            policies_dir: overlay(
                "policies_dir",
                file.policies_dir.map(|path| path.display().to_string()),
            )?
            .map(PathBuf::from),
            mqtt_url: overlay("mqtt_url", file.mqtt_url)?,
            oidc_issuer: overlay("oidc_issuer", file.oidc_issuer)?,
            oidc_audience: overlay("oidc_audience", file.oidc_audience)?,
            oidc_role_claim: overlay("oidc_role_claim", file.oidc_role_claim)?
                .unwrap_or_else(|| "roles".to_owned()),
            oidc_client_id: overlay("oidc_client_id", file.oidc_client_id)?,
            oidc_client_secret: overlay(
                "oidc_client_secret",
                file.oidc_client_secret
                    .map(|secret| secret.expose_secret().to_owned()),
            )?
            .map(SecretString::from),
            console_idle_seconds: parse_number(
                "console_idle_seconds",
                overlay("console_idle_seconds", None)?,
                file.console_idle_seconds,
                900,
            )?,
            data_dir,
            http_addr,
            dicom_addr,
            dicom_aet,
            dicom_tls,
            database_url: SecretString::from(database_url),
            blob_url,
            tls,
            master_passphrase,
            log_format,
            config_file,
        })
    }

    /// The effective settings as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut lines = Vec::new();
        if let Some(path) = &self.config_file {
            lines.push(format!("# config file: {}", path.display()));
        }
        let mut push = |key: &str, value: String| lines.push(format!("{key} = {value}"));
        push("data_dir", quote(&self.data_dir.display().to_string()));
        push("http_addr", quote(&self.http_addr.to_string()));
        push("dicom_addr", quote(&self.dicom_addr.to_string()));
        push("dicom_aet", quote(&self.dicom_aet));
        if let Some(dicom_tls) = &self.dicom_tls {
            push("dicom_tls_addr", quote(&dicom_tls.address.to_string()));
            push(
                "dicom_tls_cert",
                quote(&dicom_tls.certificate_path.display().to_string()),
            );
            push(
                "dicom_tls_key",
                quote(&dicom_tls.private_key_path.display().to_string()),
            );
        }
        push(
            "database_url",
            quote(&mask_url_password(self.database_url.expose_secret())),
        );
        push("blob_url", quote(&mask_url_password(&self.blob_url)));
        if let Some(url) = &self.mqtt_url {
            push("mqtt_url", quote(&mask_url_password(url)));
        }
        if let Some(issuer) = &self.oidc_issuer {
            push("oidc_issuer", quote(issuer));
            push(
                "oidc_audience",
                quote(self.oidc_audience.as_deref().unwrap_or_default()),
            );
            push("oidc_role_claim", quote(&self.oidc_role_claim));
            push(
                "oidc_client_id",
                quote(self.oidc_client_id.as_deref().unwrap_or_default()),
            );
            let client_secret = if self.oidc_client_secret.is_some() {
                "\"********\""
            } else {
                "\"\""
            };
            push("oidc_client_secret", client_secret.to_owned());
            push(
                "console_idle_seconds",
                self.console_idle_seconds.to_string(),
            );
        }
        if let Some(folder) = &self.policies_dir {
            push("policies_dir", quote(&folder.display().to_string()));
        }
        if let Some(tls) = &self.tls {
            push(
                "tls_cert",
                quote(&tls.certificate_path.display().to_string()),
            );
            push(
                "tls_key",
                quote(&tls.private_key_path.display().to_string()),
            );
        }
        let passphrase = if self.master_passphrase.is_some() {
            "\"********\""
        } else {
            "\"\" # not set: evaluation key file"
        };
        push("master_passphrase", passphrase.to_owned());
        push("appliance_id", quote(&self.appliance_id));
        push(
            "log_format",
            quote(&format!("{:?}", self.log_format).to_lowercase()),
        );
        push("max_body_bytes", self.max_body_bytes.to_string());
        push(
            "request_timeout_seconds",
            self.request_timeout_seconds.to_string(),
        );
        push(
            "token_lifetime_seconds",
            self.token_lifetime_seconds.to_string(),
        );
        push(
            "rate_limit_per_second",
            self.rate_limit_per_second.to_string(),
        );
        push(
            "bulk_export_expiry_seconds",
            self.bulk_export_expiry_seconds.to_string(),
        );
        lines.join("\n") + "\n"
    }

    /// The database URL with any password replaced, safe for logs.
    pub fn database_url_for_logs(&self) -> String {
        mask_url_password(self.database_url.expose_secret())
    }
}

fn read_settings_file(path: &Path) -> Result<SettingsFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| ConfigError::ParseFile {
        path: path.to_path_buf(),
        message: error.message().to_owned(),
    })
}

fn environment_name(key: &str) -> String {
    format!("GLASTONBURY_{}", key.to_uppercase())
}

/// Reads one setting from the environment: `GLASTONBURY_KEY`, then for secrets
/// `GLASTONBURY_KEY_FILE`, then `$CREDENTIALS_DIRECTORY/key` (systemd `LoadCredential=`).
fn read_environment_value(
    environment: &dyn Environment,
    key: &str,
) -> Result<Option<String>, ConfigError> {
    let name = environment_name(key);
    if let Some(value) = environment.get(&name) {
        return Ok(Some(value));
    }
    if !SECRET_KEYS.contains(&key) {
        return Ok(None);
    }
    if let Some(path) = environment.get(&format!("{name}_FILE")) {
        return read_secret_file(key, Path::new(&path)).map(Some);
    }
    if let Some(directory) = environment.get("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&directory).join(key);
        if path.exists() {
            return read_secret_file(key, &path).map(Some);
        }
    }
    Ok(None)
}

fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadSecret {
        key: key.to_owned(),
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

fn reject_unknown_environment(environment: &dyn Environment) -> Result<(), ConfigError> {
    let mut allowed: Vec<String> = NON_SETTING_ENVIRONMENT
        .iter()
        .map(|name| (*name).to_owned())
        .collect();
    for key in SETTING_KEYS {
        allowed.push(environment_name(key));
    }
    for key in SECRET_KEYS {
        allowed.push(format!("{}_FILE", environment_name(key)));
    }
    for name in environment.names() {
        if name.starts_with("GLASTONBURY_") && !allowed.contains(&name) {
            return Err(ConfigError::UnknownEnvironment {
                name,
                expected: allowed.join(", "),
            });
        }
    }
    Ok(())
}

fn parse_addr(key: &str, value: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    text.parse().map_err(|_| ConfigError::InvalidValue {
        key: key.to_owned(),
        message: format!("{text:?} is not an address like 127.0.0.1:8080"),
    })
}

fn parse_number<T: std::str::FromStr + Copy>(
    key: &str,
    from_environment: Option<String>,
    from_file: Option<T>,
    default: T,
) -> Result<T, ConfigError> {
    match from_environment {
        Some(text) => text.trim().parse().map_err(|_| ConfigError::InvalidValue {
            key: key.to_owned(),
            message: format!("{text:?} is not a number"),
        }),
        None => Ok(from_file.unwrap_or(default)),
    }
}

fn parse_log_format(text: &str) -> Result<LogFormat, ConfigError> {
    match text {
        "auto" => Ok(LogFormat::Auto),
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        other => Err(ConfigError::InvalidValue {
            key: "log_format".to_owned(),
            message: format!("{other:?} is not one of auto, json, pretty"),
        }),
    }
}

fn validate_ae_title(title: &str) -> Result<(), ConfigError> {
    let valid = !title.trim().is_empty()
        && title.len() <= 16
        && title
            .chars()
            .all(|character| character.is_ascii_graphic() || character == ' ')
        && !title.contains('\\');
    if valid {
        return Ok(());
    }
    Err(ConfigError::InvalidValue {
        key: "dicom_aet".to_owned(),
        message: "an AE title is 1 to 16 printable ASCII characters without backslash".to_owned(),
    })
}

fn default_appliance_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "glastonbury".to_owned())
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// Replaces the password of a URL (`scheme://user:password@host`) with `********`.
pub fn mask_url_password(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return text.to_owned();
    };
    if url.password().is_some() && url.set_password(Some("********")).is_err() {
        return "********".to_owned();
    }
    let masked_pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(name, value)| {
            let secret = ["password", "secret", "token", "sslpassword"].contains(&name.as_ref());
            (
                name.into_owned(),
                if secret {
                    "********".to_owned()
                } else {
                    value.into_owned()
                },
            )
        })
        .collect();
    if !masked_pairs.is_empty() {
        url.query_pairs_mut().clear().extend_pairs(masked_pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnvironment(HashMap<String, String>);

    impl Environment for FakeEnvironment {
        fn get(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
        fn names(&self) -> Vec<String> {
            self.0.keys().cloned().collect()
        }
    }

    fn environment(pairs: &[(&str, &str)]) -> FakeEnvironment {
        FakeEnvironment(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn defaults_follow_the_data_dir() {
        let settings = Settings::resolve(SettingsFile::default(), &environment(&[]), None).unwrap();
        assert_eq!(settings.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.dicom_aet, "GLASTONBURY");
        assert_eq!(
            settings.database_url.expose_secret(),
            "sqlite://./data/glastonbury.db"
        );
        assert_eq!(settings.blob_url, "file://./data/blobs");
    }

    #[test]
    fn environment_wins_over_the_file() {
        let file: SettingsFile =
            toml::from_str("http_addr = \"127.0.0.1:9000\"\ndata_dir = \"/srv/a\"").unwrap();
        let settings = Settings::resolve(
            file,
            &environment(&[("GLASTONBURY_HTTP_ADDR", "127.0.0.1:9001")]),
            None,
        )
        .unwrap();
        assert_eq!(settings.http_addr.to_string(), "127.0.0.1:9001");
        assert_eq!(settings.data_dir, PathBuf::from("/srv/a"));
    }

    #[test]
    fn unknown_file_key_is_named() {
        let error = toml::from_str::<SettingsFile>("htp_addr = \"x\"").unwrap_err();
        assert!(error.message().contains("htp_addr"), "{}", error.message());
    }

    #[test]
    fn unknown_environment_key_is_named() {
        let error =
            reject_unknown_environment(&environment(&[("GLASTONBURY_HTP_ADDR", "x")])).unwrap_err();
        assert!(error.to_string().contains("GLASTONBURY_HTP_ADDR"));
    }

    #[test]
    fn secrets_come_from_files_and_are_masked() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("passphrase");
        std::fs::write(&path, "correct horse\n").unwrap();
        let settings = Settings::resolve(
            SettingsFile::default(),
            &environment(&[
                ("GLASTONBURY_MASTER_PASSPHRASE_FILE", path.to_str().unwrap()),
                (
                    "GLASTONBURY_DATABASE_URL",
                    "postgres://app:hunter2@db/glastonbury",
                ),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(
            settings.master_passphrase.as_ref().unwrap().expose_secret(),
            "correct horse"
        );
        let printed = settings.to_masked_toml();
        assert!(
            !printed.contains("hunter2") && !printed.contains("correct horse"),
            "{printed}"
        );
        assert!(
            printed.contains("postgres://app:********@db/glastonbury"),
            "{printed}"
        );
    }

    #[test]
    fn systemd_credentials_are_read() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("master_passphrase"), "from systemd").unwrap();
        let settings = Settings::resolve(
            SettingsFile::default(),
            &environment(&[("CREDENTIALS_DIRECTORY", directory.path().to_str().unwrap())]),
            None,
        )
        .unwrap();
        assert_eq!(
            settings.master_passphrase.unwrap().expose_secret(),
            "from systemd"
        );
    }
}
