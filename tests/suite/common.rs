//! Shared helpers: temporary data dirs, temporary PostgreSQL databases, and a running
//! `glastonbury serve` process with an admin-made clinician client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glastonbury::access::{Principal, Role};
use glastonbury::appliance::Appliance;
use glastonbury::config::{MapEnvironment, Settings};

/// The built `glastonbury` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_glastonbury"))
}

/// The PostgreSQL server tests may use (`GLASTONBURY_TEST_DATABASE_URL`), if any.
pub fn postgres_admin_url() -> Option<String> {
    std::env::var("GLASTONBURY_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

/// Which engines the storage suite runs on: SQLite always, PostgreSQL when configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineUnderTest {
    Sqlite,
    Postgres,
}

/// A uniquely named PostgreSQL database, dropped when this value is dropped.
pub struct TemporaryPostgres {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TemporaryPostgres {
    pub fn create(admin_url: &str) -> Self {
        let name = format!("glastonbury_test_{}", uuid::Uuid::new_v4().simple());
        run_psql(admin_url, &format!("CREATE DATABASE {name}"));
        let mut url = url::Url::parse(admin_url).unwrap();
        url.set_path(&name);
        Self {
            admin_url: admin_url.to_owned(),
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TemporaryPostgres {
    fn drop(&mut self) {
        run_psql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn run_psql(url: &str, statement: &str) {
    let status = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", statement])
        .stdout(Stdio::null())
        .status()
        .expect("psql must be installed to run the PostgreSQL suite");
    assert!(status.success(), "psql failed: {statement}");
}

/// A data dir plus (for PostgreSQL) its database; both go away on drop.
pub struct TestAppliance {
    pub data_dir: tempfile::TempDir,
    pub postgres: Option<TemporaryPostgres>,
}

impl TestAppliance {
    pub fn new(engine: EngineUnderTest) -> Option<Self> {
        let postgres = match engine {
            EngineUnderTest::Sqlite => None,
            EngineUnderTest::Postgres => Some(TemporaryPostgres::create(&postgres_admin_url()?)),
        };
        Some(Self {
            data_dir: tempfile::tempdir().unwrap(),
            postgres,
        })
    }

    pub fn environment(&self) -> MapEnvironment {
        let mut environment = MapEnvironment::default().with(
            "GLASTONBURY_DATA_DIR",
            self.data_dir.path().display().to_string(),
        );
        if let Some(postgres) = &self.postgres {
            environment = environment.with("GLASTONBURY_DATABASE_URL", postgres.url.clone());
        }
        environment
    }

    pub async fn open(&self) -> Appliance {
        let settings = Settings::load(None, &self.environment()).unwrap();
        Appliance::open(settings).await.unwrap().0
    }
}

/// A test appliance on `engine`, or `None` (with a printed notice) when that engine is not
/// available here (PostgreSQL without `GLASTONBURY_TEST_DATABASE_URL`).
pub fn appliance_for(engine: EngineUnderTest) -> Option<TestAppliance> {
    let appliance = TestAppliance::new(engine);
    if appliance.is_none() {
        println!(
            "notice: GLASTONBURY_TEST_DATABASE_URL is not set; skipping the PostgreSQL variant"
        );
    }
    appliance
}

/// A clinician allowed everything clinical, for driving the record path directly.
pub fn clinician() -> Arc<Principal> {
    Arc::new(Principal {
        id: "test-clinician".to_owned(),
        role: Role::Clinician,
        scopes: vec!["system/*.cruds".parse().unwrap()],
        token_id: None,
        network_address: None,
        purpose_of_use: Some("TREAT".to_owned()),
        request_id: None,
        break_glass_reason: None,
    })
}

/// Where test processes reserve the ports they hand out (one lock file per port).
const PORT_RESERVATIONS: &str = "glastonbury-test-ports";

/// Test ports come from below Linux's ephemeral range (32768 and up by default), so an outgoing
/// connection never takes a port between its reservation and the server binding it.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// The reservations this process holds; each lock is released when the process exits.
static RESERVED_PORTS: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());

/// A free loopback port that no other test process (or thread) is handed while this one runs.
///
/// Binding port 0 and letting it go is not enough: tests run in parallel, each server takes two
/// ports, and two of them could draw the same one between the draw and the bind. The second
/// server then fails to start while the first answers its readiness check (stop 27's CI).
pub fn free_port() -> u16 {
    use rand::Rng;
    let folder = std::env::temp_dir().join(PORT_RESERVATIONS);
    std::fs::create_dir_all(&folder).unwrap();
    let mut random = rand::thread_rng();
    for _ in 0..1000 {
        let port = random.gen_range(TEST_PORTS);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(folder.join(format!("{port}.lock")))
            .unwrap();
        if lock.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        RESERVED_PORTS.lock().unwrap().push(lock);
        return port;
    }
    panic!("no free test port in {TEST_PORTS:?}");
}

/// A `glastonbury serve` child process; killed on drop.
pub struct Server {
    pub child: Child,
    pub base_url: String,
    pub log_path: PathBuf,
    pub environment: Vec<(String, String)>,
}

impl Server {
    /// Starts the server on a fresh port with `environment` and waits for `/readyz`.
    pub fn start(data_dir: &Path, extra_environment: &[(&str, &str)]) -> Self {
        let port = free_port();
        let mut environment: Vec<(String, String)> = vec![
            (
                "GLASTONBURY_DATA_DIR".to_owned(),
                data_dir.display().to_string(),
            ),
            (
                "GLASTONBURY_HTTP_ADDR".to_owned(),
                format!("127.0.0.1:{port}"),
            ),
            ("GLASTONBURY_LOG_FORMAT".to_owned(), "json".to_owned()),
        ];
        environment.extend(
            extra_environment
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Self::start_with(data_dir, environment)
    }

    pub fn start_with(data_dir: &Path, mut environment: Vec<(String, String)>) -> Self {
        // Every server gets its own DICOM port, so tests can run side by side.
        if !environment
            .iter()
            .any(|(name, _)| name == "GLASTONBURY_DICOM_ADDR")
        {
            environment.insert(
                0,
                (
                    "GLASTONBURY_DICOM_ADDR".to_owned(),
                    format!("127.0.0.1:{}", free_port()),
                ),
            );
        }
        let port = environment
            .iter()
            .find(|(name, _)| name == "GLASTONBURY_HTTP_ADDR")
            .map(|(_, value)| value.rsplit(':').next().unwrap().to_owned())
            .unwrap();
        let log_path = data_dir.with_extension(format!("{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(binary())
            .arg("serve")
            .envs(environment.iter().cloned())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            log_path,
            environment,
        };
        server.wait_ready();
        server
    }

    /// Waits for `/readyz`; fails at once, with the server's log, if the server exits first.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::blocking::Client::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "server exited ({status}) before it was ready: {}",
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                );
            }
            if let Ok(response) = client.get(format!("{}/readyz", self.base_url)).send()
                && response.status().is_success()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "server did not become ready: {}",
            std::fs::read_to_string(&self.log_path).unwrap_or_default()
        );
    }

    /// Runs another `glastonbury` command against the same settings.
    pub fn command(&self, arguments: &[&str]) -> std::process::Output {
        Command::new(binary())
            .args(arguments)
            .envs(self.environment.iter().cloned())
            .output()
            .unwrap()
    }

    /// Registers a client and returns a bearer token for it.
    pub fn token_for(&self, role: &str, scopes: &[&str]) -> String {
        let mut arguments = vec![
            "clients", "create", "--name", "test", "--role", role, "--json",
        ];
        for scope in scopes {
            arguments.extend(["--scope", scope]);
        }
        let output = self.command(&arguments);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let created: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let client_id = created["client_id"].as_str().unwrap();
        // `--secret=S`, not `--secret S`: a generated secret starts with `-` one time in 64, and
        // clap takes it for a flag (e2e_core::token_accepts_a_secret_that_starts_with_a_hyphen).
        let secret = format!("--secret={}", created["client_secret"].as_str().unwrap());
        let output = self.command(&[
            "token",
            "--client",
            client_id,
            &secret,
            "--server",
            &self.base_url,
        ]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Every file under `root`, recursively.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// Expands each named `async fn name(engine: EngineUnderTest)` into a `sqlite::name` and a
/// `postgres::name` test (the PostgreSQL one skips with a notice when no server is configured).
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::common::EngineUnderTest::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::common::EngineUnderTest::Postgres).await;
                }
            )*
        }
    };
}
