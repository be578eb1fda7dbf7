//! De-identification policy as code: `deidentification.toml` in the policy folder (or the
//! built-in `policies/deidentification.toml`) names PS3.15 profiles, which DICOM sources
//! (calling AE titles) are de-identified on ingest, and which profile each role's de-identified
//! view of DICOM data is served under. Reloaded with the Cedar policies on SIGHUP;
//! a file that does not parse is refused and the one in force stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use glastonbury_dicom::deidentify::Profile;

use super::PolicyError;

/// The file that ships with the appliance.
const DEFAULT_FILE: &str = include_str!("../../policies/deidentification.toml");

/// The file's contents.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeidentificationFile {
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
    /// Calling AE title → profile applied before its instances are stored.
    #[serde(default)]
    pub ingest: BTreeMap<String, String>,
    /// Role → profile applied to DICOM data served to that role in the de-identified view
    /// (when Cedar grants only that view); a role without one is refused DICOM data there.
    #[serde(default)]
    pub egress: BTreeMap<String, String>,
}

impl DeidentificationFile {
    fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let file: Self =
            toml::from_str(text).map_err(|error| PolicyError(format!("{origin}: {error}")))?;
        for (source, profile) in &file.ingest {
            if !file.profiles.contains_key(profile) {
                return Err(PolicyError(format!(
                    "{origin}: ingest source {source:?} names unknown profile {profile:?}"
                )));
            }
        }
        for (role, profile) in &file.egress {
            if !file.profiles.contains_key(profile) {
                return Err(PolicyError(format!(
                    "{origin}: egress role {role:?} names unknown profile {profile:?}"
                )));
            }
        }
        Ok(file)
    }

    /// The named profile.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// The profile DICOM data is served under to `role` in the de-identified view, if any.
    pub fn egress_profile(&self, role: &str) -> Option<&Profile> {
        self.egress
            .get(role)
            .and_then(|name| self.profiles.get(name))
    }

    /// The profile applied to instances from `ae_title` before they are stored, if any.
    pub fn ingest_profile(&self, ae_title: &str) -> Option<&Profile> {
        self.ingest
            .get(ae_title.trim())
            .and_then(|name| self.profiles.get(name))
    }
}

/// The de-identification policy in force; swapped atomically on reload.
#[derive(Debug)]
pub struct DeidentificationPolicies {
    folder: Option<PathBuf>,
    current: RwLock<Arc<DeidentificationFile>>,
}

impl DeidentificationPolicies {
    /// Loads `folder/deidentification.toml` (the built-in file when there is no folder, or the
    /// folder has none).
    pub fn load(folder: Option<&Path>) -> Result<Self, PolicyError> {
        Ok(Self {
            folder: folder.map(Path::to_path_buf),
            current: RwLock::new(Arc::new(read(folder)?)),
        })
    }

    /// Re-reads the file; on error the one in force stays and the error is returned.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let loaded = read(self.folder.as_deref())?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        *current = Arc::new(loaded);
        Ok(())
    }

    /// The file in force.
    pub fn current(&self) -> Arc<DeidentificationFile> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }
}

fn read(folder: Option<&Path>) -> Result<DeidentificationFile, PolicyError> {
    let Some(folder) = folder else {
        return DeidentificationFile::parse(DEFAULT_FILE, "deidentification.toml");
    };
    let path = folder.join("deidentification.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => DeidentificationFile::parse(&text, &path.display().to_string()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            DeidentificationFile::parse(DEFAULT_FILE, "deidentification.toml")
        }
        Err(error) => Err(PolicyError(format!("{}: {error}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_has_the_basic_and_research_profiles() {
        let file = DeidentificationFile::parse(DEFAULT_FILE, "built-in").unwrap();
        assert!(file.profile("basic").is_some());
        assert!(
            file.profile("research")
                .unwrap()
                .options
                .retain_longitudinal_modified_dates
        );
        assert!(
            file.ingest_profile("ANY_AE").is_none(),
            "nothing is de-identified on ingest by default"
        );
    }

    #[test]
    fn an_ingest_source_must_name_a_known_profile() {
        let text = "[profiles.basic]\n[ingest]\nFEED = \"nope\"\n";
        assert!(DeidentificationFile::parse(text, "test").is_err());
        let text = "[profiles.basic]\n[ingest]\nFEED = \"basic\"\n";
        let file = DeidentificationFile::parse(text, "test").unwrap();
        assert!(file.ingest_profile("FEED ").is_some());
    }
}
