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
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready "), "the IdP did not start: {line}");
        // Keep reading what it prints, or it dies of EPIPE on its next log line.
        std::thread::spawn(move || std::io::copy(&mut output, &mut std::io::sink()));
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

/// An appliance that accepts the IdP's tokens for [`AUDIENCE`].
fn server_trusting(idp: &TestIdp) -> (tempfile::TempDir, Server) {
    let workspace = tempfile::tempdir().unwrap();
    let server = Server::start(
        &workspace.path().join("data"),
        &[
            ("GLASTONBURY_OIDC_ISSUER", idp.issuer.as_str()),
            ("GLASTONBURY_OIDC_AUDIENCE", AUDIENCE),
        ],
    );
    (workspace, server)
}

#[test]
fn access_tokens_from_the_hospital_idp_are_validated_against_its_keys() {
    let idp = TestIdp::start(&[]);
    let (_workspace, server) = server_trusting(&idp);
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
    let mut signature = parts[2].clone().into_bytes();
    signature[10] = if signature[10] == b'A' { b'B' } else { b'A' };
    parts[2] = String::from_utf8(signature).unwrap();
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
fn a_purpose_of_use_vouched_for_by_the_idp_cannot_be_overridden() {
    let idp = TestIdp::start(&[("PURPOSE", "HRESCH")]);
    let (_workspace, server) = server_trusting(&idp);
    let client = Client::new();
    let token = idp.backend_token(&client, AUDIENCE);
    for header in [None, Some("TREAT")] {
        // Research gets the de-identified view, which refuses a search by name; treatment
        // would run it.
        let mut request = client
            .get(format!("{}/fhir/Patient?family=nobody", server.base_url))
            .bearer_auth(&token);
        if let Some(purpose) = header {
            request = request.header("x-purpose-of-use", purpose);
        }
        assert_eq!(
            request.send().unwrap().status().as_u16(),
            403,
            "research purpose from the IdP (header {header:?}) is not treatment"
        );
    }
}

#[test]
fn idp_tokens_without_a_known_role_are_refused() {
    let idp = TestIdp::start(&[("ROLE", "visitor")]);
    let (_workspace, server) = server_trusting(&idp);
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

/// The absolute URL a page's form posts to.
fn form_action(issuer: &str, html: &str) -> String {
    let start = html.find("action=\"").expect("a form") + "action=\"".len();
    let end = html[start..].find('"').unwrap() + start;
    let action = html[start..end].replace("&amp;", "&");
    if action.starts_with("http") {
        action
    } else {
        format!("{issuer}{action}")
    }
}

/// Signs in through the provider's login and consent pages, as a browser would.
fn sign_in(
    browser: &Client,
    server_url: &str,
    idp: &TestIdp,
    user: &str,
) -> reqwest::blocking::Response {
    let login_page = browser
        .get(format!("{server_url}/console/login"))
        .send()
        .unwrap();
    if login_page.url().as_str().starts_with(server_url) {
        return login_page; // the provider still had a session: single sign-on
    }
    assert!(
        login_page.url().as_str().starts_with(&idp.issuer),
        "sent to the provider"
    );
    let html = login_page.text().unwrap();
    let consent_page = browser
        .post(form_action(&idp.issuer, &html))
        .form(&[("prompt", "login"), ("login", user), ("password", "any")])
        .send()
        .unwrap();
    let html = consent_page.text().unwrap();
    browser
        .post(form_action(&idp.issuer, &html))
        .form(&[("prompt", "consent")])
        .send()
        .unwrap()
}

fn browser() -> Client {
    Client::builder().cookie_store(true).build().unwrap()
}

/// A browser whose cookies the test can read.
fn browser_with_jar() -> (Client, std::sync::Arc<reqwest::cookie::Jar>) {
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let client = Client::builder()
        .cookie_provider(std::sync::Arc::clone(&jar))
        .build()
        .unwrap();
    (client, jar)
}

/// GET /console with exactly these cookies and no redirect following: the status and Location.
fn console_with_cookies(server_url: &str, cookies: &str) -> (u16, String) {
    let response = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{server_url}/console"))
        .header("cookie", cookies)
        .send()
        .unwrap();
    let location = response
        .headers()
        .get("location")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (response.status().as_u16(), location)
}

fn start_console(idle_minutes: &str) -> (TestIdp, tempfile::TempDir, Server) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let redirect = format!("{base}/console/callback");
    let idp = TestIdp::start(&[("CONSOLE_REDIRECT", redirect.as_str())]);
    let workspace = tempfile::tempdir().unwrap();
    let data_dir = workspace.path().join("data");
    let environment = [
        ("GLASTONBURY_DATA_DIR", data_dir.display().to_string()),
        ("GLASTONBURY_HTTP_ADDR", format!("127.0.0.1:{port}")),
        ("GLASTONBURY_LOG_FORMAT", "json".to_owned()),
        ("GLASTONBURY_OIDC_ISSUER", idp.issuer.clone()),
        ("GLASTONBURY_OIDC_AUDIENCE", AUDIENCE.to_owned()),
        ("GLASTONBURY_OIDC_CLIENT_ID", "console".to_owned()),
        (
            "GLASTONBURY_OIDC_CLIENT_SECRET",
            "console-test-secret".to_owned(),
        ),
        ("GLASTONBURY_CONSOLE_IDLE_SECONDS", idle_minutes.to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    let server = Server::start_with(&data_dir, environment);
    (idp, workspace, server)
}

#[test]
fn people_sign_in_to_the_console_with_code_and_pkce_and_sign_out() {
    let (idp, _workspace, server) = start_console("15");
    let anonymous = browser();
    let landing = anonymous
        .get(format!("{}/console", server.base_url))
        .send()
        .unwrap();
    assert!(
        landing.url().as_str().starts_with(&idp.issuer),
        "an anonymous visit is sent to sign in"
    );
    let person = browser();
    let signed_in = sign_in(&person, &server.base_url, &idp, "dr-jones");
    assert_eq!(
        signed_in.url().as_str(),
        format!("{}/console", server.base_url)
    );
    let page = signed_in.text().unwrap();
    assert!(
        page.contains("Signed in as <strong>dr-jones</strong> (clinician)"),
        "{page}"
    );

    // The session cookie is HttpOnly and SameSite, and its value is not what the server keeps.
    let raw = Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let start = raw
        .get(format!("{}/console/login", server.base_url))
        .send()
        .unwrap();
    let set_cookie = start.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"),
        "{set_cookie}"
    );
    let authorize = start.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        authorize.contains("code_challenge_method=S256"),
        "{authorize}"
    );

    // A replayed or forged callback does not sign anyone in.
    let forged = browser()
        .get(format!(
            "{}/console/callback?code=stolen&state=guessed",
            server.base_url
        ))
        .send()
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);

    let signed_out = person
        .post(format!("{}/console/logout", server.base_url))
        .send()
        .unwrap();
    assert!(signed_out.text().unwrap().contains("Signed out"));
}

#[test]
fn console_sessions_end_on_sign_out_and_after_the_idle_time() {
    let (idp, _workspace, server) = start_console("2");
    let (person, jar) = browser_with_jar();
    let console_url: reqwest::Url = format!("{}/console", server.base_url).parse().unwrap();
    sign_in(&person, &server.base_url, &idp, "nurse-ratched");
    let cookies = {
        use reqwest::cookie::CookieStore as _;
        jar.cookies(&console_url)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert!(cookies.contains("glastonbury_session="));
    assert_eq!(console_with_cookies(&server.base_url, &cookies).0, 200);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (status, location) = console_with_cookies(&server.base_url, &cookies);
    assert_eq!(
        (status, location.as_str()),
        (303, "/console/login"),
        "idle too long"
    );

    sign_in(&person, &server.base_url, &idp, "nurse-ratched");
    let cookies = {
        use reqwest::cookie::CookieStore as _;
        jar.cookies(&console_url)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(console_with_cookies(&server.base_url, &cookies).0, 200);
    person
        .post(format!("{}/console/logout", server.base_url))
        .send()
        .unwrap();
    let (status, _) = console_with_cookies(&server.base_url, &cookies);
    assert_eq!(
        status, 303,
        "a signed-out session id is dead even if replayed"
    );
}
