//! The hospital's OpenID provider: a real `oidc-provider` (OpenID certified) on loopback issues
//! access tokens to a SMART backend client (private_key_jwt); the appliance, pointed at it with
//! `GLASTONBURY_OIDC_ISSUER`, discovers its keys and accepts those tokens, and only those.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Server, free_port};

const AUDIENCE: &str = "https://glastonbury.test";

/// The test IdP process; killed on drop.
pub struct TestIdp {
    child: Child,
    pub issuer: String,
}

impl TestIdp {
    pub fn start(extra_environment: &[(&str, &str)]) -> Self {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp");
        assert!(
            folder.join("node_modules/oidc-provider").exists(),
            "the test OpenID provider is not installed: run scripts/install-test-deps.sh"
        );
        let port = free_port();
        let mut child = Command::new("node")
            .arg("idp.mjs")
            .arg(port.to_string())
            .current_dir(&folder)
            .env("AUDIENCE", AUDIENCE)
            .envs(extra_environment.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node must be installed to run the OpenID provider tests");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("ready "), "the IdP did not start: {line}");
        Self {
            child,
            issuer: line.trim_start_matches("ready ").trim().to_owned(),
        }
    }

    /// An access token for `resource` by client_credentials + private_key_jwt (ES384).
    pub fn backend_token(&self, client: &Client, resource: &str) -> String {
        let key_pem = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/backend-services/es384.pem"),
        )
        .unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
        header.kid = Some("backend-es384".to_owned());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token_url = format!("{}/token", self.issuer);
        let assertion = jsonwebtoken::encode(
            &header,
            &json!({"iss": "backend", "sub": "backend", "aud": token_url, "exp": now + 120,
                    "iat": now, "jti": uuid::Uuid::new_v4().to_string()}),
            &jsonwebtoken::EncodingKey::from_ec_pem(&key_pem).unwrap(),
        )
        .unwrap();
        let response: Value = client
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "system/*.rs"),
                ("resource", resource),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
            ])
            .send()
            .unwrap()
            .json()
            .unwrap();
        response["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("the IdP issued no token: {response}"))
            .to_owned()
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn access_tokens_from_the_hospital_idp_are_validated_against_its_keys() {
    let idp = TestIdp::start(&[]);
    let workspace = tempfile::tempdir().unwrap();
    let server = Server::start(
        &workspace.path().join("data"),
        &[
            ("GLASTONBURY_OIDC_ISSUER", idp.issuer.as_str()),
            ("GLASTONBURY_OIDC_AUDIENCE", AUDIENCE),
        ],
    );
    let client = Client::new();
    let read = |token: &str| {
        client
            .get(format!("{}/fhir/Patient/nobody", server.base_url))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    let token = idp.backend_token(&client, AUDIENCE);
    assert_eq!(token.split('.').count(), 3, "a JWT access token");
    assert_eq!(
        read(&token),
        404,
        "an IdP token with the clinician role reads (nothing there)"
    );

    let elsewhere = idp.backend_token(&client, "https://another-api.example");
    assert_eq!(
        read(&elsewhere),
        401,
        "a token for another audience is refused"
    );

    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let signature = parts[2].clone();
    parts[2] = format!("{}A", &signature[..signature.len() - 1]);
    assert_eq!(
        read(&parts.join(".")),
        401,
        "a damaged signature is refused"
    );

    let write = client
        .post(format!("{}/fhir/Patient", server.base_url))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient"}"#)
        .send()
        .unwrap();
    assert_eq!(
        write.status().as_u16(),
        403,
        "the IdP granted read scopes only"
    );
}

#[test]
fn idp_tokens_without_a_known_role_are_refused() {
    let idp = TestIdp::start(&[("ROLE", "visitor")]);
    let workspace = tempfile::tempdir().unwrap();
    let server = Server::start(
        &workspace.path().join("data"),
        &[
            ("GLASTONBURY_OIDC_ISSUER", idp.issuer.as_str()),
            ("GLASTONBURY_OIDC_AUDIENCE", AUDIENCE),
        ],
    );
    let client = Client::new();
    let token = idp.backend_token(&client, AUDIENCE);
    let status = client
        .get(format!("{}/fhir/Patient/nobody", server.base_url))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 401);
}
