//! Making the thumbnail: decode (the format is read from the content, not the name), turn
//! the image upright per its EXIF orientation, shrink it to fit the box, encode it in the
//! input's format.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};

use crate::failure::Failure;

/// The largest box side accepted (JPEG's own limit).
pub const MAX_SIDE: u32 = 65_535;

/// What to make.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_width: u32,
    pub max_height: u32,
    /// JPEG quality, 1-100.
    pub jpeg_quality: u8,
}

/// A thumbnail and what it was made from.
#[derive(Debug)]
pub struct Thumbnail {
    pub format: ImageFormat,
    /// The input's size, upright.
    pub source: (u32, u32),
    /// The thumbnail's size.
    pub size: (u32, u32),
    /// The encoded thumbnail.
    pub bytes: Vec<u8>,
}

impl Thumbnail {
    pub fn content_type(&self) -> &'static str {
        self.format.to_mime_type()
    }
}

/// The largest size with `width`x`height`'s aspect ratio that fits `max_width`x`max_height`;
/// never larger than the image itself, never zero.
pub fn fit(width: u32, height: u32, max_width: u32, max_height: u32) -> (u32, u32) {
    if width <= max_width && height <= max_height {
        return (width, height);
    }
    let (w, h) = (u64::from(width.max(1)), u64::from(height.max(1)));
    let (max_w, max_h) = (u64::from(max_width.max(1)), u64::from(max_height.max(1)));
    // Compare the two scale factors, max_w / w and max_h / h, without division.
    let (new_w, new_h) = if max_w * h <= max_h * w {
        (max_w, (h * max_w + w / 2) / w)
    } else {
        ((w * max_h + h / 2) / h, max_h)
    };
    // Both are at most the box's sides, which are u32.
    let clamp = |side: u64, max: u64| u32::try_from(side.clamp(1, max)).unwrap_or(u32::MAX);
    (clamp(new_w, max_w), clamp(new_h, max_h))
}

/// Makes the thumbnail of `bytes`; `name` (the object's key) is for messages only.
pub fn make(bytes: &[u8], name: &str, settings: Settings) -> Result<Thumbnail, Failure> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Failure::image(format!("{name}: cannot read the image: {e}")))?;
    let format = match reader.format() {
        Some(format @ (ImageFormat::Jpeg | ImageFormat::Png)) => format,
        Some(other) => {
            return Err(Failure::image(format!(
                "{name} is a {} image; this worker reads JPEG and PNG",
                other
                    .extensions_str()
                    .first()
                    .unwrap_or(&"?")
                    .to_uppercase()
            )));
        }
        None => {
            return Err(Failure::image(format!(
                "{name} is not an image (its content is neither JPEG nor PNG)"
            )));
        }
    };
    let damaged = |e: ImageError| match e {
        ImageError::Limits(_) => Failure::image(format!(
            "{name} is too large to decode within this worker's memory limit"
        )),
        other => Failure::image(format!("{name} is not a valid {format:?} image: {other}")),
    };
    let mut decoder = reader.into_decoder().map_err(damaged)?;
    // The decoded pixels must fit the default allocation limit (512 MiB), checked before any
    // is allocated: a small file can declare a huge image.
    Limits::default()
        .reserve(decoder.total_bytes())
        .map_err(damaged)?;
    // A photo's sensor orientation is in its EXIF data; the thumbnail drops the metadata, so
    // it is applied to the pixels. Unreadable EXIF is not a reason to fail.
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder).map_err(damaged)?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    let source = (image.width(), image.height());
    if source.0 == 0 || source.1 == 0 {
        return Err(Failure::image(format!("{name} has no pixels")));
    }
    let size = fit(source.0, source.1, settings.max_width, settings.max_height);
    let thumbnail = if size == source {
        image
    } else {
        image.thumbnail_exact(size.0, size.1)
    };
    let bytes = encode(&thumbnail, format, settings.jpeg_quality)
        .map_err(|e| Failure::image(format!("{name}: cannot encode the thumbnail: {e}")))?;
    Ok(Thumbnail {
        format,
        source,
        size,
        bytes,
    })
}

fn encode(image: &DynamicImage, format: ImageFormat, quality: u8) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    match format {
        ImageFormat::Jpeg => {
            // JPEG holds 8-bit grey or RGB; a JPEG decodes to one of them (CMYK becomes RGB).
            let image = match image {
                DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_) => image,
                other if !other.color().has_color() => &DynamicImage::from(other.to_luma8()),
                other => &DynamicImage::from(other.to_rgb8()),
            };
            image.write_with_encoder(JpegEncoder::new_with_quality(&mut out, quality))?;
        }
        _ => {
            image.write_with_encoder(PngEncoder::new_with_quality(
                &mut out,
                CompressionType::Default,
                FilterType::Adaptive,
            ))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    const BOX: Settings = Settings {
        max_width: 64,
        max_height: 64,
        jpeg_quality: 85,
    };

    #[test]
    fn fit_keeps_the_aspect_ratio_inside_the_box() {
        assert_eq!(fit(4000, 3000, 256, 256), (256, 192));
        assert_eq!(fit(3000, 4000, 256, 256), (192, 256));
        assert_eq!(fit(1000, 1000, 200, 100), (100, 100));
        assert_eq!(fit(1000, 10, 100, 100), (100, 1));
        assert_eq!(fit(100_000, 1, 10, 10), (10, 1));
        assert_eq!(fit(3, 2, 2, 2), (2, 1));
        assert_eq!(
            fit(u32::MAX, u32::MAX, MAX_SIDE, MAX_SIDE),
            (MAX_SIDE, MAX_SIDE)
        );
    }

    #[test]
    fn fit_never_upscales() {
        assert_eq!(fit(50, 40, 256, 256), (50, 40));
        assert_eq!(fit(256, 256, 256, 256), (256, 256));
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = RgbaImage::from_pixel(width, height, Rgba([10, 200, 30, 128]));
        let mut out = Vec::new();
        DynamicImage::from(image)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let image = RgbImage::from_pixel(width, height, Rgb([200, 100, 50]));
        let mut out = Vec::new();
        DynamicImage::from(image)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
            .unwrap();
        out
    }

    #[test]
    fn a_png_stays_a_png_with_its_alpha() {
        let thumbnail = make(&png(200, 100), "a.png", BOX).unwrap();
        assert_eq!(thumbnail.format, ImageFormat::Png);
        assert_eq!(thumbnail.content_type(), "image/png");
        assert_eq!((thumbnail.source, thumbnail.size), ((200, 100), (64, 32)));
        let decoded = image::load_from_memory(&thumbnail.bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (64, 32));
        assert!(decoded.color().has_alpha());
    }

    #[test]
    fn a_jpeg_stays_a_jpeg_whatever_its_name() {
        let thumbnail = make(&jpeg(100, 300), "named.png", BOX).unwrap();
        assert_eq!(thumbnail.format, ImageFormat::Jpeg);
        assert_eq!(thumbnail.size, (21, 64));
        assert_eq!(
            image::guess_format(&thumbnail.bytes).unwrap(),
            ImageFormat::Jpeg
        );
    }

    #[test]
    fn what_is_not_a_jpeg_or_png_is_refused_by_name() {
        let failure = make(b"hello, world\n", "notes.jpg", BOX).unwrap_err();
        assert_eq!(failure.kind, crate::failure::Kind::Image);
        assert_eq!(
            failure.message,
            "notes.jpg is not an image (its content is neither JPEG nor PNG)"
        );
        let failure = make(b"GIF89a\x01\x00\x01\x00", "a.gif", BOX).unwrap_err();
        assert_eq!(
            failure.message,
            "a.gif is a GIF image; this worker reads JPEG and PNG"
        );
        let mut truncated = png(50, 50);
        truncated.truncate(truncated.len() / 2);
        let failure = make(&truncated, "half.png", BOX).unwrap_err();
        assert!(
            failure
                .message
                .starts_with("half.png is not a valid Png image"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_huge_declared_size_is_refused_before_decoding() {
        // A valid PNG header declaring 60000x60000 RGBA pixels (14 GB), and no pixel data.
        let mut header = png(1, 1);
        header[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        header[20..24].copy_from_slice(&60_000u32.to_be_bytes());
        let crc = crc32(&header[12..29]);
        header[29..33].copy_from_slice(&crc.to_be_bytes());
        let failure = make(&header, "bomb.png", BOX).unwrap_err();
        assert_eq!(failure.kind, crate::failure::Kind::Image);
        assert_eq!(
            failure.message,
            "bomb.png is too large to decode within this worker's memory limit"
        );
    }

    /// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320).
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = u32::MAX;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
