//! Rendered frames (PS3.18 8.3.5, "rendered" resources): one frame decoded from any stored
//! transfer syntax, its stored values turned into display values (modality rescale, then a VOI
//! window: the caller's, the instance's, or the frame's range), and encoded as JPEG or PNG.
//! Decoding is dicom-pixeldata's (JPEG, JPEG lossless, RLE, JPEG 2000 through openjp2) except
//! JPEG-LS, which pure_jpegls decodes without C code.

use dicom_core::Tag;
use dicom_core::value::Value;
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, InMemDicomObject};
use dicom_pixeldata::{PixelDecoder, PlanarConfiguration};

use crate::frames::{self, FrameError};

/// The most pixels (rows × columns) a frame may have to be rendered.
pub const MAX_RENDERED_PIXELS: u64 = 1 << 26;

const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
const JPEG_LS_LOSSLESS: &str = "1.2.840.10008.1.2.4.80";
const JPEG_LS_NEAR_LOSSLESS: &str = "1.2.840.10008.1.2.4.81";

/// The image formats frames are rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
}

impl ImageFormat {
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
        }
    }
}

/// The VOI LUT functions of PS3.3 C.11.2.1.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

/// A VOI window: center and width in modality units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f64,
    pub width: f64,
    pub function: WindowFunction,
}

impl Window {
    /// Parses the `window` query parameter: `center,width,function`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(',').map(str::trim);
        let center = parts.next()?.parse::<f64>().ok()?;
        let width = parts.next()?.parse::<f64>().ok()?;
        let function = match parts
            .next()
            .unwrap_or("linear")
            .to_ascii_lowercase()
            .as_str()
        {
            "linear" => WindowFunction::Linear,
            "linear-exact" | "linear_exact" => WindowFunction::LinearExact,
            "sigmoid" => WindowFunction::Sigmoid,
            _ => return None,
        };
        let valid = center.is_finite()
            && width.is_finite()
            && width > 0.0
            && (function != WindowFunction::Linear || width >= 1.0)
            && parts.next().is_none();
        valid.then_some(Self {
            center,
            width,
            function,
        })
    }

    /// The display value (0–255) of a modality value.
    fn apply(&self, value: f64) -> u8 {
        let (center, width) = (self.center, self.width);
        let fraction = match self.function {
            WindowFunction::Linear => (value - (center - 0.5)) / (width - 1.0).max(1.0) + 0.5,
            WindowFunction::LinearExact => (value - center) / width + 0.5,
            WindowFunction::Sigmoid => 1.0 / (1.0 + (-4.0 * (value - center) / width).exp()),
        };
        (fraction.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

/// What a rendering asks for: which frame (1-based), in which format, how.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderRequest {
    pub frame: u32,
    pub format: ImageFormat,
    /// JPEG quality, 1–100.
    pub quality: u8,
    pub window: Option<Window>,
    /// The largest width and height of the image; it is scaled down, keeping its aspect ratio,
    /// to fit (never up).
    pub viewport: Option<(u32, u32)>,
}

/// Parses the `viewport` query parameter: `width,height` in pixels (the cropping form with a
/// source rectangle is not supported).
pub fn parse_viewport(text: &str) -> Option<(u32, u32)> {
    let (width, height) = text.split_once(',')?;
    let width = width.trim().parse::<u32>().ok()?;
    let height = height.trim().parse::<u32>().ok()?;
    let fits = |side: u32| (1..=16_384).contains(&side);
    (fits(width) && fits(height)).then_some((width, height))
}

/// Why a frame cannot be rendered. Messages name encodings and attributes, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("this frame cannot be rendered: {0}")]
    Unsupported(String),
    #[error("the pixel data could not be decoded")]
    Undecodable,
}

/// A frame's pixels as stored values, pixel-interleaved.
struct StoredFrame {
    rows: u32,
    columns: u32,
    samples_per_pixel: u16,
    bits_stored: u16,
    signed: bool,
    photometric: String,
    values: Vec<u32>,
}

/// A frame ready for encoding: 8-bit gray or RGB.
struct DisplayFrame {
    rows: u32,
    columns: u32,
    color: bool,
    pixels: Vec<u8>,
}

/// Renders one frame of an instance as a JPEG or PNG image.
pub fn render(
    object: &FileDicomObject<InMemDicomObject>,
    request: &RenderRequest,
) -> Result<Vec<u8>, RenderError> {
    let count = frames::frame_count(object);
    if request.frame == 0 || request.frame > count {
        return Err(FrameError::OutOfRange {
            requested: request.frame,
            count,
        }
        .into());
    }
    if object.get(tags::PIXEL_DATA).is_none() {
        return Err(FrameError::NoPixelData.into());
    }
    check_size(object)?;
    let stored = stored_frame(object, request.frame)?;
    let display = to_display(object, stored, request.window)?;
    let display = match request.viewport {
        Some(viewport) => fit_into(display, viewport),
        None => display,
    };
    encode(&display, request)
}

/// Scales a frame down to fit the viewport, each output pixel the mean of the input pixels it
/// covers (a box filter: no aliasing on thumbnails of fine structure).
fn fit_into(display: DisplayFrame, (max_width, max_height): (u32, u32)) -> DisplayFrame {
    let scale = (f64::from(max_width) / f64::from(display.columns))
        .min(f64::from(max_height) / f64::from(display.rows));
    if scale >= 1.0 {
        return display;
    }
    let columns = ((f64::from(display.columns) * scale).round() as u32).max(1);
    let rows = ((f64::from(display.rows) * scale).round() as u32).max(1);
    let channels = if display.color { 3 } else { 1 };
    let source_width = display.columns as usize;
    let span = |index: u32, out: u32, input: u32| {
        let start = (u64::from(index) * u64::from(input) / u64::from(out)) as usize;
        let end = ((u64::from(index) + 1) * u64::from(input) / u64::from(out)) as usize;
        start..end.max(start + 1)
    };
    let mut pixels = Vec::with_capacity(columns as usize * rows as usize * channels);
    for row in 0..rows {
        let source_rows = span(row, rows, display.rows);
        for column in 0..columns {
            let source_columns = span(column, columns, display.columns);
            for channel in 0..channels {
                let mut sum = 0u64;
                let mut count = 0u64;
                for source_row in source_rows.clone() {
                    for source_column in source_columns.clone() {
                        let index =
                            (source_row * source_width + source_column) * channels + channel;
                        sum += u64::from(display.pixels[index]);
                        count += 1;
                    }
                }
                pixels.push((sum / count.max(1)) as u8);
            }
        }
    }
    DisplayFrame {
        rows,
        columns,
        color: display.color,
        pixels,
    }
}

fn check_size(object: &FileDicomObject<InMemDicomObject>) -> Result<(), RenderError> {
    let rows = unsigned(object, tags::ROWS).unwrap_or(0);
    let columns = unsigned(object, tags::COLUMNS).unwrap_or(0);
    if rows == 0 || columns == 0 {
        return Err(RenderError::Unsupported(
            "Rows or Columns is missing".to_owned(),
        ));
    }
    if rows * columns > MAX_RENDERED_PIXELS {
        return Err(RenderError::Unsupported(format!(
            "frames over {MAX_RENDERED_PIXELS} pixels are not rendered"
        )));
    }
    Ok(())
}

fn unsigned(object: &FileDicomObject<InMemDicomObject>, tag: Tag) -> Option<u64> {
    object.get(tag)?.to_int::<u64>().ok()
}

fn text(object: &FileDicomObject<InMemDicomObject>, tag: Tag) -> Option<String> {
    crate::instance::text_of(object, tag)
}

fn stored_frame(
    object: &FileDicomObject<InMemDicomObject>,
    frame: u32,
) -> Result<StoredFrame, RenderError> {
    let transfer_syntax = object.meta().transfer_syntax().trim_end_matches('\0');
    if transfer_syntax == JPEG_LS_LOSSLESS || transfer_syntax == JPEG_LS_NEAR_LOSSLESS {
        return jpeg_ls_frame(object, frame);
    }
    if unsigned(object, tags::BITS_ALLOCATED) == Some(1) {
        return single_bit_frame(object, frame);
    }
    if transfer_syntax == JPEG_EXTENDED && unsigned(object, tags::BITS_STORED).unwrap_or(8) > 8 {
        return Err(RenderError::Unsupported(
            "12-bit JPEG Extended (process 4) frames are not decoded: no 12-bit DCT decoder is built in".to_owned(),
        ));
    }
    let native_ybr_422 = text(object, tags::PHOTOMETRIC_INTERPRETATION).as_deref()
        == Some("YBR_FULL_422")
        && !matches!(
            object.get(tags::PIXEL_DATA).map(|element| element.value()),
            Some(Value::PixelSequence(_))
        );
    if native_ybr_422 {
        return subsampled_frame(object, frame);
    }
    decoded_frame(object, frame)
}

/// Native YBR_FULL_422 frames (Y1 Y2 Cb Cr per pair of pixels), which dicom-pixeldata reads as
/// if they had three samples per pixel.
fn subsampled_frame(
    object: &FileDicomObject<InMemDicomObject>,
    frame: u32,
) -> Result<StoredFrame, RenderError> {
    if unsigned(object, tags::BITS_ALLOCATED) != Some(8) {
        return Err(RenderError::Unsupported(
            "YBR_FULL_422 with more than 8 bits per sample is not rendered".to_owned(),
        ));
    }
    let bytes = frames::extract(object, &[frame])?
        .pop()
        .ok_or(RenderError::Undecodable)?;
    Ok(stated_frame(
        object,
        bytes.into_iter().map(u32::from).collect(),
    ))
}

/// Geometry and interpretation as the instance states them.
fn stated_frame(object: &FileDicomObject<InMemDicomObject>, values: Vec<u32>) -> StoredFrame {
    StoredFrame {
        rows: unsigned(object, tags::ROWS).unwrap_or(0) as u32,
        columns: unsigned(object, tags::COLUMNS).unwrap_or(0) as u32,
        samples_per_pixel: unsigned(object, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as u16,
        bits_stored: unsigned(object, tags::BITS_STORED).unwrap_or(8) as u16,
        signed: unsigned(object, tags::PIXEL_REPRESENTATION) == Some(1),
        photometric: text(object, tags::PHOTOMETRIC_INTERPRETATION)
            .unwrap_or_else(|| "MONOCHROME2".to_owned()),
        values,
    }
}

/// JPEG-LS frames: pure_jpegls decodes single-component (grayscale) streams.
fn jpeg_ls_frame(
    object: &FileDicomObject<InMemDicomObject>,
    frame: u32,
) -> Result<StoredFrame, RenderError> {
    if unsigned(object, tags::SAMPLES_PER_PIXEL).unwrap_or(1) != 1 {
        return Err(RenderError::Unsupported(
            "JPEG-LS color (multi-component) frames are not decoded".to_owned(),
        ));
    }
    let bitstream = frames::extract(object, &[frame])?
        .pop()
        .ok_or(RenderError::Undecodable)?;
    let stated = stated_frame(object, Vec::new());
    let (samples, columns, rows) = jpegls::decode(&bitstream, stated.columns, stated.rows)
        .map_err(|_| RenderError::Undecodable)?;
    if columns != stated.columns || rows != stated.rows {
        return Err(RenderError::Undecodable);
    }
    Ok(StoredFrame {
        values: samples.into_iter().map(u32::from).collect(),
        ..stated
    })
}

/// Packed single-bit frames (segmentations, overlays stored as images): bit by bit, low first.
fn single_bit_frame(
    object: &FileDicomObject<InMemDicomObject>,
    frame: u32,
) -> Result<StoredFrame, RenderError> {
    let bytes = object
        .get(tags::PIXEL_DATA)
        .and_then(|element| element.to_bytes().ok())
        .ok_or(RenderError::Undecodable)?;
    let stated = stated_frame(object, Vec::new());
    let pixels = u64::from(stated.rows) * u64::from(stated.columns);
    let first_bit = u64::from(frame - 1) * pixels;
    let values: Option<Vec<u32>> = (first_bit..first_bit + pixels)
        .map(|bit| {
            let byte = bytes.get(usize::try_from(bit / 8).ok()?)?;
            Some(u32::from((byte >> (bit % 8)) & 1))
        })
        .collect();
    Ok(StoredFrame {
        bits_stored: 1,
        signed: false,
        values: values.ok_or(RenderError::Undecodable)?,
        ..stated
    })
}

/// Every other encoding, through dicom-pixeldata, which leaves native samples in machine order.
fn decoded_frame(
    object: &FileDicomObject<InMemDicomObject>,
    frame: u32,
) -> Result<StoredFrame, RenderError> {
    let decoded =
        object
            .decode_pixel_data_frame(frame - 1)
            .map_err(|error| match error.to_string() {
                reason if reason.contains("nsupported") => RenderError::Unsupported(reason),
                _ => RenderError::Undecodable,
            })?;
    let data = decoded
        .frame_data(0)
        .map_err(|_| RenderError::Undecodable)?;
    let values: Vec<u32> = match decoded.bits_allocated() {
        8 => data.iter().map(|byte| u32::from(*byte)).collect(),
        16 => data
            .chunks_exact(2)
            .map(|pair| u32::from(u16::from_ne_bytes([pair[0], pair[1]])))
            .collect(),
        32 => data
            .chunks_exact(4)
            .map(|quad| u32::from_ne_bytes([quad[0], quad[1], quad[2], quad[3]]))
            .collect(),
        other => {
            return Err(RenderError::Unsupported(format!(
                "Bits Allocated {other} is not rendered"
            )));
        }
    };
    let samples_per_pixel = decoded.samples_per_pixel();
    let values = if samples_per_pixel > 1
        && decoded.planar_configuration() == PlanarConfiguration::PixelFirst
    {
        interleave_planes(&values, usize::from(samples_per_pixel))
    } else {
        values
    };
    Ok(StoredFrame {
        rows: decoded.rows(),
        columns: decoded.columns(),
        samples_per_pixel,
        bits_stored: decoded.bits_stored(),
        signed: unsigned(object, tags::PIXEL_REPRESENTATION) == Some(1),
        photometric: decoded.photometric_interpretation().to_string(),
        values,
    })
}

fn interleave_planes(values: &[u32], planes: usize) -> Vec<u32> {
    let plane_length = values.len() / planes;
    (0..plane_length)
        .flat_map(|pixel| (0..planes).map(move |plane| values[plane * plane_length + pixel]))
        .collect()
}

fn to_display(
    object: &FileDicomObject<InMemDicomObject>,
    stored: StoredFrame,
    window: Option<Window>,
) -> Result<DisplayFrame, RenderError> {
    let pixel_count = stored.rows as usize * stored.columns as usize;
    let photometric = stored.photometric.trim().to_ascii_uppercase();
    let pixels = match photometric.as_str() {
        "MONOCHROME1" | "MONOCHROME2" => monochrome(object, &stored, window, pixel_count)?,
        "PALETTE COLOR" => palette(object, &stored, pixel_count)?,
        "RGB" | "YBR_FULL" | "YBR_FULL_422" | "YBR_RCT" | "YBR_ICT" => {
            color(&stored, &photometric, pixel_count)?
        }
        _ => {
            return Err(RenderError::Unsupported(format!(
                "photometric interpretation {photometric} is not rendered"
            )));
        }
    };
    let color = pixels.len() == pixel_count * 3;
    Ok(DisplayFrame {
        rows: stored.rows,
        columns: stored.columns,
        color,
        pixels,
    })
}

/// A stored sample as the signed or unsigned integer it holds in Bits Stored bits.
fn stored_value(raw: u32, bits_stored: u16, signed: bool) -> f64 {
    let bits = u32::from(bits_stored.clamp(1, 32));
    let masked = if bits == 32 {
        u64::from(raw)
    } else {
        u64::from(raw & ((1u32 << bits) - 1))
    };
    if signed && masked >> (bits - 1) & 1 == 1 {
        return masked as f64 - (1u64 << bits) as f64;
    }
    masked as f64
}

fn monochrome(
    object: &FileDicomObject<InMemDicomObject>,
    stored: &StoredFrame,
    window: Option<Window>,
    pixel_count: usize,
) -> Result<Vec<u8>, RenderError> {
    if stored.values.len() < pixel_count {
        return Err(RenderError::Undecodable);
    }
    let slope = decimal(object, tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = decimal(object, tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    let modality: Vec<f64> = stored.values[..pixel_count]
        .iter()
        .map(|raw| stored_value(*raw, stored.bits_stored, stored.signed) * slope + intercept)
        .collect();
    let window = window
        .or_else(|| stated_window(object))
        .unwrap_or_else(|| range_window(&modality));
    let invert = stored.photometric.trim() == "MONOCHROME1";
    Ok(modality
        .iter()
        .map(|value| {
            let shown = window.apply(*value);
            if invert { 255 - shown } else { shown }
        })
        .collect())
}

fn decimal(object: &FileDicomObject<InMemDicomObject>, tag: Tag) -> Option<f64> {
    let value = object.get(tag)?.to_multi_float64().ok()?.first().copied()?;
    value.is_finite().then_some(value)
}

/// The instance's first Window Center / Width, with its VOI LUT Function.
fn stated_window(object: &FileDicomObject<InMemDicomObject>) -> Option<Window> {
    let center = decimal(object, tags::WINDOW_CENTER)?;
    let width = decimal(object, tags::WINDOW_WIDTH)?;
    let function = match text(object, tags::VOILUT_FUNCTION).as_deref() {
        Some("LINEAR_EXACT") => "linear-exact",
        Some("SIGMOID") => "sigmoid",
        _ => "linear",
    };
    Window::parse(&format!("{center},{width},{function}"))
}

/// A window over the frame's whole range, for instances that state none.
fn range_window(values: &[f64]) -> Window {
    let (low, high) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(low, high), value| {
            (low.min(*value), high.max(*value))
        });
    if low > high {
        return Window {
            center: 0.0,
            width: 1.0,
            function: WindowFunction::LinearExact,
        };
    }
    Window {
        center: (low + high) / 2.0,
        width: (high - low).max(1.0),
        function: WindowFunction::LinearExact,
    }
}

fn color(
    stored: &StoredFrame,
    photometric: &str,
    pixel_count: usize,
) -> Result<Vec<u8>, RenderError> {
    if stored.samples_per_pixel != 3 {
        return Err(RenderError::Unsupported(format!(
            "{photometric} with {} samples per pixel is not rendered",
            stored.samples_per_pixel
        )));
    }
    let shift = stored.bits_stored.clamp(8, 32) - 8;
    let to_byte = |raw: u32| (raw >> shift).min(255) as u8;
    if photometric == "YBR_FULL_422" && stored.values.len() == pixel_count * 2 {
        return Ok(expand_ybr_422(&stored.values, to_byte));
    }
    if stored.values.len() < pixel_count * 3 {
        return Err(RenderError::Undecodable);
    }
    let samples = stored.values[..pixel_count * 3]
        .iter()
        .map(|raw| to_byte(*raw));
    if photometric.starts_with("YBR_FULL") {
        let bytes: Vec<u8> = samples.collect();
        return Ok(bytes
            .chunks_exact(3)
            .flat_map(|ybr| ybr_to_rgb(ybr[0], ybr[1], ybr[2]))
            .collect());
    }
    Ok(samples.collect())
}

/// YBR_FULL_422 as stored natively: Y1 Y2 Cb Cr for each pair of pixels.
fn expand_ybr_422(values: &[u32], to_byte: impl Fn(u32) -> u8) -> Vec<u8> {
    values
        .chunks_exact(4)
        .flat_map(|group| {
            let (first, second, blue, red) = (
                to_byte(group[0]),
                to_byte(group[1]),
                to_byte(group[2]),
                to_byte(group[3]),
            );
            let mut pair = ybr_to_rgb(first, blue, red).to_vec();
            pair.extend(ybr_to_rgb(second, blue, red));
            pair
        })
        .collect()
}

/// PS3.3 C.7.6.3.1.2: YBR_FULL to RGB.
fn ybr_to_rgb(luma: u8, blue: u8, red: u8) -> [u8; 3] {
    let (y, cb, cr) = (
        f64::from(luma),
        f64::from(blue) - 128.0,
        f64::from(red) - 128.0,
    );
    let channel = |value: f64| value.round().clamp(0.0, 255.0) as u8;
    [
        channel(y + 1.402 * cr),
        channel(y - 0.344_136 * cb - 0.714_136 * cr),
        channel(y + 1.772 * cb),
    ]
}

/// PALETTE COLOR through the instance's red, green and blue lookup tables.
fn palette(
    object: &FileDicomObject<InMemDicomObject>,
    stored: &StoredFrame,
    pixel_count: usize,
) -> Result<Vec<u8>, RenderError> {
    let table = |descriptor: Tag, data: Tag| -> Option<(i64, Vec<u8>)> {
        let described = object.get(descriptor)?.to_multi_int::<i64>().ok()?;
        let (entries, first_mapped, bits) =
            (*described.first()?, *described.get(1)?, *described.get(2)?);
        let entries = if entries == 0 { 65_536 } else { entries };
        let words: Vec<u16> = object.get(data)?.to_multi_int::<u16>().ok()?;
        let shift = if bits > 8 { 8 } else { 0 };
        let table: Vec<u8> = words
            .iter()
            .take(usize::try_from(entries).ok()?)
            .map(|word| (word >> shift) as u8)
            .collect();
        (!table.is_empty()).then_some((first_mapped, table))
    };
    let unsupported = || RenderError::Unsupported("the palette color tables are unreadable".into());
    let red = table(
        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )
    .ok_or_else(unsupported)?;
    let green = table(
        tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )
    .ok_or_else(unsupported)?;
    let blue = table(
        tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )
    .ok_or_else(unsupported)?;
    if stored.values.len() < pixel_count {
        return Err(RenderError::Undecodable);
    }
    let look_up = |(first_mapped, table): &(i64, Vec<u8>), index: i64| {
        let position = (index - first_mapped).clamp(0, table.len() as i64 - 1);
        table[position as usize]
    };
    Ok(stored.values[..pixel_count]
        .iter()
        .flat_map(|raw| {
            let index = stored_value(*raw, stored.bits_stored, stored.signed) as i64;
            [
                look_up(&red, index),
                look_up(&green, index),
                look_up(&blue, index),
            ]
        })
        .collect())
}

fn encode(display: &DisplayFrame, request: &RenderRequest) -> Result<Vec<u8>, RenderError> {
    let mut out = Vec::new();
    match request.format {
        ImageFormat::Png => {
            let mut encoder = png::Encoder::new(&mut out, display.columns, display.rows);
            encoder.set_color(if display.color {
                png::ColorType::Rgb
            } else {
                png::ColorType::Grayscale
            });
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder
                .write_header()
                .map_err(|_| RenderError::Undecodable)?;
            writer
                .write_image_data(&display.pixels)
                .map_err(|_| RenderError::Undecodable)?;
            writer.finish().map_err(|_| RenderError::Undecodable)?;
        }
        ImageFormat::Jpeg => {
            let (Ok(width), Ok(height)) =
                (u16::try_from(display.columns), u16::try_from(display.rows))
            else {
                return Err(RenderError::Unsupported(
                    "frames wider or taller than 65535 pixels are rendered as PNG only".into(),
                ));
            };
            let encoder = jpeg_encoder::Encoder::new(&mut out, request.quality.clamp(1, 100));
            let color = if display.color {
                jpeg_encoder::ColorType::Rgb
            } else {
                jpeg_encoder::ColorType::Luma
            };
            encoder
                .encode(&display.pixels, width, height, color)
                .map_err(|_| RenderError::Undecodable)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_from_the_query_parameter() {
        let window = Window::parse("40,400").unwrap();
        assert_eq!((window.center, window.width), (40.0, 400.0));
        assert_eq!(window.function, WindowFunction::Linear);
        assert_eq!(
            Window::parse("-600,1500,SIGMOID").unwrap().function,
            WindowFunction::Sigmoid
        );
        assert!(Window::parse("40").is_none());
        assert!(Window::parse("40,0").is_none());
        assert!(Window::parse("40,400,cubic").is_none());
        assert!(Window::parse("40,400,linear,extra").is_none());
        assert!(Window::parse("NaN,400").is_none());
    }

    #[test]
    fn linear_windows_clip_below_and_above() {
        let window = Window::parse("40,400").unwrap();
        assert_eq!(window.apply(-1000.0), 0);
        assert_eq!(window.apply(3000.0), 255);
        let middle = window.apply(40.0);
        assert!((126..=129).contains(&middle), "{middle}");
    }

    #[test]
    fn signed_samples_are_sign_extended_from_bits_stored() {
        assert_eq!(stored_value(0x0FFF, 12, true), -1.0);
        assert_eq!(stored_value(0x07FF, 12, true), 2047.0);
        assert_eq!(stored_value(0xF0FF, 12, false), 255.0);
        assert_eq!(stored_value(u32::MAX, 32, false), u32::MAX as f64);
    }

    #[test]
    fn viewports_shrink_keeping_the_aspect_ratio_and_never_grow() {
        let frame = DisplayFrame {
            rows: 4,
            columns: 8,
            color: false,
            pixels: (0..32)
                .map(|value| if value % 8 < 4 { 0 } else { 200 })
                .collect(),
        };
        let fitted = fit_into(frame, (4, 4));
        assert_eq!((fitted.columns, fitted.rows), (4, 2));
        assert_eq!(fitted.pixels, vec![0, 0, 200, 200, 0, 0, 200, 200]);
        let small = DisplayFrame {
            rows: 2,
            columns: 2,
            color: true,
            pixels: vec![1; 12],
        };
        assert_eq!(fit_into(small, (100, 100)).columns, 2);
        assert_eq!(parse_viewport("128,128"), Some((128, 128)));
        assert_eq!(parse_viewport("0,128"), None);
        assert_eq!(parse_viewport("128,128,0,0,64,64"), None);
    }

    #[test]
    fn ybr_full_gray_stays_gray() {
        assert_eq!(ybr_to_rgb(100, 128, 128), [100, 100, 100]);
    }

    #[test]
    fn planes_are_interleaved_pixel_by_pixel() {
        assert_eq!(
            interleave_planes(&[1, 2, 10, 20, 100, 200], 3),
            vec![1, 10, 100, 2, 20, 200]
        );
    }
}
