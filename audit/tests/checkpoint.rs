//! Signed checkpoints: round trip, tampering, key rotation and key handling.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use glastonbury_audit::{
    Checkpoint, CheckpointError, NoteError, NoteSigner, NoteVerifier, open_note, sign_note,
};

const ORIGIN: &str = "glastonbury.example/audit/appliance-1";

fn checkpoint() -> Checkpoint {
    Checkpoint {
        origin: ORIGIN.to_owned(),
        size: 1234,
        root: [0xab; 32],
    }
}

#[test]
fn sign_and_open_round_trip() {
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let note = checkpoint().sign(&[&signer]).unwrap();
    let body = checkpoint().body();
    assert!(note.starts_with(&body));
    assert!(note[body.len()..].starts_with(&format!("\n\u{2014} {ORIGIN} ")));
    assert_eq!(
        Checkpoint::open(&note, &[signer.verifier()]).unwrap(),
        checkpoint()
    );
}

#[test]
fn tampering_is_rejected() {
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let trusted = [signer.verifier()];
    let note = checkpoint().sign(&[&signer]).unwrap();
    let root_b64 = BASE64.encode([0xab; 32]);
    let other_root = BASE64.encode([0xac; 32]);
    let tampered = [
        note.replacen("1234", "1235", 1),
        note.replacen(&root_b64, &other_root, 1),
        note.replacen(ORIGIN, "glastonbury.example/audit/appliance-2", 1),
    ];
    for bad in &tampered {
        assert!(
            matches!(
                Checkpoint::open(bad, &trusted),
                Err(CheckpointError::Note(NoteError::BadSignature { .. }))
            ),
            "{bad}"
        );
    }
    // Flip one signature character (keep it valid base64 and the key hash intact).
    let sig_start = note.rfind(' ').unwrap() + 1;
    let mut bytes = note.clone().into_bytes();
    let at = sig_start + 20;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    let bad_sig = String::from_utf8(bytes).unwrap();
    assert!(Checkpoint::open(&bad_sig, &trusted).is_err());
    // Structural damage.
    assert!(Checkpoint::open(note.trim_end(), &trusted).is_err());
    assert!(Checkpoint::open(&note.replacen("\n\n", "\n", 1), &trusted).is_err());
    assert!(Checkpoint::open(&note.replace('\u{2014}', "-"), &trusted).is_err());
}

#[test]
fn untrusted_keys_are_rejected_and_unknown_signatures_ignored() {
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let stranger = NoteSigner::generate("someone.else/log").unwrap();
    let note = checkpoint().sign(&[&stranger, &signer]).unwrap();
    assert_eq!(
        Checkpoint::open(&note, &[stranger.verifier()]).unwrap(),
        checkpoint(),
        "a trusted key among unknown ones verifies"
    );
    let only_stranger = checkpoint().sign(&[&stranger]).unwrap();
    assert_eq!(
        Checkpoint::open(&only_stranger, &[signer.verifier()]),
        Err(CheckpointError::Note(NoteError::Untrusted))
    );
    // Same name, different key: the key hash differs, so the signature is not "by" the trusted key.
    let impostor = NoteSigner::generate(ORIGIN).unwrap();
    let forged = checkpoint().sign(&[&impostor]).unwrap();
    assert!(Checkpoint::open(&forged, &[signer.verifier()]).is_err());
}

#[test]
fn key_rotation_with_two_signatures() {
    let old = NoteSigner::generate(ORIGIN).unwrap();
    let new = NoteSigner::generate(ORIGIN).unwrap();
    let note = checkpoint().sign(&[&old, &new]).unwrap();
    assert_eq!(note.matches('\u{2014}').count(), 2);
    assert_eq!(
        Checkpoint::open(&note, &[old.verifier()]).unwrap(),
        checkpoint()
    );
    assert_eq!(
        Checkpoint::open(&note, &[new.verifier()]).unwrap(),
        checkpoint()
    );
    let both = open_note(&note, &[old.verifier(), new.verifier()]).unwrap();
    assert_eq!(both.verified_by.len(), 2);
    // One trusted key with a broken signature fails the whole note.
    let last = note.lines().last().unwrap();
    let broken = note.replace(last, &corrupt_signature_line(last));
    assert!(matches!(
        open_note(&broken, &[old.verifier(), new.verifier()]),
        Err(NoteError::BadSignature { .. })
    ));
    assert!(
        open_note(&broken, &[old.verifier()]).is_ok(),
        "only the new key's signature broke"
    );
}

/// Flips one bit of the Ed25519 signature in a signature line, keeping the key hash.
fn corrupt_signature_line(line: &str) -> String {
    let (prefix, encoded) = line.rsplit_once(' ').expect("signature line");
    let mut raw = BASE64.decode(encoded).expect("signature base64");
    raw[10] ^= 1;
    format!("{prefix} {}", BASE64.encode(raw))
}

#[test]
fn keys_parse_and_never_print_secrets() {
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let secret = signer.to_key_text();
    let restored = NoteSigner::from_key_text(&secret).unwrap();
    let note = sign_note("hello\n", &[&restored]).unwrap();
    let verifier = NoteVerifier::from_key_text(&signer.verifier().to_key_text()).unwrap();
    assert_eq!(open_note(&note, &[verifier]).unwrap().body, "hello\n");
    // The whole base64 field: base64 may itself contain '+', and a short tail after the last
    // one could occur in the printed key hash by chance.
    let seed_part = secret.splitn(5, '+').nth(4).unwrap();
    assert!(!format!("{signer:?}").contains(seed_part));
    assert!(NoteSigner::from_key_text(&secret.replacen("PRIVATE+KEY+", "", 1)).is_err());
    assert!(NoteVerifier::from_key_text("bad name+00000000+AQ==").is_err());
    let public = signer.verifier().to_key_text();
    let wrong_hash = format!("{ORIGIN}+00000000+{}", public.rsplit('+').next().unwrap());
    assert!(NoteVerifier::from_key_text(&wrong_hash).is_err());
    assert!(NoteSigner::generate("has space").is_err());
    assert!(NoteSigner::generate("has+plus").is_err());
}

#[test]
fn malformed_notes_never_panic() {
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let trusted = [signer.verifier()];
    for text in [
        "",
        "\n",
        "\n\n",
        "a\n\n",
        "a\n\n\u{2014} x \n",
        "a\n\n\u{2014} x AAAA\n",
        "a\u{1}\n\n",
    ] {
        assert!(open_note(text, &trusted).is_err(), "{text:?}");
    }
    assert!(sign_note("no newline", &[&signer]).is_err());
    assert!(sign_note("blank\n\nline\n", &[&signer]).is_err());
}
