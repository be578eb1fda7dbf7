//! The DIMSE service: an SCP on `dicom_addr` (and over TLS on `dicom_tls_addr`) that answers
//! C-ECHO, C-STORE and C-FIND (study and patient root). A calling AE title must belong to a registered client (`clients create
//! --ae-title`), whose role and scopes then decide every request through the same record path
//! as HTTP; an unknown AE is rejected and journaled. Every socket has TCP_NODELAY. One
//! association per task; a bad instance fails its own C-STORE with a status, never the
//! association.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_core::header::Header;
use dicom_dictionary_std::tags;
use dicom_ul::ServerAssociationOptions;
use dicom_ul::association::Association;
use dicom_ul::association::server::{AccessControl, AsyncServerAssociation};
use dicom_ul::pdu::{
    AssociationRJServiceUserReason, PDataValue, PDataValueType, Pdu, UserIdentity,
};
use glastonbury_dicom::dimse::{self, Command, status};
use glastonbury_dicom::qido::{self, Level};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;

use crate::access::{self, Principal};
use crate::appliance::Appliance;
use crate::auth::ClientRegistration;
use crate::records::RecordError;
use crate::records::dicom::{DicomScope, DicomStoreRefusal, IMAGING_RESOURCE_TYPE};

/// The largest PDU this SCP accepts (bigger PDUs mean fewer reads per instance).
const MAX_PDU_LENGTH: u32 = 256 * 1024;

/// An association idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The most bytes one C-STORE data set may have.
const MAX_DATA_SET_BYTES: usize = 2 << 30;

/// Why the DIMSE listener stopped.
#[derive(Debug, thiserror::Error)]
pub enum DimseError {
    #[error("dicom tls: {0}")]
    Tls(String),
    #[error("cannot listen for DICOM on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the DICOM listen address (a failure stops the appliance: it is misconfigured).
pub async fn bind(appliance: &Appliance) -> Result<tokio::net::TcpListener, DimseError> {
    let address = appliance.settings.dicom_addr;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| DimseError::Listen { address, source })?;
    tracing::info!(address = %address, ae_title = %appliance.settings.dicom_aet, "dicom listening");
    Ok(listener)
}

/// Binds the DICOM TLS address, when one is set, with the appliance's certificate.
pub async fn bind_tls(
    appliance: &Appliance,
) -> Result<Option<(tokio::net::TcpListener, Arc<ServerConfig>)>, DimseError> {
    let Some(tls) = &appliance.settings.dicom_tls else {
        return Ok(None);
    };
    let address = tls.address;
    let config = tls_config(&tls.certificate_path, &tls.private_key_path)?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| DimseError::Listen { address, source })?;
    tracing::info!(address = %address, ae_title = %appliance.settings.dicom_aet, "dicom tls listening");
    Ok(Some((listener, config)))
}

/// The TLS server configuration from the PEM certificate chain and private key.
fn tls_config(certificate: &Path, private_key: &Path) -> Result<Arc<ServerConfig>, DimseError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let unreadable = |what: &str| DimseError::Tls(format!("the {what} cannot be read as PEM"));
    let chain = CertificateDer::pem_file_iter(certificate)
        .map_err(|_| unreadable("TLS certificate"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| unreadable("TLS certificate"))?;
    let key = PrivateKeyDer::from_pem_file(private_key).map_err(|_| unreadable("TLS key"))?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| DimseError::Tls(error.to_string()))?;
    Ok(Arc::new(config))
}

/// Accepts associations until the process ends, each in its own task; over TLS when a
/// configuration is given.
pub async fn serve(
    appliance: Appliance,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<ServerConfig>>,
) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(error = %error, "dicom accept failed");
                continue;
            }
        };
        if let Err(error) = socket.set_nodelay(true) {
            tracing::warn!(error = %error, "TCP_NODELAY not set");
        }
        let appliance = appliance.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(error) = association(appliance, socket, peer, tls).await {
                tracing::info!(peer = %peer, error = %error, "dicom association ended");
            }
        });
    }
}

/// Admits registered calling AE titles addressing our AE title; remembers a refused one so the
/// refusal can be journaled.
struct RegisteredPeers {
    titles: Vec<String>,
    refused: Arc<Mutex<Option<String>>>,
}

impl AccessControl for RegisteredPeers {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let refuse = |reason| {
            if let Ok(mut refused) = self.refused.lock() {
                *refused = Some(calling_ae_title.trim().to_owned());
            }
            Err(reason)
        };
        if called_ae_title.trim() != this_ae_title.trim() {
            return refuse(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if !self
            .titles
            .iter()
            .any(|title| title == calling_ae_title.trim())
        {
            return refuse(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn association(
    appliance: Appliance,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
) -> Result<(), BoxError> {
    let peers: HashMap<String, ClientRegistration> = appliance.clients.dicom_peers().await?;
    let refused = Arc::new(Mutex::new(None));
    let options = ServerAssociationOptions::new()
        .ae_access_control(RegisteredPeers {
            titles: peers.keys().cloned().collect(),
            refused: Arc::clone(&refused),
        })
        .ae_title(appliance.settings.dicom_aet.clone())
        .with_abstract_syntax(dimse::VERIFICATION)
        .with_abstract_syntax(dimse::STUDY_ROOT_FIND)
        .with_abstract_syntax(dimse::PATIENT_ROOT_FIND)
        .promiscuous(true)
        .max_pdu_length(MAX_PDU_LENGTH)
        .read_timeout(IDLE_TIMEOUT);
    let refusal = match tls {
        None => match tokio::time::timeout(IDLE_TIMEOUT, options.establish_async(socket)).await {
            Ok(Ok(association)) => {
                return run_association(appliance, association, &peers, peer).await;
            }
            Ok(Err(error)) => error,
            Err(_) => return Err("the association was not negotiated in time".into()),
        },
        Some(config) => {
            let negotiation = options.tls_config(config);
            match tokio::time::timeout(IDLE_TIMEOUT, negotiation.establish_tls_async(socket)).await
            {
                Ok(Ok(association)) => {
                    return run_association(appliance, association, &peers, peer).await;
                }
                Ok(Err(error)) => error,
                Err(_) => return Err("the association was not negotiated in time".into()),
            }
        }
    };
    let refused_title = refused.lock().ok().and_then(|mut title| title.take());
    if let Some(title) = refused_title {
        let principal = peer_principal(&format!("ae:{title}"), None, peer);
        appliance
            .records
            .journal_dicom_refusal(&principal, "unknown calling or called AE title")
            .await?;
    }
    Err(refusal.into())
}

/// Answers the messages of one negotiated association until it is released or aborted.
async fn run_association<S>(
    appliance: Appliance,
    mut association: AsyncServerAssociation<S>,
    peers: &HashMap<String, ClientRegistration>,
    peer: SocketAddr,
) -> Result<(), BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let calling = association.peer_ae_title().trim().to_owned();
    let Some(registration) = peers.get(&calling) else {
        association.abort().await?;
        return Ok(());
    };
    let principal = Arc::new(peer_principal(
        &registration.client_id,
        Some(registration),
        peer,
    ));
    let contexts: HashMap<u8, (String, String)> = association
        .presentation_contexts()
        .iter()
        .map(|context| {
            (
                context.id,
                (
                    context.abstract_syntax.clone(),
                    context.transfer_syntax.clone(),
                ),
            )
        })
        .collect();
    let mut message = Message::default();
    loop {
        let pdu = association.receive().await?;
        let values = match pdu {
            Pdu::PData { data } => data,
            Pdu::ReleaseRQ => {
                association.send(&Pdu::ReleaseRP).await?;
                return Ok(());
            }
            Pdu::AbortRQ { .. } => return Ok(()),
            _ => {
                association.abort().await?;
                return Ok(());
            }
        };
        for value in values {
            let Some(complete) = message.add(value)? else {
                continue;
            };
            let Some((abstract_syntax, transfer_syntax)) =
                contexts.get(&complete.context_id).cloned()
            else {
                association.abort().await?;
                return Ok(());
            };
            let context = Context {
                appliance: &appliance,
                principal: &principal,
                calling_ae_title: calling.clone(),
                context_id: complete.context_id,
                abstract_syntax,
                transfer_syntax,
            };
            let replies = context.answer(complete.command, complete.data_set).await;
            for reply in replies {
                send_reply(&mut association, complete.context_id, reply).await?;
            }
        }
    }
}

fn peer_principal(
    id: &str,
    registration: Option<&ClientRegistration>,
    peer: SocketAddr,
) -> Principal {
    Principal {
        id: id.to_owned(),
        role: registration.map_or(access::Role::Device, |registration| registration.role),
        scopes: registration
            .map(|registration| registration.scopes.clone())
            .unwrap_or_default(),
        token_id: None,
        network_address: Some(peer.ip().to_string()),
        purpose_of_use: None,
        request_id: None,
        break_glass_reason: None,
    }
}

/// One DIMSE message as its PDVs arrive: a command set, then (if announced) a data set.
#[derive(Default)]
struct Message {
    command: Vec<u8>,
    command_done: Option<(Command, bool)>,
    data_set: Vec<u8>,
    context_id: u8,
}

struct CompleteMessage {
    context_id: u8,
    command: Command,
    data_set: Option<Vec<u8>>,
}

impl Message {
    fn add(&mut self, value: PDataValue) -> Result<Option<CompleteMessage>, BoxError> {
        self.context_id = value.presentation_context_id;
        match value.value_type {
            PDataValueType::Command => {
                self.command.extend_from_slice(&value.data);
                if !value.is_last {
                    return Ok(None);
                }
                let (command, has_data_set) =
                    dimse::parse_command(&std::mem::take(&mut self.command))?;
                if !has_data_set {
                    return Ok(Some(CompleteMessage {
                        context_id: self.context_id,
                        command,
                        data_set: None,
                    }));
                }
                self.command_done = Some((command, true));
                Ok(None)
            }
            PDataValueType::Data => {
                if self.data_set.len() + value.data.len() > MAX_DATA_SET_BYTES {
                    return Err("a data set exceeds the size limit".into());
                }
                self.data_set.extend_from_slice(&value.data);
                if !value.is_last {
                    return Ok(None);
                }
                let Some((command, _)) = self.command_done.take() else {
                    return Err("a data set arrived without its command".into());
                };
                Ok(Some(CompleteMessage {
                    context_id: self.context_id,
                    command,
                    data_set: Some(std::mem::take(&mut self.data_set)),
                }))
            }
        }
    }
}

/// A response: a command set and, for C-FIND matches, an identifier.
struct Reply {
    command: Vec<u8>,
    data_set: Option<Vec<u8>>,
}

async fn send_reply<S>(
    association: &mut AsyncServerAssociation<S>,
    context_id: u8,
    reply: Reply,
) -> Result<(), BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: reply.command,
            }],
        })
        .await?;
    if let Some(data_set) = reply.data_set {
        let mut writer = association.send_pdata(context_id);
        writer.write_all(&data_set).await?;
        writer.finish().await?;
    }
    Ok(())
}

/// What a message is answered with.
struct Context<'a> {
    appliance: &'a Appliance,
    principal: &'a Arc<Principal>,
    calling_ae_title: String,
    context_id: u8,
    abstract_syntax: String,
    transfer_syntax: String,
}

impl Context<'_> {
    async fn answer(&self, command: Command, data_set: Option<Vec<u8>>) -> Vec<Reply> {
        let _ = self.context_id;
        match command {
            Command::Echo {
                message_id,
                sop_class_uid,
            } => vec![Reply {
                command: dimse::echo_response(message_id, &sop_class_uid),
                data_set: None,
            }],
            Command::Store {
                message_id,
                sop_class_uid,
                sop_instance_uid,
            } => {
                let (status, comment) = self
                    .store(
                        &sop_class_uid,
                        &sop_instance_uid,
                        data_set.unwrap_or_default(),
                    )
                    .await;
                vec![Reply {
                    command: dimse::store_response(
                        message_id,
                        &sop_class_uid,
                        &sop_instance_uid,
                        status,
                        comment.as_deref(),
                    ),
                    data_set: None,
                }]
            }
            Command::Find {
                message_id,
                sop_class_uid,
            } => self.find(message_id, &sop_class_uid, data_set).await,
            Command::Cancel { .. } => Vec::new(),
            Command::Other {
                command_field,
                message_id,
                sop_class_uid,
            } => vec![Reply {
                command: dimse::unrecognized_response(command_field, message_id, &sop_class_uid),
                data_set: None,
            }],
        }
    }

    async fn store(
        &self,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        data_set: Vec<u8>,
    ) -> (u16, Option<String>) {
        if self.abstract_syntax.trim_end_matches('\0') != sop_class_uid {
            return (
                status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                Some("the SOP class differs from the presentation context".to_owned()),
            );
        }
        let records = &self.appliance.records;
        let allowed = match records
            .authorize::<access::Create>(self.principal, IMAGING_RESOURCE_TYPE)
            .await
        {
            Ok(allowed) => allowed,
            Err(_) => {
                return (
                    status::REFUSED_NOT_AUTHORIZED,
                    Some("this AE may not store instances".to_owned()),
                );
            }
        };
        let instance = match glastonbury_dicom::instance::from_data_set(
            &data_set,
            &self.transfer_syntax,
            sop_class_uid,
            sop_instance_uid,
            &self.calling_ae_title,
        ) {
            Ok(instance) => instance,
            Err(error) => return (error.status(), Some(error.to_string())),
        };
        match records
            .store_dicom_instance(&allowed, instance, Some(&self.calling_ae_title))
            .await
        {
            Ok(_) => (status::SUCCESS, None),
            Err(error) => {
                let refusal = DicomStoreRefusal::of(error);
                (refusal.status, Some(refusal.comment))
            }
        }
    }

    async fn find(
        &self,
        message_id: u16,
        sop_class_uid: &str,
        data_set: Option<Vec<u8>>,
    ) -> Vec<Reply> {
        let final_reply = |status: u16, comment: Option<&str>| Reply {
            command: dimse::find_response(message_id, sop_class_uid, status, false, comment),
            data_set: None,
        };
        let identifier = match data_set
            .as_deref()
            .and_then(|bytes| dimse::parse_data_set(bytes, &self.transfer_syntax))
        {
            Some(identifier) => identifier,
            None => {
                return vec![final_reply(
                    status::UNABLE_TO_PROCESS,
                    Some("the identifier is unreadable"),
                )];
            }
        };
        let level_text =
            glastonbury_dicom::instance::text_of(&identifier, tags::QUERY_RETRIEVE_LEVEL)
                .unwrap_or_default()
                .to_ascii_uppercase();
        let level = match level_text.as_str() {
            "STUDY" | "PATIENT" => Level::Study,
            "SERIES" => Level::Series,
            "IMAGE" => Level::Instance,
            _ => {
                return vec![final_reply(
                    status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                    Some("QueryRetrieveLevel must be PATIENT, STUDY, SERIES or IMAGE"),
                )];
            }
        };
        let mut pairs = Vec::new();
        let mut returned_keys = Vec::new();
        for element in identifier.iter() {
            let tag = element.tag();
            if tag == tags::QUERY_RETRIEVE_LEVEL || tag == tags::SPECIFIC_CHARACTER_SET {
                continue;
            }
            returned_keys.push(tag);
            let value = element
                .to_str()
                .map(|text| text.trim_end_matches(['\0', ' ']).to_owned())
                .unwrap_or_default();
            pairs.push((format!("{:04X}{:04X}", tag.group(), tag.element()), value));
        }
        pairs.push(("limit".to_owned(), qido::MAX_LIMIT.to_string()));
        let query = match qido::parse_query(level, &pairs) {
            Ok(query) => query,
            Err(error) => return vec![final_reply(status::UNABLE_TO_PROCESS, Some(&error.0))],
        };
        let records = &self.appliance.records;
        let outcome = async {
            let allowed = records
                .authorize::<access::Search>(self.principal, IMAGING_RESOURCE_TYPE)
                .await?;
            let query_text = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&pairs)
                .finish();
            records
                .query_dicom(&allowed, &query, &DicomScope::default(), &query_text)
                .await
        };
        let matches = match outcome.await {
            Ok(matches) => matches,
            Err(RecordError::Denied(_) | RecordError::NotInView(_)) => {
                return vec![final_reply(
                    status::REFUSED_NOT_AUTHORIZED,
                    Some("this AE may not query"),
                )];
            }
            Err(RecordError::TooBroad) => {
                return vec![final_reply(
                    status::OUT_OF_RESOURCES,
                    Some("the query matches too much; narrow it"),
                )];
            }
            Err(RecordError::Invalid(reason)) => {
                return vec![final_reply(status::UNABLE_TO_PROCESS, Some(&reason))];
            }
            Err(error) => {
                tracing::error!(error = %error, "c-find failed");
                return vec![final_reply(
                    status::PROCESSING_FAILURE,
                    Some("the query failed"),
                )];
            }
        };
        let mut replies = Vec::with_capacity(matches.len() + 1);
        // PATIENT level is answered from the studies: one identifier per distinct patient.
        let mut patients_answered = std::collections::HashSet::new();
        for found in matches {
            let Some(identifier) =
                glastonbury_dicom::json::identifier(&found.attributes, &returned_keys, &level_text)
            else {
                continue;
            };
            let Some(bytes) = dimse::encode_data_set(&identifier, &self.transfer_syntax) else {
                continue;
            };
            if level_text == "PATIENT" && !patients_answered.insert(bytes.clone()) {
                continue;
            }
            replies.push(Reply {
                command: dimse::find_response(
                    message_id,
                    sop_class_uid,
                    status::PENDING,
                    true,
                    None,
                ),
                data_set: Some(bytes),
            });
        }
        replies.push(final_reply(status::SUCCESS, None));
        replies
    }
}
