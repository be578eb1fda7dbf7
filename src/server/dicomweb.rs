//! DICOMweb at `/dicomweb` (PS3.18): STOW-RS (streamed: each instance stored as soon as it has
//! arrived, several at once, with per-instance results in the order sent), QIDO-RS for studies,
//! series and instances, and WADO-RS retrieval of studies, series and instances as
//! `multipart/related` Part 10 (byte for byte as stored), of their metadata as DICOM JSON, of
//! frames (as stored: compressed frames are not transcoded) and of rendered JPEG or PNG images of a
//! frame. Everything goes through the record path's DICOM calls; errors outside the DICOM status
//! model are RFC 9457 problem documents.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dicom_dictionary_std::tags;
use futures::StreamExt;
use glastonbury_dicom::dimse;
use glastonbury_dicom::frames::{self, FrameError};
use glastonbury_dicom::multipart::{self, PartReader};
use glastonbury_dicom::qido::{self, Level};
use glastonbury_dicom::render::{self, ImageFormat, RenderError, RenderRequest, Window};
use glastonbury_dicom::{InstanceError, json};
use serde_json::{Map, Value, json as json_value};
use tracing::Instrument;

use super::AppState;
use super::authenticate::Caller;
use super::problem::Problem;
use crate::access;
use crate::records::RecordError;
use crate::records::dicom::{
    DicomMatch, DicomScope, DicomStoreRefusal, IMAGING_RESOURCE_TYPE, RetrievableInstance,
};

/// The media type of DICOM JSON.
pub const DICOM_JSON: &str = "application/dicom+json";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/studies", get(query_studies).post(store))
        .route("/series", get(query_all_series))
        .route("/instances", get(query_all_instances))
        .route(
            "/studies/{study}",
            get(retrieve_study).post(store_into_study),
        )
        .route("/studies/{study}/metadata", get(study_metadata))
        .route("/studies/{study}/series", get(query_series_of_study))
        .route("/studies/{study}/instances", get(query_instances_of_study))
        .route("/studies/{study}/series/{series}", get(retrieve_series))
        .route(
            "/studies/{study}/series/{series}/metadata",
            get(series_metadata),
        )
        .route(
            "/studies/{study}/series/{series}/instances",
            get(query_instances_of_series),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}",
            get(retrieve_instance),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/metadata",
            get(instance_metadata),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
            get(retrieve_frames),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/rendered",
            get(render_instance),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
            get(render_frames),
        )
        .route(
            "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
            get(thumbnail_instance),
        )
}

/// An error of the DICOMweb surface, as a problem document.
fn problem(error: RecordError) -> Response {
    let (status, title, detail) = match error {
        RecordError::Denied(denied) => (StatusCode::FORBIDDEN, "Forbidden", denied.reason),
        RecordError::NotInView(reason) => (StatusCode::FORBIDDEN, "Forbidden", reason),
        RecordError::NotFound => (StatusCode::NOT_FOUND, "Not Found", "no such study, series or instance".to_owned()),
        RecordError::Shredded => (
            StatusCode::GONE,
            "Gone",
            "this patient's data was crypto-shredded and can no longer be read".to_owned(),
        ),
        RecordError::TooBroad => (
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "the query needs matching on too many candidates; narrow it with UIDs, dates, modality or identifiers".to_owned(),
        ),
        RecordError::Invalid(reason) => (StatusCode::BAD_REQUEST, "Bad Request", reason),
        other => {
            tracing::error!(error = %other, "dicomweb request failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "storage is unavailable; nothing was changed".to_owned(),
            )
        }
    };
    Problem::new(status, title, detail).into_response()
}

fn bad_request(detail: impl Into<String>) -> Response {
    Problem::new(StatusCode::BAD_REQUEST, "Bad Request", detail.into()).into_response()
}

fn base_url(state: &AppState) -> String {
    format!("{}/dicomweb", state.appliance.tokens.issuer())
}

fn retrieve_url(
    state: &AppState,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> String {
    let mut url = format!("{}/studies/{study}", base_url(state));
    if let Some(series) = series {
        url.push_str(&format!("/series/{series}"));
        if let Some(instance) = instance {
            url.push_str(&format!("/instances/{instance}"));
        }
    }
    url
}

// ---------------------------------------------------------------------------------------------
// QIDO-RS

async fn query_studies(state: State<AppState>, caller: Caller, query: RawQuery) -> Response {
    run_query(state, caller, query, Level::Study, DicomScope::default()).await
}

async fn query_all_series(state: State<AppState>, caller: Caller, query: RawQuery) -> Response {
    run_query(state, caller, query, Level::Series, DicomScope::default()).await
}

async fn query_all_instances(state: State<AppState>, caller: Caller, query: RawQuery) -> Response {
    run_query(state, caller, query, Level::Instance, DicomScope::default()).await
}

async fn query_series_of_study(
    state: State<AppState>,
    caller: Caller,
    Path(study): Path<String>,
    query: RawQuery,
) -> Response {
    let scope = DicomScope::of(Some(study), None, None);
    run_query(state, caller, query, Level::Series, scope).await
}

async fn query_instances_of_study(
    state: State<AppState>,
    caller: Caller,
    Path(study): Path<String>,
    query: RawQuery,
) -> Response {
    let scope = DicomScope::of(Some(study), None, None);
    run_query(state, caller, query, Level::Instance, scope).await
}

async fn query_instances_of_series(
    state: State<AppState>,
    caller: Caller,
    Path((study, series)): Path<(String, String)>,
    query: RawQuery,
) -> Response {
    let scope = DicomScope::of(Some(study), Some(series), None);
    run_query(state, caller, query, Level::Instance, scope).await
}

async fn run_query(
    State(state): State<AppState>,
    Caller(caller): Caller,
    RawQuery(query): RawQuery,
    level: Level,
    scope: DicomScope,
) -> Response {
    let query_text = query.unwrap_or_default();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query_text.as_bytes())
        .into_owned()
        .collect();
    let parsed = match qido::parse_query(level, &pairs) {
        Ok(parsed) => parsed,
        Err(error) => return bad_request(error.0),
    };
    let records = &state.appliance.records;
    let outcome = async {
        let allowed = records
            .authorize::<access::Search>(&caller, IMAGING_RESOURCE_TYPE)
            .await?;
        records
            .query_dicom(&allowed, &parsed, &scope, &query_text)
            .await
    };
    let matches = match outcome.await {
        Ok(matches) => matches,
        Err(error) => return problem(error),
    };
    let results: Vec<Value> = matches
        .into_iter()
        .map(|found| query_result(&state, level, found))
        .collect();
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, DICOM_JSON)],
        Value::Array(results).to_string(),
    )
        .into_response();
    for warning in &parsed.warnings {
        if let Ok(value) = HeaderValue::from_str(&format!("299 glastonbury \"{warning}\"")) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

fn query_result(state: &AppState, level: Level, found: DicomMatch) -> Value {
    let mut attributes = found.attributes;
    let url = match level {
        Level::Study => retrieve_url(state, &found.study_uid, None, None),
        Level::Series => retrieve_url(state, &found.study_uid, Some(&found.series_uid), None),
        Level::Instance => retrieve_url(
            state,
            &found.study_uid,
            Some(&found.series_uid),
            Some(&found.instance_uid),
        ),
    };
    json::put(
        &mut attributes,
        tags::RETRIEVE_URL,
        "UR",
        vec![Value::String(url)],
    );
    Value::Object(attributes)
}

// ---------------------------------------------------------------------------------------------
// WADO-RS

async fn retrieve_study(
    state: State<AppState>,
    caller: Caller,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> Response {
    let scope = DicomScope::of(Some(study), None, None);
    retrieve(state, caller, scope, headers).await
}

async fn retrieve_series(
    state: State<AppState>,
    caller: Caller,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let scope = DicomScope::of(Some(study), Some(series), None);
    retrieve(state, caller, scope, headers).await
}

async fn retrieve_instance(
    state: State<AppState>,
    caller: Caller,
    Path((study, series, instance)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let scope = DicomScope::of(Some(study), Some(series), Some(instance));
    retrieve(state, caller, scope, headers).await
}

/// The media ranges of `Accept` (`*/*` when absent): each lower-cased media type with the
/// whole candidate, parameters included.
fn accept_candidates(headers: &HeaderMap) -> Vec<(String, String)> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("*/*");
    accept
        .split(',')
        .map(|candidate| {
            let media = candidate
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            (media, candidate.to_owned())
        })
        .collect()
}

/// What a retrieval's `Accept` asks for: Part 10 files (in any transfer syntax, or one that
/// must be the stored one: nothing is transcoded).
fn accepted_transfer_syntax(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    for (media, candidate) in accept_candidates(headers) {
        let dicom_parts = media == "multipart/related"
            && multipart::parameter(&candidate, "type")
                .is_none_or(|kind| kind.eq_ignore_ascii_case("application/dicom"));
        if dicom_parts || media == "*/*" || media == "application/dicom" {
            let syntax =
                multipart::parameter(&candidate, "transfer-syntax").filter(|syntax| syntax != "*");
            return Ok(syntax);
        }
    }
    Err(Problem::new(
        StatusCode::NOT_ACCEPTABLE,
        "Not Acceptable",
        "instances are served as multipart/related; type=\"application/dicom\"".to_owned(),
    ))
}

async fn retrieve(
    State(state): State<AppState>,
    Caller(caller): Caller,
    scope: DicomScope,
    headers: HeaderMap,
) -> Response {
    let wanted_syntax = match accepted_transfer_syntax(&headers) {
        Ok(wanted) => wanted,
        Err(problem) => return problem.into_response(),
    };
    let records = Arc::clone(&state.appliance.records);
    let instances = match authorized_instances(&records, &caller, &scope).await {
        Ok(instances) => instances,
        Err(error) => return problem(error),
    };
    if let Some(wanted) = &wanted_syntax
        && instances
            .iter()
            .any(|instance| &instance.transfer_syntax_uid != wanted)
    {
        return Problem::new(
            StatusCode::NOT_ACCEPTABLE,
            "Not Acceptable",
            "instances are served in the transfer syntax they were stored in; ask for transfer-syntax=*".to_owned(),
        )
        .into_response();
    }
    let boundary = uuid::Uuid::new_v4().simple().to_string();
    let content_type =
        format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    let closing = multipart::closing(&boundary);
    let parts = futures::stream::iter(instances)
        .then(move |instance| {
            let records = Arc::clone(&records);
            let boundary = boundary.clone();
            async move {
                let file = records
                    .dicom_file(&instance)
                    .await
                    .map_err(|error| std::io::Error::other(error.to_string()))?;
                let opening = multipart::part_opening(
                    &boundary,
                    &format!(
                        "application/dicom; transfer-syntax={}",
                        instance.transfer_syntax_uid
                    ),
                    &[],
                );
                Ok::<_, std::io::Error>(futures::stream::iter([
                    Ok(Bytes::from(opening)),
                    Ok(file),
                    Ok(Bytes::from_static(multipart::PART_END)),
                ]))
            }
        })
        .map(|part| match part {
            Ok(chunks) => chunks.left_stream(),
            Err(error) => futures::stream::iter([Err(error)]).right_stream(),
        })
        .flatten()
        .chain(futures::stream::once(async move {
            Ok::<_, std::io::Error>(Bytes::from(closing))
        }));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(parts),
    )
        .into_response()
}

async fn authorized_instances(
    records: &crate::records::Records,
    caller: &Arc<crate::access::Principal>,
    scope: &DicomScope,
) -> Result<Vec<RetrievableInstance>, RecordError> {
    let allowed = records
        .authorize::<access::Read>(caller, IMAGING_RESOURCE_TYPE)
        .await?;
    records.dicom_instances(&allowed, scope).await
}

async fn study_metadata(
    state: State<AppState>,
    caller: Caller,
    Path(study): Path<String>,
) -> Response {
    let scope = DicomScope::of(Some(study), None, None);
    metadata(state, caller, scope).await
}

async fn series_metadata(
    state: State<AppState>,
    caller: Caller,
    Path((study, series)): Path<(String, String)>,
) -> Response {
    let scope = DicomScope::of(Some(study), Some(series), None);
    metadata(state, caller, scope).await
}

async fn instance_metadata(
    state: State<AppState>,
    caller: Caller,
    Path((study, series, instance)): Path<(String, String, String)>,
) -> Response {
    let scope = DicomScope::of(Some(study), Some(series), Some(instance));
    metadata(state, caller, scope).await
}

/// Headers as DICOM JSON; Pixel Data is named by a `BulkDataURI` (the instance itself).
async fn metadata(
    State(state): State<AppState>,
    Caller(caller): Caller,
    scope: DicomScope,
) -> Response {
    let records = &state.appliance.records;
    let instances = match authorized_instances(records, &caller, &scope).await {
        Ok(instances) => instances,
        Err(error) => return problem(error),
    };
    let headers = match records.dicom_headers(&instances).await {
        Ok(headers) => headers,
        Err(error) => return problem(error),
    };
    match metadata_body(&state, &instances, headers) {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, DICOM_JSON)], body).into_response(),
        Err(_) => problem(RecordError::Damaged),
    }
}

/// The metadata response: the instances' headers (DICOM JSON object bytes, in their order) as
/// one array, each with its Pixel Data named by a `BulkDataURI` (the instance's own URL).
fn metadata_body(
    state: &AppState,
    instances: &[RetrievableInstance],
    headers: Vec<Vec<u8>>,
) -> Result<Vec<u8>, serde_json::Error> {
    let stored_bytes: usize = headers.iter().map(Vec::len).sum();
    let mut body = Vec::with_capacity(stored_bytes + instances.len() * METADATA_URI_ROOM + 2);
    body.push(b'[');
    for (index, (instance, header)) in instances.iter().zip(headers).enumerate() {
        if index > 0 {
            body.push(b',');
        }
        let pixel_data_uri = retrieve_url(
            state,
            &instance.study_uid,
            Some(&instance.series_uid),
            Some(&instance.instance_uid),
        );
        json::write_with_bulk_data(&mut body, &header, tags::PIXEL_DATA, "OB", &pixel_data_uri)?;
    }
    body.push(b']');
    Ok(body)
}

/// Room for one instance's Pixel Data reference in a metadata response.
const METADATA_URI_ROOM: usize = 256;

// ---------------------------------------------------------------------------------------------
// WADO-RS frames and rendered images

/// The Part 10 file of one instance the caller may retrieve (journaled as a transfer).
async fn one_instance_file(
    state: &AppState,
    caller: &Arc<crate::access::Principal>,
    scope: &DicomScope,
) -> Result<Bytes, Response> {
    let records = &state.appliance.records;
    let instances = authorized_instances(records, caller, scope)
        .await
        .map_err(problem)?;
    let instance = instances
        .first()
        .ok_or_else(|| problem(RecordError::NotFound))?;
    records.dicom_file(instance).await.map_err(problem)
}

fn frame_problem(error: &FrameError) -> Response {
    let status = match error {
        FrameError::OutOfRange { .. } | FrameError::NoPixelData => StatusCode::NOT_FOUND,
        FrameError::Unlocatable(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let title = status.canonical_reason().unwrap_or("Error");
    Problem::new(status, title, error.to_string()).into_response()
}

fn render_problem(error: &RenderError) -> Response {
    match error {
        RenderError::Frame(frame_error) => frame_problem(frame_error),
        RenderError::Unsupported(_) => Problem::new(
            StatusCode::NOT_ACCEPTABLE,
            "Not Acceptable",
            error.to_string(),
        )
        .into_response(),
        RenderError::Undecodable => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable Content",
            error.to_string(),
        )
        .into_response(),
    }
}

/// Whether `Accept` takes frames of this media type in this transfer syntax, as stored.
fn frames_acceptable(headers: &HeaderMap, media_type: &str, transfer_syntax: &str) -> bool {
    accept_candidates(headers)
        .into_iter()
        .any(|(media, candidate)| {
            let syntax_fits = multipart::parameter(&candidate, "transfer-syntax")
                .is_none_or(|syntax| syntax == "*" || syntax == transfer_syntax);
            let type_fits = |kind: &str| kind == "*/*" || kind.eq_ignore_ascii_case(media_type);
            match media.as_str() {
                "*/*" => true,
                "multipart/related" => {
                    syntax_fits
                        && multipart::parameter(&candidate, "type")
                            .is_none_or(|kind| type_fits(&kind))
                }
                other => syntax_fits && type_fits(other),
            }
        })
}

async fn retrieve_frames(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((study, series, instance, frame_list)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(numbers) = frames::parse_frame_list(&frame_list) else {
        return bad_request("frames are listed as 1-based numbers separated by commas");
    };
    let scope = DicomScope::of(Some(study), Some(series), Some(instance));
    let file = match one_instance_file(&state, &caller, &scope).await {
        Ok(file) => file,
        Err(response) => return response,
    };
    let extracted = tokio::task::spawn_blocking(move || {
        let object = glastonbury_dicom::instance::read_whole(&file)
            .map_err(|_| FrameError::Unlocatable("the stored instance cannot be read"))?;
        let transfer_syntax = object
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_owned();
        frames::extract(&object, &numbers).map(|frames| (transfer_syntax, frames))
    })
    .await;
    let (stored_syntax, extracted) = match extracted {
        Ok(Ok(extracted)) => extracted,
        Ok(Err(error)) => return frame_problem(&error),
        Err(_) => {
            return frame_problem(&FrameError::Unlocatable(
                "the stored pixel data cannot be read",
            ));
        }
    };
    let (media_type, transfer_syntax) = frames::media_type(&stored_syntax);
    if !frames_acceptable(&headers, media_type, transfer_syntax) {
        return Problem::new(
            StatusCode::NOT_ACCEPTABLE,
            "Not Acceptable",
            format!(
                "frames of this instance are served as stored: multipart/related; type=\"{media_type}\"; transfer-syntax={transfer_syntax}"
            ),
        )
        .into_response();
    }
    let boundary = uuid::Uuid::new_v4().simple().to_string();
    let content_type = format!(
        "multipart/related; type=\"{media_type}\"; transfer-syntax={transfer_syntax}; boundary={boundary}"
    );
    let part_type = format!("{media_type}; transfer-syntax={transfer_syntax}");
    let mut body = Vec::new();
    for frame in extracted {
        body.extend_from_slice(&multipart::part_opening(&boundary, &part_type, &[]));
        body.extend_from_slice(&frame);
        body.extend_from_slice(multipart::PART_END);
    }
    body.extend_from_slice(&multipart::closing(&boundary));
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn render_instance(
    state: State<AppState>,
    caller: Caller,
    Path((study, series, instance)): Path<(String, String, String)>,
    query: RawQuery,
    headers: HeaderMap,
) -> Response {
    let scope = DicomScope::of(Some(study), Some(series), Some(instance));
    render_frame(state, caller, scope, 1, query, headers, None).await
}

/// The side of a thumbnail's box when the request names no viewport.
const THUMBNAIL_SIDE: u32 = 128;

async fn thumbnail_instance(
    state: State<AppState>,
    caller: Caller,
    Path((study, series, instance)): Path<(String, String, String)>,
    query: RawQuery,
    headers: HeaderMap,
) -> Response {
    let scope = DicomScope::of(Some(study), Some(series), Some(instance));
    let viewport = Some((THUMBNAIL_SIDE, THUMBNAIL_SIDE));
    render_frame(state, caller, scope, 1, query, headers, viewport).await
}

async fn render_frames(
    state: State<AppState>,
    caller: Caller,
    Path((study, series, instance, frame_list)): Path<(String, String, String, String)>,
    query: RawQuery,
    headers: HeaderMap,
) -> Response {
    let frame = match frames::parse_frame_list(&frame_list).as_deref() {
        Some([frame]) => *frame,
        _ => return bad_request("a rendered frame is named by one 1-based frame number"),
    };
    let scope = DicomScope::of(Some(study), Some(series), Some(instance));
    render_frame(state, caller, scope, frame, query, headers, None).await
}

/// The rendered image format `Accept` asks for: JPEG unless only PNG is acceptable.
fn rendered_format(headers: &HeaderMap) -> Option<ImageFormat> {
    accept_candidates(headers)
        .into_iter()
        .find_map(|(media, _)| match media.as_str() {
            "image/jpeg" | "image/*" | "*/*" => Some(ImageFormat::Jpeg),
            "image/png" => Some(ImageFormat::Png),
            _ => None,
        })
}

/// The rendering query parameters (PS3.18 8.3.5.1.3) this server honours.
fn render_request(
    frame: u32,
    format: ImageFormat,
    query: Option<&str>,
) -> Result<RenderRequest, String> {
    let mut request = RenderRequest {
        frame,
        format,
        quality: 90,
        window: None,
        viewport: None,
    };
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "quality" => {
                request.quality = value
                    .parse::<u8>()
                    .ok()
                    .filter(|quality| (1..=100).contains(quality))
                    .ok_or("quality is a number from 1 to 100")?;
            }
            "window" => {
                request.window = Some(Window::parse(&value).ok_or(
                    "window is center,width[,linear|linear-exact|sigmoid] with a positive width",
                )?);
            }
            "viewport" => {
                request.viewport = Some(render::parse_viewport(&value).ok_or(
                    "viewport is width,height in pixels (1 to 16384; cropping is not supported)",
                )?);
            }
            other => {
                return Err(format!(
                    "rendering parameter '{other}' is not supported; supported: quality, window, viewport"
                ));
            }
        }
    }
    Ok(request)
}

async fn render_frame(
    State(state): State<AppState>,
    Caller(caller): Caller,
    scope: DicomScope,
    frame: u32,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    default_viewport: Option<(u32, u32)>,
) -> Response {
    let Some(format) = rendered_format(&headers) else {
        return Problem::new(
            StatusCode::NOT_ACCEPTABLE,
            "Not Acceptable",
            "frames are rendered as image/jpeg or image/png".to_owned(),
        )
        .into_response();
    };
    let mut request = match render_request(frame, format, query.as_deref()) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    request.viewport = request.viewport.or(default_viewport);
    let file = match one_instance_file(&state, &caller, &scope).await {
        Ok(file) => file,
        Err(response) => return response,
    };
    let rendered = tokio::task::spawn_blocking(move || {
        let object =
            glastonbury_dicom::instance::read_whole(&file).map_err(|_| RenderError::Undecodable)?;
        render::render(&object, &request)
    })
    .await
    .unwrap_or(Err(RenderError::Undecodable));
    match rendered {
        Ok(image) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, format.media_type())],
            image,
        )
            .into_response(),
        Err(error) => render_problem(&error),
    }
}

// ---------------------------------------------------------------------------------------------
// STOW-RS

async fn store(state: State<AppState>, caller: Caller, request: Request) -> Response {
    run_store(state, caller, None, request).await
}

async fn store_into_study(
    state: State<AppState>,
    caller: Caller,
    Path(study): Path<String>,
    request: Request,
) -> Response {
    run_store(state, caller, Some(study), request).await
}

/// What happened to one part of a STOW-RS request.
enum StoreOutcome {
    Stored {
        sop_class_uid: String,
        sop_instance_uid: String,
        study_uid: String,
        series_uid: String,
    },
    Failed {
        sop_class_uid: String,
        sop_instance_uid: String,
        reason: u16,
    },
}

async fn run_store(
    State(state): State<AppState>,
    Caller(caller): Caller,
    target_study: Option<String>,
    request: Request,
) -> Response {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let is_multipart = content_type
        .to_ascii_lowercase()
        .starts_with("multipart/related");
    let part_type = multipart::parameter(&content_type, "type");
    if !is_multipart
        || part_type
            .as_deref()
            .is_some_and(|kind| !kind.eq_ignore_ascii_case("application/dicom"))
    {
        return Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type",
            "STOW-RS takes multipart/related; type=\"application/dicom\"".to_owned(),
        )
        .into_response();
    }
    let Some(boundary) = multipart::boundary_of(&content_type) else {
        return bad_request("the multipart Content-Type has no boundary");
    };
    let records = &state.appliance.records;
    // The caller's AE title picks the ingest de-identification profile; it is read while the
    // policy decides.
    let (allowed, source_ae_title) = tokio::join!(
        records.authorize::<access::Create>(&caller, IMAGING_RESOURCE_TYPE),
        state.appliance.clients.ae_title_of(&caller.id)
    );
    let allowed = match allowed {
        Ok(allowed) => allowed,
        Err(error) => return problem(error),
    };
    // Without it an instance could be stored without the profile its source requires.
    let source_ae_title = match source_ae_title {
        Ok(ae_title) => ae_title,
        Err(error) => {
            tracing::error!(error = %error, "stow refused: the caller's AE title could not be read");
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "storage is unavailable; nothing was stored".to_owned(),
            )
            .into_response();
        }
    };
    let mut reader = PartReader::new(&boundary, multipart::DEFAULT_MAX_PART_BYTES);
    let mut body = request.into_body().into_data_stream();
    let mut stores = PartStores::new(Arc::new(StoreContext {
        records: Arc::clone(&state.appliance.records),
        allowed,
        source_ae_title,
    }));
    // A study may take long to upload: the deadline is per chunk, not per request.
    let idle_limit =
        std::time::Duration::from_secs(state.appliance.settings.request_timeout_seconds);
    loop {
        let chunk = match tokio::time::timeout(idle_limit, body.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                stores.finish_all().await;
                return Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "Request Timeout",
                    "no data arrived within the request timeout; instances received before were stored (see the answer of a retry)".to_owned(),
                )
                .into_response();
            }
        };
        let Ok(chunk) = chunk else {
            stores.finish_all().await;
            return bad_request("the request body could not be read");
        };
        let parts = match reader.push(&chunk) {
            Ok(parts) => parts,
            Err(error) => {
                let outcomes = stores.finish_all().await;
                return stow_answer(
                    &state,
                    outcomes,
                    Some(error.to_string()),
                    target_study.as_deref(),
                );
            }
        };
        for part in parts {
            match checked_part(part, target_study.as_deref()) {
                Ok(instance) => stores.start(instance).await,
                Err(refused) => stores.refused(refused),
            }
        }
    }
    let outcomes = stores.finish_all().await;
    if let Err(error) = reader.finish() {
        return stow_answer(
            &state,
            outcomes,
            Some(error.to_string()),
            target_study.as_deref(),
        );
    }
    stow_answer(&state, outcomes, None, target_study.as_deref())
}

/// The most parts of one request stored at once, and the most bytes they may hold together
/// (a larger part is stored alone). While the writer commits one part the next ones are parsed
/// and encrypted, so the writer finds several in its queue and commits them together.
const MAX_PART_STORES_IN_FLIGHT: usize = 8;
const MAX_PART_BYTES_IN_FLIGHT: usize = 64 << 20;

/// What every part of one request is stored with.
struct StoreContext {
    records: Arc<crate::records::Records>,
    allowed: crate::access::Allowed<access::Create>,
    source_ae_title: Option<String>,
}

/// A part refused before its store began, or one being stored.
enum PartStore {
    Refused(StoreOutcome),
    Storing {
        sop_instance_uid: String,
        bytes: usize,
        task: tokio::task::JoinHandle<StoreOutcome>,
    },
}

/// The stores of one STOW-RS request: each part's store runs as its own task while the next
/// parts arrive, and the outcomes come back in the order of the parts. A part that repeats the
/// SOP Instance UID of a part still being stored waits for it, so the later part is the stored
/// version, as when the parts are stored one after another.
struct PartStores {
    context: Arc<StoreContext>,
    pending: std::collections::VecDeque<PartStore>,
    bytes_in_flight: usize,
    outcomes: Vec<StoreOutcome>,
}

impl PartStores {
    fn new(context: Arc<StoreContext>) -> Self {
        Self {
            context,
            pending: std::collections::VecDeque::new(),
            bytes_in_flight: 0,
            outcomes: Vec::new(),
        }
    }

    fn refused(&mut self, outcome: StoreOutcome) {
        self.pending.push_back(PartStore::Refused(outcome));
    }

    /// Starts storing `instance` once there is room for it.
    async fn start(&mut self, instance: glastonbury_dicom::instance::Instance) {
        let bytes = instance.part10.len();
        while self.storing() > 0
            && (self.storing() >= MAX_PART_STORES_IN_FLIGHT
                || self.bytes_in_flight + bytes > MAX_PART_BYTES_IN_FLIGHT
                || self.is_storing(&instance.sop_instance_uid))
        {
            self.finish_oldest().await;
        }
        let sop_instance_uid = instance.sop_instance_uid.clone();
        let context = Arc::clone(&self.context);
        // In the request's span, so its log lines keep the request id.
        let task = tokio::spawn(
            async move { store_instance(&context, instance).await }
                .instrument(tracing::Span::current()),
        );
        self.bytes_in_flight += bytes;
        self.pending.push_back(PartStore::Storing {
            sop_instance_uid,
            bytes,
            task,
        });
    }

    fn storing(&self) -> usize {
        self.pending
            .iter()
            .filter(|store| matches!(store, PartStore::Storing { .. }))
            .count()
    }

    fn is_storing(&self, uid: &str) -> bool {
        self.pending.iter().any(|store| {
            matches!(store, PartStore::Storing { sop_instance_uid, .. } if sop_instance_uid == uid)
        })
    }

    /// Waits for the oldest part (and takes every refusal before it).
    async fn finish_oldest(&mut self) {
        while let Some(store) = self.pending.pop_front() {
            match store {
                PartStore::Refused(outcome) => self.outcomes.push(outcome),
                PartStore::Storing {
                    sop_instance_uid,
                    bytes,
                    task,
                } => {
                    self.bytes_in_flight -= bytes;
                    let outcome = task.await.unwrap_or_else(|error| {
                        tracing::error!(error = %error, "stow instance store task failed");
                        StoreOutcome::Failed {
                            sop_class_uid: String::new(),
                            sop_instance_uid,
                            reason: dimse::status::PROCESSING_FAILURE,
                        }
                    });
                    self.outcomes.push(outcome);
                    return;
                }
            }
        }
    }

    /// Waits for every part still being stored; the outcomes of all parts, in their order.
    async fn finish_all(mut self) -> Vec<StoreOutcome> {
        while !self.pending.is_empty() {
            self.finish_oldest().await;
        }
        self.outcomes
    }
}

/// Reads one part as a DICOM instance, or the failure to answer for it.
fn checked_part(
    part: multipart::Part,
    target_study: Option<&str>,
) -> Result<glastonbury_dicom::instance::Instance, StoreOutcome> {
    let failed = |reason: u16| StoreOutcome::Failed {
        sop_class_uid: String::new(),
        sop_instance_uid: String::new(),
        reason,
    };
    if part
        .media_type()
        .is_some_and(|media| media != "application/dicom")
    {
        return Err(failed(dimse::status::UNABLE_TO_PROCESS));
    }
    let instance = match glastonbury_dicom::instance::from_part10(part.body) {
        Ok(instance) => instance,
        Err(error) => {
            tracing::info!(reason = %error, "stow part refused");
            return Err(failed(error.status()));
        }
    };
    if target_study.is_some_and(|study| study != instance.study_instance_uid) {
        return Err(StoreOutcome::Failed {
            sop_class_uid: instance.sop_class_uid,
            sop_instance_uid: instance.sop_instance_uid,
            reason: InstanceError::SopInstanceMismatch("the study of the request URL").status(),
        });
    }
    Ok(instance)
}

async fn store_instance(
    context: &StoreContext,
    instance: glastonbury_dicom::instance::Instance,
) -> StoreOutcome {
    let sop_class_uid = instance.sop_class_uid.clone();
    let sop_instance_uid = instance.sop_instance_uid.clone();
    let study_uid = instance.study_instance_uid.clone();
    let series_uid = instance.series_instance_uid.clone();
    match context
        .records
        .store_dicom_instance(
            &context.allowed,
            instance,
            context.source_ae_title.as_deref(),
        )
        .await
    {
        Ok(_) => StoreOutcome::Stored {
            sop_class_uid,
            sop_instance_uid,
            study_uid,
            series_uid,
        },
        Err(error) => StoreOutcome::Failed {
            sop_class_uid,
            sop_instance_uid,
            reason: DicomStoreRefusal::of(error).status,
        },
    }
}

/// The STOW-RS response: 200 when every instance was stored, 202 when some were, 409 when none
/// were (with each failure's reason), 400 when the body itself was unreadable and nothing stored.
fn stow_answer(
    state: &AppState,
    outcomes: Vec<StoreOutcome>,
    body_error: Option<String>,
    target_study: Option<&str>,
) -> Response {
    let mut referenced = Vec::new();
    let mut failed = Vec::new();
    let mut study_of_request = target_study.map(str::to_owned);
    for outcome in outcomes {
        match outcome {
            StoreOutcome::Stored {
                sop_class_uid,
                sop_instance_uid,
                study_uid,
                series_uid,
            } => {
                let url = retrieve_url(
                    state,
                    &study_uid,
                    Some(&series_uid),
                    Some(&sop_instance_uid),
                );
                study_of_request.get_or_insert(study_uid);
                referenced.push(json_value!({
                    "00081150": {"vr": "UI", "Value": [sop_class_uid]},
                    "00081155": {"vr": "UI", "Value": [sop_instance_uid]},
                    "00081190": {"vr": "UR", "Value": [url]},
                }));
            }
            StoreOutcome::Failed {
                sop_class_uid,
                sop_instance_uid,
                reason,
            } => {
                let mut item = Map::new();
                let uid_value = |uid: String| {
                    if uid.is_empty() {
                        json_value!({"vr": "UI"})
                    } else {
                        json_value!({"vr": "UI", "Value": [uid]})
                    }
                };
                item.insert("00081150".to_owned(), uid_value(sop_class_uid));
                item.insert("00081155".to_owned(), uid_value(sop_instance_uid));
                item.insert(
                    "00081197".to_owned(),
                    json_value!({"vr": "US", "Value": [reason]}),
                );
                failed.push(Value::Object(item));
            }
        }
    }
    if referenced.is_empty() && failed.is_empty() {
        return bad_request(
            body_error.unwrap_or_else(|| "the request holds no instance".to_owned()),
        );
    }
    if body_error.is_some() {
        failed.push(json_value!({
            "00081150": {"vr": "UI"},
            "00081155": {"vr": "UI"},
            "00081197": {"vr": "US", "Value": [0xC000]},
        }));
    }
    let status = match (referenced.is_empty(), failed.is_empty()) {
        (false, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        _ => StatusCode::CONFLICT,
    };
    let mut answer = Map::new();
    if let Some(study) = &study_of_request {
        answer.insert(
            "00081190".to_owned(),
            json_value!({"vr": "UR", "Value": [retrieve_url(state, study, None, None)]}),
        );
    }
    if !failed.is_empty() {
        answer.insert(
            "00081198".to_owned(),
            json_value!({"vr": "SQ", "Value": failed}),
        );
    }
    if !referenced.is_empty() {
        answer.insert(
            "00081199".to_owned(),
            json_value!({"vr": "SQ", "Value": referenced}),
        );
    }
    (
        status,
        [(header::CONTENT_TYPE, DICOM_JSON)],
        Value::Object(answer).to_string(),
    )
        .into_response()
}
