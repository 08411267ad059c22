//! The engine's A/B switches (our packed kernel, the f32 prefill copies, prompt-prefix reuse, vector `expf`):
//! chosen once per process. The binary reads them from the environment ([`Switches::from_env`])
//! and installs them with [`configure`]; a library user may install their own. A process that
//! installs none gets [`Switches::from_env`] on first use (so the crate's tests can force the
//! fallback path with `MRREC_Q8_KERNEL=0`). No other code of this crate reads the environment.

use std::sync::OnceLock;

/// Which engine paths run (all on by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    /// Our packed Q8_0 kernel where the CPU has AVX512-VNNI (`MRREC_Q8_KERNEL=0`: candle's).
    pub q8_kernel: bool,
    /// Without our kernel, f32 copies of the weights for prompt prefill
    /// (`MRREC_DENSE_PREFILL=0`: less memory, slower).
    pub dense_prefill: bool,
    /// Reuse the keys and values of a remembered prompt prefix (`MRREC_PREFIX_REUSE=0`: off).
    pub prefix_reuse: bool,
    /// SiLU's `expf` in vectors with glibc's bits (`MRREC_VECTOR_EXPF=0`: the C library per
    /// element; the same answers, slower).
    pub vector_expf: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            q8_kernel: true,
            dense_prefill: true,
            prefix_reuse: true,
            vector_expf: true,
        }
    }
}

impl Switches {
    /// The defaults with each switch whose variable is `0` turned off.
    pub fn from_env() -> Self {
        let on = |k: &str| std::env::var(k).map_or(true, |v| v != "0");
        Switches {
            q8_kernel: on("MRREC_Q8_KERNEL"),
            dense_prefill: on("MRREC_DENSE_PREFILL"),
            prefix_reuse: on("MRREC_PREFIX_REUSE"),
            vector_expf: on("MRREC_VECTOR_EXPF"),
        }
    }
}

static SWITCHES: OnceLock<Switches> = OnceLock::new();

/// Installs the process's switches. Only the first call (or first use) decides: different
/// switches after that are refused and the ones in force returned.
pub fn configure(switches: Switches) -> Result<(), Switches> {
    let installed = *SWITCHES.get_or_init(|| switches);
    if installed == switches {
        Ok(())
    } else {
        Err(installed)
    }
}

/// The switches in force.
pub fn switches() -> Switches {
    *SWITCHES.get_or_init(Switches::from_env)
}
