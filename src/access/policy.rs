//! Authorization as code: the Cedar policy set (`policies/*.cedar` validated against
//! `policies/schema.cedarschema`), loaded at start and reloaded on SIGHUP. A set that does not
//! parse or validate is refused with its errors and the one in force stays.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use cedar_policy::{
    Authorizer as CedarAuthorizer, Context, Decision, Entities, Entity, EntityUid, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use super::{Principal, Role};

/// The policies that ship with the appliance (used when no policy folder is configured).
const DEFAULT_POLICIES: &str = include_str!("../../policies/glastonbury.cedar");
const DEFAULT_SCHEMA: &str = include_str!("../../policies/schema.cedarschema");

/// The id given to decisions no policy took part in.
pub const DEFAULT_DENY: &str = "default-deny";

/// Why a policy set was refused. The message names the file and the problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy set refused: {0}")]
pub struct PolicyError(pub String);

/// One request to decide.
#[derive(Debug, Clone)]
pub struct PolicyQuestion<'a> {
    pub principal: &'a Principal,
    /// `create`, `read`, `update`, `delete`, `search` or `readAudit`.
    pub action: &'a str,
    /// A FHIR resource type, or `None` for the audit journal.
    pub resource_type: Option<&'a str>,
    pub scopes_permit: bool,
    pub break_glass: bool,
    /// The data written names the caller itself (a device's own observation).
    pub concerns_caller: bool,
    /// The caller would receive only the Safe Harbor de-identified view of what it reads.
    pub deidentified: bool,
}

/// The answer: allowed or not, and the ids of the policies that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyAnswer {
    pub allowed: bool,
    pub decided_by: Vec<String>,
}

/// A parsed, validated policy set with its policy ids resolved to their `@id` annotations, and
/// the decisions it has made so far.
#[derive(Debug)]
struct LoadedPolicies {
    policies: PolicySet,
    schema: Schema,
    names: HashMap<String, String>,
    decisions: DecisionMemo,
}

/// Everything a decision depends on: the same question to the same policy set always gets the
/// same answer, so it is evaluated once. A modality's association asks "may this AE create
/// ImagingStudy" for every instance it sends; Cedar's evaluation of it cost about 5% of the
/// server's CPU under C-STORE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DecisionKey {
    caller_id: String,
    role: Role,
    purpose_of_use: Option<String>,
    action: String,
    resource_type: Option<String>,
    scopes_permit: bool,
    break_glass: bool,
    concerns_caller: bool,
    deidentified: bool,
}

impl DecisionKey {
    fn of(question: &PolicyQuestion<'_>) -> Self {
        Self {
            caller_id: question.principal.id.clone(),
            role: question.principal.role,
            purpose_of_use: question.principal.purpose_of_use.clone(),
            action: question.action.to_owned(),
            resource_type: question.resource_type.map(str::to_owned),
            scopes_permit: question.scopes_permit,
            break_glass: question.break_glass,
            concerns_caller: question.concerns_caller,
            deidentified: question.deidentified,
        }
    }
}

/// The answers a policy set gave, by question. It belongs to one loaded set, so a reload starts
/// with none; it forgets everything when it reaches [`DecisionMemo::CAPACITY`] answers (callers
/// are few, their questions fewer).
#[derive(Debug, Default)]
struct DecisionMemo {
    answers: Mutex<HashMap<DecisionKey, PolicyAnswer>>,
}

impl DecisionMemo {
    const CAPACITY: usize = 16_384;

    fn answer(&self, key: &DecisionKey) -> Option<PolicyAnswer> {
        self.answers.lock().ok()?.get(key).cloned()
    }

    fn remember(&self, key: DecisionKey, answer: &PolicyAnswer) {
        let Ok(mut answers) = self.answers.lock() else {
            return;
        };
        if answers.len() >= Self::CAPACITY {
            answers.clear();
        }
        answers.insert(key, answer.clone());
    }
}

/// The policy set in force; swapped atomically on reload.
#[derive(Debug)]
pub struct PolicyStore {
    folder: Option<PathBuf>,
    current: RwLock<Arc<LoadedPolicies>>,
}

impl PolicyStore {
    /// Loads the policies of `folder` (every `*.cedar` plus `schema.cedarschema`), or the
    /// built-in defaults when `folder` is `None`.
    pub fn load(folder: Option<&Path>) -> Result<Self, PolicyError> {
        let loaded = load_policies(folder)?;
        Ok(Self {
            folder: folder.map(Path::to_path_buf),
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    /// Re-reads the folder. On error the previous set stays in force and the error is returned.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let loaded = load_policies(self.folder.as_deref())?;
        let count = loaded.policies.policies().count();
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        *current = Arc::new(loaded);
        Ok(count)
    }

    /// Decides one question. Anything that cannot be evaluated is a denial (and is evaluated
    /// again the next time it is asked).
    pub fn decide(&self, question: &PolicyQuestion<'_>) -> PolicyAnswer {
        let loaded = Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        let key = DecisionKey::of(question);
        if let Some(answer) = loaded.decisions.answer(&key) {
            return answer;
        }
        match evaluate(&loaded, question) {
            Ok(answer) => {
                loaded.decisions.remember(key, &answer);
                answer
            }
            Err(error) => {
                tracing::error!(error = %error, "policy evaluation failed; denying");
                PolicyAnswer {
                    allowed: false,
                    decided_by: vec![DEFAULT_DENY.to_owned()],
                }
            }
        }
    }
}

fn load_policies(folder: Option<&Path>) -> Result<LoadedPolicies, PolicyError> {
    let (sources, schema_text) = match folder {
        None => (
            vec![("glastonbury.cedar".to_owned(), DEFAULT_POLICIES.to_owned())],
            DEFAULT_SCHEMA.to_owned(),
        ),
        Some(folder) => read_folder(folder)?,
    };
    let (schema, _warnings) = Schema::from_cedarschema_str(&schema_text)
        .map_err(|error| PolicyError(format!("schema.cedarschema: {error}")))?;
    let mut policies = PolicySet::new();
    let mut names = HashMap::new();
    let mut seen = HashSet::new();
    for (file, text) in &sources {
        let parsed =
            PolicySet::from_str(text).map_err(|error| PolicyError(format!("{file}: {error}")))?;
        for policy in parsed.policies() {
            let Some(name) = policy.annotation("id").map(str::to_owned) else {
                return Err(PolicyError(format!(
                    "{file}: every policy needs an @id(\"…\") annotation"
                )));
            };
            if !seen.insert(name.clone()) {
                return Err(PolicyError(format!("{file}: duplicate policy id {name:?}")));
            }
            let renamed = policy.new_id(cedar_policy::PolicyId::new(&name));
            names.insert(renamed.id().to_string(), name);
            policies
                .add(renamed)
                .map_err(|error| PolicyError(format!("{file}: {error}")))?;
        }
    }
    let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
    if !validation.validation_passed() {
        let errors: Vec<String> = validation
            .validation_errors()
            .map(|error| error.to_string())
            .collect();
        return Err(PolicyError(format!(
            "policies do not match the schema: {}",
            errors.join("; ")
        )));
    }
    Ok(LoadedPolicies {
        policies,
        schema,
        names,
        decisions: DecisionMemo::default(),
    })
}

fn read_folder(folder: &Path) -> Result<(Vec<(String, String)>, String), PolicyError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|error| PolicyError(format!("{}: {error}", path.display())))
    };
    let entries = std::fs::read_dir(folder)
        .map_err(|error| PolicyError(format!("{}: {error}", folder.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "cedar")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(PolicyError(format!(
            "{}: holds no *.cedar policy file",
            folder.display()
        )));
    }
    let mut sources = Vec::with_capacity(files.len());
    for path in files {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        sources.push((name, read(&path)?));
    }
    let schema = read(&folder.join("schema.cedarschema"))?;
    Ok((sources, schema))
}

fn entity_uid(type_name: &str, id: &str) -> Result<EntityUid, String> {
    let escaped = id.replace('\\', "\\\\").replace('"', "\\\"");
    EntityUid::from_str(&format!("Glastonbury::{type_name}::\"{escaped}\""))
        .map_err(|error| error.to_string())
}

fn evaluate(
    loaded: &LoadedPolicies,
    question: &PolicyQuestion<'_>,
) -> Result<PolicyAnswer, String> {
    let role = question.principal.role;
    let role_uid = entity_uid("Role", role.as_str())?;
    let caller_uid = entity_uid("Caller", &question.principal.id)?;
    let caller = Entity::new(
        caller_uid.clone(),
        HashMap::from([(
            "role".to_owned(),
            RestrictedExpression::new_string(role.as_str().to_owned()),
        )]),
        HashSet::from([role_uid.clone()]),
    )
    .map_err(|error| error.to_string())?;
    let role_entity = Entity::with_uid(role_uid);
    let resource = match question.resource_type {
        Some(resource_type) => entity_uid("ResourceType", resource_type)?,
        None => entity_uid("AuditJournal", "journal")?,
    };
    let entities = Entities::from_entities(
        [caller, role_entity, Entity::with_uid(resource.clone())],
        Some(&loaded.schema),
    )
    .map_err(|error| error.to_string())?;
    let action = entity_uid("Action", question.action)?;
    let context = Context::from_pairs([
        (
            "purpose".to_owned(),
            RestrictedExpression::new_string(
                question
                    .principal
                    .purpose_of_use
                    .clone()
                    .unwrap_or_default(),
            ),
        ),
        (
            "scopesPermit".to_owned(),
            RestrictedExpression::new_bool(question.scopes_permit),
        ),
        (
            "breakGlass".to_owned(),
            RestrictedExpression::new_bool(question.break_glass),
        ),
        (
            "concernsCaller".to_owned(),
            RestrictedExpression::new_bool(question.concerns_caller),
        ),
        (
            "deidentified".to_owned(),
            RestrictedExpression::new_bool(question.deidentified),
        ),
    ])
    .map_err(|error| error.to_string())?;
    let request = Request::new(caller_uid, action, resource, context, Some(&loaded.schema))
        .map_err(|error| error.to_string())?;
    let response = CedarAuthorizer::new().is_authorized(&request, &loaded.policies, &entities);
    let mut decided_by: Vec<String> = response
        .diagnostics()
        .reason()
        .map(|id| {
            loaded
                .names
                .get(&id.to_string())
                .cloned()
                .unwrap_or_else(|| id.to_string())
        })
        .collect();
    decided_by.sort();
    if decided_by.is_empty() {
        decided_by.push(DEFAULT_DENY.to_owned());
    }
    if let Some(error) = response.diagnostics().errors().next() {
        tracing::warn!(error = %error, "a policy failed to evaluate");
    }
    Ok(PolicyAnswer {
        allowed: response.decision() == Decision::Allow,
        decided_by,
    })
}

/// Every role, for the matrix of decisions.
pub const ROLES: [Role; 5] = [
    Role::Clinician,
    Role::Researcher,
    Role::Compliance,
    Role::Device,
    Role::Admin,
];
