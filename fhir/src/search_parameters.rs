//! The R4 search parameters, loaded from the official definitions shipped in `data/` and compiled
//! per resource type. The router, the indexer, the query parser and the CapabilityStatement all
//! read this one registry, so what is advertised is what is implemented.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use crate::path::{CompiledPath, compile_for};

const SEARCH_PARAMETERS_JSON: &str = include_str!("../data/search-parameters.json");
const RESOURCE_TYPES_JSON: &str = include_str!("../data/resource-types.json");

/// The kinds of search parameter this server implements (composite and special are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParameterType {
    String,
    Token,
    Reference,
    Date,
    Number,
    Quantity,
    Uri,
}

impl ParameterType {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "string" => Self::String,
            "token" => Self::Token,
            "reference" => Self::Reference,
            "date" => Self::Date,
            "number" => Self::Number,
            "quantity" => Self::Quantity,
            "uri" => Self::Uri,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Token => "token",
            Self::Reference => "reference",
            Self::Date => "date",
            Self::Number => "number",
            Self::Quantity => "quantity",
            Self::Uri => "uri",
        }
    }
}

/// One search parameter as it applies to one resource type.
#[derive(Debug, Clone)]
pub struct SearchParameter {
    pub code: String,
    pub parameter_type: ParameterType,
    pub url: String,
    /// The FHIRPath expression as published (for the CapabilityStatement).
    pub expression: String,
    pub paths: Vec<CompiledPath>,
    /// Resource types a reference parameter may point at.
    pub targets: Vec<String>,
}

/// Every implemented search parameter, by resource type and code.
#[derive(Debug)]
pub struct SearchParameters {
    resource_types: BTreeSet<String>,
    by_type: BTreeMap<String, BTreeMap<String, SearchParameter>>,
    /// Parameters published for a type that this server cannot evaluate (composite, special, or an
    /// expression outside the supported FHIRPath subset), by type.
    unsupported: BTreeMap<String, BTreeSet<String>>,
}

/// Parameters whose published expression evaluates but whose meaning this server does not
/// implement: `phonetic` asks for a sound-alike match (Soundex and friends), which a prefix
/// search over the same names would only pretend to be.
const NOT_IMPLEMENTED: &[&str] = &["phonetic"];

#[derive(serde::Deserialize)]
struct PublishedParameter {
    code: String,
    base: Vec<String>,
    #[serde(rename = "type")]
    parameter_type: String,
    expression: String,
    target: Vec<String>,
    url: String,
}

impl SearchParameters {
    /// The registry built from the shipped R4 definitions (built once per process).
    pub fn r4() -> &'static Self {
        static REGISTRY: OnceLock<SearchParameters> = OnceLock::new();
        REGISTRY.get_or_init(Self::build)
    }

    fn build() -> Self {
        let resource_types: BTreeSet<String> =
            serde_json::from_str(RESOURCE_TYPES_JSON).unwrap_or_default();
        let published: Vec<PublishedParameter> =
            serde_json::from_str(SEARCH_PARAMETERS_JSON).unwrap_or_default();
        let mut registry = Self {
            resource_types,
            by_type: BTreeMap::new(),
            unsupported: BTreeMap::new(),
        };
        for parameter in &published {
            registry.add(parameter);
        }
        registry
    }

    fn add(&mut self, published: &PublishedParameter) {
        let applies_to: Vec<String> = if published
            .base
            .iter()
            .any(|base| base == "Resource" || base == "DomainResource")
        {
            self.resource_types.iter().cloned().collect()
        } else {
            published.base.clone()
        };
        for resource_type in applies_to {
            let compiled = ParameterType::parse(&published.parameter_type)
                .zip(compile_for(&published.expression, &resource_type).ok())
                .filter(|(_, paths)| !paths.is_empty())
                .filter(|_| !NOT_IMPLEMENTED.contains(&published.code.as_str()));
            let Some((parameter_type, paths)) = compiled else {
                self.unsupported
                    .entry(resource_type)
                    .or_default()
                    .insert(published.code.clone());
                continue;
            };
            self.by_type.entry(resource_type).or_default().insert(
                published.code.clone(),
                SearchParameter {
                    code: published.code.clone(),
                    parameter_type,
                    url: published.url.clone(),
                    expression: published.expression.clone(),
                    paths,
                    targets: published.target.clone(),
                },
            );
        }
    }

    /// Whether `resource_type` is an R4 resource type.
    pub fn is_resource_type(&self, resource_type: &str) -> bool {
        self.resource_types.contains(resource_type)
    }

    pub fn resource_types(&self) -> impl Iterator<Item = &str> {
        self.resource_types.iter().map(String::as_str)
    }

    /// The parameter `code` of `resource_type`, when implemented.
    pub fn get(&self, resource_type: &str, code: &str) -> Option<&SearchParameter> {
        self.by_type.get(resource_type)?.get(code)
    }

    /// Every implemented parameter of `resource_type`, by code.
    pub fn of_type(&self, resource_type: &str) -> impl Iterator<Item = &SearchParameter> {
        self.by_type
            .get(resource_type)
            .into_iter()
            .flat_map(|parameters| parameters.values())
    }

    /// Whether the definitions publish `code` for `resource_type` although it is not implemented.
    pub fn is_unsupported(&self, resource_type: &str, code: &str) -> bool {
        self.unsupported
            .get(resource_type)
            .is_some_and(|codes| codes.contains(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resource types the FHIR issue names; every published parameter of theirs must be
    /// implemented except composites, `_text`/`_content`/`_query`/`_filter`-style specials and
    /// Patient.deceased (an `exists()` expression).
    const CORE_TYPES: &[&str] = &[
        "Patient",
        "Practitioner",
        "Organization",
        "Encounter",
        "Observation",
        "Condition",
        "Procedure",
        "MedicationRequest",
        "AllergyIntolerance",
        "Immunization",
        "DiagnosticReport",
        "DocumentReference",
        "ImagingStudy",
        "Device",
        "AuditEvent",
        "Provenance",
    ];

    #[test]
    fn knows_the_r4_resource_types() {
        let registry = SearchParameters::r4();
        assert!(registry.is_resource_type("Patient"));
        assert!(registry.is_resource_type("ImagingStudy"));
        assert!(!registry.is_resource_type("patient"));
        assert!(!registry.is_resource_type("Bot"));
        assert!(registry.resource_types().count() >= 145);
    }

    #[test]
    fn implements_the_parameters_of_the_core_types() {
        let registry = SearchParameters::r4();
        for resource_type in CORE_TYPES {
            let unsupported: Vec<&String> = registry
                .unsupported
                .get(*resource_type)
                .map(|codes| codes.iter().collect())
                .unwrap_or_default();
            for code in unsupported {
                let allowed = code.starts_with('_') && code != "_tag" && code != "_profile"
                    || code.contains("code-value")
                    || code.starts_with("combo-code-value")
                    || code.starts_with("component-code-value")
                    || code == "relationship"
                    || code == "deceased"
                    || code == "phonetic"
                    || code == "near";
                assert!(allowed, "{resource_type}.{code} is not implemented");
            }
            assert!(registry.get(resource_type, "_tag").is_some());
            assert!(registry.get(resource_type, "_profile").is_some());
        }
        let family = registry.get("Patient", "family").expect("family");
        assert_eq!(family.parameter_type, ParameterType::String);
        let subject = registry.get("Observation", "subject").expect("subject");
        assert_eq!(subject.parameter_type, ParameterType::Reference);
        assert!(registry.get("Observation", "value-quantity").is_some());
    }
}
