//! The frames of an instance's Pixel Data as WADO-RS serves them (PS3.18 8.7.3): native frames as
//! bytes in little endian order, encapsulated frames as their compressed bitstreams, each named
//! by the media type of its encoding. Frames are located, never decoded or transcoded.

use dicom_core::value::Value;
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};

/// The media type native (uncompressed) frames are served as.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The transfer syntax native frames are served in (PS3.18 8.7.3.3.2).
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";

/// Why frames cannot be served. Messages name frames and attributes, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the instance has no pixel data")]
    NoPixelData,
    #[error("frame {requested} does not exist: the instance has {count} frame(s)")]
    OutOfRange { requested: u32, count: u32 },
    #[error("the frames of this instance's pixel data cannot be located: {0}")]
    Unlocatable(&'static str),
}

/// The media type a frame has in the given transfer syntax (PS3.18 Table 8.7.3-2), and the
/// transfer syntax its bytes are in.
pub fn media_type(transfer_syntax_uid: &str) -> (&'static str, &str) {
    let media_type = match transfer_syntax_uid {
        "1.2.840.10008.1.2.4.50"
        | "1.2.840.10008.1.2.4.51"
        | "1.2.840.10008.1.2.4.57"
        | "1.2.840.10008.1.2.4.70" => "image/jpeg",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "image/jls",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "image/jp2",
        "1.2.840.10008.1.2.4.92" | "1.2.840.10008.1.2.4.93" => "image/jpx",
        "1.2.840.10008.1.2.5" => "image/dicom-rle",
        "1.2.840.10008.1.2.4.100" | "1.2.840.10008.1.2.4.101" => "video/mpeg",
        "1.2.840.10008.1.2.4.102"
        | "1.2.840.10008.1.2.4.103"
        | "1.2.840.10008.1.2.4.104"
        | "1.2.840.10008.1.2.4.105"
        | "1.2.840.10008.1.2.4.106" => "video/mp4",
        _ => return (OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN),
    };
    (media_type, transfer_syntax_uid)
}

/// Parses a WADO-RS frame list (`1,3,5`): 1-based frame numbers, at least one.
pub fn parse_frame_list(list: &str) -> Option<Vec<u32>> {
    let numbers: Option<Vec<u32>> = list
        .split(',')
        .map(|number| {
            number
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|number| *number > 0)
        })
        .collect();
    numbers.filter(|numbers| !numbers.is_empty() && numbers.len() <= 10_000)
}

/// How many frames the instance has (Number of Frames, 1 when absent).
pub fn frame_count(object: &FileDicomObject<InMemDicomObject>) -> u32 {
    object
        .get(tags::NUMBER_OF_FRAMES)
        .and_then(|element| element.to_int::<i64>().ok())
        .and_then(|count| u32::try_from(count).ok())
        .filter(|count| *count > 0)
        .unwrap_or(1)
}

/// The bytes of the requested frames (1-based numbers), in the order asked for.
pub fn extract(
    object: &FileDicomObject<InMemDicomObject>,
    numbers: &[u32],
) -> Result<Vec<Vec<u8>>, FrameError> {
    let count = frame_count(object);
    if let Some(&requested) = numbers
        .iter()
        .find(|number| **number == 0 || **number > count)
    {
        return Err(FrameError::OutOfRange { requested, count });
    }
    let pixel_data = object
        .get(tags::PIXEL_DATA)
        .ok_or(FrameError::NoPixelData)?;
    match pixel_data.value() {
        Value::PixelSequence(sequence) => {
            let frames =
                encapsulated_frames(object, sequence.offset_table(), sequence.fragments(), count)?;
            Ok(numbers
                .iter()
                .map(|number| frames[*number as usize - 1].clone())
                .collect())
        }
        Value::Primitive(primitive) => {
            let bytes = primitive.to_bytes();
            let frame_length = native_frame_length(object)?;
            numbers
                .iter()
                .map(|number| {
                    let start = (*number as usize - 1) * frame_length;
                    bytes
                        .get(start..start + frame_length)
                        .map(<[u8]>::to_vec)
                        .ok_or(FrameError::Unlocatable(
                            "the pixel data is shorter than its frames",
                        ))
                })
                .collect()
        }
        Value::Sequence(_) => Err(FrameError::NoPixelData),
    }
}

/// The bytes of one native frame: Rows × Columns × Samples per Pixel × Bits Allocated / 8.
fn native_frame_length(object: &FileDicomObject<InMemDicomObject>) -> Result<usize, FrameError> {
    let number = |tag| {
        object
            .get(tag)
            .and_then(|element| element.to_int::<u64>().ok())
            .ok_or(FrameError::Unlocatable(
                "an image pixel attribute is missing",
            ))
    };
    // YBR_FULL_422 stores two samples per pixel: Y for each, Cb and Cr shared by two pixels.
    let samples = match crate::instance::text_of(object, tags::PHOTOMETRIC_INTERPRETATION) {
        Some(photometric) if photometric == "YBR_FULL_422" => 2,
        _ => number(tags::SAMPLES_PER_PIXEL)?,
    };
    let bits =
        number(tags::ROWS)? * number(tags::COLUMNS)? * samples * number(tags::BITS_ALLOCATED)?;
    if bits == 0 || bits % 8 != 0 {
        return Err(FrameError::Unlocatable(
            "frames of packed single-bit pixel data do not end on byte boundaries",
        ));
    }
    usize::try_from(bits / 8).map_err(|_| FrameError::Unlocatable("frames are too large"))
}

/// Groups the fragments of encapsulated pixel data into frames (PS3.5 A.4): one frame takes
/// every fragment; else the Extended or Basic Offset Table says where each frame starts; else
/// there must be one fragment per frame.
fn encapsulated_frames(
    object: &FileDicomObject<InMemDicomObject>,
    basic_offset_table: &[u32],
    fragments: &[Vec<u8>],
    count: u32,
) -> Result<Vec<Vec<u8>>, FrameError> {
    if count == 1 {
        return Ok(vec![fragments.concat()]);
    }
    let offsets = extended_offset_table(object).unwrap_or_else(|| {
        basic_offset_table
            .iter()
            .map(|offset| u64::from(*offset))
            .collect()
    });
    if offsets.is_empty() {
        if fragments.len() == count as usize {
            return Ok(fragments.to_vec());
        }
        return Err(FrameError::Unlocatable(
            "several fragments per frame and no offset table",
        ));
    }
    if offsets.len() != count as usize {
        return Err(FrameError::Unlocatable(
            "the offset table does not list every frame",
        ));
    }
    let mut frames: Vec<Vec<u8>> = vec![Vec::new(); count as usize];
    let mut position = 0u64;
    for fragment in fragments {
        let frame_index = offsets
            .iter()
            .rposition(|offset| *offset <= position)
            .ok_or(FrameError::Unlocatable(
                "the offset table does not start at 0",
            ))?;
        frames[frame_index].extend_from_slice(fragment);
        position += 8 + fragment.len() as u64;
    }
    Ok(frames)
}

/// The Extended Offset Table (7FE0,0001), 64-bit offsets, when the instance has one.
fn extended_offset_table(object: &FileDicomObject<InMemDicomObject>) -> Option<Vec<u64>> {
    let bytes = object.get(tags::EXTENDED_OFFSET_TABLE)?.to_bytes().ok()?;
    let offsets: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|chunk| u64::from_le_bytes(chunk.try_into().unwrap_or_default()))
        .collect();
    (!offsets.is_empty()).then_some(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lists_are_one_based_numbers() {
        assert_eq!(parse_frame_list("1"), Some(vec![1]));
        assert_eq!(parse_frame_list("3, 1,2"), Some(vec![3, 1, 2]));
        assert_eq!(parse_frame_list("0"), None);
        assert_eq!(parse_frame_list("1,,2"), None);
        assert_eq!(parse_frame_list("a"), None);
        assert_eq!(parse_frame_list(""), None);
    }

    #[test]
    fn compressed_frames_keep_their_encoding_and_native_frames_are_little_endian() {
        assert_eq!(
            media_type("1.2.840.10008.1.2.4.50"),
            ("image/jpeg", "1.2.840.10008.1.2.4.50")
        );
        assert_eq!(
            media_type("1.2.840.10008.1.2.4.80"),
            ("image/jls", "1.2.840.10008.1.2.4.80")
        );
        assert_eq!(
            media_type("1.2.840.10008.1.2.2"),
            (OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN)
        );
        assert_eq!(
            media_type("1.2.840.10008.1.2.1.99"),
            (OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN)
        );
    }
}
