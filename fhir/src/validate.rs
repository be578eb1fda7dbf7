//! Structural validation of R4 resources with fhir-model's R4B models: wrong JSON types, codes
//! outside their value set, missing required elements and elements the model does not know.
//!
//! R4B differs from R4 only in the medication definition, evidence and subscription modules.
//! Types that exist in both with the same structure are validated; the R4-only types
//! (`MedicinalProduct*`, `Substance*` specifications, `EffectEvidenceSynthesis`,
//! `RiskEvidenceSynthesis`) and the two whose structure changed (`Evidence`, `EvidenceVariable`)
//! are not modelled here and get only the server's shape checks. Stored bodies are always the
//! client's JSON, never the model's re-serialization (which drops what it does not know).

use serde_json::Value;

/// Why a resource does not fit its model: where (a JSON path of element names and indices) and
/// what kind of problem. Never the offending value, which can be PHI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct InvalidResource {
    pub path: String,
    pub problem: &'static str,
}

/// The outcome of validating one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    /// The resource fits its model; `unknown_elements` lists (as paths) what the model does
    /// not know (an R4 element removed in R4B, or a typo), which strict handling refuses.
    Checked { unknown_elements: Vec<String> },
    /// This resource type has no R4-compatible model here.
    NotModelled,
}

/// Validates `resource` (already known to be an object of `resource_type`).
pub fn validate(resource_type: &str, resource: &Value) -> Result<Validation, InvalidResource> {
    macro_rules! validate_as {
        ($($name:ident),* $(,)?) => {
            match resource_type {
                $(stringify!($name) => check::<fhir_model::r4b::resources::$name>(resource),)*
                _ => Ok(Validation::NotModelled),
            }
        };
    }
    validate_as!(
        Account,
        ActivityDefinition,
        AdverseEvent,
        AllergyIntolerance,
        Appointment,
        AppointmentResponse,
        AuditEvent,
        Basic,
        Binary,
        BiologicallyDerivedProduct,
        BodyStructure,
        Bundle,
        CapabilityStatement,
        CarePlan,
        CareTeam,
        CatalogEntry,
        ChargeItem,
        ChargeItemDefinition,
        Claim,
        ClaimResponse,
        ClinicalImpression,
        CodeSystem,
        Communication,
        CommunicationRequest,
        CompartmentDefinition,
        Composition,
        ConceptMap,
        Condition,
        Consent,
        Contract,
        Coverage,
        CoverageEligibilityRequest,
        CoverageEligibilityResponse,
        DetectedIssue,
        Device,
        DeviceDefinition,
        DeviceMetric,
        DeviceRequest,
        DeviceUseStatement,
        DiagnosticReport,
        DocumentManifest,
        DocumentReference,
        Encounter,
        Endpoint,
        EnrollmentRequest,
        EnrollmentResponse,
        EpisodeOfCare,
        EventDefinition,
        ExampleScenario,
        ExplanationOfBenefit,
        FamilyMemberHistory,
        Flag,
        Goal,
        GraphDefinition,
        Group,
        GuidanceResponse,
        HealthcareService,
        ImagingStudy,
        Immunization,
        ImmunizationEvaluation,
        ImmunizationRecommendation,
        ImplementationGuide,
        InsurancePlan,
        Invoice,
        Library,
        Linkage,
        List,
        Location,
        Measure,
        MeasureReport,
        Media,
        Medication,
        MedicationAdministration,
        MedicationDispense,
        MedicationKnowledge,
        MedicationRequest,
        MedicationStatement,
        MessageDefinition,
        MessageHeader,
        MolecularSequence,
        NamingSystem,
        NutritionOrder,
        Observation,
        ObservationDefinition,
        OperationDefinition,
        OperationOutcome,
        Organization,
        OrganizationAffiliation,
        Parameters,
        Patient,
        PaymentNotice,
        PaymentReconciliation,
        Person,
        PlanDefinition,
        Practitioner,
        PractitionerRole,
        Procedure,
        Provenance,
        Questionnaire,
        QuestionnaireResponse,
        RelatedPerson,
        RequestGroup,
        ResearchDefinition,
        ResearchElementDefinition,
        ResearchStudy,
        ResearchSubject,
        RiskAssessment,
        Schedule,
        SearchParameter,
        ServiceRequest,
        Slot,
        Specimen,
        SpecimenDefinition,
        StructureDefinition,
        StructureMap,
        Subscription,
        Substance,
        SupplyDelivery,
        SupplyRequest,
        Task,
        TerminologyCapabilities,
        TestReport,
        TestScript,
        ValueSet,
        VerificationResult,
        VisionPrescription,
    )
}

fn check<T>(resource: &Value) -> Result<Validation, InvalidResource>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_path_to_error::deserialize(resource).map_err(|error| InvalidResource {
        path: readable_path(&error.path().to_string()),
        problem: problem_of(&error.inner().to_string()),
    })?;
    let Ok(round_trip) = serde_json::to_value(&typed) else {
        return Ok(Validation::Checked {
            unknown_elements: Vec::new(),
        });
    };
    let mut unknown_elements = Vec::new();
    dropped_members(resource, &round_trip, "", &mut unknown_elements);
    unknown_elements.sort();
    Ok(Validation::Checked { unknown_elements })
}

/// Members of `input` that the model's re-serialization does not have: elements it does not
/// know (nulls and empty arrays, which FHIR JSON forbids, are reported too).
fn dropped_members(input: &Value, output: &Value, path: &str, found: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(input), Value::Object(output)) => {
            for (key, value) in input {
                let member_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match output.get(key) {
                    Some(kept) => dropped_members(value, kept, &member_path, found),
                    None => found.push(member_path),
                }
            }
        }
        (Value::Array(input), Value::Array(output)) => {
            for (index, (value, kept)) in input.iter().zip(output).enumerate() {
                dropped_members(value, kept, &format!("{path}[{index}]"), found);
            }
        }
        _ => {}
    }
}

/// serde_path_to_error writes `.` for the root; clients read `Patient` better.
fn readable_path(path: &str) -> String {
    if path == "." || path.is_empty() {
        return "(resource)".to_owned();
    }
    path.to_owned()
}

/// The kind of a deserialization error, from serde's message, without the value it quotes.
fn problem_of(message: &str) -> &'static str {
    if message.starts_with("invalid type") {
        "has the wrong JSON type for this element"
    } else if message.starts_with("missing field") {
        "lacks a required element"
    } else if message.starts_with("unknown variant") || message.starts_with("Unknown value") {
        "is not one of the codes this element allows"
    } else if message.starts_with("invalid length") {
        "has the wrong number of items"
    } else if message.starts_with("duplicate field") {
        "names an element twice"
    } else {
        "is not a valid value for this element"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "name": [{"family": "Smith", "given": ["John"]}],
            "birthDate": "1970-05-06",
            "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1970-05-06T08:30:00+01:00"}]},
            "gender": "male",
            "extension": [{"url": "http://example.org/x", "valueString": "y"}]
        })
    }

    #[test]
    fn a_valid_resource_passes_with_nothing_unknown() {
        assert_eq!(
            validate("Patient", &patient()),
            Ok(Validation::Checked {
                unknown_elements: Vec::new()
            })
        );
        let observation = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 72, "unit": "/min"}});
        assert!(matches!(
            validate("Observation", &observation),
            Ok(Validation::Checked { unknown_elements }) if unknown_elements.is_empty()
        ));
    }

    #[test]
    fn unknown_elements_are_named_by_path() {
        let mut resource = patient();
        resource["favouriteColour"] = json!("blue");
        resource["name"][0]["nickname"] = json!("Johnny");
        assert_eq!(
            validate("Patient", &resource),
            Ok(Validation::Checked {
                unknown_elements: vec!["favouriteColour".to_owned(), "name[0].nickname".to_owned()]
            })
        );
    }

    #[test]
    fn errors_name_the_element_and_never_the_value() {
        let mut resource = patient();
        resource["birthDate"] = json!("Smith John");
        let error = validate("Patient", &resource).unwrap_err();
        assert_eq!(error.path, "birthDate");
        assert!(!error.to_string().contains("Smith"));
        let mut resource = patient();
        resource["name"] = json!("John Smith");
        let error = validate("Patient", &resource).unwrap_err();
        assert_eq!(error.path, "name");
        assert_eq!(error.problem, "has the wrong JSON type for this element");
        assert!(!error.to_string().contains("Smith"));
        let mut resource = patient();
        resource["gender"] = json!("Smith");
        let error = validate("Patient", &resource).unwrap_err();
        assert_eq!(error.path, "gender");
        assert!(!error.to_string().contains("Smith"));
        let missing_status = json!({"resourceType": "Observation", "code": {"text": "x"}});
        assert_eq!(
            validate("Observation", &missing_status)
                .unwrap_err()
                .problem,
            "lacks a required element"
        );
    }

    #[test]
    fn types_without_an_r4_model_are_not_checked() {
        let resource = json!({"resourceType": "MedicinalProduct", "anything": 1});
        assert_eq!(
            validate("MedicinalProduct", &resource),
            Ok(Validation::NotModelled)
        );
        let evidence = json!({"resourceType": "Evidence", "status": "draft", "exposureBackground": {"reference": "x"}});
        assert_eq!(validate("Evidence", &evidence), Ok(Validation::NotModelled));
    }
}
