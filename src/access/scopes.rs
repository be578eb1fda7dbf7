//! SMART on FHIR scopes, v1 (`patient/*.read`) and v2 (`system/Observation.cruds`), parsed into
//! one form: a context, a resource type (or `*`) and the set of permitted interactions.

/// Whose data a scope covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

/// One parsed SMART scope.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Scope {
    pub context: ScopeContext,
    /// A FHIR resource type, or `*`.
    pub resource_type: String,
    /// Permitted interactions as SMART v2 letters, in `cruds` order.
    pub interactions: String,
    /// The scope as it was written.
    pub text: String,
}

/// A scope string that is not a SMART clinical scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SMART clinical scope: {0:?}")]
pub struct ScopeParseError(pub String);

impl std::str::FromStr for Scope {
    type Err = ScopeParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ScopeParseError(text.to_owned());
        let (context, rest) = text.split_once('/').ok_or_else(error)?;
        let context = match context {
            "patient" => ScopeContext::Patient,
            "user" => ScopeContext::User,
            "system" => ScopeContext::System,
            _ => return Err(error()),
        };
        let (resource_type, permission) = rest.split_once('.').ok_or_else(error)?;
        let permission = permission.split('?').next().unwrap_or_default();
        let valid_type = resource_type == "*"
            || (resource_type
                .chars()
                .next()
                .is_some_and(|first| first.is_ascii_uppercase())
                && resource_type
                    .chars()
                    .all(|character| character.is_ascii_alphanumeric()));
        if !valid_type {
            return Err(error());
        }
        let interactions = match permission {
            "read" => "rs".to_owned(),
            "write" => "cud".to_owned(),
            "*" => "cruds".to_owned(),
            letters => parse_v2_letters(letters).ok_or_else(error)?,
        };
        Ok(Self {
            context,
            resource_type: resource_type.to_owned(),
            interactions,
            text: text.to_owned(),
        })
    }
}

/// SMART v2 letters must be a non-empty subsequence of `cruds`, in that order.
fn parse_v2_letters(letters: &str) -> Option<String> {
    if letters.is_empty() {
        return None;
    }
    let mut remaining = "cruds".chars();
    for letter in letters.chars() {
        remaining.by_ref().find(|candidate| *candidate == letter)?;
    }
    Some(letters.to_owned())
}

impl Scope {
    /// Whether this scope permits the interaction `letter` on `resource_type`.
    pub fn permits(&self, resource_type: &str, letter: char) -> bool {
        (self.resource_type == "*" || self.resource_type == resource_type)
            && self.interactions.contains(letter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_scopes_parse_to_the_same_form() {
        let v1: Scope = "patient/*.read".parse().unwrap();
        assert_eq!(v1.interactions, "rs");
        let v2: Scope = "system/Observation.cruds".parse().unwrap();
        assert!(v2.permits("Observation", 'd'));
        assert!(!v2.permits("Patient", 'r'));
        let with_query: Scope = "user/Observation.rs?category=vital-signs".parse().unwrap();
        assert!(with_query.permits("Observation", 's'));
    }

    #[test]
    fn malformed_scopes_are_rejected() {
        for text in [
            "openid",
            "system/patient.read",
            "system/Patient.sc",
            "system/Patient.",
            "admin/*.read",
            "system/Patient.x",
        ] {
            assert!(text.parse::<Scope>().is_err(), "{text}");
        }
    }
}
