//! Which FHIR Patient owns a patient identifier, remembered between lookups on a single-node
//! (SQLite) appliance, so that the instances of a study after its first skip the index query
//! that links a DICOM PatientID to its FHIR Patient.
//!
//! Only this process's record writer changes Patient index rows on SQLite, and it forgets
//! everything after any batch that writes a Patient. A lookup that raced such a batch is not
//! remembered: it carries the generation it started under, and the writer's forgetting moves the
//! generation on. On PostgreSQL another replica can create a Patient at any time, so nothing is
//! remembered there.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::storage::Engine;

/// The most identifiers remembered; past it the memory starts over (a miss only costs the query
/// the memory saves).
const MAX_REMEMBERED_IDENTIFIERS: usize = 4096;

/// What the memory knows of an identifier token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RememberedOwner {
    /// The owner as last looked up: the FHIR Patient id, or none when no single Patient has it.
    Known(Option<String>),
    /// Not remembered: look it up, then [`PatientOwners::remember`] it with this generation.
    Unknown(Generation),
}

/// The number of times the memory has been forgotten, as seen when a lookup started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// Identifier tokens and the FHIR Patient that owns each.
#[derive(Debug)]
pub struct PatientOwners {
    enabled: bool,
    remembered: Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    generation: u64,
    owners: HashMap<String, Option<String>>,
}

impl PatientOwners {
    /// A memory that remembers on SQLite and never on PostgreSQL.
    pub fn for_engine(engine: Engine) -> Self {
        Self {
            enabled: engine == Engine::Sqlite,
            remembered: Mutex::default(),
        }
    }

    /// The remembered owner of `token`, or the generation to remember a lookup under.
    pub fn recall(&self, token: &str) -> RememberedOwner {
        let remembered = self.lock();
        match remembered.owners.get(token) {
            Some(owner) if self.enabled => RememberedOwner::Known(owner.clone()),
            _ => RememberedOwner::Unknown(Generation(remembered.generation)),
        }
    }

    /// Remembers a lookup of `token`, unless the memory was forgotten since it started.
    pub fn remember(&self, token: &str, owner: Option<String>, started: Generation) {
        if !self.enabled {
            return;
        }
        let mut remembered = self.lock();
        if remembered.generation != started.0 {
            return;
        }
        if remembered.owners.len() >= MAX_REMEMBERED_IDENTIFIERS {
            remembered.owners.clear();
        }
        remembered.owners.insert(token.to_owned(), owner);
    }

    /// Forgets every owner (a Patient was written) and turns away lookups started before.
    pub fn forget_all(&self) {
        let mut remembered = self.lock();
        remembered.generation += 1;
        remembered.owners.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.remembered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation_of(owners: &PatientOwners, token: &str) -> Generation {
        match owners.recall(token) {
            RememberedOwner::Unknown(generation) => generation,
            RememberedOwner::Known(owner) => panic!("unexpectedly remembered {owner:?}"),
        }
    }

    #[test]
    fn a_lookup_is_remembered_until_forgotten() {
        let owners = PatientOwners::for_engine(Engine::Sqlite);
        let started = generation_of(&owners, "token-1");
        owners.remember("token-1", Some("patient-1".to_owned()), started);
        assert_eq!(
            owners.recall("token-1"),
            RememberedOwner::Known(Some("patient-1".to_owned()))
        );
        owners.forget_all();
        generation_of(&owners, "token-1");
    }

    #[test]
    fn a_lookup_that_raced_a_patient_write_is_not_remembered() {
        let owners = PatientOwners::for_engine(Engine::Sqlite);
        let started = generation_of(&owners, "token-1");
        owners.forget_all();
        owners.remember("token-1", None, started);
        generation_of(&owners, "token-1");
    }

    #[test]
    fn nothing_is_remembered_on_postgres() {
        let owners = PatientOwners::for_engine(Engine::Postgres);
        let started = generation_of(&owners, "token-1");
        owners.remember("token-1", None, started);
        generation_of(&owners, "token-1");
    }
}
