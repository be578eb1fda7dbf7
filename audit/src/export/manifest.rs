//! The export manifest: a signed note binding the selection (which leaf indexes the export
//! must contain) and the query description to the checkpoint.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::hash::Hash;

/// First line of every manifest body.
pub(crate) const MANIFEST_TAG: &str = "glastonbury-audit-export-manifest/v1";

/// Parsed manifest body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) origin: String,
    pub(crate) size: u64,
    pub(crate) root: Hash,
    /// One-line description of the query that selected the entries (no PHI).
    pub(crate) query: String,
    /// Maximal runs of selected indexes, inclusive bounds, increasing and non-adjacent.
    pub(crate) runs: Vec<(u64, u64)>,
    /// The leaf hash of every selected entry, in selection order: a changed entry is named
    /// exactly, even inside a range proof's window.
    pub(crate) leaf_hashes: Vec<Hash>,
}

impl Manifest {
    /// The note body.
    pub(crate) fn body(&self) -> String {
        let selection = if self.runs.is_empty() {
            "none".to_owned()
        } else {
            let items: Vec<String> = self.runs.iter().map(|run| format_run(*run)).collect();
            items.join(",")
        };
        let leaves: Vec<u8> = self.leaf_hashes.iter().flatten().copied().collect();
        format!(
            "{MANIFEST_TAG}\n{}\n{}\n{}\nquery {}\nselection {}\nleaves {}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root),
            self.query,
            selection,
            BASE64.encode(leaves)
        )
    }

    /// Parses a note body written by [`Manifest::body`].
    pub(crate) fn parse(body: &str) -> Result<Self, &'static str> {
        let lines: Vec<&str> = body.split_terminator('\n').collect();
        let [tag, origin, size, root, query, selection, leaves] = lines.as_slice() else {
            return Err("expected seven lines");
        };
        if *tag != MANIFEST_TAG {
            return Err("unknown manifest version");
        }
        let size = parse_number(size).ok_or("bad size line")?;
        let root = BASE64.decode(root).map_err(|_| "bad root line")?;
        let root = Hash::try_from(root.as_slice()).map_err(|_| "bad root line")?;
        let query = query.strip_prefix("query ").ok_or("bad query line")?;
        let selection = selection
            .strip_prefix("selection ")
            .ok_or("bad selection line")?;
        let leaves = leaves.strip_prefix("leaves ").ok_or("bad leaves line")?;
        let leaves = BASE64.decode(leaves).map_err(|_| "bad leaves line")?;
        if leaves.len() % 32 != 0 {
            return Err("bad leaves line");
        }
        let leaf_hashes = leaves
            .chunks_exact(32)
            .map(|chunk| Hash::try_from(chunk).map_err(|_| "bad leaves line"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            origin: (*origin).to_owned(),
            size,
            root,
            query: query.to_owned(),
            runs: parse_selection(selection)?,
            leaf_hashes,
        })
    }
}

fn format_run((first, last): (u64, u64)) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// A canonical decimal number (no sign, no leading zeros).
fn parse_number(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical { text.parse().ok() } else { None }
}

fn parse_selection(text: &str) -> Result<Vec<(u64, u64)>, &'static str> {
    if text == "none" {
        return Ok(Vec::new());
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for item in text.split(',') {
        let run = match item.split_once('-') {
            Some((first, last)) => (parse_number(first), parse_number(last)),
            None => (parse_number(item), parse_number(item)),
        };
        let (Some(first), Some(last)) = run else {
            return Err("bad selection item");
        };
        let after_previous = runs
            .last()
            .is_none_or(|(_, prev)| *prev < first && first - prev > 1);
        if first > last || !after_previous {
            return Err("selection is not increasing");
        }
        runs.push((first, last));
    }
    Ok(runs)
}

/// Groups increasing indexes into maximal runs.
pub(crate) fn runs_of(indexes: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for index in indexes {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(index) => *last = index,
            _ => runs.push((index, index)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trip() {
        let manifest = Manifest {
            origin: "o".into(),
            size: 100,
            root: [1; 32],
            query: "patient=p-1".into(),
            runs: runs_of([1, 2, 3, 7, 9, 10]),
            leaf_hashes: vec![[3; 32]; 6],
        };
        assert_eq!(manifest.runs, vec![(1, 3), (7, 7), (9, 10)]);
        let body = manifest.body();
        assert!(body.contains("\nselection 1-3,7,9-10\nleaves "));
        assert_eq!(Manifest::parse(&body).unwrap(), manifest);
        assert!(parse_selection("3,2").is_err());
        assert!(parse_selection("1-2,3").is_err());
        assert!(parse_selection("01").is_err());
        assert_eq!(parse_selection("none").unwrap(), vec![]);
    }
}
