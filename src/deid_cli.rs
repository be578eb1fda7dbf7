//! `glastonbury deid dicom IN OUT [--profile P] [--key-file F]`: offline PS3.15 de-identification
//! of a DICOM file or a folder of them into a new file or folder (the input is only read),
//! in parallel, with a progress line on a terminal.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use glastonbury_dicom::deidentify::{
    DeidentificationError, DeidentificationKey, Profile, deidentify,
};

/// The named profile of `policies_dir/deidentification.toml` (or of the built-in file).
pub fn load_profile(policies_dir: Option<&Path>, name: &str) -> anyhow::Result<Profile> {
    let policies =
        glastonbury::access::deidentification::DeidentificationPolicies::load(policies_dir)?;
    let file = policies.current();
    let known: Vec<&str> = file.profiles.keys().map(String::as_str).collect();
    file.profile(name)
        .cloned()
        .with_context(|| format!("no profile {name:?} (known: {})", known.join(", ")))
}

/// The key: read from a file (64 hex characters, so the same UIDs map the same way across
/// runs), or fresh for this run.
fn load_key(key_file: Option<&Path>) -> anyhow::Result<DeidentificationKey> {
    let Some(path) = key_file else {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        return Ok(DeidentificationKey::new(bytes));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bytes = hex::decode(text.trim()).context("the key file must hold 64 hex characters")?;
    let array: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("the key file must hold 64 hex characters"))?;
    Ok(DeidentificationKey::new(array))
}

/// What a run did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub deidentified: usize,
    pub skipped_not_dicom: usize,
    pub refused: Vec<String>,
    pub seconds: f64,
}

pub fn run(
    input: &Path,
    output: &Path,
    profile: &Profile,
    key_file: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let key = load_key(key_file)?;
    let jobs = plan(input, output)?;
    let started = std::time::Instant::now();
    let done = AtomicUsize::new(0);
    let summary = Mutex::new(Summary::default());
    let progress = std::io::stderr().is_terminal() && !json;
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some((source, target)) = jobs.get(index) else {
                        break;
                    };
                    let outcome = one_file(source, target, profile, &key);
                    if let Ok(mut summary) = summary.lock() {
                        match outcome {
                            Ok(true) => summary.deidentified += 1,
                            Ok(false) => summary.skipped_not_dicom += 1,
                            Err(reason) => summary
                                .refused
                                .push(format!("{}: {reason}", source.display())),
                        }
                    }
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if progress {
                        eprint!("\r{finished}/{} files", jobs.len());
                        let _ = std::io::stderr().flush();
                    }
                }
            });
        }
    });
    if progress {
        eprintln!();
    }
    let mut summary = summary.into_inner().unwrap_or_default();
    summary.seconds = started.elapsed().as_secs_f64();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{} de-identified, {} not DICOM (skipped), {} refused, in {:.2} s",
            summary.deidentified,
            summary.skipped_not_dicom,
            summary.refused.len(),
            summary.seconds
        );
        for refusal in &summary.refused {
            eprintln!("refused: {refusal}");
        }
    }
    if !summary.refused.is_empty() {
        bail!("{} files were not de-identified", summary.refused.len());
    }
    Ok(())
}

/// `(source, target)` pairs: one file, or every file of a folder mirrored under the output.
fn plan(input: &Path, output: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let input = input
        .canonicalize()
        .with_context(|| format!("cannot read {}", input.display()))?;
    if output.exists() && output.canonicalize()? == input {
        bail!("the output must differ from the input (the input is never modified)");
    }
    if input.is_file() {
        if output.is_dir() {
            let name = input.file_name().context("the input has no file name")?;
            return Ok(vec![(input.clone(), output.join(name))]);
        }
        return Ok(vec![(input, output.to_path_buf())]);
    }
    if output.starts_with(&input)
        || output
            .canonicalize()
            .is_ok_and(|out| out.starts_with(&input))
    {
        bail!("the output folder may not be inside the input folder");
    }
    let mut jobs = Vec::new();
    let mut pending = vec![input.clone()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder)
            .with_context(|| format!("cannot read {}", folder.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path.strip_prefix(&input)?.to_path_buf();
            jobs.push((path, output.join(relative)));
        }
    }
    jobs.sort();
    Ok(jobs)
}

/// `Ok(false)` for a file that is not DICOM Part 10 (left alone).
fn one_file(
    source: &Path,
    target: &Path,
    profile: &Profile,
    key: &DeidentificationKey,
) -> Result<bool, String> {
    let bytes = std::fs::read(source).map_err(|error| error.to_string())?;
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Ok(false);
    }
    let deidentified = match deidentify(&bytes, profile, key) {
        Ok(deidentified) => deidentified,
        Err(DeidentificationError::Unreadable) => return Ok(false),
        Err(error) => return Err(error.to_string()),
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|error| error.to_string())?;
    }
    std::fs::write(target, &deidentified.part10).map_err(|error| error.to_string())?;
    Ok(true)
}
