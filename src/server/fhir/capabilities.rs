//! `/fhir/metadata`: the CapabilityStatement, generated from the search-parameter registry the
//! indexer and the query parser use and from the interaction lists beside the router, so it
//! states exactly what is implemented.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use glastonbury_fhir::{ParameterType, SearchParameters};
use serde_json::{Value, json};

use super::{SYSTEM_INTERACTIONS, TYPE_INTERACTIONS, fhir_response, instant};
use crate::server::AppState;

pub async fn capability_statement(State(state): State<AppState>) -> Response {
    let base = state.appliance.tokens.issuer();
    fhir_response(StatusCode::OK, &statement(base))
}

fn statement(base: &str) -> Value {
    let registry = SearchParameters::r4();
    let resources: Vec<Value> = registry
        .resource_types()
        .map(|resource_type| resource_capability(registry, resource_type))
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(crate::storage::now_micros()),
        "publisher": "Glastonbury",
        "kind": "instance",
        "software": {"name": "Glastonbury", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Glastonbury FHIR R4 server", "url": format!("{base}/fhir")},
        "fhirVersion": "4.0.1",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "documentation": "String, token, reference and uri index values are stored as keyed HMAC tokens (no PHI at rest); string sorting is therefore not offered.",
            "security": {
                "cors": false,
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": format!("{base}/auth/token")}],
                }],
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
            },
            "resource": resources,
            "interaction": SYSTEM_INTERACTIONS.iter().map(|code| json!({"code": code})).collect::<Vec<_>>(),
            "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}],
            "searchParam": [
                {"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"},
                {"name": "_lastUpdated", "type": "date", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"},
            ],
        }],
    })
}

fn resource_capability(registry: &SearchParameters, resource_type: &str) -> Value {
    let parameters: Vec<_> = registry.of_type(resource_type).collect();
    let search_params: Vec<Value> = parameters
        .iter()
        .filter(|parameter| parameter.code != "_id" && parameter.code != "_lastUpdated")
        .map(|parameter| json!({"name": parameter.code, "type": parameter.parameter_type.as_str(), "definition": parameter.url}))
        .chain([
            json!({"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"}),
            json!({"name": "_lastUpdated", "type": "date", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"}),
        ])
        .collect();
    let includes: Vec<String> = parameters
        .iter()
        .filter(|parameter| parameter.parameter_type == ParameterType::Reference)
        .map(|parameter| format!("{resource_type}:{}", parameter.code))
        .collect();
    let revincludes: Vec<String> = registry
        .resource_types()
        .flat_map(|source| {
            registry
                .of_type(source)
                .filter(|parameter| {
                    parameter.parameter_type == ParameterType::Reference
                        && parameter
                            .targets
                            .iter()
                            .any(|target| target == resource_type)
                })
                .map(move |parameter| format!("{source}:{}", parameter.code))
        })
        .collect();
    let mut capability = json!({
        "type": resource_type,
        "profile": format!("http://hl7.org/fhir/StructureDefinition/{resource_type}"),
        "interaction": TYPE_INTERACTIONS.iter().map(|code| json!({"code": code})).collect::<Vec<_>>(),
        "versioning": "versioned-update",
        "readHistory": true,
        "updateCreate": true,
        "conditionalCreate": true,
        "conditionalRead": "not-supported",
        "conditionalUpdate": true,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "local"],
        "searchInclude": includes,
        "searchRevInclude": revincludes,
        "searchParam": search_params,
    });
    if resource_type == "Patient" {
        capability["operation"] = json!([
            {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
            {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"},
        ]);
    }
    if resource_type == "Group" {
        capability["operation"] = json!([
            {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"},
        ]);
    }
    capability
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_what_the_registry_implements() {
        let statement = statement("https://example.test");
        let resources = statement["rest"][0]["resource"]
            .as_array()
            .expect("resources");
        let patient = resources
            .iter()
            .find(|resource| resource["type"] == "Patient")
            .expect("Patient");
        let names: Vec<&str> = patient["searchParam"]
            .as_array()
            .expect("params")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        for expected in [
            "name",
            "family",
            "birthdate",
            "identifier",
            "_tag",
            "_profile",
            "_id",
            "_lastUpdated",
        ] {
            assert!(names.contains(&expected), "{expected}");
        }
        assert!(
            !names.contains(&"deceased"),
            "deceased is not implemented and must not be advertised"
        );
        assert!(
            patient["searchRevInclude"]
                .as_array()
                .expect("revinclude")
                .iter()
                .any(|value| value == "Observation:subject")
        );
        let observation = resources
            .iter()
            .find(|resource| resource["type"] == "Observation")
            .expect("Observation");
        let names: Vec<&str> = observation["searchParam"]
            .as_array()
            .expect("params")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(
            !names.contains(&"code-value-quantity"),
            "composites are not implemented"
        );
    }
}
