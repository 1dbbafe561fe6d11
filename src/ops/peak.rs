//! The multiply-add rate of the instruction a product kind runs on, measured rather
//! than taken from a data sheet (clocks, turbo and double-pumped 512-bit units differ
//! between machines): independent chains of the instruction on registers only, long
//! enough that its latency is hidden, so the loop runs at the core's issue rate.
//! `vitscope bench` sets the products' speed against it.

use super::bf16::Kernel;
use super::cpu::{self, Level};

/// Chains on 512-bit registers: enough to hide the latency (4-5 cycles at two a cycle),
/// and with the two factors within the 32 registers.
const ZMM_CHAINS: usize = 16;
/// Chains on 256-bit registers: AVX2 has 16, two hold the factors, so 16 chains would
/// spill to memory and measure the loads and stores (half the rate, seen on AMD Zen 3);
/// 12 still hide the latency.
const YMM_CHAINS: usize = 12;
const _: () = assert!(ZMM_CHAINS + 2 <= 32 && YMM_CHAINS + 2 <= 16);

/// A measured peak: GFLOP/s of one core, and how it was measured, in words.
pub struct Peak {
    pub gflops: f64,
    pub how: String,
}

/// The peak of the instruction that runs the products: bf16 (`bf16`) on
/// [`Kernel::current`], or the widest f32 FMA the capped CPU has. `None` where no
/// vector instruction is measured (the portable build, aarch64).
pub fn measure(bf16: bool) -> Option<Peak> {
    let kernel = Kernel::current();
    type Loop = unsafe fn(u64) -> f32;
    let (flops_per_instr, chains, name, run): (f64, usize, &str, Loop) = match (bf16, kernel) {
        (true, Kernel::DotProducts) => (64.0, ZMM_CHAINS, "VDPBF16PS zmm", x86::dpbf16),
        (true, Kernel::Amx) => (16.0 * 16.0 * 32.0 * 2.0, 4, "TDPBF16PS", x86::tdpbf16),
        _ if cpu::level() >= Level::Avx512 => {
            (32.0, ZMM_CHAINS, "VFMADD231PS zmm (f32)", x86::fma512)
        }
        _ if cpu::level() >= Level::Avx2 => {
            (16.0, YMM_CHAINS, "VFMADD231PS ymm (f32)", x86::fma256)
        }
        _ => return None,
    };
    let mut iterations = 1u64 << 16;
    // SAFETY: each loop runs only at the level that has its instruction (above).
    unsafe { std::hint::black_box(run(iterations)) };
    let secs = loop {
        let t = std::time::Instant::now();
        unsafe { std::hint::black_box(run(iterations)) };
        let secs = t.elapsed().as_secs_f64();
        if secs > 0.05 {
            break secs;
        }
        iterations *= 4;
    };
    let gflops = (iterations * chains as u64) as f64 * flops_per_instr / secs / 1e9;
    Some(Peak {
        gflops,
        how: format!(
            "{name}: {chains} independent chains on registers, {:.0} M instructions",
            (iterations * chains as u64) as f64 / 1e6
        ),
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{YMM_CHAINS, ZMM_CHAINS};

    /// [`ZMM_CHAINS`] chains of `iterations` VDPBF16PS each.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16(iterations: u64) -> f32 {
        let mut acc = [_mm512_setzero_ps(); ZMM_CHAINS];
        let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
        let y: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3400_3400));
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, x, y);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// [`ZMM_CHAINS`] chains of `iterations` 512-bit FMAs each.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512(iterations: u64) -> f32 {
        let mut acc = [_mm512_setzero_ps(); ZMM_CHAINS];
        let (x, y) = (_mm512_set1_ps(1.0), _mm512_set1_ps(1e-7));
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(x, y, *a);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// [`YMM_CHAINS`] chains of `iterations` 256-bit FMAs each.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256(iterations: u64) -> f32 {
        let mut acc = [_mm256_setzero_ps(); YMM_CHAINS];
        let (x, y) = (_mm256_set1_ps(1.0), _mm256_set1_ps(1e-7));
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(x, y, *a);
            }
        }
        let mut out = [0f32; 8];
        let mut total = 0.0;
        for a in acc {
            _mm256_storeu_ps(out.as_mut_ptr(), a);
            total += out.iter().sum::<f32>();
        }
        total
    }

    /// 4 chains of `iterations` TDPBF16PS each (tiles 0-3 += tiles 4-5 x 6-7).
    pub unsafe fn tdpbf16(iterations: u64) -> f32 {
        super::super::bf16::amx_peak_loop(iterations)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub unsafe fn dpbf16(_: u64) -> f32 {
        unreachable!("only on x86_64")
    }
    pub use dpbf16 as fma512;
    pub use dpbf16 as fma256;
    pub use dpbf16 as tdpbf16;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop measures something plausible on every kind this machine runs: between
    /// 1 GFLOP/s and 20 TFLOP/s a core (the tiles' peak, the highest, is about 1,024
    /// FLOP a cycle: 2-4 TFLOP/s). A sanity check, not a speed target: it catches a
    /// loop the compiler dropped or a count off by orders of magnitude.
    #[test]
    fn the_instruction_peak_is_a_plausible_rate() {
        let (f32, bf16) = (measure(false), measure(true));
        for peak in [&f32, &bf16].into_iter().flatten() {
            assert!(
                peak.gflops > 1.0 && peak.gflops < 20_000.0,
                "{}: {} GFLOP/s",
                peak.how,
                peak.gflops
            );
        }
    }
}
