//! Keyed blind index: HMAC-SHA-256 tokens for values that must be searchable but may carry PHI,
//! with normalization (case, accents, whitespace) and word-prefix tokens for `name=smi` searches.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;
use zeroize::{Zeroize, ZeroizeOnDrop};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the HMAC kept in a token (128 bits: collisions are negligible, rows stay small).
const TOKEN_BYTES: usize = 16;

/// The longest prefix (in characters) that gets its own token; longer words still match exactly.
pub const MAX_PREFIX_CHARACTERS: usize = 16;

/// The longest substring of a word that gets its own `:contains` token. Longer searches look up
/// every window of this length (all must be present).
pub const CONTAINS_WINDOW: usize = 4;

/// The HMAC key of the blind index. Wrapped by the master key like patient keys.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct BlindIndexKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for BlindIndexKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BlindIndexKey(********)")
    }
}

/// Computes blind-index tokens. Every token is domain-separated by the field it belongs to, so
/// equal values in different fields cannot be linked.
#[derive(Debug, Clone)]
pub struct BlindIndex {
    key: BlindIndexKey,
}

/// How a token was derived; part of the HMAC input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Exact,
    WordPrefix,
    Pseudonym,
    Verbatim,
    Substring,
}

impl BlindIndex {
    pub fn new(key: BlindIndexKey) -> Self {
        Self { key }
    }

    /// The token for the whole normalized value (FHIR `:exact`-style equality after normalization).
    pub fn exact(&self, field: &str, value: &str) -> String {
        self.token(TokenKind::Exact, field, &normalize(value))
    }

    /// The token a search for `prefix` looks up among [`Self::word_prefix_tokens`].
    pub fn prefix_query(&self, field: &str, prefix: &str) -> String {
        let normalized = normalize(prefix);
        let bounded: String = normalized.chars().take(MAX_PREFIX_CHARACTERS).collect();
        self.token(TokenKind::WordPrefix, field, &bounded)
    }

    /// Tokens for every prefix of every word of `value` (and of the whole value), so a search for
    /// the start of any word finds it. Deduplicated.
    pub fn word_prefix_tokens(&self, field: &str, value: &str) -> Vec<String> {
        let normalized = bounded(normalize(value));
        let mut prefixes: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut add_prefixes_of = |text: &str| {
            let mut prefix = String::new();
            for character in text.chars().take(MAX_PREFIX_CHARACTERS) {
                prefix.push(character);
                prefixes.insert(prefix.clone());
            }
        };
        add_prefixes_of(&normalized);
        for word in normalized.split(' ') {
            add_prefixes_of(word);
        }
        prefixes
            .iter()
            .map(|prefix| self.token(TokenKind::WordPrefix, field, prefix))
            .collect()
    }

    /// The token of a value compared exactly as written (codes, identifiers, references, uris and
    /// `:exact` strings): no normalization at all.
    pub fn verbatim(&self, field: &str, value: &str) -> String {
        self.token(TokenKind::Verbatim, field, value)
    }

    /// Tokens of every substring (up to [`CONTAINS_WINDOW`] characters) of every normalized word
    /// of `value`, for `:contains`. Deduplicated.
    pub fn substring_tokens(&self, field: &str, value: &str) -> Vec<String> {
        let normalized = bounded(normalize(value));
        let mut substrings: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for word in normalized.split(' ') {
            let characters: Vec<char> = word.chars().collect();
            for start in 0..characters.len() {
                let longest = CONTAINS_WINDOW.min(characters.len() - start);
                for length in 1..=longest {
                    substrings.insert(characters[start..start + length].iter().collect());
                }
            }
        }
        substrings
            .iter()
            .map(|substring| self.token(TokenKind::Substring, field, substring))
            .collect()
    }

    /// The tokens a `:contains` search for `text` requires (all of them): each word of the search
    /// itself, or, for a word longer than [`CONTAINS_WINDOW`], each of its windows.
    pub fn substring_query(&self, field: &str, text: &str) -> Vec<String> {
        let normalized = normalize(text);
        let mut required = Vec::new();
        for word in normalized.split(' ').filter(|word| !word.is_empty()) {
            let characters: Vec<char> = word.chars().collect();
            if characters.len() <= CONTAINS_WINDOW {
                required.push(self.token(TokenKind::Substring, field, word));
                continue;
            }
            for window in characters.windows(CONTAINS_WINDOW) {
                let substring: String = window.iter().collect();
                required.push(self.token(TokenKind::Substring, field, &substring));
            }
        }
        required.sort_unstable();
        required.dedup();
        required
    }

    /// Tokens of each normalized word of `value` (for `:text`, which matches whole words).
    pub fn word_tokens(&self, field: &str, value: &str) -> Vec<String> {
        let normalized = normalize(value);
        let mut words: Vec<&str> = normalized
            .split(|character: char| !character.is_alphanumeric())
            .filter(|word| !word.is_empty())
            .collect();
        words.sort_unstable();
        words.dedup();
        words
            .iter()
            .map(|word| self.token(TokenKind::Exact, field, word))
            .collect()
    }

    /// A stable pseudonym for an identifier (e.g. a patient id) that appears in keys and audit
    /// leaves instead of the identifier itself. Not normalized: identifiers are exact.
    pub fn pseudonym(&self, namespace: &str, identifier: &str) -> String {
        self.token(TokenKind::Pseudonym, namespace, identifier)
    }

    fn token(&self, kind: TokenKind, field: &str, normalized_value: &str) -> String {
        let mut mac = match HmacSha256::new_from_slice(&self.key.0) {
            Ok(mac) => mac,
            Err(_) => unreachable_hmac_key(),
        };
        let kind_tag: &[u8] = match kind {
            TokenKind::Exact => b"exact",
            TokenKind::WordPrefix => b"prefix",
            TokenKind::Pseudonym => b"pseudonym",
            TokenKind::Verbatim => b"verbatim",
            TokenKind::Substring => b"substring",
        };
        for part in [kind_tag, field.as_bytes(), normalized_value.as_bytes()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        let digest = mac.finalize().into_bytes();
        hex::encode(&digest[..TOKEN_BYTES])
    }
}

/// HMAC accepts keys of any length, so this cannot happen; kept out of line for clarity.
#[cold]
pub(crate) fn unreachable_hmac_key() -> ! {
    panic!("hmac-sha256 accepts keys of any length")
}

/// The most characters of one value that get prefix and substring tokens; a longer value (a
/// pasted note in a string element) is still found by its beginning and by `:exact`.
pub const MAX_INDEXED_CHARACTERS: usize = 256;

fn bounded(normalized: String) -> String {
    if normalized.chars().count() <= MAX_INDEXED_CHARACTERS {
        return normalized;
    }
    normalized.chars().take(MAX_INDEXED_CHARACTERS).collect()
}

/// Case-folds, strips accents (NFKD without combining marks), and collapses whitespace.
pub fn normalize(value: &str) -> String {
    let folded: String = value
        .nfkd()
        .filter(|character| !is_combining_mark(*character))
        .collect::<String>()
        .to_lowercase();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> BlindIndex {
        BlindIndex::new(BlindIndexKey([7u8; 32]))
    }

    #[test]
    fn normalization_ignores_case_accents_and_spacing() {
        assert_eq!(normalize("  José   ÁLVAREZ "), "jose alvarez");
        assert_eq!(
            index().exact("name", "José Álvarez"),
            index().exact("name", "jose  alvarez")
        );
    }

    #[test]
    fn a_prefix_of_any_word_matches() {
        let tokens = index().word_prefix_tokens("name", "John Smith");
        assert!(tokens.contains(&index().prefix_query("name", "smi")));
        assert!(tokens.contains(&index().prefix_query("name", "Jo")));
        assert!(!tokens.contains(&index().prefix_query("name", "mith")));
    }

    #[test]
    fn contains_finds_any_part_of_a_word() {
        let tokens = index().substring_tokens("name", "Maximilian Smith");
        for query in ["xim", "MITH", "imilia", "maximilian"] {
            let required = index().substring_query("name", query);
            assert!(
                required.iter().all(|token| tokens.contains(token)),
                "{query}"
            );
        }
        let required = index().substring_query("name", "mithx");
        assert!(!required.iter().all(|token| tokens.contains(token)));
    }

    #[test]
    fn fields_are_separated_and_keys_matter() {
        assert_ne!(
            index().exact("name", "smith"),
            index().exact("address", "smith")
        );
        let other = BlindIndex::new(BlindIndexKey([8u8; 32]));
        assert_ne!(index().exact("name", "smith"), other.exact("name", "smith"));
        assert!(!index().exact("name", "smith").contains("smith"));
    }
}
