//! Pixels and small maps drawn straight into the buffer with half blocks: each cell
//! shows two pixels stacked ('▀' with the upper pixel as foreground and the lower as
//! background). Without colour, a shading character of the brightness stands in.

use crate::palette::{image_pixel, Rgb};
use ratatui::buffer::{Buffer, Cell};
use ratatui::style::{Color, Style};

use crate::config::IMAGE_SIZE;
use crate::ui::theme::{ColorMode, Theme, HEAT_RAMP};

/// An RGB pixel as a colour the terminal can show.
pub fn pixel_color(mode: ColorMode, r: u8, g: u8, b: u8) -> Option<Color> {
    match mode {
        ColorMode::TrueColor => Some(Color::Rgb(r, g, b)),
        ColorMode::Ansi256 => {
            let q = |v: u8| (u16::from(v) * 5 + 127) / 255;
            Some(Color::Indexed((16 + 36 * q(r) + 6 * q(g) + q(b)) as u8))
        }
        ColorMode::NoColor => None,
    }
}

/// Perceived brightness of a pixel in [0, 1] (Rec. 601 weights).
pub fn luminance(p: Rgb) -> f64 {
    (0.299 * f64::from(p.0) + 0.587 * f64::from(p.1) + 0.114 * f64::from(p.2)) / 255.0
}

/// Draws a `width` x `height` pixel picture (`pixel(x, y)`) at (x0, y0): `width`
/// cells wide and `height / 2` rows tall. Cells outside the buffer are skipped.
pub fn draw_rgb(
    t: &Theme,
    width: usize,
    height: usize,
    pixel: impl Fn(usize, usize) -> Rgb,
    (x0, y0): (u16, u16),
    buf: &mut Buffer,
) {
    let area = buf.area;
    for row in 0..height.div_ceil(2) {
        for x in 0..width {
            let (cx, cy) = (x0 + x as u16, y0 + row as u16);
            if cx >= area.right() || cy >= area.bottom() {
                continue;
            }
            let top = pixel(x, 2 * row);
            let bottom = if 2 * row + 1 < height {
                pixel(x, 2 * row + 1)
            } else {
                (0, 0, 0)
            };
            set_half_block(
                &mut buf[(cx, cy)],
                pixel_color(t.mode, top.0, top.1, top.2),
                pixel_color(t.mode, bottom.0, bottom.1, bottom.2),
                || HEAT_RAMP[((luminance(top) + luminance(bottom)) / 2.0 * 4.0).round() as usize],
            );
        }
    }
}

/// A raw image at full size: 32 cells x 16 rows.
pub fn draw_image(t: &Theme, pixels: &[u8], x0: u16, y0: u16, buf: &mut Buffer) {
    draw_rgb(
        t,
        IMAGE_SIZE,
        IMAGE_SIZE,
        |x, y| image_pixel(pixels, x, y),
        (x0, y0),
        buf,
    );
}

/// A raw image at half size (each pixel the mean of 2 x 2): 16 cells x 8 rows.
pub fn draw_image_half(t: &Theme, pixels: &[u8], x0: u16, y0: u16, buf: &mut Buffer) {
    let mean = |x: usize, y: usize| {
        let ps = [(0, 0), (1, 0), (0, 1), (1, 1)]
            .map(|(dx, dy)| image_pixel(pixels, 2 * x + dx, 2 * y + dy));
        let avg = |f: fn(&Rgb) -> u8| (ps.iter().map(|p| u16::from(f(p))).sum::<u16>() / 4) as u8;
        (avg(|p| p.0), avg(|p| p.1), avg(|p| p.2))
    };
    draw_rgb(t, IMAGE_SIZE / 2, IMAGE_SIZE / 2, mean, (x0, y0), buf);
}

/// Fills each of `values` (a `grid` x `grid` map, row-major) as a block of
/// `cell_w` x `cell_h` cells with the character and style `paint` gives it; cells
/// outside the buffer are skipped.
fn fill_cells(
    values: &[f64],
    grid: usize,
    (cell_w, cell_h): (u16, u16),
    (x0, y0): (u16, u16),
    buf: &mut Buffer,
    paint: impl Fn(f64) -> (char, Style),
) {
    let area = buf.area;
    for (i, &v) in values.iter().enumerate().take(grid * grid) {
        let (ch, style) = paint(v);
        for dy in 0..cell_h {
            for dx in 0..cell_w {
                let (x, y) = (
                    x0 + (i % grid) as u16 * cell_w + dx,
                    y0 + (i / grid) as u16 * cell_h + dy,
                );
                if x < area.right() && y < area.bottom() {
                    buf[(x, y)].set_char(ch).set_style(style);
                }
            }
        }
    }
}

/// A `grid` x `grid` map of levels in [0, 1], each value `cell_w` cells wide and
/// `cell_h` rows tall, in the heat colours (shading without colour).
pub fn draw_level_map(
    t: &Theme,
    levels: &[f64],
    grid: usize,
    cell: (u16, u16),
    origin: (u16, u16),
    buf: &mut Buffer,
) {
    fill_cells(levels, grid, cell, origin, buf, |level| {
        let (ch, style) = t.heat(level);
        let ch = if t.mode == ColorMode::NoColor {
            ch
        } else {
            '█'
        };
        (ch, style)
    });
}

/// A `grid` x `grid` map of values in [-1, 1] (cosine similarities) on a blue-dark-red
/// scale, each value `cell_w` x `cell_h` cells; without colour, shading of the value
/// mapped from [-1, 1] to [0, 1].
pub fn draw_signed_map(
    t: &Theme,
    values: &[f64],
    grid: usize,
    cell: (u16, u16),
    origin: (u16, u16),
    buf: &mut Buffer,
) {
    fill_cells(values, grid, cell, origin, buf, |v| {
        match t.signed_color(v) {
            Some(c) => ('█', Style::default().fg(c)),
            None => (t.heat((v + 1.0) / 2.0).0, Style::default()),
        }
    });
}

/// One cell showing two stacked values: '▀' with the upper colour as foreground and
/// the lower as background; where either has no colour, the character `shade` gives.
pub fn set_half_block(
    cell: &mut Cell,
    top: Option<Color>,
    bottom: Option<Color>,
    shade: impl FnOnce() -> char,
) {
    match (top, bottom) {
        (Some(fg), Some(bg)) => {
            cell.set_char('▀').set_style(Style::default().fg(fg).bg(bg));
        }
        _ => {
            cell.set_char(shade()).set_style(Style::default());
        }
    }
}

/// A `rows` x `cols` matrix (row-major) at one cell per column and two rows per text
/// row: text row r shows rows 2r (upper half) and 2r + 1 (lower; the background past
/// the last row).
/// `colour` gives a value's colour; `shade` the character for a pair where there is
/// none. Cells outside the buffer are skipped.
pub fn draw_stacked(
    values: &[f64],
    (rows, cols): (usize, usize),
    (x0, y0): (u16, u16),
    buf: &mut Buffer,
    colour: impl Fn(f64) -> Option<Color>,
    shade: impl Fn(f64, f64) -> char,
) {
    let area = buf.area;
    for text_row in 0..rows.div_ceil(2) {
        for col in 0..cols {
            let (x, y) = (x0 + col as u16, y0 + text_row as u16);
            if x >= area.right() || y >= area.bottom() {
                continue;
            }
            let top = values[2 * text_row * cols + col];
            if 2 * text_row + 1 < rows {
                let bottom = values[(2 * text_row + 1) * cols + col];
                set_half_block(&mut buf[(x, y)], colour(top), colour(bottom), || {
                    shade(top, bottom)
                });
            } else {
                // An odd last row: its upper half only, over the terminal's background.
                set_half_block(&mut buf[(x, y)], colour(top), Some(Color::Reset), || {
                    shade(top, 0.0)
                });
            }
        }
    }
}

/// A `grid` x `grid` map of values in [-1, 1] at one cell per value across and two
/// values stacked per cell: `grid` cells wide, `grid / 2` rows tall.
pub fn draw_signed_half(
    t: &Theme,
    values: &[f64],
    grid: usize,
    origin: (u16, u16),
    buf: &mut Buffer,
) {
    draw_stacked(
        values,
        (grid, grid),
        origin,
        buf,
        |v| t.signed_color(v),
        |top, bottom| t.heat(((top + bottom) / 2.0 + 1.0) / 2.0).0,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::layout::Rect;

    #[test]
    fn pixels_map_to_the_terminal_palette() {
        assert_eq!(
            pixel_color(ColorMode::TrueColor, 1, 2, 3),
            Some(Color::Rgb(1, 2, 3))
        );
        assert_eq!(
            pixel_color(ColorMode::Ansi256, 0, 0, 0),
            Some(Color::Indexed(16))
        );
        assert_eq!(
            pixel_color(ColorMode::Ansi256, 255, 255, 255),
            Some(Color::Indexed(231))
        );
        assert_eq!(
            pixel_color(ColorMode::Ansi256, 255, 0, 0),
            Some(Color::Indexed(196))
        );
        assert_eq!(pixel_color(ColorMode::NoColor, 9, 9, 9), None);
    }

    #[test]
    fn images_are_drawn_two_pixel_rows_per_cell_from_the_planes() {
        // Pixel (x, y) has red = x, green = y, blue = 200.
        let mut pixels = vec![0u8; 3 * 32 * 32];
        for y in 0..32 {
            for x in 0..32 {
                pixels[y * 32 + x] = x as u8;
                pixels[1024 + y * 32 + x] = y as u8;
                pixels[2048 + y * 32 + x] = 200;
            }
        }
        assert_eq!(image_pixel(&pixels, 5, 7), (5, 7, 200));
        let t = Theme::new(ColorMode::TrueColor, crate::config::Markers::Braille);
        let mut buf = Buffer::empty(Rect::new(0, 0, 40, 20));
        draw_image(&t, &pixels, 1, 1, &mut buf);
        let cell = &buf[(1 + 5, 1 + 3)];
        assert_eq!(cell.symbol(), "▀");
        assert_eq!(cell.fg, Color::Rgb(5, 6, 200));
        assert_eq!(cell.bg, Color::Rgb(5, 7, 200));
        let mut half = Buffer::empty(Rect::new(0, 0, 20, 10));
        draw_image_half(&t, &pixels, 0, 0, &mut half);
        // Cell (2, 1): upper half-pixel covers x 4..6, y 4..6 -> mean (4, 4) after flooring.
        assert_eq!(half[(2, 1)].fg, Color::Rgb(4, 4, 200));
        assert_eq!(half[(2, 1)].bg, Color::Rgb(4, 6, 200));
        // No colour: brightness as shading.
        let plain = Theme::new(ColorMode::NoColor, crate::config::Markers::Braille);
        let white = vec![255u8; 3 * 32 * 32];
        let mut b = Buffer::empty(Rect::new(0, 0, 32, 16));
        draw_image(&plain, &white, 0, 0, &mut b);
        assert_eq!(b[(0, 0)].symbol(), "█");
    }
}
