//! Access control: who is calling (a [`Principal`]), what they may do, and the capability
//! ([`Allowed`]) that proves a decision was made. Record operations take an `Allowed<A>`, which
//! only [`Authorizer::decide`] can mint, so a forgotten check does not compile.

pub mod deidentification;
pub mod policy;
pub mod scopes;

use std::marker::PhantomData;
use std::sync::Arc;

pub use policy::{PolicyError, PolicyStore};
pub use scopes::{Scope, ScopeContext, ScopeParseError};

/// The roles of the appliance (see `policies/` for what each may do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Clinician,
    Researcher,
    Compliance,
    Device,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clinician => "clinician",
            Self::Researcher => "researcher",
            Self::Compliance => "compliance",
            Self::Device => "device",
            Self::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "clinician" => Ok(Self::Clinician),
            "researcher" => Ok(Self::Researcher),
            "compliance" => Ok(Self::Compliance),
            "device" => Ok(Self::Device),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected clinician, researcher, compliance, device or admin"
            )),
        }
    }
}

/// An authenticated caller, as every surface describes it to the record path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Principal {
    /// Client id (built-in token server) or subject (external IdP).
    pub id: String,
    pub role: Role,
    pub scopes: Vec<Scope>,
    /// The access token's `jti`, when there is one.
    pub token_id: Option<String>,
    pub network_address: Option<String>,
    /// HL7 purpose of use (TREAT, ETREAT, HOPERAT, HRESCH), when stated.
    pub purpose_of_use: Option<String>,
    pub request_id: Option<String>,
    /// The reason a clinician stated to invoke emergency access (break-glass), if any.
    pub break_glass_reason: Option<String>,
}

impl Principal {
    /// The appliance itself, for work the CLI does on an administrator's behalf.
    pub fn local_administrator(purpose: &str) -> Self {
        Self::local_operator(Role::Admin, purpose)
    }

    /// The local command line acting in `role` (whoever can run it holds the data dir).
    pub fn local_operator(role: Role, purpose: &str) -> Self {
        Self {
            id: "local-cli".to_owned(),
            role,
            scopes: Vec::new(),
            token_id: None,
            network_address: None,
            purpose_of_use: Some(purpose.to_owned()),
            request_id: None,
            break_glass_reason: None,
        }
    }
}

/// The kinds of record interaction, each a type so a grant for one cannot be used for another.
pub trait Action: Send + Sync + 'static {
    /// The SMART v2 letter for this action (`c`, `r`, `u`, `d`, `s`).
    const SCOPE_LETTER: char;
    const NAME: &'static str;
}

macro_rules! action {
    ($name:ident, $letter:literal, $text:literal) => {
        #[doc = concat!("The `", $text, "` interaction.")]
        #[derive(Debug, Clone, Copy)]
        pub struct $name;
        impl Action for $name {
            const SCOPE_LETTER: char = $letter;
            const NAME: &'static str = $text;
        }
    };
}

action!(Create, 'c', "create");
action!(Read, 'r', "read");
action!(Update, 'u', "update");
action!(Delete, 'd', "delete");
action!(Search, 's', "search");
action!(Export, 'r', "export");

/// What a caller sees of the records an access reaches: the records as stored, or only their
/// HIPAA Safe Harbor de-identified form (ids and identifiers as pseudonyms, no names, contact
/// details, free text or dates finer than a year). The policy that allowed the access decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum View {
    #[default]
    Identified,
    SafeHarbor,
}

impl View {
    pub fn is_deidentified(self) -> bool {
        self == Self::SafeHarbor
    }
}

/// Proof that `principal` may perform `A` on records of `resource_type`.
#[derive(Debug, Clone)]
pub struct Allowed<A: Action> {
    principal: Arc<Principal>,
    resource_type: String,
    decided_by: Vec<String>,
    break_glass: bool,
    view: View,
    action: PhantomData<A>,
}

impl<A: Action> Allowed<A> {
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// The policy ids that allowed this access, for the audit leaf.
    pub fn decided_by(&self) -> &[String] {
        &self.decided_by
    }

    /// Whether only emergency access (break-glass) allowed this.
    pub fn break_glass(&self) -> bool {
        self.break_glass
    }

    /// What the caller may see of the records this access reaches.
    pub fn view(&self) -> View {
        self.view
    }
}

/// Proof that `principal` may read the audit journal (compliance officers only: the journal
/// names every patient's pseudonym and who looked at what).
#[derive(Debug, Clone)]
pub struct AuditJournalAccess {
    principal: Arc<Principal>,
    decided_by: Vec<String>,
}

impl AuditJournalAccess {
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    pub fn decided_by(&self) -> &[String] {
        &self.decided_by
    }
}

/// Why access was refused. Carries no PHI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("access denied: {reason}")]
pub struct Denied {
    pub reason: String,
    pub decided_by: Vec<String>,
}

/// What a surface learned from the request that policies may depend on.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts {
    /// The data written names the caller itself (e.g. `Observation.device` is the device).
    pub concerns_caller: bool,
}

/// Decides access with the Cedar policy set in force. Deny by default: only what a policy
/// permits (and none forbids) is allowed.
#[derive(Debug, Clone)]
pub struct Authorizer {
    policies: Arc<PolicyStore>,
}

impl Authorizer {
    pub fn new(policies: Arc<PolicyStore>) -> Self {
        Self { policies }
    }

    /// An authorizer over the policies that ship with the appliance.
    pub fn with_default_policies() -> Result<Self, PolicyError> {
        Ok(Self::new(Arc::new(PolicyStore::load(None)?)))
    }

    /// Decides whether `principal` may do `A` on `resource_type`, knowing nothing of the data.
    pub fn decide<A: Action>(
        &self,
        principal: &Arc<Principal>,
        resource_type: &str,
    ) -> Result<Allowed<A>, Denied> {
        self.decide_with(principal, resource_type, &RequestFacts::default())
    }

    /// Decides whether `principal` may do `A` on `resource_type` with what the surface learned
    /// from the request (`facts`). A read or search the policies refuse on identified data is
    /// asked again for the de-identified view; a clinician who stated a break-glass reason is
    /// asked again as an emergency when both are denied.
    pub fn decide_with<A: Action>(
        &self,
        principal: &Arc<Principal>,
        resource_type: &str,
        facts: &RequestFacts,
    ) -> Result<Allowed<A>, Denied> {
        let scopes_permit = principal
            .scopes
            .iter()
            .any(|scope| scope.permits(resource_type, A::SCOPE_LETTER));
        let mut question = policy::PolicyQuestion {
            principal,
            action: A::NAME,
            resource_type: Some(resource_type),
            scopes_permit,
            break_glass: false,
            concerns_caller: facts.concerns_caller,
            deidentified: false,
        };
        let answer = self.policies.decide(&question);
        let allowed = |decided_by: Vec<String>, break_glass: bool, view: View| Allowed {
            principal: Arc::clone(principal),
            resource_type: resource_type.to_owned(),
            decided_by,
            break_glass,
            view,
            action: PhantomData,
        };
        if answer.allowed {
            return Ok(allowed(answer.decided_by, false, View::Identified));
        }
        if matches!(A::SCOPE_LETTER, 'r' | 's') {
            question.deidentified = true;
            let deidentified = self.policies.decide(&question);
            if deidentified.allowed {
                return Ok(allowed(deidentified.decided_by, false, View::SafeHarbor));
            }
            question.deidentified = false;
        }
        if principal.break_glass_reason.is_some() {
            question.break_glass = true;
            let emergency = self.policies.decide(&question);
            if emergency.allowed {
                return Ok(allowed(emergency.decided_by, true, View::Identified));
            }
        }
        let reason = if scopes_permit {
            format!(
                "role {} may not {} {}",
                principal.role.as_str(),
                A::NAME,
                resource_type
            )
        } else {
            format!("no granted scope permits {} on {}", A::NAME, resource_type)
        };
        Err(Denied {
            reason,
            decided_by: answer.decided_by,
        })
    }

    /// Decides whether `principal` may read the audit journal (compliance officers only).
    pub fn decide_audit_access(
        &self,
        principal: &Arc<Principal>,
    ) -> Result<AuditJournalAccess, Denied> {
        let answer = self.policies.decide(&policy::PolicyQuestion {
            principal,
            action: "readAudit",
            resource_type: None,
            scopes_permit: false,
            break_glass: false,
            concerns_caller: false,
            deidentified: false,
        });
        if !answer.allowed {
            return Err(Denied {
                reason: format!(
                    "role {} may not read the audit journal",
                    principal.role.as_str()
                ),
                decided_by: answer.decided_by,
            });
        }
        Ok(AuditJournalAccess {
            principal: Arc::clone(principal),
            decided_by: answer.decided_by,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, scopes: &str) -> Arc<Principal> {
        Arc::new(Principal {
            id: "c1".to_owned(),
            role,
            scopes: scopes
                .split(' ')
                .filter_map(|text| text.parse().ok())
                .collect(),
            token_id: None,
            network_address: None,
            purpose_of_use: None,
            request_id: None,
            break_glass_reason: None,
        })
    }

    #[test]
    fn clinician_needs_a_matching_scope() {
        let authorizer = Authorizer::with_default_policies().unwrap();
        assert!(
            authorizer
                .decide::<Read>(&principal(Role::Clinician, "system/Patient.r"), "Patient")
                .is_ok()
        );
        assert!(
            authorizer
                .decide::<Create>(&principal(Role::Clinician, "system/Patient.r"), "Patient")
                .is_err()
        );
        assert!(
            authorizer
                .decide::<Read>(
                    &principal(Role::Clinician, "system/Patient.r"),
                    "Observation"
                )
                .is_err()
        );
    }

    #[test]
    fn admin_and_compliance_get_no_clinical_data() {
        let authorizer = Authorizer::with_default_policies().unwrap();
        assert!(
            authorizer
                .decide::<Read>(&principal(Role::Admin, "system/*.cruds"), "Patient")
                .is_err()
        );
        assert!(
            authorizer
                .decide::<Read>(&principal(Role::Compliance, "system/*.cruds"), "Patient")
                .is_err()
        );
    }

    #[test]
    fn only_compliance_reads_the_audit_journal() {
        let authorizer = Authorizer::with_default_policies().unwrap();
        assert!(
            authorizer
                .decide_audit_access(&principal(Role::Compliance, ""))
                .is_ok()
        );
        for role in [Role::Clinician, Role::Admin, Role::Device, Role::Researcher] {
            assert!(
                authorizer
                    .decide_audit_access(&principal(role, "system/*.cruds"))
                    .is_err()
            );
        }
    }

    #[test]
    fn break_glass_lets_a_clinician_read_beyond_scope_but_not_write() {
        let authorizer = Authorizer::with_default_policies().unwrap();
        let mut clinician = (*principal(Role::Clinician, "system/Patient.r")).clone();
        assert!(
            authorizer
                .decide::<Read>(&Arc::new(clinician.clone()), "Observation")
                .is_err()
        );
        clinician.break_glass_reason = Some("unconscious patient in the ED".to_owned());
        let emergency = Arc::new(clinician);
        let allowed = authorizer
            .decide::<Read>(&emergency, "Observation")
            .unwrap();
        assert!(allowed.break_glass());
        assert_eq!(allowed.decided_by(), ["clinician-break-glass"]);
        assert!(
            authorizer
                .decide::<Update>(&emergency, "Observation")
                .is_err()
        );
        let ordinary = authorizer.decide::<Read>(&emergency, "Patient").unwrap();
        assert!(
            !ordinary.break_glass(),
            "no emergency is recorded when none was needed"
        );
        let other_role = Arc::new(Principal {
            role: Role::Admin,
            ..(*emergency).clone()
        });
        assert!(
            authorizer
                .decide::<Read>(&other_role, "Observation")
                .is_err()
        );
    }

    #[test]
    fn purpose_of_use_is_part_of_the_decision() {
        let authorizer = Authorizer::with_default_policies().unwrap();
        let mut clinician = (*principal(Role::Clinician, "system/*.cruds")).clone();
        for (purpose, view) in [
            ("TREAT", Some(View::Identified)),
            ("HOPERAT", Some(View::Identified)),
            ("HRESCH", Some(View::SafeHarbor)),
            ("PUBHLTH", None),
        ] {
            clinician.purpose_of_use = Some(purpose.to_owned());
            assert_eq!(
                authorizer
                    .decide::<Read>(&Arc::new(clinician.clone()), "Patient")
                    .ok()
                    .map(|allowed| allowed.view()),
                view,
                "{purpose}"
            );
        }
        assert!(
            authorizer
                .decide::<Update>(&Arc::new(clinician), "Patient")
                .is_err(),
            "research is read-only"
        );
    }

    #[test]
    fn researchers_get_only_the_deidentified_view_within_scope() {
        let authorizer = Authorizer::with_default_policies().unwrap();
        let researcher = principal(Role::Researcher, "system/Observation.rs");
        let read = authorizer
            .decide::<Read>(&researcher, "Observation")
            .unwrap();
        assert_eq!(read.view(), View::SafeHarbor);
        assert_eq!(read.decided_by(), ["researcher-deidentified-view"]);
        assert_eq!(
            authorizer
                .decide::<Search>(&researcher, "Observation")
                .unwrap()
                .view(),
            View::SafeHarbor
        );
        assert!(authorizer.decide::<Read>(&researcher, "Patient").is_err());
        assert!(
            authorizer
                .decide::<Create>(
                    &principal(Role::Researcher, "system/*.cruds"),
                    "Observation"
                )
                .is_err()
        );
    }

    #[test]
    fn denials_name_the_deciding_policy() {
        let authorizer = Authorizer::with_default_policies().unwrap();
        let denied = authorizer
            .decide::<Read>(&principal(Role::Admin, "system/*.cruds"), "Patient")
            .unwrap_err();
        assert_eq!(denied.decided_by, [policy::DEFAULT_DENY]);
        let allowed = authorizer
            .decide::<Read>(&principal(Role::Clinician, "system/*.cruds"), "Patient")
            .unwrap();
        assert_eq!(allowed.decided_by(), ["clinician-phi-within-scope"]);
    }

    #[test]
    fn device_only_creates_observations() {
        let authorizer = Authorizer::with_default_policies().unwrap();
        let device = principal(Role::Device, "system/Observation.c system/Patient.r");
        let own = RequestFacts {
            concerns_caller: true,
        };
        assert!(
            authorizer
                .decide_with::<Create>(&device, "Observation", &own)
                .is_ok()
        );
        assert!(
            authorizer.decide::<Create>(&device, "Observation").is_err(),
            "another device's observation"
        );
        assert!(authorizer.decide::<Read>(&device, "Patient").is_err());
    }
}
