//! `glastonbury audit …`: export, offline verification, fsck, accounting of disclosures, the
//! checkpoint public keys and their rotation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Subcommand, ValueEnum};

use glastonbury::access::{Principal, Role};
use glastonbury::appliance::Appliance;
use glastonbury::config::Settings;
use glastonbury::journal::draft::parse_time_micros;
use glastonbury::journal::export::{build_verified_export, to_csv, to_fhir_bundle};
use glastonbury::journal::query::AuditFilter;
use glastonbury::journal::{disclosures, fsck};
use glastonbury_audit::{Export, NoteVerifier, verify_export};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Write a signed, self-verifying export of the selected entries (details decrypted).
    Export {
        /// Where to write it (created with mode 0600; must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Entries recorded at or after this time (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        from: Option<String>,
        /// Entries recorded before this time (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        to: Option<String>,
        /// Only this patient's entries (their logical id).
        #[arg(long)]
        patient: Option<String>,
        /// Only this user's or client's entries.
        #[arg(long)]
        user: Option<String>,
        /// Only this event type code (e.g. 110110).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only this outcome (0, 4, 8, 12).
        #[arg(long)]
        outcome: Option<i64>,
        /// The previous export, to chain this one to it with a consistency proof.
        #[arg(long)]
        previous: Option<PathBuf>,
        /// json (verifiable), fhir (AuditEvent Bundle) or csv.
        #[arg(long, value_enum, default_value_t = ExportFormat::Json)]
        format: ExportFormat,
    },
    /// Verify an export offline: signatures, every leaf, every proof, the chain to --previous.
    Verify {
        /// The export file.
        file: PathBuf,
        /// A trusted checkpoint key (`origin+hash+key`) or a file of them, one per line.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<String>,
        /// The previous export this one must extend.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
    /// Re-derive the whole tree from the stored entries and compare it with the stored nodes,
    /// the journal head and every signed checkpoint.
    Fsck,
    /// Accounting of disclosures (45 CFR 164.528) for one patient.
    Disclosures {
        /// The patient's logical id.
        #[arg(long)]
        patient: String,
        /// Also list treatment, payment and operations disclosures (exempt from the accounting).
        #[arg(long)]
        all: bool,
    },
    /// Print the checkpoint public key (with --all, every generation's, oldest first).
    PublicKey {
        #[arg(long)]
        all: bool,
    },
    /// Start a new checkpoint signing key; the handover checkpoint is signed by old and new.
    RotateKey,
    /// Sign a checkpoint of the current journal now and print it.
    Checkpoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Json,
    Fhir,
    Csv,
}

pub async fn run(settings: Settings, command: AuditCommand, json: bool) -> anyhow::Result<()> {
    if let AuditCommand::Verify {
        file,
        trusted_keys,
        previous,
    } = &command
    {
        return verify(&settings, file, trusted_keys, previous.as_deref(), json).await;
    }
    let (appliance, _) = Appliance::open(settings)
        .await
        .context("cannot open the appliance")?;
    let result = run_on_appliance(&appliance, command, json).await;
    appliance.close().await;
    result
}

async fn run_on_appliance(
    appliance: &Appliance,
    command: AuditCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        AuditCommand::Export {
            out,
            from,
            to,
            patient,
            user,
            event_type,
            outcome,
            previous,
            format,
        } => {
            let filter = AuditFilter {
                patient_ref: patient
                    .as_deref()
                    .map(|id| appliance.vault.patient_ref(Some(id))),
                agent_id: user,
                since: from.as_deref().map(parse_time).transpose()?,
                until: to.as_deref().map(parse_time).transpose()?,
                event_code: event_type,
                outcome,
            };
            export(appliance, filter, &out, previous.as_deref(), format, json).await
        }
        AuditCommand::Fsck => run_fsck(appliance, json).await,
        AuditCommand::Disclosures { patient, all } => {
            run_disclosures(appliance, &patient, all, json).await
        }
        AuditCommand::PublicKey { all } => {
            let keys = appliance.checkpoints.keys().await?;
            if all {
                for verifier in keys.verifiers() {
                    println!("{}", verifier.to_key_text());
                }
            } else {
                println!("{}", keys.public_key_text());
            }
            Ok(())
        }
        AuditCommand::RotateKey => {
            let keys = appliance.checkpoints.rotate().await?;
            println!(
                "audit signing key generation {} is current: {}",
                keys.generation(),
                keys.public_key_text()
            );
            Ok(())
        }
        AuditCommand::Checkpoint => {
            match appliance.checkpoints.sign_if_grown().await? {
                Some(checkpoint) => print!("{}", checkpoint.note),
                None => println!("the journal is empty"),
            }
            Ok(())
        }
        AuditCommand::Verify { .. } => bail!("verify runs without the appliance"),
    }
}

fn parse_time(text: &str) -> anyhow::Result<i64> {
    parse_time_micros(text).with_context(|| format!("{text:?} is not RFC 3339 or YYYY-MM-DD"))
}

fn compliance_operator() -> Arc<Principal> {
    Arc::new(Principal::local_operator(Role::Compliance, "HOPERAT"))
}

async fn export(
    appliance: &Appliance,
    filter: AuditFilter,
    out: &Path,
    previous: Option<&Path>,
    format: ExportFormat,
    json: bool,
) -> anyhow::Result<()> {
    let previous = previous.map(read_export).transpose()?;
    let access = appliance
        .records
        .authorize_audit_access(&compliance_operator())
        .await?;
    appliance
        .records
        .journal_audit_log_used(
            &access,
            "export",
            &format!("{} format={format:?}", filter.describe()),
            filter.patient_ref.as_deref(),
        )
        .await?;
    let export = build_verified_export(
        &appliance.database,
        &appliance.vault,
        &appliance.checkpoints,
        &filter,
        previous.as_ref(),
    )
    .await?;
    let bytes = match format {
        ExportFormat::Json => serde_json::to_vec_pretty(&export)?,
        ExportFormat::Fhir => serde_json::to_vec_pretty(&to_fhir_bundle(&export))?,
        ExportFormat::Csv => to_csv(&export).into_bytes(),
    };
    crate::write_new_private_file(out, &bytes)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"file": out, "entries": export.entries.len(), "format": format!("{format:?}").to_lowercase()})
        );
    } else {
        println!(
            "wrote {} entries to {} (mode 0600: it holds decrypted audit details)",
            export.entries.len(),
            out.display()
        );
    }
    Ok(())
}

fn read_export(path: &Path) -> anyhow::Result<Export> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a glastonbury audit export", path.display()))
}

async fn verify(
    settings: &Settings,
    file: &Path,
    trusted_keys: &[String],
    previous: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let export = read_export(file)?;
    let previous = previous.map(read_export).transpose()?;
    let verifiers = if trusted_keys.is_empty() {
        local_verifiers(settings).await?
    } else {
        parse_trusted_keys(trusted_keys)?
    };
    let summary = match verify_export(&export, &verifiers, previous.as_ref()) {
        Ok(summary) => summary,
        Err(error) => match error.entry_index() {
            Some(index) => bail!("verification failed at entry {index}: {error}"),
            None => bail!("verification failed: {error}"),
        },
    };
    let root = BASE64.encode(summary.root);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "verified": true, "entries": summary.entries, "tree_size": summary.tree_size,
                "root": root, "signed_by": summary.verified_by, "previous_size": summary.previous_size,
                "query": summary.query,
            })
        );
        return Ok(());
    }
    let chained = summary
        .previous_size
        .map(|size| format!("; consistent with the previous export at size {size}"))
        .unwrap_or_default();
    println!(
        "ok: {} entries verified against checkpoint {} size {} root {} signed by {}{chained}",
        summary.entries,
        summary.origin,
        summary.tree_size,
        root,
        summary.verified_by.join(", ")
    );
    Ok(())
}

/// Trusted keys given as key text, or as files holding key lines.
fn parse_trusted_keys(values: &[String]) -> anyhow::Result<Vec<NoteVerifier>> {
    let mut verifiers = Vec::new();
    for value in values {
        let path = Path::new(value);
        let lines: Vec<String> = if path.is_file() {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_owned)
                .collect()
        } else {
            vec![value.trim().to_owned()]
        };
        for line in lines {
            verifiers.push(
                NoteVerifier::from_key_text(&line)
                    .with_context(|| format!("{line:?} is not a checkpoint public key"))?,
            );
        }
    }
    Ok(verifiers)
}

/// Without --trusted-key: the keys of the appliance on this machine, if there is one.
async fn local_verifiers(settings: &Settings) -> anyhow::Result<Vec<NoteVerifier>> {
    if !settings.data_dir.join("keys/master.key").exists() {
        bail!(
            "no trusted key: pass --trusted-key (print it on the appliance with `glastonbury audit public-key --all`)"
        );
    }
    let (appliance, _) = Appliance::open(settings.clone()).await?;
    let keys = appliance.checkpoints.keys().await?;
    let verifiers = keys.verifiers().to_vec();
    appliance.close().await;
    Ok(verifiers)
}

async fn run_fsck(appliance: &Appliance, json: bool) -> anyhow::Result<()> {
    let keys = appliance.checkpoints.keys().await?;
    let mut connection = appliance.database.pool().acquire().await?;
    let summary = fsck::check(&mut connection, keys.verifiers())
        .await
        .map_err(|failure| anyhow::anyhow!("fsck failed: {failure}"))?;
    let root = BASE64.encode(summary.root);
    if json {
        println!(
            "{}",
            serde_json::json!({"clean": true, "entries": summary.leaves, "nodes_checked": summary.nodes_checked,
                "checkpoints_checked": summary.checkpoints_checked, "root": root})
        );
    } else {
        println!(
            "ok: {} entries, {} stored nodes and {} signed checkpoints agree; root {root}",
            summary.leaves, summary.nodes_checked, summary.checkpoints_checked
        );
    }
    Ok(())
}

async fn run_disclosures(
    appliance: &Appliance,
    patient: &str,
    include_tpo: bool,
    json: bool,
) -> anyhow::Result<()> {
    let access = appliance
        .records
        .authorize_audit_access(&compliance_operator())
        .await?;
    let patient_ref = appliance.vault.patient_ref(Some(patient));
    appliance
        .records
        .journal_audit_log_used(
            &access,
            "disclosures",
            &format!("patient={patient} all={include_tpo}"),
            Some(&patient_ref),
        )
        .await?;
    let mut connection = appliance.database.pool().acquire().await?;
    let list = disclosures::account(&mut connection, &patient_ref, include_tpo).await?;
    if json {
        println!("{}", serde_json::json!({"disclosures": list}));
        return Ok(());
    }
    if list.is_empty() {
        println!("no disclosures on record for this patient");
        return Ok(());
    }
    println!("date\trecipient\tdescription\tpurpose");
    for disclosure in list {
        let recipient = match &disclosure.recipient_name {
            Some(name) => format!("{} ({name})", disclosure.recipient),
            None => disclosure.recipient.clone(),
        };
        println!(
            "{}\t{recipient}\t{}\t{}",
            disclosure.date, disclosure.description, disclosure.purpose
        );
    }
    Ok(())
}
