//! The product on AMX tiles (Intel Sapphire Rapids and later): TDPBF16PS multiplies
//! bf16 tiles into tiles of f32 sums, in inline assembly, over the same packed factors
//! as the VDPBF16PS path (`dot.rs`); `cpu.rs` asks Linux for the tile state before
//! any of it runs.

use super::layout::{padded, BLOCK};
use super::start::Start;
use std::arch::asm;
use std::cell::Cell;

thread_local! {
    /// Whether this thread's tiles hold [`FULL_TILES`]. LDTILECFG and TILERELEASE cost
    /// more than a small product's few tile instructions (the attention runs thousands
    /// of 64 x 64 products a step), so a thread configures its tiles once and keeps
    /// them: Linux saves them with the thread's other registers.
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
}

/// Configures this thread's tiles as [`FULL_TILES`] unless they are already.
#[inline]
unsafe fn configure() {
    if !CONFIGURED.get() {
        asm!("ldtilecfg [{}]", in(reg) FULL_TILES.0.as_ptr(), options(nostack, preserves_flags));
        CONFIGURED.set(true);
    }
}

/// Palette 1 with all eight tiles at their largest: 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const FULL_TILES: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

macro_rules! tile {
    (load $t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}]"), p = in(reg) $ptr,
             s = in(reg) $stride, options(nostack, preserves_flags))
    };
    (store $t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}], tmm", $t), p = in(reg) $ptr,
             s = in(reg) $stride, options(nostack, preserves_flags))
    };
    (zero $t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack, preserves_flags, nomem))
    };
    (dot $c:literal, $a:literal, $b:literal) => {
        asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
             options(nostack, preserves_flags, nomem))
    };
}

/// What a block's sums start from: zero, or values loaded from rows `stride` bytes
/// apart (the output itself, or one row read 32 times with stride 0: a bias).
#[derive(Clone, Copy)]
enum Init {
    Zero,
    Load(*const f32, usize),
}

/// One 32 x 32 block of the output: C (f32, rows `c_stride` bytes apart) = `init` + A ·
/// B over `kp` (a multiple of 32), A 32 rows of pairs `a_stride` bytes apart, B kp / 2
/// rows of 32 pairs `b_stride` bytes apart. Tiles 0-3 hold C, 4-5 A, 6-7 B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    c: *mut f32,
    c_stride: usize,
    init: Init,
    a: *const u32,
    a_stride: usize,
    b: *const u32,
    b_stride: usize,
    kp: usize,
) {
    let (c1, c2) = (c.byte_add(64), c.byte_add(16 * c_stride));
    let c3 = c2.byte_add(64);
    match init {
        Init::Load(s, stride) => {
            let (s1, s2) = (s.byte_add(64), s.byte_add(16 * stride));
            tile!(load "0", s, stride);
            tile!(load "1", s1, stride);
            tile!(load "2", s2, stride);
            tile!(load "3", s2.byte_add(64), stride);
        }
        Init::Zero => {
            tile!(zero "0");
            tile!(zero "1");
            tile!(zero "2");
            tile!(zero "3");
        }
    }
    let a2 = a.byte_add(16 * a_stride);
    for kb in 0..kp / BLOCK {
        let (ak, ak2) = (a.add(kb * 16), a2.add(kb * 16));
        let bk = b.byte_add(kb * 16 * b_stride);
        tile!(load "4", ak, a_stride);
        tile!(load "6", bk, b_stride);
        tile!(load "5", ak2, a_stride);
        tile!(load "7", bk.add(16), b_stride);
        tile!(dot "0", "4", "6");
        tile!(dot "1", "4", "7");
        tile!(dot "2", "5", "6");
        tile!(dot "3", "5", "7");
    }
    tile!(store "0", c, c_stride);
    tile!(store "1", c1, c_stride);
    tile!(store "2", c2, c_stride);
    tile!(store "3", c3, c_stride);
}

/// `iterations` rounds of four independent TDPBF16PS (tiles 0-3 += 4-5 x 6-7) on
/// tiles loaded once: the instruction's own rate, for `vitscope bench`.
pub unsafe fn peak_loop(iterations: u64) -> f32 {
    #[repr(C, align(64))]
    struct Block([u32; 256]);
    let ones = Block([0x3f80_3f80; 256]);
    let mut out = Block([0; 256]);
    configure();
    tile!(zero "0");
    tile!(zero "1");
    tile!(zero "2");
    tile!(zero "3");
    tile!(load "4", ones.0.as_ptr(), 64usize);
    tile!(load "5", ones.0.as_ptr(), 64usize);
    tile!(load "6", ones.0.as_ptr(), 64usize);
    tile!(load "7", ones.0.as_ptr(), 64usize);
    for _ in 0..iterations {
        tile!(dot "0", "4", "6");
        tile!(dot "1", "4", "7");
        tile!(dot "2", "5", "6");
        tile!(dot "3", "5", "7");
    }
    tile!(store "0", out.0.as_mut_ptr(), 64usize);
    f32::from_bits(out.0[0])
}

/// dst = `start` + A · B from the packed factors. The tiles write straight into `dst`
/// (and start from its values, or from a row loaded with stride 0) when its rows are
/// contiguous and the shape is whole blocks; else into `out` from zero, then added: the
/// two round differently, so `whole_rows`, the rows of the product this is a part of,
/// decides for every part alike, and a product split over a lane's threads changes no
/// bit.
#[allow(clippy::too_many_arguments)]
pub unsafe fn multiply(
    (m, n, k): (usize, usize, usize),
    whole_rows: usize,
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    a: &[u32],
    b: &[u32],
    out: &mut Vec<f32>,
    start: Start,
) {
    let (mp, np, kp) = (padded(m), padded(n), padded(k));
    debug_assert!(a.len() >= mp * kp / 2 && b.len() >= kp / 2 * np);
    let direct = dst_cs == 1
        && whole_rows.is_multiple_of(BLOCK)
        && m.is_multiple_of(BLOCK)
        && n.is_multiple_of(BLOCK);
    let (c, c_rs) = if direct {
        (dst, dst_rs)
    } else {
        out.clear();
        out.resize(mp * np, 0.0);
        (out.as_mut_ptr(), np)
    };
    configure();
    for i in (0..mp).step_by(BLOCK) {
        for j in (0..np).step_by(BLOCK) {
            let c = c.add(i * c_rs + j);
            let init = match (direct, start) {
                (false, _) | (true, Start::Zero) => Init::Zero,
                (true, Start::Dst) => Init::Load(c, c_rs * 4),
                (true, Start::Row(row)) => Init::Load(row.add(j), 0),
            };
            let (a, b) = (a.as_ptr().add(i * kp / 2), b.as_ptr().add(j));
            block(c, c_rs * 4, init, a, kp * 2, b, np * 4, kp);
        }
    }
    if !direct {
        for i in 0..m {
            for j in 0..n {
                let (v, d) = (out[i * np + j], dst.add(i * dst_rs + j * dst_cs));
                *d = match start {
                    Start::Zero => v,
                    Start::Dst => *d + v,
                    Start::Row(row) => *row.add(j) + v,
                };
            }
        }
    }
}
