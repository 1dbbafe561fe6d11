//! An RGB raster to draw the exported pictures on: rectangles, lines, heat cells and
//! text in the public-domain 8x8 bitmap font (`font8x8`) scaled up, encoded as PNG or
//! as frames of a GIF. Pictures here are grids and bars, which need nothing more.

use std::io::Write;

use font8x8::UnicodeFonts;

use super::request::ExportError;

/// An encoder's error as the export's.
fn encode(e: impl std::fmt::Display) -> ExportError {
    ExportError::Encode(e.to_string())
}

pub type Rgb = (u8, u8, u8);

pub const WHITE: Rgb = (255, 255, 255);
pub const BLACK: Rgb = (0, 0, 0);
pub const GREY: Rgb = (120, 120, 120);
pub const LIGHT: Rgb = (225, 225, 225);
pub const BLUE: Rgb = (40, 110, 200);
pub const ORANGE: Rgb = (230, 120, 20);
pub const GREEN: Rgb = (30, 150, 60);
pub const RED: Rgb = (200, 40, 40);

/// Side of a glyph of the bitmap font at scale 1.
pub const GLYPH: usize = 8;

#[derive(Debug, Clone, PartialEq)]
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB bytes.
    pub pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: Rgb) -> Self {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend([background.0, background.1, background.2]);
        }
        Self {
            width,
            height,
            pixels,
        }
    }

    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        (self.pixels[i], self.pixels[i + 1], self.pixels[i + 2])
    }

    /// Sets one pixel; outside the canvas, nothing.
    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&[c.0, c.1, c.2]);
    }

    /// A filled rectangle, clipped to the canvas.
    pub fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y.max(0)..(y + h).min(self.height as i64) {
            for xx in x.max(0)..(x + w).min(self.width as i64) {
                self.set(xx, yy, c);
            }
        }
    }

    /// A one-pixel rectangle outline.
    pub fn frame(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        self.fill(x, y, w, 1, c);
        self.fill(x, y + h - 1, w, 1, c);
        self.fill(x, y, 1, h, c);
        self.fill(x + w - 1, y, 1, h, c);
    }

    /// A line `thickness` pixels wide (square pen), by Bresenham.
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thickness: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let half = thickness / 2;
        loop {
            self.fill(x - half, y - half, thickness, thickness, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y), each glyph `scale` x 8 pixels; characters
    /// the font lacks show as '?'. Returns the width drawn.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: usize, c: Rgb) -> i64 {
        let s = scale as i64;
        for (i, ch) in text.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS
                .get(ch)
                .or_else(|| font8x8::LATIN_FONTS.get(ch))
                .or_else(|| font8x8::BASIC_FONTS.get('?'))
                .unwrap_or([0; 8]);
            let gx = x + i as i64 * GLYPH as i64 * s;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        self.fill(gx + col * s, y + row as i64 * s, s, s, c);
                    }
                }
            }
        }
        text_width(text, scale)
    }

    /// Text centred on x.
    pub fn text_centred(&mut self, x: i64, y: i64, text: &str, scale: usize, c: Rgb) {
        self.text(x - text_width(text, scale) / 2, y, text, scale, c);
    }

    /// The canvas as a PNG file's bytes.
    pub fn png(&self) -> Result<Vec<u8>, ExportError> {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().map_err(encode)?;
            writer.write_image_data(&self.pixels).map_err(encode)?;
        }
        Ok(out)
    }
}

/// Pixels of `text` across at `scale`.
pub fn text_width(text: &str, scale: usize) -> i64 {
    (text.chars().count() * GLYPH * scale) as i64
}

/// Frames of equal size as an animated GIF that loops, each shown `delay_cs`
/// hundredths of a second (the last one `last_delay_cs`).
pub fn gif(frames: &[Canvas], delay_cs: u16, last_delay_cs: u16) -> Result<Vec<u8>, ExportError> {
    let first = frames
        .first()
        .ok_or_else(|| ExportError::Encode("no frames to animate".into()))?;
    let (w, h) = (first.width as u16, first.height as u16);
    let mut out = Vec::new();
    {
        let mut encoder = gif::Encoder::new(&mut out, w, h, &[]).map_err(encode)?;
        encoder.set_repeat(gif::Repeat::Infinite).map_err(encode)?;
        for (i, canvas) in frames.iter().enumerate() {
            // Speed 10 of 30: the palette quantiser's quality against time, fine for
            // flat-coloured charts.
            let mut frame = gif::Frame::from_rgb_speed(w, h, &canvas.pixels, 10);
            frame.delay = if i + 1 == frames.len() {
                last_delay_cs
            } else {
                delay_cs
            };
            encoder.write_frame(&frame).map_err(encode)?;
        }
    }
    out.flush().map_err(encode)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_text_land_where_drawn_and_encode_as_png() {
        let mut c = Canvas::new(40, 20, WHITE);
        c.fill(2, 3, 4, 5, RED);
        assert_eq!(c.get(2, 3), RED);
        assert_eq!(c.get(5, 7), RED);
        assert_eq!(c.get(6, 7), WHITE);
        c.fill(-5, -5, 3, 3, BLUE); // clipped away entirely
        assert_eq!(c.get(0, 0), WHITE);
        c.line((10, 10), (20, 10), 1, BLACK);
        assert_eq!(c.get(15, 10), BLACK);
        // 'I' in the 8x8 font has ink in its middle column.
        let w = c.text(24, 0, "I", 2, BLACK);
        assert_eq!(w, 16);
        assert!((24..40).any(|x| c.get(x, 8) == BLACK));
        let png = c.png().unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (40, 20));
        assert_eq!(&buf[..info.buffer_size()], &c.pixels[..]);
    }

    #[test]
    fn frames_become_a_looping_gif_with_their_delays() {
        let frames: Vec<Canvas> = [RED, GREEN, BLUE]
            .iter()
            .map(|&c| Canvas::new(8, 6, c))
            .collect();
        let bytes = gif(&frames, 20, 100).unwrap();
        let mut options = gif::DecodeOptions::new();
        options.set_color_output(gif::ColorOutput::RGBA);
        let mut decoder = options.read_info(std::io::Cursor::new(bytes)).unwrap();
        let mut delays = Vec::new();
        while let Some(frame) = decoder.read_next_frame().unwrap() {
            assert_eq!((frame.width, frame.height), (8, 6));
            delays.push(frame.delay);
            let first = &frame.buffer[..3];
            delays.push(u16::from(first[0] > 150) + 2 * u16::from(first[2] > 150));
        }
        assert_eq!(delays, vec![20, 1, 20, 0, 100, 2]);
    }
}
