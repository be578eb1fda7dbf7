//! The web console's sign-in: OpenID Connect authorization code + PKCE against the hospital's
//! provider, server-side sessions in HttpOnly SameSite cookies (Secure under TLS) with ids
//! rotated at sign-in and every few minutes, automatic sign-out after the configured idle time,
//! and a minimal landing page. The console itself comes later on these routes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::AppState;
use super::problem::Problem;

const SESSION_COOKIE: &str = "glastonbury_session";
const LOGIN_COOKIE: &str = "glastonbury_login";
/// A sign-in must come back from the provider within this time.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Session ids are replaced after this long, even while in use.
const ROTATE_AFTER: Duration = Duration::from_secs(300);
/// A session ends this long after sign-in however active it is (roles are re-checked at the
/// provider by signing in again).
const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Sign-ins in progress kept at most; beyond it new ones are refused until old ones expire.
const MAX_PENDING_LOGINS: usize = 10_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(landing))
        .route("/login", get(login))
        .route("/callback", get(callback))
        .route("/logout", post(logout))
}

/// A sign-in in progress, keyed by its `state`.
#[derive(Debug)]
struct PendingLogin {
    nonce: String,
    verifier: String,
    started: Instant,
}

/// A signed-in person.
#[derive(Debug, Clone)]
struct Session {
    subject: String,
    role: String,
    signed_in: Instant,
    created: Instant,
    last_seen: Instant,
}

/// Sessions and pending sign-ins of this process. Session ids are kept only as SHA-256 hashes.
#[derive(Debug, Default)]
pub struct ConsoleSessions {
    pending: Mutex<HashMap<String, PendingLogin>>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn session_key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn cookie(state: &AppState, name: &str, value: &str, max_age_seconds: u64) -> HeaderValue {
    let secure = if state.appliance.settings.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let text = format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Lax; Max-Age={max_age_seconds}{secure}"
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn not_configured() -> Response {
    Problem::new(
        StatusCode::NOT_FOUND,
        "Not Found",
        "the console needs oidc_issuer, oidc_client_id and oidc_client_secret".to_owned(),
    )
    .into_response()
}

fn redirect_uri(state: &AppState) -> String {
    format!("{}/console/callback", state.appliance.tokens.issuer())
}

async fn login(State(state): State<AppState>) -> Response {
    let (Some(provider), Some(client_id)) = (
        state.appliance.external_issuer.as_ref(),
        state.appliance.settings.oidc_client_id.as_ref(),
    ) else {
        return not_configured();
    };
    let login_state = random_token();
    let nonce = random_token();
    let verifier = random_token();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    {
        let mut pending = state
            .console
            .pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if pending.len() >= MAX_PENDING_LOGINS {
            pending.retain(|_, login| login.started.elapsed() < LOGIN_TIMEOUT);
        }
        if pending.len() >= MAX_PENDING_LOGINS {
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "too many sign-ins in progress; try again in a few minutes".to_owned(),
            )
            .into_response();
        }
        pending.insert(
            login_state.clone(),
            PendingLogin {
                nonce: nonce.clone(),
                verifier,
                started: Instant::now(),
            },
        );
    }
    let mut target = match url::Url::parse(&provider.authorization_endpoint) {
        Ok(target) => target,
        Err(_) => return not_configured(),
    };
    target
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", &redirect_uri(&state))
        .append_pair("scope", "openid profile")
        .append_pair("state", &login_state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let mut response = Redirect::to(target.as_str()).into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        cookie(&state, LOGIN_COOKIE, &login_state, LOGIN_TIMEOUT.as_secs()),
    );
    response
}

#[derive(Debug, serde::Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

fn sign_in_failed(reason: &str) -> Response {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "Sign-in failed",
        reason.to_owned(),
    )
    .into_response()
}

async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let (Some(provider), Some(client_id), Some(client_secret)) = (
        state.appliance.external_issuer.as_ref(),
        state.appliance.settings.oidc_client_id.as_ref(),
        state.appliance.settings.oidc_client_secret.as_ref(),
    ) else {
        return not_configured();
    };
    if query.error.is_some() {
        return sign_in_failed("the identity provider refused the sign-in");
    }
    let (Some(code), Some(returned_state)) = (query.code, query.state) else {
        return sign_in_failed("the provider's answer is incomplete");
    };
    let cookie_state = cookie_value(&headers, LOGIN_COOKIE).unwrap_or_default();
    let same_browser: bool =
        subtle::ConstantTimeEq::ct_eq(cookie_state.as_bytes(), returned_state.as_bytes()).into();
    let pending = state
        .console
        .pending
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .remove(&returned_state);
    let Some(pending) = pending.filter(|login| login.started.elapsed() < LOGIN_TIMEOUT) else {
        return sign_in_failed("this sign-in expired or was already used; start again");
    };
    if !same_browser {
        return sign_in_failed("this sign-in was started in another browser");
    }
    let exchange = provider
        .http()
        .post(&provider.token_endpoint)
        .basic_auth(client_id, Some(client_secret.expose_secret()))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect_uri(&state).as_str()),
            ("code_verifier", pending.verifier.as_str()),
        ])
        .send()
        .await;
    let tokens: serde_json::Value = match exchange {
        Ok(response) if response.status().is_success() => {
            response.json().await.unwrap_or(serde_json::Value::Null)
        }
        Ok(response) => {
            tracing::warn!(status = %response.status(), "console code exchange refused");
            return sign_in_failed("the provider refused the code exchange");
        }
        Err(error) => {
            tracing::warn!(error = %error, "console code exchange failed");
            return sign_in_failed("the provider could not be reached");
        }
    };
    let Some(id_token) = tokens["id_token"].as_str() else {
        return sign_in_failed("the provider returned no ID token");
    };
    let claims = match provider
        .verify_id_token(id_token, client_id, &pending.nonce)
        .await
    {
        Ok(claims) => claims,
        Err(error) => {
            tracing::warn!(error = %error, "console ID token refused");
            return sign_in_failed("the ID token is not valid for this sign-in");
        }
    };
    let subject = claims["sub"].as_str().unwrap_or_default().to_owned();
    let Some(role) = provider.role_of(&claims) else {
        journal(
            &state,
            &subject,
            None,
            Some("console sign-in without a known role"),
        )
        .await;
        return Problem::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "your account has no Glastonbury role".to_owned(),
        )
        .into_response();
    };
    let session_id = random_token();
    let now = Instant::now();
    state
        .console
        .sessions
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .insert(
            session_key(&session_id),
            Session {
                subject: subject.clone(),
                role: role.clone(),
                signed_in: now,
                created: now,
                last_seen: now,
            },
        );
    journal(&state, &subject, role.parse().ok(), None).await;
    let mut response = Redirect::to("/console").into_response();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        cookie(
            &state,
            SESSION_COOKIE,
            &session_id,
            idle_limit(&state).as_secs(),
        ),
    );
    headers.append(header::SET_COOKIE, cookie(&state, LOGIN_COOKIE, "", 0));
    response
}

fn idle_limit(state: &AppState) -> Duration {
    Duration::from_secs(state.appliance.settings.console_idle_seconds.max(1))
}

async fn journal(
    state: &AppState,
    subject: &str,
    role: Option<crate::access::Role>,
    failure: Option<&str>,
) {
    if let Err(error) = state
        .appliance
        .records
        .journal_authentication(subject, None, role, failure)
        .await
    {
        tracing::error!(error = %error, "console sign-in was not journaled");
    }
}

/// The session of this request, touched (idle clock reset) and rotated when old; `None` when
/// absent, unknown or idle too long (then it is removed).
fn current_session(state: &AppState, headers: &HeaderMap) -> Option<(Session, Option<String>)> {
    let id = cookie_value(headers, SESSION_COOKIE)?;
    let key = session_key(id);
    let mut sessions = state
        .console
        .sessions
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let idle = idle_limit(state);
    sessions.retain(|_, session| {
        session.last_seen.elapsed() < idle && session.signed_in.elapsed() < SESSION_MAX_AGE
    });
    let mut session = sessions.remove(&key)?;
    session.last_seen = Instant::now();
    if session.created.elapsed() < ROTATE_AFTER {
        sessions.insert(key, session.clone());
        return Some((session, None));
    }
    let rotated = random_token();
    session.created = Instant::now();
    sessions.insert(session_key(&rotated), session.clone());
    Some((session, Some(rotated)))
}

async fn landing(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some((session, rotated)) = current_session(&state, &headers) else {
        return Redirect::to("/console/login").into_response();
    };
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Glastonbury</title></head>\
         <body><h1>Glastonbury</h1><p>Signed in as <strong>{}</strong> ({}).</p>\
         <p>Sessions end after {} idle seconds.</p>\
         <form method=\"post\" action=\"/console/logout\"><button type=\"submit\">Sign out</button></form></body></html>",
        html_escape(&session.subject),
        html_escape(&session.role),
        state.appliance.settings.console_idle_seconds
    );
    let mut response = Html(page).into_response();
    if let Some(rotated) = rotated {
        response.headers_mut().append(
            header::SET_COOKIE,
            cookie(
                &state,
                SESSION_COOKIE,
                &rotated,
                idle_limit(&state).as_secs(),
            ),
        );
    }
    response
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_value(&headers, SESSION_COOKIE) {
        state
            .console
            .sessions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&session_key(id));
    }
    let page = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Signed out</title></head>\
                <body><h1>Signed out</h1><p><a href=\"/console\">Sign in again</a></p></body></html>";
    let mut response = Html(page).into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, cookie(&state, SESSION_COOKIE, "", 0));
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
