//! Which instructions the kernels may use: what this CPU has, read once at run time,
//! capped by the environment variable `VITSCOPE_CPU` so that one machine can run (and
//! test) every slower path it is able to execute. The binary is built for the baseline
//! target; the fast paths are compiled beside it with `target_feature` and picked here.

use std::sync::OnceLock;

/// The environment variable that caps the instruction level.
pub const CPU_VAR: &str = "VITSCOPE_CPU";

/// Instruction levels, slowest first; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable code only (SSE2 on x86_64, the baseline elsewhere).
    Scalar,
    /// 256-bit vectors with fused multiply-adds.
    Avx2,
    /// AVX-512 (F, BW, DQ and VL): 512-bit vectors, masks.
    Avx512,
    /// AVX-512 with VDPBF16PS: bf16 pairs multiplied and summed into f32.
    Avx512Bf16,
    /// AMX tiles (TDPBF16PS), granted to this process by the kernel.
    Amx,
}

impl Level {
    pub const ALL: [Level; 5] = [
        Level::Scalar,
        Level::Avx2,
        Level::Avx512,
        Level::Avx512Bf16,
        Level::Amx,
    ];

    /// The name `VITSCOPE_CPU` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Bf16 => "avx512bf16",
            Level::Amx => "amx",
        }
    }

    fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s)
    }
}

/// The highest level this CPU (and OS) supports, ignoring the cap.
pub fn detected() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma")) {
        return Level::Scalar;
    }
    if !(has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl")) {
        return Level::Avx2;
    }
    if has!("avx512bf16") && amx_granted() {
        return Level::Amx;
    }
    if has!("avx512bf16") {
        return Level::Avx512Bf16;
    }
    Level::Avx512
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Scalar
}

/// The cap `VITSCOPE_CPU` sets: `Ok(None)` when unset, an error naming the variable
/// and the values it takes when it holds anything else.
pub fn cap_from_env() -> Result<Option<Level>, String> {
    match std::env::var(CPU_VAR) {
        Err(_) => Ok(None),
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => Level::parse(v.trim()).map(Some).ok_or_else(|| {
            let names: Vec<_> = Level::ALL.iter().map(|l| l.name()).collect();
            format!("{CPU_VAR}={v}: expected one of {}", names.join(", "))
        }),
    }
}

/// The level the kernels use: the detected one, lowered to `VITSCOPE_CPU` when that is
/// set (a cap above what the CPU has changes nothing: it cannot add instructions). The
/// command line rejects a bad value before any kernel runs; here it is ignored.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match cap_from_env() {
        Ok(Some(cap)) => cap.min(detected()),
        _ => detected(),
    })
}

/// The levels this machine can run, slowest first, up to the cap: what the kernel
/// tests loop over.
pub fn runnable() -> Vec<Level> {
    Level::ALL.into_iter().filter(|&l| l <= level()).collect()
}

/// The levels this machine cannot run, in words, for the tests to say what they skipped.
pub fn not_runnable() -> Vec<&'static str> {
    Level::ALL
        .into_iter()
        .filter(|&l| l > level())
        .map(Level::name)
        .collect()
}

/// Whether this CPU has AMX-BF16 and Linux lets this process use the tile registers
/// (it hands them out on request only): asked once, by [`detected`].
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_granted() -> bool {
    if !std::arch::is_x86_feature_detected!("avx512f")
        || !std::arch::is_x86_feature_detected!("avx512bw")
    {
        return false;
    }
    // CPUID leaf 7 exists on every CPU with AVX-512.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    if leaf.edx & (AMX_BF16 | AMX_TILE) != AMX_BF16 | AMX_TILE {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a request for a permission; it changes nothing else.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn amx_granted() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_named_for_the_variable() {
        for pair in Level::ALL.windows(2) {
            assert!(pair[0] < pair[1]);
        }
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        assert_eq!(Level::parse("avx-512"), None);
        assert!(level() <= detected());
        assert_eq!(runnable().last(), Some(&level()));
        assert_eq!(runnable().len() + not_runnable().len(), Level::ALL.len());
    }
}
