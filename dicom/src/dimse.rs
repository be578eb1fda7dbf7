//! DIMSE command sets (PS3.7): the requests an SCP receives (C-ECHO, C-STORE, C-FIND, C-CANCEL)
//! parsed from their implicit VR little endian encoding, and the responses it sends. Data sets
//! travel separately; only their presence is recorded here.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// The Verification SOP Class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Query/Retrieve information models answered by C-FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";

const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";

/// Command Data Set Type values: none follows, or one follows.
const NO_DATA_SET: u16 = 0x0101;
const DATA_SET_FOLLOWS: u16 = 0x0000;

/// DIMSE statuses used here.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const PENDING: u16 = 0xFF00;
    pub const CANCELLED: u16 = 0xFE00;
    pub const REFUSED_NOT_AUTHORIZED: u16 = 0x0124;
    pub const REFUSED_SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const UNABLE_TO_PROCESS: u16 = 0xC000;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    pub const PROCESSING_FAILURE: u16 = 0x0110;
}

/// A command the SCP received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Echo {
        message_id: u16,
        sop_class_uid: String,
    },
    Store {
        message_id: u16,
        sop_class_uid: String,
        sop_instance_uid: String,
    },
    Find {
        message_id: u16,
        sop_class_uid: String,
    },
    Cancel {
        message_id: u16,
    },
    /// Anything else (answered as unrecognized).
    Other {
        command_field: u16,
        message_id: u16,
        sop_class_uid: String,
    },
}

impl Command {
    /// The id of the request (what its response answers).
    pub fn message_id(&self) -> u16 {
        match self {
            Self::Echo { message_id, .. }
            | Self::Store { message_id, .. }
            | Self::Find { message_id, .. }
            | Self::Cancel { message_id }
            | Self::Other { message_id, .. } => *message_id,
        }
    }
}

/// A command set that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the command set is malformed: {0}")]
pub struct CommandError(pub &'static str);

/// Reads a command set, and whether a data set follows it.
///
/// The elements are read straight from the bytes, not through dicom-rs's data set reader: that
/// reader ends a data set by failing to read one more element header, and its error captures a
/// stack backtrace, 1.3 % of the server's CPU per serial C-STORE.
pub fn parse_command(bytes: &[u8]) -> Result<(Command, bool), CommandError> {
    let command = CommandElements::read(bytes)?;
    let required_message_id = || {
        command
            .unsigned(tags::MESSAGE_ID)
            .ok_or(CommandError("no message id"))
    };
    let command_field = command
        .unsigned(tags::COMMAND_FIELD)
        .ok_or(CommandError("no command field"))?;
    let has_data_set = command
        .unsigned(tags::COMMAND_DATA_SET_TYPE)
        .is_some_and(|kind| kind != NO_DATA_SET);
    let parsed = match command_field {
        0x0030 => Command::Echo {
            message_id: required_message_id()?,
            sop_class_uid: command.text(tags::AFFECTED_SOP_CLASS_UID),
        },
        0x0001 => Command::Store {
            message_id: required_message_id()?,
            sop_class_uid: command.text(tags::AFFECTED_SOP_CLASS_UID),
            sop_instance_uid: command.text(tags::AFFECTED_SOP_INSTANCE_UID),
        },
        0x0020 => Command::Find {
            message_id: required_message_id()?,
            sop_class_uid: command.text(tags::AFFECTED_SOP_CLASS_UID),
        },
        0x0FFF => Command::Cancel {
            message_id: command
                .unsigned(tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .ok_or(CommandError("no message id being responded to"))?,
        },
        other => Command::Other {
            command_field: other,
            message_id: command.unsigned(tags::MESSAGE_ID).unwrap_or(0),
            sop_class_uid: command.text(tags::AFFECTED_SOP_CLASS_UID),
        },
    };
    Ok((parsed, has_data_set))
}

/// The elements of a command set (PS3.7 6.3.1: implicit VR little endian, group 0000 only, no
/// sequences), as the value bytes of each tag.
struct CommandElements<'a> {
    elements: Vec<(Tag, &'a [u8])>,
}

impl<'a> CommandElements<'a> {
    fn read(bytes: &'a [u8]) -> Result<Self, CommandError> {
        let mut elements = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (header, after_header) = rest
                .split_first_chunk::<8>()
                .ok_or(CommandError("lengths do not fit"))?;
            let group = u16::from_le_bytes([header[0], header[1]]);
            let element = u16::from_le_bytes([header[2], header[3]]);
            let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            let length = usize::try_from(length).map_err(|_| CommandError("lengths do not fit"))?;
            if length > after_header.len() {
                return Err(CommandError("lengths do not fit"));
            }
            let (value, after_value) = after_header.split_at(length);
            // PS3.7 puts nothing else in a command set; anything else is not read, as before.
            if group == 0x0000 {
                elements.push((Tag(group, element), value));
            }
            rest = after_value;
        }
        Ok(Self { elements })
    }

    fn value(&self, tag: Tag) -> Option<&'a [u8]> {
        self.elements
            .iter()
            .find(|(element_tag, _)| *element_tag == tag)
            .map(|(_, value)| *value)
    }

    /// The first value of a US element.
    fn unsigned(&self, tag: Tag) -> Option<u16> {
        let (first, _) = self.value(tag)?.split_first_chunk::<2>()?;
        Some(u16::from_le_bytes(*first))
    }

    /// A UI or AE value without its padding; empty when absent or not text.
    fn text(&self, tag: Tag) -> String {
        self.value(tag)
            .and_then(|value| std::str::from_utf8(value).ok())
            .map(|text| text.trim_end_matches(['\0', ' ']).to_owned())
            .unwrap_or_default()
    }
}

/// C-ECHO-RSP.
pub fn echo_response(message_id: u16, sop_class_uid: &str) -> Vec<u8> {
    response(
        0x8030,
        message_id,
        sop_class_uid,
        None,
        status::SUCCESS,
        false,
        None,
    )
}

/// C-STORE-RSP; `error_comment` (at most 64 characters, never PHI) explains a failure.
pub fn store_response(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    status: u16,
    error_comment: Option<&str>,
) -> Vec<u8> {
    response(
        0x8001,
        message_id,
        sop_class_uid,
        Some(sop_instance_uid),
        status,
        false,
        error_comment,
    )
}

/// C-FIND-RSP: pending with an identifier, or final without one.
pub fn find_response(
    message_id: u16,
    sop_class_uid: &str,
    status: u16,
    with_identifier: bool,
    error_comment: Option<&str>,
) -> Vec<u8> {
    response(
        0x8020,
        message_id,
        sop_class_uid,
        None,
        status,
        with_identifier,
        error_comment,
    )
}

/// A response to an operation this SCP does not perform.
pub fn unrecognized_response(command_field: u16, message_id: u16, sop_class_uid: &str) -> Vec<u8> {
    response(
        command_field | 0x8000,
        message_id,
        sop_class_uid,
        None,
        status::UNRECOGNIZED_OPERATION,
        false,
        None,
    )
}

fn response(
    command_field: u16,
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: Option<&str>,
    status: u16,
    with_data_set: bool,
    error_comment: Option<&str>,
) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class_uid),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(command_field),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            PrimitiveValue::from(message_id),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(if with_data_set {
                DATA_SET_FOLLOWS
            } else {
                NO_DATA_SET
            }),
        ),
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status)),
    ];
    if let Some(uid) = sop_instance_uid {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(uid),
        ));
    }
    if let Some(comment) = error_comment {
        let comment: String = comment.chars().take(64).collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(comment),
        ));
    }
    let command = InMemDicomObject::command_from_element_iter(elements);
    encode_implicit(&command)
}

/// A data set in implicit VR little endian (command sets, and identifiers on such contexts).
pub fn encode_implicit(object: &InMemDicomObject) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(syntax) = implicit_vr_little_endian() {
        // Writing to memory cannot fail for lack of space; an unencodable value leaves the
        // response short, which the peer reports.
        let _ = object.write_dataset_with_ts(&mut bytes, syntax);
    }
    bytes
}

/// Encodes an identifier in the transfer syntax of its presentation context.
pub fn encode_data_set(object: &InMemDicomObject, transfer_syntax_uid: &str) -> Option<Vec<u8>> {
    let syntax = TransferSyntaxRegistry.get(transfer_syntax_uid)?;
    let mut bytes = Vec::new();
    object.write_dataset_with_ts(&mut bytes, syntax).ok()?;
    Some(bytes)
}

/// Reads an identifier (a C-FIND query) in the transfer syntax of its presentation context.
pub fn parse_data_set(bytes: &[u8], transfer_syntax_uid: &str) -> Option<InMemDicomObject> {
    let syntax = TransferSyntaxRegistry
        .get(transfer_syntax_uid)
        .filter(|syntax| syntax.can_decode_dataset())?;
    let encoding = match transfer_syntax_uid {
        IMPLICIT_VR_LITTLE_ENDIAN => crate::guard::Encoding::ImplicitLittle,
        "1.2.840.10008.1.2.2" => crate::guard::Encoding::ExplicitBig,
        _ => crate::guard::Encoding::ExplicitLittle,
    };
    crate::guard::check(bytes, encoding).ok()?;
    InMemDicomObject::read_dataset_with_ts(bytes, syntax).ok()
}

fn implicit_vr_little_endian() -> Result<&'static dicom_encoding::TransferSyntax, CommandError> {
    TransferSyntaxRegistry
        .get(IMPLICIT_VR_LITTLE_ENDIAN)
        .ok_or(CommandError("implicit VR little endian is not registered"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_back() {
        let bytes = store_response(7, "1.2.3", "1.2.3.4", status::SUCCESS, None);
        let (command, has_data) = parse_command(&bytes).unwrap();
        assert!(!has_data);
        assert!(matches!(
            command,
            Command::Other {
                command_field: 0x8001,
                ..
            }
        ));
        let echo = echo_response(1, VERIFICATION);
        assert!(parse_command(&echo).is_ok());
    }

    #[test]
    fn requests_are_recognized() {
        let request = InMemDicomObject::command_from_element_iter([
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
            ),
            DataElement::new(
                tags::COMMAND_FIELD,
                VR::US,
                PrimitiveValue::from(0x0001_u16),
            ),
            DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(3_u16)),
            DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0_u16)),
            DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                PrimitiveValue::from(0_u16),
            ),
            DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4.5"),
            ),
        ]);
        let (command, has_data) = parse_command(&encode_implicit(&request)).unwrap();
        assert!(has_data);
        assert_eq!(
            command,
            Command::Store {
                message_id: 3,
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: "1.2.3.4.5".into()
            }
        );
        assert!(parse_command(&[1, 2, 3]).is_err());
    }

    fn command_of(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
        encode_implicit(&InMemDicomObject::command_from_element_iter(elements))
    }

    fn us(tag: Tag, value: u16) -> DataElement<InMemDicomObject> {
        DataElement::new(tag, VR::US, PrimitiveValue::from(value))
    }

    fn ui(tag: Tag, value: &str) -> DataElement<InMemDicomObject> {
        DataElement::new(tag, VR::UI, PrimitiveValue::from(value))
    }

    /// The values `parse_command` reads, as dicom-rs's data set reader reads them.
    fn read_by_dicom_rs(bytes: &[u8]) -> (Option<u16>, Option<u16>, Option<u16>, String, String) {
        let syntax = implicit_vr_little_endian().unwrap();
        let command = InMemDicomObject::read_dataset_with_ts(bytes, syntax).unwrap();
        let unsigned = |tag: Tag| command.get(tag)?.to_int::<u16>().ok();
        let text = |tag: Tag| {
            command
                .get(tag)
                .and_then(|element| element.to_str().ok())
                .map(|text| text.trim_end_matches(['\0', ' ']).to_owned())
                .unwrap_or_default()
        };
        (
            unsigned(tags::COMMAND_FIELD),
            unsigned(tags::MESSAGE_ID),
            unsigned(tags::COMMAND_DATA_SET_TYPE),
            text(tags::AFFECTED_SOP_CLASS_UID),
            text(tags::AFFECTED_SOP_INSTANCE_UID),
        )
    }

    #[test]
    fn commands_read_as_dicom_rs_reads_them() {
        let commands = [
            command_of(vec![
                us(tags::COMMAND_FIELD, 0x0001),
                us(tags::MESSAGE_ID, 65535),
                us(tags::PRIORITY, 2),
                us(tags::COMMAND_DATA_SET_TYPE, DATA_SET_FOLLOWS),
                ui(tags::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.4"),
                // an odd-length UID, padded with a NUL on the wire
                ui(tags::AFFECTED_SOP_INSTANCE_UID, "1.2.3.4.5"),
                DataElement::new(
                    tags::MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE,
                    VR::AE,
                    PrimitiveValue::from("MOVER "),
                ),
                us(tags::MOVE_ORIGINATOR_MESSAGE_ID, 9),
            ]),
            command_of(vec![
                us(tags::COMMAND_FIELD, 0x0020),
                us(tags::MESSAGE_ID, 1),
                us(tags::PRIORITY, 0),
                us(tags::COMMAND_DATA_SET_TYPE, DATA_SET_FOLLOWS),
                ui(tags::AFFECTED_SOP_CLASS_UID, STUDY_ROOT_FIND),
            ]),
            command_of(vec![
                us(tags::COMMAND_FIELD, 0x0030),
                us(tags::MESSAGE_ID, 2),
                us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
                ui(tags::AFFECTED_SOP_CLASS_UID, VERIFICATION),
            ]),
            command_of(vec![
                us(tags::COMMAND_FIELD, 0x0FFF),
                us(tags::MESSAGE_ID_BEING_RESPONDED_TO, 1),
                us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
            ]),
            command_of(vec![
                us(tags::COMMAND_FIELD, 0x0010),
                us(tags::MESSAGE_ID, 4),
                us(tags::COMMAND_DATA_SET_TYPE, DATA_SET_FOLLOWS),
                ui(tags::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.2.2.3"),
            ]),
            store_response(7, "1.2.3", "1.2.3.4", status::SUCCESS, Some("not stored")),
            echo_response(1, VERIFICATION),
        ];
        for bytes in commands {
            let ours = CommandElements::read(&bytes).unwrap();
            let expected = read_by_dicom_rs(&bytes);
            let read = (
                ours.unsigned(tags::COMMAND_FIELD),
                ours.unsigned(tags::MESSAGE_ID),
                ours.unsigned(tags::COMMAND_DATA_SET_TYPE),
                ours.text(tags::AFFECTED_SOP_CLASS_UID),
                ours.text(tags::AFFECTED_SOP_INSTANCE_UID),
            );
            assert_eq!(read, expected);
            assert!(parse_command(&bytes).is_ok());
        }
    }

    #[test]
    fn a_truncated_or_lying_command_is_refused() {
        let bytes = command_of(vec![
            us(tags::COMMAND_FIELD, 0x0001),
            us(tags::MESSAGE_ID, 3),
            us(tags::COMMAND_DATA_SET_TYPE, DATA_SET_FOLLOWS),
            ui(tags::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.2"),
        ]);
        for cut in [1, 7, 9, bytes.len() - 1] {
            assert_eq!(
                parse_command(&bytes[..cut]),
                Err(CommandError("lengths do not fit")),
                "cut at {cut}"
            );
        }
        let mut undefined_length = bytes.clone();
        // the group length element's length, made undefined
        undefined_length[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_command(&undefined_length).is_err());
        assert_eq!(
            parse_command(&command_of(vec![us(tags::MESSAGE_ID, 3)])),
            Err(CommandError("no command field"))
        );
    }
}
