//! A structural pre-check of encoded DICOM data: every declared length fits inside what holds
//! it, sequences and items nest properly, and nesting is bounded. It runs before the full parser,
//! which would otherwise allocate whatever a lying length asks for (a 4 GiB value in a 40 KB
//! file) before noticing the data is not there.

use std::ops::Range;

use dicom_core::dictionary::DataDictionary;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// The deepest sequence nesting accepted (real data sets stay far below it).
pub const MAX_NESTING: usize = 64;

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_DELIMITATION: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_DELIMITATION: Tag = Tag(0xFFFE, 0xE0DD);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);

/// How the data set is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    ImplicitLittle,
    ExplicitLittle,
    ExplicitBig,
}

/// What is wrong with the structure (no value of the data is ever quoted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StructureError {
    #[error("the data ends inside an element header or value")]
    Truncated,
    #[error("element ({group:04X},{element:04X}) declares a length beyond the end of the data")]
    LengthBeyondData { group: u16, element: u16 },
    #[error(
        "element ({group:04X},{element:04X}) has an undefined length but is not a sequence (an undefined-length UN is not supported)"
    )]
    UndefinedLength { group: u16, element: u16 },
    #[error("a sequence holds something other than an item")]
    NotAnItem,
    #[error("sequences are nested more than {MAX_NESTING} deep")]
    TooDeep,
    #[error("an item or sequence delimiter is out of place")]
    StrayDelimiter,
}

/// Checks `data` (a whole data set, or the file meta group) in `encoding`.
pub fn check(data: &[u8], encoding: Encoding) -> Result<(), StructureError> {
    pixel_data_span(data, encoding).map(|_| ())
}

/// Checks `data` as [`check`] does and tells where its top-level Pixel Data element lies, header
/// included: a reader that needs only the other attributes can skip those bytes.
pub fn pixel_data_span(
    data: &[u8],
    encoding: Encoding,
) -> Result<Option<Range<usize>>, StructureError> {
    let mut scanner = Scanner::new(data, encoding);
    scanner.data_set(Some(data.len()))?;
    Ok(scanner.pixel_data)
}

/// One top-level element: its tag, its VR as encoded (`None` in implicit VR) and where its
/// value lies in the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopLevelElement {
    pub tag: Tag,
    pub vr: Option<VR>,
    pub value: Range<usize>,
}

/// The top-level elements of `data`, checked as [`check`] checks them.
pub fn top_level_elements(
    data: &[u8],
    encoding: Encoding,
) -> Result<Vec<TopLevelElement>, StructureError> {
    let mut scanner = Scanner::new(data, encoding);
    let mut elements = Vec::new();
    while scanner.position < data.len() {
        let header = scanner.header()?;
        if header.tag.group() == 0xFFFE {
            return Err(StructureError::StrayDelimiter);
        }
        let value_start = scanner.position;
        scanner.element(&header, data.len())?;
        elements.push(TopLevelElement {
            tag: header.tag,
            vr: header.vr,
            value: value_start..scanner.position,
        });
    }
    Ok(elements)
}

struct Scanner<'a> {
    data: &'a [u8],
    position: usize,
    encoding: Encoding,
    depth: usize,
    /// The top-level Pixel Data element, once met.
    pixel_data: Option<Range<usize>>,
}

struct Header {
    tag: Tag,
    vr: Option<VR>,
    length: u32,
}

impl<'a> Scanner<'a> {
    fn new(data: &'a [u8], encoding: Encoding) -> Self {
        Self {
            data,
            position: 0,
            encoding,
            depth: 0,
            pixel_data: None,
        }
    }

    /// Elements until `end` (a defined length) or until an item delimiter (`None`).
    fn data_set(&mut self, end: Option<usize>) -> Result<(), StructureError> {
        loop {
            match end {
                Some(end) if self.position >= end => return Ok(()),
                None if self.position >= self.data.len() => return Err(StructureError::Truncated),
                _ => {}
            }
            let element_start = self.position;
            let header = self.header()?;
            if header.tag == ITEM_DELIMITATION {
                return match end {
                    None => Ok(()),
                    Some(_) => Err(StructureError::StrayDelimiter),
                };
            }
            if header.tag.group() == 0xFFFE {
                return Err(StructureError::StrayDelimiter);
            }
            self.element(&header, end.unwrap_or(self.data.len()))?;
            if self.depth == 0 && header.tag == PIXEL_DATA {
                self.pixel_data = Some(element_start..self.position);
            }
        }
    }

    fn element(&mut self, header: &Header, parent_end: usize) -> Result<(), StructureError> {
        let sequence_like = self.is_sequence(header);
        if header.length == UNDEFINED {
            if header.tag == PIXEL_DATA {
                return self.fragments();
            }
            // An undefined-length UN is a sequence in implicit VR little endian (PS3.5 6.2.2),
            // but dicom-rs reads it as a value of 4 GiB: it is refused, not allocated.
            if !sequence_like || header.vr == Some(VR::UN) {
                return Err(StructureError::UndefinedLength {
                    group: header.tag.group(),
                    element: header.tag.element(),
                });
            }
            return self.nested(self.encoding, |scanner| scanner.sequence(None));
        }
        let length = header.length as usize;
        let end = self
            .position
            .checked_add(length)
            .ok_or(StructureError::Truncated)?;
        if end > parent_end || end > self.data.len() {
            return Err(StructureError::LengthBeyondData {
                group: header.tag.group(),
                element: header.tag.element(),
            });
        }
        if sequence_like {
            return self.nested(self.encoding, |scanner| scanner.sequence(Some(end)));
        }
        self.position = end;
        Ok(())
    }

    /// Items until `end`, or until the sequence delimiter.
    fn sequence(&mut self, end: Option<usize>) -> Result<(), StructureError> {
        loop {
            if let Some(end) = end
                && self.position >= end
            {
                return Ok(());
            }
            let tag = self.tag()?;
            let length = self.u32()?;
            if tag == SEQUENCE_DELIMITATION {
                return match end {
                    None => Ok(()),
                    Some(_) => Err(StructureError::StrayDelimiter),
                };
            }
            if tag != ITEM {
                return Err(StructureError::NotAnItem);
            }
            if length == UNDEFINED {
                self.data_set(None)?;
                continue;
            }
            let item_end = self
                .position
                .checked_add(length as usize)
                .ok_or(StructureError::Truncated)?;
            if item_end > end.unwrap_or(self.data.len()) || item_end > self.data.len() {
                return Err(StructureError::LengthBeyondData {
                    group: tag.group(),
                    element: tag.element(),
                });
            }
            self.data_set(Some(item_end))?;
        }
    }

    /// Encapsulated pixel data: fragments (items of bytes) until the sequence delimiter.
    fn fragments(&mut self) -> Result<(), StructureError> {
        loop {
            let tag = self.tag()?;
            let length = self.u32()?;
            if tag == SEQUENCE_DELIMITATION {
                return Ok(());
            }
            if tag != ITEM || length == UNDEFINED {
                return Err(StructureError::NotAnItem);
            }
            let end = self
                .position
                .checked_add(length as usize)
                .filter(|end| *end <= self.data.len())
                .ok_or(StructureError::LengthBeyondData {
                    group: tag.group(),
                    element: tag.element(),
                })?;
            self.position = end;
        }
    }

    fn nested(
        &mut self,
        encoding: Encoding,
        scan: impl FnOnce(&mut Self) -> Result<(), StructureError>,
    ) -> Result<(), StructureError> {
        if self.depth >= MAX_NESTING {
            return Err(StructureError::TooDeep);
        }
        let outer = self.encoding;
        self.depth += 1;
        self.encoding = encoding;
        let outcome = scan(self);
        self.encoding = outer;
        self.depth -= 1;
        outcome
    }

    fn is_sequence(&self, header: &Header) -> bool {
        match header.vr {
            Some(vr) => vr == VR::SQ,
            None => StandardDataDictionary
                .by_tag(header.tag)
                .is_some_and(|entry| entry.vr.relaxed() == VR::SQ),
        }
    }

    fn header(&mut self) -> Result<Header, StructureError> {
        let tag = self.tag()?;
        if tag.group() == 0xFFFE || self.encoding == Encoding::ImplicitLittle {
            let length = self.u32()?;
            return Ok(Header {
                tag,
                vr: None,
                length,
            });
        }
        let vr_bytes = self.bytes(2)?;
        let vr = VR::from_binary([vr_bytes[0], vr_bytes[1]]).unwrap_or(VR::UN);
        let long_form = matches!(
            vr,
            VR::OB
                | VR::OD
                | VR::OF
                | VR::OL
                | VR::OV
                | VR::OW
                | VR::SQ
                | VR::UC
                | VR::UN
                | VR::UR
                | VR::UT
                | VR::SV
                | VR::UV
        );
        let length = if long_form {
            self.bytes(2)?;
            self.u32()?
        } else {
            u32::from(self.u16()?)
        };
        Ok(Header {
            tag,
            vr: Some(vr),
            length,
        })
    }

    fn tag(&mut self) -> Result<Tag, StructureError> {
        let group = self.u16()?;
        let element = self.u16()?;
        Ok(Tag(group, element))
    }

    fn u16(&mut self) -> Result<u16, StructureError> {
        let bytes = self.bytes(2)?;
        let pair = [bytes[0], bytes[1]];
        Ok(match self.encoding {
            Encoding::ExplicitBig => u16::from_be_bytes(pair),
            _ => u16::from_le_bytes(pair),
        })
    }

    fn u32(&mut self) -> Result<u32, StructureError> {
        let bytes = self.bytes(4)?;
        let quad = [bytes[0], bytes[1], bytes[2], bytes[3]];
        Ok(match self.encoding {
            Encoding::ExplicitBig => u32::from_be_bytes(quad),
            _ => u32::from_le_bytes(quad),
        })
    }

    fn bytes(&mut self, count: usize) -> Result<&[u8], StructureError> {
        let end = self
            .position
            .checked_add(count)
            .filter(|end| *end <= self.data.len())
            .ok_or(StructureError::Truncated)?;
        let bytes = &self.data[self.position..end];
        self.position = end;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_undefined_length_un_is_refused_not_allocated() {
        let mut data = vec![0x09, 0x00, 0x10, 0x10];
        data.extend_from_slice(b"UN\0\0");
        data.extend_from_slice(&UNDEFINED.to_le_bytes());
        data.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        assert!(matches!(
            check(&data, Encoding::ExplicitLittle),
            Err(StructureError::UndefinedLength { .. })
        ));
    }

    fn explicit(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(tag.0.to_le_bytes());
        bytes.extend(tag.1.to_le_bytes());
        bytes.extend(vr);
        bytes.extend(u16::try_from(value.len()).unwrap().to_le_bytes());
        bytes.extend(value);
        bytes
    }

    #[test]
    fn a_well_formed_data_set_passes() {
        let mut data = explicit((0x0010, 0x0010), b"PN", b"Doe^Jane");
        data.extend(explicit((0x0010, 0x0020), b"LO", b"ID-1"));
        assert_eq!(check(&data, Encoding::ExplicitLittle), Ok(()));
    }

    #[test]
    fn the_top_level_pixel_data_is_located_header_included() {
        let mut data = explicit((0x0010, 0x0010), b"PN", b"Doe^Jane");
        let pixel_data_start = data.len();
        // OB has a 4-byte length after two reserved bytes.
        data.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 4, 0, 0, 0]);
        data.extend([1, 2, 3, 4]);
        let pixel_data_end = data.len();
        // Data Set Trailing Padding after it.
        data.extend([0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(
            pixel_data_span(&data, Encoding::ExplicitLittle),
            Ok(Some(pixel_data_start..pixel_data_end))
        );
        let without = explicit((0x0010, 0x0010), b"PN", b"Doe^Jane");
        assert_eq!(
            pixel_data_span(&without, Encoding::ExplicitLittle),
            Ok(None)
        );
    }

    #[test]
    fn a_length_beyond_the_data_is_refused_before_any_allocation() {
        let mut data = explicit((0x0010, 0x0010), b"PN", b"Doe^Jane");
        // OB with a 4 GiB - 2 length in a 30-byte buffer.
        data.extend([
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFE, 0xFF, 0xFF, 0xFF,
        ]);
        assert_eq!(
            check(&data, Encoding::ExplicitLittle),
            Err(StructureError::LengthBeyondData {
                group: 0x7FE0,
                element: 0x0010
            })
        );
    }

    #[test]
    fn truncation_and_deep_nesting_are_refused() {
        let data = explicit((0x0010, 0x0010), b"PN", b"Doe^Jane");
        assert_eq!(
            check(&data[..data.len() - 3], Encoding::ExplicitLittle),
            Err(StructureError::LengthBeyondData {
                group: 0x0010,
                element: 0x0010
            })
        );
        let mut nested = Vec::new();
        for _ in 0..(MAX_NESTING + 1) {
            // (0040,A730) Content Sequence, implicit VR, undefined length, one undefined item.
            nested.extend([0x40, 0x00, 0x30, 0xA7, 0xFF, 0xFF, 0xFF, 0xFF]);
            nested.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert_eq!(
            check(&nested, Encoding::ImplicitLittle),
            Err(StructureError::TooDeep)
        );
    }
}
