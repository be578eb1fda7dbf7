//! DICOM JSON (PS3.18 F.2) of a data set written straight into a byte buffer: the same bytes
//! as `dicom_json::to_vec`, without its per-element allocations (a `String` for every tag and
//! VR, a vector for every value). Every stored instance's header goes through it on ingest.

use base64::Engine as _;
use dicom_core::header::Header as _;
use dicom_core::{DicomValue, PrimitiveValue, Tag, VR};
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;

/// Why a data set could not be written as DICOM JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonWriteError {
    #[error("a {vr} attribute holds a value of another kind")]
    ValueDoesNotFitVr { vr: &'static str },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Appends the DICOM JSON object of `data_set` to `out`.
pub fn write_data_set(
    out: &mut Vec<u8>,
    data_set: &InMemDicomObject,
) -> Result<(), JsonWriteError> {
    out.push(b'{');
    for (position, element) in data_set.into_iter().enumerate() {
        if position > 0 {
            out.push(b',');
        }
        write_tag(out, element.tag());
        out.push(b':');
        write_element(out, element)?;
    }
    out.push(b'}');
    Ok(())
}

/// A tag as DICOM JSON writes it: `"GGGGEEEE"` in uppercase hexadecimal.
fn write_tag(out: &mut Vec<u8>, tag: Tag) {
    out.push(b'"');
    push_hex_u16(out, tag.group());
    push_hex_u16(out, tag.element());
    out.push(b'"');
}

fn push_hex_u16(out: &mut Vec<u8>, value: u16) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    for shift in [12, 8, 4, 0] {
        out.push(DIGITS[usize::from((value >> shift) & 0xF)]);
    }
}

fn write_element(out: &mut Vec<u8>, element: &InMemElement) -> Result<(), JsonWriteError> {
    let vr = element.vr();
    out.extend_from_slice(b"{\"vr\":\"");
    out.extend_from_slice(vr.to_string().as_bytes());
    out.push(b'"');
    match element.value() {
        DicomValue::Sequence(sequence) => {
            out.extend_from_slice(b",\"Value\":");
            write_array(out, sequence.items(), write_data_set)?;
        }
        // Encapsulated Pixel Data is bulk data: never inlined.
        DicomValue::PixelSequence(_) | DicomValue::Primitive(PrimitiveValue::Empty) => {}
        DicomValue::Primitive(value) => write_primitive(out, vr, value)?,
    }
    out.push(b'}');
    Ok(())
}

fn write_primitive(
    out: &mut Vec<u8>,
    vr: VR,
    value: &PrimitiveValue,
) -> Result<(), JsonWriteError> {
    match vr {
        VR::AE
        | VR::AS
        | VR::CS
        | VR::DA
        | VR::DT
        | VR::LO
        | VR::LT
        | VR::SH
        | VR::UC
        | VR::UI
        | VR::UR
        | VR::TM
        | VR::ST
        | VR::UT => {
            out.extend_from_slice(b",\"Value\":");
            write_strings(out, value)
        }
        VR::PN => {
            out.extend_from_slice(b",\"Value\":");
            write_array(out, value.to_multi_str().iter(), |out, name| {
                write_person_name(out, name)
            })
        }
        VR::FD | VR::IS | VR::FL | VR::DS | VR::SL | VR::SS | VR::SV | VR::UL | VR::US | VR::UV => {
            out.extend_from_slice(b",\"Value\":");
            write_numbers(out, vr, value)
        }
        VR::AT => {
            let PrimitiveValue::Tags(tags) = value else {
                return Err(JsonWriteError::ValueDoesNotFitVr { vr: "AT" });
            };
            out.extend_from_slice(b",\"Value\":");
            write_array(out, tags, |out, tag| {
                write_tag(out, *tag);
                Ok(())
            })
        }
        VR::OB | VR::OD | VR::OF | VR::OL | VR::OV | VR::OW | VR::UN => {
            out.extend_from_slice(b",\"InlineBinary\":\"");
            let encoded = base64::engine::general_purpose::STANDARD.encode(value.to_bytes());
            out.extend_from_slice(encoded.as_bytes());
            out.push(b'"');
            Ok(())
        }
        VR::SQ => Err(JsonWriteError::ValueDoesNotFitVr { vr: "SQ" }),
    }
}

/// A JSON array of `items`, each written by `write_item`.
fn write_array<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut write_item: impl FnMut(&mut Vec<u8>, T) -> Result<(), JsonWriteError>,
) -> Result<(), JsonWriteError> {
    out.push(b'[');
    for (position, item) in items.into_iter().enumerate() {
        if position > 0 {
            out.push(b',');
        }
        write_item(out, item)?;
    }
    out.push(b']');
    Ok(())
}

/// One value as serde_json writes it (strings escaped, numbers as Rust formats them).
fn write_json<T: serde::Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), JsonWriteError> {
    serde_json::to_writer(&mut *out, value)?;
    Ok(())
}

fn write_strings(out: &mut Vec<u8>, value: &PrimitiveValue) -> Result<(), JsonWriteError> {
    write_array(out, value.to_multi_str().iter(), |out, text| {
        write_json(out, text.as_str())
    })
}

/// A person name as the object of its non-empty component groups.
fn write_person_name(out: &mut Vec<u8>, name: &str) -> Result<(), JsonWriteError> {
    out.push(b'{');
    let mut groups = name.split('=');
    let mut wrote_a_group = false;
    for key in ["Alphabetic", "Ideographic", "Phonetic"] {
        let group = groups.next().unwrap_or_default();
        if group.is_empty() {
            continue;
        }
        if wrote_a_group {
            out.push(b',');
        }
        write_json(out, key)?;
        out.push(b':');
        write_json(out, group)?;
        wrote_a_group = true;
    }
    out.push(b'}');
    Ok(())
}

/// Numbers as JSON numbers; those held as text (IS, DS) as the text; 64-bit integers that do not
/// fit 32 bits as text, and non-finite floats as `"NaN"`, `"inf"`, `"-inf"`.
fn write_numbers(out: &mut Vec<u8>, vr: VR, value: &PrimitiveValue) -> Result<(), JsonWriteError> {
    match value {
        PrimitiveValue::Str(_) | PrimitiveValue::Strs(_) => write_strings(out, value),
        PrimitiveValue::U8(numbers) => write_array(out, numbers, write_json),
        PrimitiveValue::I16(numbers) => write_array(out, numbers, write_json),
        PrimitiveValue::U16(numbers) => write_array(out, numbers, write_json),
        PrimitiveValue::I32(numbers) => write_array(out, numbers, write_json),
        PrimitiveValue::U32(numbers) => write_array(out, numbers, write_json),
        PrimitiveValue::I64(numbers) => write_array(out, numbers, |out, number| {
            write_wide_integer(out, i128::from(*number))
        }),
        PrimitiveValue::U64(numbers) => write_array(out, numbers, |out, number| {
            write_wide_integer(out, i128::from(*number))
        }),
        PrimitiveValue::F32(numbers) => write_array(out, numbers, |out, number| {
            if number.is_finite() {
                return write_json(out, number);
            }
            write_non_finite(out, number.is_nan(), number.is_sign_positive())
        }),
        PrimitiveValue::F64(numbers) => write_array(out, numbers, |out, number| {
            if number.is_finite() {
                return write_json(out, number);
            }
            write_non_finite(out, number.is_nan(), number.is_sign_positive())
        }),
        PrimitiveValue::Empty => {
            out.extend_from_slice(b"[]");
            Ok(())
        }
        PrimitiveValue::Date(_)
        | PrimitiveValue::DateTime(_)
        | PrimitiveValue::Time(_)
        | PrimitiveValue::Tags(_) => Err(JsonWriteError::ValueDoesNotFitVr { vr: vr.to_string() }),
    }
}

/// A 64-bit integer: a JSON number when it fits 32 bits, its text otherwise.
fn write_wide_integer(out: &mut Vec<u8>, number: i128) -> Result<(), JsonWriteError> {
    match i32::try_from(number) {
        Ok(narrow) => write_json(out, &narrow),
        Err(_) => write_json(out, &number.to_string()),
    }
}

fn write_non_finite(
    out: &mut Vec<u8>,
    is_nan: bool,
    is_positive: bool,
) -> Result<(), JsonWriteError> {
    let text = match (is_nan, is_positive) {
        (true, _) => "NaN",
        (false, true) => "inf",
        (false, false) => "-inf",
    };
    write_json(out, text)
}

#[cfg(test)]
mod tests {
    use dicom_core::value::{DataSetSequence, PixelFragmentSequence};
    use dicom_core::{DataElement, Length, dicom_value};
    use dicom_dictionary_std::tags;

    use super::*;

    fn written(data_set: &InMemDicomObject) -> String {
        let mut out = Vec::new();
        write_data_set(&mut out, data_set).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn reference(data_set: &InMemDicomObject) -> String {
        String::from_utf8(dicom_json::to_vec(data_set).unwrap()).unwrap()
    }

    /// One attribute of every kind of value a parsed header holds, and a few only built ones.
    fn every_kind_of_value() -> InMemDicomObject {
        let mut item = InMemDicomObject::new_empty();
        item.put(DataElement::new(tags::CODE_VALUE, VR::SH, "T-D\"1100\\"));
        item.put(DataElement::new(
            tags::CODE_MEANING,
            VR::LO,
            PrimitiveValue::Empty,
        ));
        let mut data_set = InMemDicomObject::new_empty();
        data_set.put(DataElement::new(
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            "ISO_IR 192",
        ));
        data_set.put(DataElement::new(
            tags::IMAGE_TYPE,
            VR::CS,
            dicom_value!(Strs, ["ORIGINAL", "PRIMARY", "AXIAL"]),
        ));
        data_set.put(DataElement::new(
            tags::PATIENT_NAME,
            VR::PN,
            dicom_value!(
                Strs,
                [
                    "Yamada^Tarou=山田^太郎=やまだ^たろう",
                    "=喜多川^海夢",
                    "Doe^J",
                    ""
                ]
            ),
        ));
        data_set.put(DataElement::new(tags::STUDY_DATE, VR::DA, "20240131"));
        data_set.put(DataElement::new(
            tags::STUDY_DESCRIPTION,
            VR::LO,
            "tab\there, quote \" and control \u{1}",
        ));
        data_set.put(DataElement::new(
            tags::SERIES_NUMBER,
            VR::IS,
            dicom_value!(Strs, ["5", "-7"]),
        ));
        data_set.put(DataElement::new(tags::SLICE_THICKNESS, VR::DS, "2.50"));
        data_set.put(DataElement::new(
            tags::ROWS,
            VR::US,
            dicom_value!(U16, [512]),
        ));
        data_set.put(DataElement::new(
            tags::PIXEL_SPACING,
            VR::FD,
            dicom_value!(F64, [0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0018, 0x9306),
            VR::FL,
            dicom_value!(F32, [1.25, f32::NEG_INFINITY]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0018, 0x9313),
            VR::SV,
            dicom_value!(I64, [-3, 9_000_000_000]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0018, 0x9314),
            VR::UV,
            dicom_value!(U64, [7, 18_000_000_000]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0028, 0x0106),
            VR::SS,
            dicom_value!(I16, [-2048]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0028, 0x0108),
            VR::SL,
            dicom_value!(I32, [-70_000]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0028, 0x0109),
            VR::UL,
            dicom_value!(U32, [70_000]),
        ));
        data_set.put(DataElement::new(
            tags::FRAME_INCREMENT_POINTER,
            VR::AT,
            dicom_value!(Tags, [Tag(0x0018, 0x1063), Tag(0x7FE0, 0x0010)]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0009, 0x0010),
            VR::LO,
            "PRIVATE CREATOR",
        ));
        data_set.put(DataElement::new(
            Tag(0x0009, 0x1001),
            VR::OB,
            dicom_value!(U8, [1, 2, 3, 250]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0009, 0x1002),
            VR::UN,
            dicom_value!(U8, [0, 255]),
        ));
        data_set.put(DataElement::new(
            Tag(0x0009, 0x1003),
            VR::OW,
            dicom_value!(U16, [0xABCD]),
        ));
        data_set.put(DataElement::new(
            tags::ANATOMIC_REGION_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(
                vec![item.clone(), InMemDicomObject::new_empty(), item],
                Length::UNDEFINED,
            ),
        ));
        data_set.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new(vec![], vec![vec![1, 2, 3, 4]]),
        ));
        data_set
    }

    #[test]
    fn writes_the_same_bytes_as_dicom_json() {
        let data_set = every_kind_of_value();
        assert_eq!(written(&data_set), reference(&data_set));
        let empty = InMemDicomObject::new_empty();
        assert_eq!(written(&empty), reference(&empty));
    }

    #[test]
    fn a_value_that_does_not_fit_its_vr_is_an_error_not_a_panic() {
        let mut data_set = InMemDicomObject::new_empty();
        data_set.put(DataElement::new(
            tags::ROWS,
            VR::US,
            dicom_value!(Tags, [Tag(1, 2)]),
        ));
        let mut out = Vec::new();
        assert!(matches!(
            write_data_set(&mut out, &data_set),
            Err(JsonWriteError::ValueDoesNotFitVr { vr: "US" })
        ));
    }
}
