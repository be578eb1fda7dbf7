//! Authentication and authorization end to end through the real binary: SMART Backend Services
//! (private_key_jwt with RS384 and ES384), forged and misused tokens, scope escalation, back-off,
//! break-glass, Cedar policy reload on SIGHUP, and the role × action × resource matrix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::{Value, json};

use crate::common::Server;

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/backend-services")
        .join(name)
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Sends a request again after the `Retry-After` of a 429 (the address back-off), at most 8 times.
fn send_patiently(build: impl Fn() -> RequestBuilder) -> (Response, bool) {
    let mut throttled = false;
    for _ in 0..8 {
        let response = build().send().unwrap();
        if response.status().as_u16() != 429 {
            return (response, throttled);
        }
        throttled = true;
        let wait: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_secs(wait));
    }
    panic!("still throttled after eight waits");
}

fn start() -> (tempfile::TempDir, Server, Client) {
    let workspace = tempfile::tempdir().unwrap();
    let server = Server::start(&workspace.path().join("data"), &[]);
    (workspace, server, Client::new())
}

fn register_backend_client(server: &Server) -> String {
    let output = server.command(&[
        "clients",
        "create",
        "--name",
        "backend",
        "--role",
        "clinician",
        "--scope",
        "system/*.rs",
        "--jwks",
        fixture("jwks.json").to_str().unwrap(),
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let created: Value = serde_json::from_slice(&output.stdout).unwrap();
    created["client_id"].as_str().unwrap().to_owned()
}

struct AssertionShape<'a> {
    algorithm: jsonwebtoken::Algorithm,
    key_file: &'a str,
    kid: &'a str,
    audience: String,
    expires_in: i64,
    jti: String,
}

fn assertion(client_id: &str, shape: &AssertionShape<'_>) -> String {
    let pem = std::fs::read(fixture(shape.key_file)).unwrap();
    let key = match shape.algorithm {
        jsonwebtoken::Algorithm::RS384 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(shape.algorithm);
    header.kid = Some(shape.kid.to_owned());
    let now = unix_now();
    let claims = json!({"iss": client_id, "sub": client_id, "aud": shape.audience,
        "exp": now + shape.expires_in, "iat": now, "jti": shape.jti});
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn token_request(client: &Client, server: &Server, assertion: &str) -> (u16, Value) {
    let (response, _) = send_patiently(|| {
        client
            .post(format!("{}/auth/token", server.base_url))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", assertion),
            ])
    });
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn backend_services_clients_authenticate_with_signed_assertions() {
    let (_workspace, server, client) = start();
    let client_id = register_backend_client(&server);
    let audience = format!("{}/auth/token", server.base_url);
    let configuration: Value = client
        .get(format!(
            "{}/.well-known/smart-configuration",
            server.base_url
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        configuration["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("private_key_jwt"))
    );
    let good = |algorithm, key_file, kid| AssertionShape {
        algorithm,
        key_file,
        kid,
        audience: audience.clone(),
        expires_in: 240,
        jti: uuid::Uuid::new_v4().to_string(),
    };
    for shape in [
        good(jsonwebtoken::Algorithm::RS384, "rs384.pem", "backend-rs384"),
        good(jsonwebtoken::Algorithm::ES384, "es384.pem", "backend-es384"),
    ] {
        let signed = assertion(&client_id, &shape);
        let (status, body) = token_request(&client, &server, &signed);
        assert_eq!(status, 200, "{:?}: {body}", shape.algorithm);
        assert_eq!(body["scope"], "system/*.rs");
        let read = client
            .get(format!("{}/fhir/Patient/nobody", server.base_url))
            .bearer_auth(body["access_token"].as_str().unwrap())
            .send()
            .unwrap();
        assert_eq!(read.status().as_u16(), 404, "authorized, and nothing there");
        let (replayed, body) = token_request(&client, &server, &signed);
        assert_eq!(replayed, 401, "a replayed jti is refused");
        assert_eq!(body["error"], "invalid_client");
    }
    let refused = [
        AssertionShape {
            audience: "https://elsewhere.example/token".to_owned(),
            ..good(jsonwebtoken::Algorithm::ES384, "es384.pem", "backend-es384")
        },
        AssertionShape {
            expires_in: 3600,
            ..good(jsonwebtoken::Algorithm::ES384, "es384.pem", "backend-es384")
        },
        AssertionShape {
            expires_in: -120,
            ..good(jsonwebtoken::Algorithm::ES384, "es384.pem", "backend-es384")
        },
        good(
            jsonwebtoken::Algorithm::ES384,
            "stranger-es384.pem",
            "backend-es384",
        ),
        good(jsonwebtoken::Algorithm::ES384, "es384.pem", "no-such-kid"),
        good(jsonwebtoken::Algorithm::ES384, "es384.pem", "backend-rs384"),
    ];
    for shape in &refused {
        let (status, body) = token_request(&client, &server, &assertion(&client_id, shape));
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"], "invalid_client");
    }
    let mut hs256 = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs256.kid = Some("backend-rs384".to_owned());
    let now = unix_now();
    let forged = jsonwebtoken::encode(
        &hs256,
        &json!({"iss": client_id, "sub": client_id, "aud": audience, "exp": now + 60, "jti": "x"}),
        &jsonwebtoken::EncodingKey::from_secret(&std::fs::read(fixture("jwks.json")).unwrap()),
    )
    .unwrap();
    let (status, _) = token_request(&client, &server, &forged);
    assert_eq!(status, 401, "HS256 keyed with the public JWKS is refused");

    let officer = compliance_token(&server);
    let (response, _) = send_patiently(|| {
        client
            .get(format!(
                "{}/audit?type=110114&outcome=4&limit=100",
                server.base_url
            ))
            .bearer_auth(&officer)
    });
    let failures: Value = response.json().unwrap();
    let reasons: Vec<&str> = failures["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| entry["event"]["outcome_reason"].as_str())
        .collect();
    assert!(
        reasons.len() >= 9,
        "every refused attempt is journaled: {reasons:?}"
    );
    assert!(reasons.iter().any(|reason| reason.contains("already used")));
}

/// A compliance token, waiting out any back-off on this address.
fn compliance_token(server: &Server) -> String {
    for _ in 0..8 {
        let output = server.command(&[
            "clients",
            "create",
            "--name",
            "officer",
            "--role",
            "compliance",
            "--json",
        ]);
        let created: Value = serde_json::from_slice(&output.stdout).unwrap();
        let secret = format!("--secret={}", created["client_secret"].as_str().unwrap());
        let output = server.command(&[
            "token",
            "--client",
            created["client_id"].as_str().unwrap(),
            &secret,
            "--server",
            &server.base_url,
        ]);
        if output.status.success() {
            return String::from_utf8(output.stdout).unwrap().trim().to_owned();
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("no compliance token");
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// An EdDSA token signed with the appliance's own key, with any header and claims.
fn signed_token(seed: &[u8; 32], header: &Value, claims: &Value) -> String {
    use ed25519_dalek::Signer as _;
    let input = format!("{}.{}", b64(header), b64(claims));
    let key = ed25519_dalek::SigningKey::from_bytes(seed);
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(key.sign(input.as_bytes()).to_bytes())
    )
}

#[test]
fn forged_and_misused_access_tokens_are_refused() {
    let (workspace, server, client) = start();
    let real = server.token_for("clinician", &["system/*.cruds"]);
    let jwks: Value = client
        .get(format!("{}/auth/jwks", server.base_url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let public_key = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let seed = {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let environment = glastonbury::config::MapEnvironment::default().with(
                "GLASTONBURY_DATA_DIR",
                workspace.path().join("data").display().to_string(),
            );
            let settings = glastonbury::config::Settings::load(None, &environment).unwrap();
            let (appliance, _) = glastonbury::appliance::Appliance::open(settings)
                .await
                .unwrap();
            let seed = *appliance.vault.token_signing_seed(1).await.unwrap();
            appliance.close().await;
            seed
        })
    };
    let real_claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(real.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let header = json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid});
    let with = |field: &str, value: Value| {
        let mut claims = real_claims.clone();
        claims[field] = value;
        claims
    };
    let now = unix_now();
    let hs256_input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "typ": "at+jwt", "kid": kid})),
        b64(&real_claims)
    );
    let hs256_signature = {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&public_key).unwrap();
        mac.update(hs256_input.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    };
    let mut tampered_parts: Vec<String> = real.split('.').map(str::to_owned).collect();
    tampered_parts[1] = b64(&with("role", json!("admin")));
    let forgeries = [
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "at+jwt", "kid": kid})),
                b64(&real_claims)
            ),
        ),
        (
            "HS256 keyed with the public key",
            format!("{hs256_input}.{hs256_signature}"),
        ),
        (
            "wrong issuer",
            signed_token(&seed, &header, &with("iss", json!("https://evil.example"))),
        ),
        (
            "wrong audience",
            signed_token(&seed, &header, &with("aud", json!("https://other.example"))),
        ),
        (
            "expired",
            signed_token(&seed, &header, &with("exp", json!(now - 3600))),
        ),
        (
            "not yet valid",
            signed_token(&seed, &header, &with("nbf", json!(now + 3600))),
        ),
        (
            "unknown kid",
            signed_token(
                &seed,
                &json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "0011223344556677"}),
                &real_claims,
            ),
        ),
        ("claims changed after signing", tampered_parts.join(".")),
    ];
    let mut saw_back_off = false;
    for (what, token) in &forgeries {
        let (response, throttled) = send_patiently(|| {
            client
                .get(format!("{}/fhir/Patient/anyone", server.base_url))
                .bearer_auth(token)
        });
        saw_back_off |= throttled;
        assert_eq!(response.status().as_u16(), 401, "{what}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    assert!(
        saw_back_off,
        "repeated failures from one address back off with 429"
    );
    let (response, _) = send_patiently(|| {
        client
            .get(format!("{}/fhir/Patient/anyone", server.base_url))
            .bearer_auth(&real)
    });
    assert_eq!(
        response.status().as_u16(),
        404,
        "the real token still works"
    );

    // Scope escalation: a client asks for more than it was registered with.
    let output = server.command(&[
        "clients",
        "create",
        "--name",
        "narrow",
        "--role",
        "clinician",
        "--scope",
        "system/Observation.rs",
        "--json",
    ]);
    let narrow: Value = serde_json::from_slice(&output.stdout).unwrap();
    let narrow_id = narrow["client_id"].as_str().unwrap();
    let narrow_secret = narrow["client_secret"].as_str().unwrap();
    let ask = |scope: &str| {
        send_patiently(|| {
            client
                .post(format!("{}/auth/token", server.base_url))
                .basic_auth(narrow_id, Some(narrow_secret))
                .form(&[("grant_type", "client_credentials"), ("scope", scope)])
        })
        .0
    };
    let escalation = ask("system/*.cruds");
    assert_eq!(escalation.status().as_u16(), 400);
    let body: Value = escalation.json().unwrap();
    assert_eq!(body["error"], "invalid_scope");
    let partly: Value = ask("system/Observation.rs system/Patient.cruds")
        .json()
        .unwrap();
    assert_eq!(partly["scope"], "system/Observation.rs");
    let write = client
        .post(format!("{}/fhir/Patient", server.base_url))
        .bearer_auth(partly["access_token"].as_str().unwrap())
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient"}"#)
        .send()
        .unwrap();
    assert_eq!(write.status().as_u16(), 403);

    let officer = compliance_token(&server);
    let (response, _) = send_patiently(|| {
        client
            .get(format!(
                "{}/audit?type=110114&outcome=4&limit=100",
                server.base_url
            ))
            .bearer_auth(&officer)
    });
    let failures: Value = response.json().unwrap();
    let refused = failures["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| {
            entry["event"]["outcome_reason"]
                .as_str()
                .is_some_and(|reason| reason.starts_with("access token refused"))
        })
        .count();
    assert!(
        refused >= forgeries.len(),
        "every refused token is journaled ({refused})"
    );
}

fn fhir_status(
    client: &Client,
    server: &Server,
    token: &str,
    method: &str,
    path: &str,
    extra_header: Option<(&str, &str)>,
) -> u16 {
    let url = format!("{}/fhir/{path}", server.base_url);
    let resource_type = path.split('/').next().unwrap();
    // A valid body of the type (the server checks bodies against the R4 model).
    let body = match resource_type {
        "Observation" => {
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}})
        }
        "Device" => json!({"resourceType": "Device", "status": "active"}),
        other => json!({"resourceType": other}),
    };
    let mut body_with_id = body.clone();
    body_with_id["id"] = json!(path.split('/').nth(1).unwrap_or_default());
    let (response, _) = send_patiently(|| {
        let mut request = match method {
            "POST" => client.post(&url).json(&body),
            "PUT" => client.put(&url).json(&body_with_id),
            "DELETE" => client.delete(&url),
            _ => client.get(&url),
        };
        request = request
            .bearer_auth(token)
            .header("content-type", "application/fhir+json");
        if let Some((name, value)) = extra_header {
            request = request.header(name, value);
        }
        request
    });
    response.status().as_u16()
}

#[test]
fn break_glass_is_allowed_flagged_and_counted() {
    let (_workspace, server, client) = start();
    let full = server.token_for("clinician", &["system/*.cruds"]);
    assert_eq!(
        fhir_status(&client, &server, &full, "PUT", "Observation/vitals", None),
        201
    );
    let narrow = server.token_for("clinician", &["system/Patient.rs"]);
    assert_eq!(
        fhir_status(&client, &server, &narrow, "GET", "Observation/vitals", None),
        403
    );
    let reason = Some(("x-break-glass-reason", "patient unresponsive in the ED"));
    assert_eq!(
        fhir_status(
            &client,
            &server,
            &narrow,
            "GET",
            "Observation/vitals",
            reason
        ),
        200
    );
    assert_eq!(
        fhir_status(
            &client,
            &server,
            &narrow,
            "DELETE",
            "Observation/vitals",
            reason
        ),
        403,
        "break-glass never writes"
    );
    let metrics = client
        .get(format!("{}/metrics", server.base_url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("glastonbury_break_glass_accesses_total 1"),
        "{metrics}"
    );
    let officer = compliance_token(&server);
    let alerts: Value = client
        .get(format!("{}/audit?type=110113", server.base_url))
        .bearer_auth(&officer)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let emergency = alerts["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["event"]["subtypes"][0]["code"] == "break-glass")
        .expect("the emergency is journaled as a security alert");
    assert_eq!(emergency["event"]["break_glass"], true);
    assert_eq!(emergency["detail"], "patient unresponsive in the ED");
    let records: Value = client
        .get(format!("{}/audit?type=110110", server.base_url))
        .bearer_auth(&officer)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let flagged: Vec<&Value> = records["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["event"]["break_glass"] == true)
        .collect();
    assert_eq!(flagged.len(), 1, "the emergency read's own leaf is flagged");
    assert_eq!(
        flagged[0]["event"]["policy_ids"],
        json!(["clinician-break-glass"])
    );
}

#[test]
fn purpose_of_use_is_checked_and_decides() {
    let (_workspace, server, client) = start();
    let clinician = server.token_for("clinician", &["system/*.cruds"]);
    let purpose = |value: &'static str| Some(("x-purpose-of-use", value));
    assert_eq!(
        fhir_status(
            &client,
            &server,
            &clinician,
            "GET",
            "Patient/p",
            purpose("TREAT")
        ),
        404
    );
    assert_eq!(
        fhir_status(
            &client,
            &server,
            &clinician,
            "GET",
            "Patient/p",
            purpose("HRESCH")
        ),
        404,
        "research gets the de-identified view, where a real id names nothing"
    );
    assert_eq!(
        fhir_status(
            &client,
            &server,
            &clinician,
            "GET",
            "Patient/p",
            purpose("whatever")
        ),
        400,
        "an unknown purpose is refused, not dropped"
    );
}

#[test]
fn policies_reload_on_sighup_and_a_bad_set_is_refused() {
    let workspace = tempfile::tempdir().unwrap();
    let policies = workspace.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for name in ["glastonbury.cedar", "schema.cedarschema"] {
        std::fs::copy(source.join(name), policies.join(name)).unwrap();
    }
    let server = Server::start(
        &workspace.path().join("data"),
        &[("GLASTONBURY_POLICIES_DIR", policies.to_str().unwrap())],
    );
    let client = Client::new();
    let clinician = server.token_for("clinician", &["system/*.cruds"]);
    assert_eq!(
        fhir_status(&client, &server, &clinician, "GET", "Patient/p", None),
        404
    );
    let hangup = |expect_in_log: &str| {
        let pid = server.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !server.log().contains(expect_in_log) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {expect_in_log:?} in the log"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let without_clinicians: String = std::fs::read_to_string(policies.join("glastonbury.cedar"))
        .unwrap()
        .replace(
            "@id(\"clinician-phi-within-scope\")\npermit",
            "@id(\"clinician-phi-within-scope\")\nforbid",
        );
    std::fs::write(policies.join("glastonbury.cedar"), without_clinicians).unwrap();
    hangup("policies reloaded");
    assert_eq!(
        fhir_status(&client, &server, &clinician, "GET", "Patient/p", None),
        403
    );
    std::fs::write(
        policies.join("broken.cedar"),
        "permit (principal, action, resource) when { context.nonsense };",
    )
    .unwrap();
    hangup("policies not reloaded");
    assert!(
        server.log().contains("broken.cedar"),
        "the error names the file"
    );
    assert_eq!(
        fhir_status(&client, &server, &clinician, "GET", "Patient/p", None),
        403,
        "the set in force stays"
    );
}

#[test]
fn every_role_action_and_resource_cell_is_decided_by_policy() {
    let (_workspace, server, client) = start();
    let roles = ["clinician", "researcher", "compliance", "device", "admin"];
    let tokens: Vec<(&str, String)> = roles
        .iter()
        .map(|role| (*role, server.token_for(role, &["system/*.cruds"])))
        .collect();
    let seed = &tokens[0].1;
    for resource_type in ["Patient", "Observation", "Device"] {
        assert_eq!(
            fhir_status(
                &client,
                &server,
                seed,
                "PUT",
                &format!("{resource_type}/seed"),
                None
            ),
            201
        );
    }
    let mut cells = 0;
    for (role, token) in &tokens {
        for resource_type in ["Patient", "Observation", "Device"] {
            for (action, method, path) in [
                ("create", "POST", resource_type.to_owned()),
                ("read", "GET", format!("{resource_type}/seed")),
                ("update", "PUT", format!("{resource_type}/seed")),
                ("delete", "DELETE", format!("{resource_type}/other")),
            ] {
                // A device writes only data that names itself; these bodies name no device. A
                // researcher reads the de-identified view (where `seed` is no pseudonym: 404).
                let expected_allowed =
                    *role == "clinician" || (*role == "researcher" && action == "read");
                let status = fhir_status(&client, &server, token, method, &path, None);
                let allowed = status != 403;
                assert_eq!(
                    allowed, expected_allowed,
                    "{role} {action} {resource_type}: HTTP {status}"
                );
                assert!(
                    status != 401 && status < 500,
                    "{role} {action} {resource_type}: {status}"
                );
                cells += 1;
            }
        }
        let audit = send_patiently(|| {
            client
                .get(format!("{}/audit?limit=1", server.base_url))
                .bearer_auth(token)
        })
        .0
        .status()
        .as_u16();
        assert_eq!(
            audit == 200,
            *role == "compliance",
            "{role} reads the audit journal: {audit}"
        );
        cells += 1;
    }
    assert_eq!(cells, 65);

    // A device creates observations that name it, never another device's.
    let device_token = &tokens[3].1;
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(device_token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let device_id = claims["sub"].as_str().unwrap();
    let observe = |device_reference: &str| {
        send_patiently(|| {
            client
                .post(format!("{}/fhir/Observation", server.base_url))
                .bearer_auth(device_token)
                .json(&json!({"resourceType": "Observation", "status": "final",
                    "code": {"text": "heart rate"}, "device": {"reference": device_reference}}))
        })
        .0
        .status()
        .as_u16()
    };
    assert_eq!(observe(&format!("Device/{device_id}")), 201);
    assert_eq!(observe("Device/someone-else"), 403);
}

#[test]
fn outbound_tokens_come_from_a_remote_token_server_and_are_cached() {
    use glastonbury::auth::outbound::{OutboundCredential, OutboundTokenSource};
    use secrecy::ExposeSecret as _;
    // Another Glastonbury plays the remote EHR's authorization server.
    let (_workspace, remote, client) = start();
    let backend_id = register_backend_client(&remote);
    let output = remote.command(&[
        "clients",
        "create",
        "--name",
        "delivery",
        "--role",
        "clinician",
        "--scope",
        "system/Observation.rs",
        "--json",
    ]);
    let secret_client: Value = serde_json::from_slice(&output.stdout).unwrap();
    let token_url = format!("{}/auth/token", remote.base_url);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let with_key = OutboundTokenSource::new(
        &token_url,
        &backend_id,
        OutboundCredential::PrivateKey {
            pem: secrecy::SecretBox::new(Box::new(std::fs::read(fixture("es384.pem")).unwrap())),
            algorithm: jsonwebtoken::Algorithm::ES384,
            key_id: "backend-es384".to_owned(),
        },
        &["system/*.rs"],
    )
    .unwrap();
    let with_secret = OutboundTokenSource::new(
        &token_url,
        secret_client["client_id"].as_str().unwrap(),
        OutboundCredential::Secret(secret_client["client_secret"].as_str().unwrap().into()),
        &["system/Observation.rs"],
    )
    .unwrap();
    for source in [&with_key, &with_secret] {
        let first = runtime.block_on(source.access_token()).unwrap();
        let again = runtime.block_on(source.access_token()).unwrap();
        assert_eq!(
            first.expose_secret(),
            again.expose_secret(),
            "cached until near expiry"
        );
        let read = client
            .get(format!("{}/fhir/Observation/none", remote.base_url))
            .bearer_auth(first.expose_secret())
            .send()
            .unwrap();
        assert_eq!(read.status().as_u16(), 404, "the remote accepts the token");
    }
    let wrong = OutboundTokenSource::new(
        &token_url,
        &backend_id,
        OutboundCredential::PrivateKey {
            pem: secrecy::SecretBox::new(Box::new(
                std::fs::read(fixture("stranger-es384.pem")).unwrap(),
            )),
            algorithm: jsonwebtoken::Algorithm::ES384,
            key_id: "backend-es384".to_owned(),
        },
        &["system/*.rs"],
    )
    .unwrap();
    let refused = runtime.block_on(wrong.access_token()).unwrap_err();
    assert!(refused.to_string().contains("refused"), "{refused}");
}

#[test]
fn python_fhirclient_reads_with_a_backend_services_token() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "the Python test clients are not installed: run scripts/install-test-deps.sh"
    );
    let (_workspace, server, client) = start();
    let clinician = server.token_for("clinician", &["system/*.cruds"]);
    let created: Value = client
        .post(format!("{}/fhir/Patient", server.base_url))
        .bearer_auth(&clinician)
        .json(&json!({"resourceType": "Patient", "name": [{"family": "Fhirclient", "given": ["Py"]}]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let backend_id = register_backend_client(&server);
    let output = std::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/backend_services_read.py"))
        .args([
            server.base_url.as_str(),
            backend_id.as_str(),
            fixture("es384.pem").to_str().unwrap(),
            "backend-es384",
            created["id"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "fhirclient failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "Fhirclient");
}

#[test]
fn token_signing_keys_rotate_with_overlap() {
    let (_workspace, server, client) = start();
    let before = server.token_for("clinician", &["system/*.cruds"]);
    let rotated = server.command(&["keys", "rotate-token-key"]);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.log().contains("token signing keys reloaded") {
        assert!(std::time::Instant::now() < deadline, "keys not reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    let jwks: Value = client
        .get(format!("{}/auth/jwks", server.base_url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        jwks["keys"].as_array().unwrap().len(),
        2,
        "new and previous key published"
    );
    let after = server.token_for("clinician", &["system/*.cruds"]);
    let kid = |token: &str| -> Value {
        serde_json::from_slice::<Value>(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap()["kid"]
            .clone()
    };
    assert_ne!(
        kid(&before),
        kid(&after),
        "new tokens are signed with the new key"
    );
    assert_eq!(jwks["keys"][0]["kid"], kid(&after));
    for token in [&before, &after] {
        assert_eq!(
            fhir_status(&client, &server, token, "GET", "Patient/nobody", None),
            404,
            "tokens of both keys are accepted during the overlap"
        );
    }
}

/// Serves `body` as JSON to every request on a loopback port, counting requests.
fn serve_json(body: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&served);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, served)
}

#[test]
fn backend_clients_may_publish_their_keys_at_a_jwks_url() {
    let (_workspace, server, client) = start();
    let (jwks_url, served) = serve_json(std::fs::read_to_string(fixture("jwks.json")).unwrap());
    let refused = server.command(&[
        "clients",
        "create",
        "--name",
        "remote",
        "--role",
        "clinician",
        "--jwks-url",
        "http://keys.example.org/jwks.json",
    ]);
    assert!(
        !refused.status.success(),
        "plain http off the box is refused"
    );
    let output = server.command(&[
        "clients",
        "create",
        "--name",
        "remote",
        "--role",
        "clinician",
        "--scope",
        "system/*.rs",
        "--jwks-url",
        &jwks_url,
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let client_id = serde_json::from_slice::<Value>(&output.stdout).unwrap()["client_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let audience = format!("{}/auth/token", server.base_url);
    for _ in 0..2 {
        let signed = assertion(
            &client_id,
            &AssertionShape {
                algorithm: jsonwebtoken::Algorithm::RS384,
                key_file: "rs384.pem",
                kid: "backend-rs384",
                audience: audience.clone(),
                expires_in: 120,
                jti: uuid::Uuid::new_v4().to_string(),
            },
        );
        let (status, body) = token_request(&client, &server, &signed);
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the fetched keys are reused"
    );
}

#[test]
fn the_token_command_signs_assertions_with_a_client_key() {
    let (_workspace, server, client) = start();
    let client_id = register_backend_client(&server);
    for (key, kid) in [
        ("rs384.pem", "backend-rs384"),
        ("es384.pem", "backend-es384"),
    ] {
        let output = server.command(&[
            "token",
            "--client",
            &client_id,
            "--key",
            fixture(key).to_str().unwrap(),
            "--kid",
            kid,
            "--server",
            &server.base_url,
        ]);
        assert!(
            output.status.success(),
            "{key}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        assert_eq!(
            fhir_status(&client, &server, &token, "GET", "Patient/nobody", None),
            404,
            "{key}"
        );
    }
    let refused = server.command(&[
        "token",
        "--client",
        &client_id,
        "--key",
        fixture("stranger-es384.pem").to_str().unwrap(),
        "--kid",
        "backend-es384",
        "--server",
        &server.base_url,
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).starts_with("error: token request refused"));
}
