//! `multipart/related` (RFC 2387) as DICOMweb uses it: an incremental reader that yields each
//! part as soon as it is complete (so a STOW-RS request is processed instance by instance, never
//! held whole), and the framing WADO-RS answers are written with.

/// The most bytes one part may have (a single instance).
pub const DEFAULT_MAX_PART_BYTES: usize = 2 << 30;

/// The most bytes of headers one part may have.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// What is wrong with a multipart body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("the Content-Type has no multipart boundary")]
    NoBoundary,
    #[error("the body does not start with the boundary")]
    NoOpeningBoundary,
    #[error("a part's headers are malformed or too long")]
    BadHeaders,
    #[error("a part is larger than {0} bytes")]
    PartTooLarge(usize),
    #[error("the body ends before its closing boundary")]
    Unterminated,
}

/// The `boundary` parameter of a `multipart/related` Content-Type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    parameter(content_type, "boundary")
}

/// A parameter of a media type (`type="application/dicom"`), unquoted.
pub fn parameter(content_type: &str, name: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|parameter| {
        let (key, value) = parameter.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case(name) {
            return None;
        }
        let value = value.trim().trim_matches('"');
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// One part: its headers (names lower-cased) and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Part {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The part's media type without parameters, lower-cased (`application/dicom`).
    pub fn media_type(&self) -> Option<String> {
        self.header("content-type").map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first boundary (a preamble may come first).
    Preamble,
    /// Inside a part's headers.
    Headers,
    /// Inside a part's body.
    Body,
    /// After the closing boundary.
    Done,
}

/// Reads parts from chunks of a body as they arrive.
#[derive(Debug)]
pub struct PartReader {
    /// `\r\n--boundary`: what ends a body (the first boundary may come without the CRLF).
    delimiter: Vec<u8>,
    buffer: Vec<u8>,
    state: State,
    headers: Vec<(String, String)>,
    max_part_bytes: usize,
    /// How much of the buffer is known not to hold the start of a delimiter (so a large part
    /// arriving in many chunks is scanned once, not once per chunk).
    scanned: usize,
}

impl PartReader {
    pub fn new(boundary: &str, max_part_bytes: usize) -> Self {
        Self {
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            buffer: Vec::new(),
            state: State::Preamble,
            headers: Vec::new(),
            max_part_bytes,
            scanned: 0,
        }
    }

    /// Adds a chunk; returns the parts it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Part>, MultipartError> {
        self.buffer.extend_from_slice(chunk);
        let mut parts = Vec::new();
        while let Some(part) = self.step()? {
            parts.push(part);
        }
        Ok(parts)
    }

    /// Ends the body: an error unless the closing boundary was seen.
    pub fn finish(&self) -> Result<(), MultipartError> {
        if self.state == State::Done {
            return Ok(());
        }
        Err(MultipartError::Unterminated)
    }

    /// Advances as far as the buffer allows; `Some` when a part completed.
    fn step(&mut self) -> Result<Option<Part>, MultipartError> {
        loop {
            match self.state {
                State::Done => {
                    self.buffer.clear();
                    return Ok(None);
                }
                State::Preamble => {
                    // The first boundary: at the very start, or after a preamble and a CRLF.
                    let opening = &self.delimiter[2..];
                    let found = if self.buffer.starts_with(opening) {
                        Some(0)
                    } else {
                        find(&self.buffer, &self.delimiter).map(|at| at + 2)
                    };
                    let Some(at) = found else {
                        if self.buffer.len() > MAX_HEADER_BYTES {
                            return Err(MultipartError::NoOpeningBoundary);
                        }
                        return Ok(None);
                    };
                    let after = at + opening.len();
                    if !self.after_boundary(after)? {
                        return Ok(None);
                    }
                }
                State::Headers => {
                    let Some(end) = find(&self.buffer, b"\r\n\r\n") else {
                        if self.buffer.len() > MAX_HEADER_BYTES {
                            return Err(MultipartError::BadHeaders);
                        }
                        return Ok(None);
                    };
                    self.headers = parse_headers(&self.buffer[..end])?;
                    self.buffer.drain(..end + 4);
                    self.state = State::Body;
                }
                State::Body => {
                    let Some(at) = find(&self.buffer[self.scanned..], &self.delimiter)
                        .map(|at| at + self.scanned)
                    else {
                        if self.buffer.len() > self.max_part_bytes + self.delimiter.len() {
                            return Err(MultipartError::PartTooLarge(self.max_part_bytes));
                        }
                        self.scanned = self.buffer.len().saturating_sub(self.delimiter.len() - 1);
                        return Ok(None);
                    };
                    self.scanned = 0;
                    if at > self.max_part_bytes {
                        return Err(MultipartError::PartTooLarge(self.max_part_bytes));
                    }
                    let after = at + self.delimiter.len();
                    if self.buffer.len() < after + 2 {
                        return Ok(None);
                    }
                    let body = self.buffer[..at].to_vec();
                    let headers = std::mem::take(&mut self.headers);
                    if !self.after_boundary(after)? {
                        // Cannot happen: two bytes after the boundary are present.
                        return Ok(None);
                    }
                    return Ok(Some(Part { headers, body }));
                }
            }
        }
    }

    /// After a boundary: `--` closes the body, CRLF opens a part. `false` when more input is
    /// needed to tell.
    fn after_boundary(&mut self, after: usize) -> Result<bool, MultipartError> {
        if self.buffer.len() < after + 2 {
            return Ok(false);
        }
        let marker = [self.buffer[after], self.buffer[after + 1]];
        self.buffer.drain(..after + 2);
        self.state = match &marker {
            b"--" => State::Done,
            b"\r\n" => State::Headers,
            _ => return Err(MultipartError::BadHeaders),
        };
        Ok(true)
    }
}

fn parse_headers(block: &[u8]) -> Result<Vec<(String, String)>, MultipartError> {
    let text = std::str::from_utf8(block).map_err(|_| MultipartError::BadHeaders)?;
    text.split("\r\n")
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').ok_or(MultipartError::BadHeaders)?;
            Ok((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// The opening of one part in an answer.
pub fn part_opening(boundary: &str, content_type: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut opening = format!("--{boundary}\r\nContent-Type: {content_type}\r\n");
    for (name, value) in extra_headers {
        opening.push_str(&format!("{name}: {value}\r\n"));
    }
    opening.push_str("\r\n");
    opening.into_bytes()
}

/// What ends each part's body.
pub const PART_END: &[u8] = b"\r\n";

/// The closing boundary of an answer.
pub fn closing(boundary: &str) -> Vec<u8> {
    format!("--{boundary}--\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&[u8]]) -> Vec<u8> {
        let mut bytes = b"preamble\r\n".to_vec();
        for part in parts {
            bytes.extend(part_opening("XYZ", "application/dicom", &[]));
            bytes.extend_from_slice(part);
            bytes.extend_from_slice(PART_END);
        }
        bytes.extend(closing("XYZ"));
        bytes
    }

    #[test]
    fn parts_arrive_whatever_the_chunking() {
        let whole = body(&[b"first\r\n--XY", b"", b"third part"]);
        for chunk_size in [1, 2, 3, 7, 64, whole.len()] {
            let mut reader = PartReader::new("XYZ", 1024);
            let mut parts = Vec::new();
            for chunk in whole.chunks(chunk_size) {
                parts.extend(reader.push(chunk).unwrap());
            }
            reader.finish().unwrap();
            let bodies: Vec<&[u8]> = parts.iter().map(|part| part.body.as_slice()).collect();
            assert_eq!(
                bodies,
                [&b"first\r\n--XY"[..], b"", b"third part"],
                "{chunk_size}"
            );
            assert_eq!(parts[0].media_type().as_deref(), Some("application/dicom"));
        }
    }

    #[test]
    fn garbage_is_refused() {
        let mut reader = PartReader::new("XYZ", 1024);
        assert!(reader.push(b"--XYZ\r\nno colon here\r\n\r\nbody").is_err());
        let mut reader = PartReader::new("XYZ", 4);
        let whole = body(&[b"far too long"]);
        assert_eq!(
            reader.push(&whole).unwrap_err(),
            MultipartError::PartTooLarge(4)
        );
        let mut reader = PartReader::new("XYZ", 1024);
        reader
            .push(b"--XYZ\r\nContent-Type: a/b\r\n\r\ncut")
            .unwrap();
        assert_eq!(reader.finish(), Err(MultipartError::Unterminated));
        assert_eq!(
            boundary_of("multipart/related; type=\"application/dicom\"; boundary=\"a b\"")
                .as_deref(),
            Some("a b")
        );
        assert_eq!(boundary_of("application/dicom"), None);
    }
}
