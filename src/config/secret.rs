//! Credentials in the configuration (the broker's password, a network camera's): given in the file, in
//! a separate file (`password_file`, e.g. a systemd credential) or in the environment (`password_env`),
//! and held in a [`Secret`] whose `Debug` prints `***`, so no log line or error can carry one.

use std::path::{Path, PathBuf};

use toml::Spanned;

/// A credential: shown as `***` by `Debug` so it cannot reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The three ways to give a password, as a table carries them.
pub(super) struct RawPassword {
    pub password: Option<String>,
    pub password_file: Option<Spanned<PathBuf>>,
    pub password_env: Option<Spanned<String>>,
}

impl RawPassword {
    /// Reads whichever one is set (at most one may be); `section` names the table in errors
    /// ("mqtt", "camera"). A file is relative to the config's directory and loses its final newline.
    pub fn resolve(
        self,
        dir: &Path,
        section: &str,
        at: &dyn Fn(std::ops::Range<usize>, &str, String) -> crate::error::Error,
    ) -> crate::Result<Option<Secret>> {
        let set = [self.password.is_some(), self.password_file.is_some(), self.password_env.is_some()];
        if set.iter().filter(|s| **s).count() > 1 {
            return Err(crate::error::Error::Config(format!(
                "{section}: set only one of password, password_file and password_env"
            )));
        }
        Ok(if let Some(p) = self.password {
            Some(Secret(p))
        } else if let Some(f) = self.password_file {
            let path = dir.join(f.get_ref());
            let text = std::fs::read_to_string(&path).map_err(|e| {
                at(f.span(), &format!("{section}.password_file"), format!("cannot read {}: {e}", path.display()))
            })?;
            Some(Secret(text.trim_end_matches(['\r', '\n']).to_string()))
        } else if let Some(v) = self.password_env {
            let value = std::env::var(v.get_ref()).map_err(|_| {
                at(
                    v.span(),
                    &format!("{section}.password_env"),
                    format!("environment variable {} is not set", v.get_ref()),
                )
            })?;
            Some(Secret(value))
        } else {
            None
        })
    }
}
