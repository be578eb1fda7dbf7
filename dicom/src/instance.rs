//! One DICOM instance as received: a Part 10 file (STOW-RS) or a data set with its transfer
//! syntax (C-STORE), checked for structure and for the attributes every stored instance needs,
//! with failures that map to DIMSE statuses and STOW-RS failure reasons. The bytes are kept
//! exactly as received: nothing is transcoded.

use std::io::{Cursor, Read};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{FileDicomObject, FileMetaTable, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::guard::{self, Encoding};

/// Glastonbury's implementation class UID (a UUID-derived `2.25` UID) and version name, written
/// into the file meta group of instances received over DIMSE.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.190244146146843393546735283296574384771";
pub const IMPLEMENTATION_VERSION_NAME: &str = "GLASTONBURY_01";

/// The largest data set a deflated instance may inflate to (a small file must not become a
/// huge one in memory).
pub const MAX_INFLATED_BYTES: u64 = 1 << 30;

const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
const DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1.99";

/// Why an instance cannot be stored. Messages name attributes, never their values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    #[error("not a DICOM Part 10 file: no 'DICM' after the 128-byte preamble")]
    NotPart10,
    #[error("the file meta information is unreadable")]
    BadFileMeta,
    #[error("transfer syntax {0} is not supported")]
    UnsupportedTransferSyntax(String),
    #[error("the data set is malformed: {0}")]
    Malformed(#[from] guard::StructureError),
    #[error("the data set cannot be parsed")]
    Unparseable,
    #[error("the data set lacks {0}")]
    MissingAttribute(&'static str),
    #[error("{0} is not a valid UID")]
    InvalidUid(&'static str),
    #[error("the SOP Class UID of the data set does not match {0}")]
    SopClassMismatch(&'static str),
    #[error("the SOP Instance UID of the data set does not match {0}")]
    SopInstanceMismatch(&'static str),
}

impl InstanceError {
    /// The C-STORE response status (PS3.4 B.2.3) and the STOW-RS Failure Reason (0008,1197).
    pub fn status(&self) -> u16 {
        match self {
            Self::UnsupportedTransferSyntax(_) => 0xC122,
            Self::MissingAttribute(_)
            | Self::InvalidUid(_)
            | Self::SopClassMismatch(_)
            | Self::SopInstanceMismatch(_) => 0xA900,
            Self::NotPart10 | Self::BadFileMeta | Self::Malformed(_) | Self::Unparseable => 0xC000,
        }
    }
}

/// A checked instance: its identity, its encoding, its header attributes (the data set without
/// Pixel Data) and the Part 10 bytes to store.
#[derive(Debug, Clone)]
pub struct Instance {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub transfer_syntax_uid: String,
    /// The data set without Pixel Data (and without other bulk values' bytes kept twice).
    pub header: InMemDicomObject,
    /// The Part 10 file, byte for byte as received (or as assembled from a C-STORE data set).
    pub part10: Vec<u8>,
}

/// Checks a Part 10 file (STOW-RS).
pub fn from_part10(bytes: Vec<u8>) -> Result<Instance, InstanceError> {
    let (meta, dataset_start) = read_file_meta(&bytes)?;
    let transfer_syntax_uid = meta.transfer_syntax().to_owned();
    let header = parse_header(&bytes, dataset_start, &transfer_syntax_uid)?;
    let instance = identify(header, transfer_syntax_uid, bytes)?;
    if meta.media_storage_sop_class_uid() != instance.sop_class_uid {
        return Err(InstanceError::SopClassMismatch("the file meta information"));
    }
    if meta.media_storage_sop_instance_uid() != instance.sop_instance_uid {
        return Err(InstanceError::SopInstanceMismatch(
            "the file meta information",
        ));
    }
    Ok(instance)
}

/// Reads a stored Part 10 file whole, Pixel Data included, for frame retrieval and rendering.
pub fn read_whole(bytes: &[u8]) -> Result<FileDicomObject<InMemDicomObject>, InstanceError> {
    let (meta, dataset_start) = read_file_meta(bytes)?;
    let object = read_data_set(&bytes[dataset_start..], meta.transfer_syntax())?;
    Ok(object.with_exact_meta(meta))
}

/// The file meta group of a Part 10 file and where its data set starts.
fn read_file_meta(bytes: &[u8]) -> Result<(FileMetaTable, usize), InstanceError> {
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Err(InstanceError::NotPart10);
    }
    let meta_length = meta_group_length(&bytes[132..])?;
    let dataset_start = 132usize
        .checked_add(meta_length)
        .filter(|start| *start <= bytes.len())
        .ok_or(InstanceError::BadFileMeta)?;
    guard::check(&bytes[132..dataset_start], Encoding::ExplicitLittle)?;
    let mut cursor = Cursor::new(&bytes[128..dataset_start]);
    let meta = FileMetaTable::from_reader(&mut cursor).map_err(|_| InstanceError::BadFileMeta)?;
    Ok((meta, dataset_start))
}

/// Checks a data set received with C-STORE (its transfer syntax from the presentation context,
/// its identity from the command) and wraps it, unchanged, in a Part 10 file.
pub fn from_data_set(
    data_set: &[u8],
    transfer_syntax_uid: &str,
    command_sop_class_uid: &str,
    command_sop_instance_uid: &str,
    source_ae_title: &str,
) -> Result<Instance, InstanceError> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(command_sop_class_uid)
        .media_storage_sop_instance_uid(command_sop_instance_uid)
        .transfer_syntax(transfer_syntax_uid)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .source_application_entity_title(source_ae_title)
        .build()
        .map_err(|_| InstanceError::BadFileMeta)?;
    let mut part10 = Vec::with_capacity(data_set.len() + 512);
    part10.extend_from_slice(&[0u8; 128]);
    part10.extend_from_slice(b"DICM");
    meta.write(&mut part10)
        .map_err(|_| InstanceError::BadFileMeta)?;
    let dataset_start = part10.len();
    part10.extend_from_slice(data_set);
    let header = parse_header(&part10, dataset_start, transfer_syntax_uid)?;
    let instance = identify(header, transfer_syntax_uid.to_owned(), part10)?;
    if instance.sop_class_uid != trim_uid(command_sop_class_uid) {
        return Err(InstanceError::SopClassMismatch("the C-STORE request"));
    }
    if instance.sop_instance_uid != trim_uid(command_sop_instance_uid) {
        return Err(InstanceError::SopInstanceMismatch("the C-STORE request"));
    }
    Ok(instance)
}

/// Reads the data set of a Part 10 file (starting at `dataset_start`) without its Pixel Data,
/// after the structural check (so every declared length fits the data). The Pixel Data bytes
/// are skipped, not parsed: they are most of an image's size, and the header is all that
/// indexing and metadata need.
fn parse_header(
    part10: &[u8],
    dataset_start: usize,
    transfer_syntax_uid: &str,
) -> Result<InMemDicomObject, InstanceError> {
    let data = &part10[dataset_start..];
    let readable = ReadableDataSet::of(data, transfer_syntax_uid)?;
    let data = readable.bytes(data);
    let Some(pixel_data) = guard::pixel_data_span(data, readable.encoding)? else {
        return readable.read(data);
    };
    let mut object = if readable.inflated.is_some() {
        readable.read(&data[..pixel_data.start])?
    } else {
        read_file_until_pixel_data(part10)?
    };
    let trailing = &data[pixel_data.end..];
    if trailing.is_empty() {
        return Ok(object);
    }
    let trailing_elements = match trailing_padding(trailing, readable.encoding) {
        Some(padding) => padding,
        None => readable.read(trailing)?.into_iter().collect(),
    };
    for element in trailing_elements {
        object.put(element);
    }
    Ok(object)
}

/// The Data Set Trailing Padding elements that make up all of `trailing` (the bytes after Pixel
/// Data, in most files that have any), built from their bytes as dicom-rs's reader builds them;
/// `None` when `trailing` holds anything else. dicom-rs's reader, given bytes that end after the
/// last element, ends by failing to read one more element header, and that error captures a
/// stack backtrace (1 % of the server's CPU per STOW-RS instance of a CT with such padding).
fn trailing_padding(
    trailing: &[u8],
    encoding: Encoding,
) -> Option<Vec<DataElement<InMemDicomObject>>> {
    let elements = guard::top_level_elements(trailing, encoding).ok()?;
    elements
        .into_iter()
        .map(|element| {
            let is_padding = element.tag == tags::DATA_SET_TRAILING_PADDING
                && element.vr.is_none_or(|vr| vr == VR::OB);
            if !is_padding {
                return None;
            }
            let value = match &trailing[element.value] {
                [] => PrimitiveValue::Empty,
                bytes => PrimitiveValue::from(bytes.to_vec()),
            };
            Some(DataElement::new(element.tag, VR::OB, value))
        })
        .collect()
}

/// Reads a checked Part 10 file up to its top-level Pixel Data. dicom-rs's reader stops there
/// cleanly; given the bytes before Pixel Data instead, it ends by failing to read one more
/// element header, and that error captures a stack backtrace (0.75 % of the server's CPU per
/// serial C-STORE). The file meta group is read a second time, which costs less.
fn read_file_until_pixel_data(part10: &[u8]) -> Result<InMemDicomObject, InstanceError> {
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(part10)
        .map(FileDicomObject::into_inner)
        .map_err(|_| InstanceError::Unparseable)
}

/// Reads the whole data set, Pixel Data included, after the structural check.
fn read_data_set(
    data: &[u8],
    transfer_syntax_uid: &str,
) -> Result<InMemDicomObject, InstanceError> {
    let readable = ReadableDataSet::of(data, transfer_syntax_uid)?;
    let data = readable.bytes(data);
    guard::check(data, readable.encoding)?;
    readable.read(data)
}

/// How to read a data set of one transfer syntax: the parser's syntax, the encoding the
/// structural check walks, and the inflated bytes of a deflated data set.
struct ReadableDataSet {
    syntax: &'static dicom_encoding::TransferSyntax,
    encoding: Encoding,
    inflated: Option<Vec<u8>>,
}

impl ReadableDataSet {
    fn of(data: &[u8], transfer_syntax_uid: &str) -> Result<Self, InstanceError> {
        let transfer_syntax_uid = trim_uid(transfer_syntax_uid);
        let (encoding, parse_as, inflated) = match transfer_syntax_uid {
            IMPLICIT_VR_LITTLE_ENDIAN => (Encoding::ImplicitLittle, transfer_syntax_uid, None),
            EXPLICIT_VR_BIG_ENDIAN => (Encoding::ExplicitBig, transfer_syntax_uid, None),
            DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN => (
                Encoding::ExplicitLittle,
                EXPLICIT_VR_LITTLE_ENDIAN,
                Some(inflate(data)?),
            ),
            _ => (Encoding::ExplicitLittle, transfer_syntax_uid, None),
        };
        let syntax = TransferSyntaxRegistry
            .get(parse_as)
            .filter(|syntax| !syntax.is_unsupported() && syntax.can_decode_dataset())
            .ok_or_else(|| {
                InstanceError::UnsupportedTransferSyntax(transfer_syntax_uid.to_owned())
            })?;
        Ok(Self {
            syntax,
            encoding,
            inflated,
        })
    }

    /// The bytes to parse: the inflated ones of a deflated data set, `data` otherwise.
    fn bytes<'a>(&'a self, data: &'a [u8]) -> &'a [u8] {
        self.inflated.as_deref().unwrap_or(data)
    }

    /// Parses bytes the structural check has passed.
    fn read(&self, checked: &[u8]) -> Result<InMemDicomObject, InstanceError> {
        InMemDicomObject::read_dataset_with_ts(checked, self.syntax)
            .map_err(|_| InstanceError::Unparseable)
    }
}

fn inflate(data: &[u8]) -> Result<Vec<u8>, InstanceError> {
    let mut inflated = Vec::new();
    flate2::read::DeflateDecoder::new(data)
        .take(MAX_INFLATED_BYTES + 1)
        .read_to_end(&mut inflated)
        .map_err(|_| InstanceError::Unparseable)?;
    if inflated.len() as u64 > MAX_INFLATED_BYTES {
        return Err(InstanceError::Unparseable);
    }
    Ok(inflated)
}

/// The file meta group's length in bytes (its group length element plus the group).
fn meta_group_length(meta: &[u8]) -> Result<usize, InstanceError> {
    // (0002,0000) UL 4 <length>: 12 bytes in explicit VR little endian.
    if meta.len() < 12 || meta[0..4] != [0x02, 0x00, 0x00, 0x00] || &meta[4..6] != b"UL" {
        return Err(InstanceError::BadFileMeta);
    }
    let group_length = u32::from_le_bytes([meta[8], meta[9], meta[10], meta[11]]) as usize;
    Ok(12 + group_length)
}

fn identify(
    header: InMemDicomObject,
    transfer_syntax_uid: String,
    part10: Vec<u8>,
) -> Result<Instance, InstanceError> {
    let uid = |tag: Tag, name: &'static str| -> Result<String, InstanceError> {
        let value = text_of(&header, tag).ok_or(InstanceError::MissingAttribute(name))?;
        if !is_valid_uid(&value) {
            return Err(InstanceError::InvalidUid(name));
        }
        Ok(value)
    };
    Ok(Instance {
        sop_class_uid: uid(tags::SOP_CLASS_UID, "SOPClassUID")?,
        sop_instance_uid: uid(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
        study_instance_uid: uid(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?,
        series_instance_uid: uid(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?,
        transfer_syntax_uid: trim_uid(&transfer_syntax_uid).to_owned(),
        header,
        part10,
    })
}

/// The text of a top-level attribute, trimmed of DICOM padding; `None` when absent or empty.
pub fn text_of(object: &InMemDicomObject, tag: Tag) -> Option<String> {
    let element = object.get(tag)?;
    let text = element.to_str().ok()?;
    let trimmed =
        text.trim_matches(|character: char| character == '\0' || character.is_whitespace());
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

/// A UID: 1 to 64 characters of digits and dots, no empty components, no leading zero.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|component| {
            !component.is_empty()
                && component.bytes().all(|byte| byte.is_ascii_digit())
                && (component == "0" || !component.starts_with('0'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_digits_and_dots() {
        assert!(is_valid_uid("1.2.840.10008.5.1.4.1.1.2"));
        assert!(is_valid_uid("2.25.0"));
        assert!(!is_valid_uid(""));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid("1.02"));
        assert!(!is_valid_uid("1.2.a"));
        assert!(!is_valid_uid(&"1.".repeat(40)));
    }

    /// Data Set Trailing Padding built from its bytes is what dicom-rs reads from them.
    #[test]
    fn trailing_padding_is_built_as_the_reader_reads_it() {
        let explicit = [0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 2, 0, 0, 0, 7, 9];
        let explicit_empty = [0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 0, 0, 0, 0];
        let implicit = [0xFC, 0xFF, 0xFC, 0xFF, 3, 0, 0, 0, 1, 2, 3];
        for (bytes, encoding, syntax) in [
            (
                &explicit[..],
                Encoding::ExplicitLittle,
                EXPLICIT_VR_LITTLE_ENDIAN,
            ),
            (
                &explicit_empty[..],
                Encoding::ExplicitLittle,
                EXPLICIT_VR_LITTLE_ENDIAN,
            ),
            (
                &implicit[..],
                Encoding::ImplicitLittle,
                IMPLICIT_VR_LITTLE_ENDIAN,
            ),
        ] {
            let built = trailing_padding(bytes, encoding).unwrap();
            let read: Vec<_> = ReadableDataSet::of(bytes, syntax)
                .unwrap()
                .read(bytes)
                .unwrap()
                .into_iter()
                .collect();
            assert_eq!(format!("{built:?}"), format!("{read:?}"));
        }
        let twice = [&explicit[..], &explicit_empty[..]].concat();
        let built = trailing_padding(&twice, Encoding::ExplicitLittle).unwrap();
        assert_eq!(built.len(), 2);
    }

    #[test]
    fn trailing_bytes_other_than_padding_are_left_to_the_reader() {
        let other_tag = [0x08, 0x00, 0x20, 0x00, b'D', b'A', 0, 0];
        let wrong_vr = [0xFC, 0xFF, 0xFC, 0xFF, b'U', b'N', 0, 0, 0, 0, 0, 0];
        let lying_length = [0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 9, 0, 0, 0, 1];
        for bytes in [&other_tag[..], &wrong_vr[..], &lying_length[..]] {
            assert!(trailing_padding(bytes, Encoding::ExplicitLittle).is_none());
        }
        assert!(trailing_padding(&wrong_vr, Encoding::ExplicitBig).is_none());
    }

    #[test]
    fn files_without_the_magic_are_refused() {
        assert_eq!(
            from_part10(vec![0; 100]).unwrap_err(),
            InstanceError::NotPart10
        );
        let mut bytes = vec![0u8; 200];
        bytes[128..132].copy_from_slice(b"DICM");
        assert_eq!(from_part10(bytes).unwrap_err(), InstanceError::BadFileMeta);
        assert_eq!(InstanceError::NotPart10.status(), 0xC000);
        assert_eq!(InstanceError::SopClassMismatch("x").status(), 0xA900);
    }
}
