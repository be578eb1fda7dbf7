//! Throughput benchmark for the audit crate (run with `cargo bench -p glastonbury-audit`):
//! appends, proof generation and verification, leaf encoding, and building + verifying
//! exports of 1,000,000 contiguous and 10,000 sparse entries from a 1M-leaf tree.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::hint::black_box;
use std::time::{Duration, Instant};

use glastonbury_audit::{
    AUDIT_EVENT_SCHEMA, AuditAction, AuditAgent, AuditEntity, AuditEvent, AuditOutcome,
    CompactRange, Export, ExportEntryInput, ExportRequest, Hash, MemoryNodeStore, NoteSigner,
    build_export, canonical_json, codes, consistency_proof, inclusion_proof, leaf_hash, root_at,
    verify_consistency, verify_export, verify_inclusion,
};

const TREE_SIZE: u64 = 1_000_000;
const PROOFS: u64 = 100_000;
const SPARSE: usize = 10_000;
const ORIGIN: &str = "glastonbury.example/audit/bench";

/// Deterministic xorshift64* so runs are comparable without an RNG dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}

fn rate(count: u64, elapsed: Duration) -> String {
    let per_second = count as f64 / elapsed.as_secs_f64();
    if per_second >= 1e6 {
        format!("{:.2} M/s", per_second / 1e6)
    } else {
        format!("{:.1} k/s", per_second / 1e3)
    }
}

fn report(label: &str, count: u64, elapsed: Duration) {
    println!(
        "{label:<48} {:>12}  ({count} in {:.3} s)",
        rate(count, elapsed),
        elapsed.as_secs_f64()
    );
}

fn event(index: u64) -> AuditEvent {
    AuditEvent {
        schema: AUDIT_EVENT_SCHEMA.to_owned(),
        event_type: codes::REST.coding(),
        subtypes: vec![codes::READ.coding()],
        action: AuditAction::Read,
        recorded: format!("2025-03-01T10:{:02}:{:02}Z", index / 60 % 60, index % 60),
        outcome: AuditOutcome::Success,
        outcome_reason: None,
        purpose_of_use: vec![codes::TREATMENT.coding()],
        agents: vec![AuditAgent {
            who: format!("user-{}", index % 97),
            requestor: true,
            roles: vec![],
            network_address: Some("10.1.2.3".to_owned()),
            token_id: Some(format!("jti-{index}")),
        }],
        source: "appliance-1".to_owned(),
        entities: vec![AuditEntity {
            resource_type: Some("Observation".to_owned()),
            resource_id: Some(format!("obs-{index}")),
            patient_pseudonym: Some(format!("p-{}", index % 1013)),
            ..AuditEntity::default()
        }],
        request_id: Some(format!("req-{index}")),
        policy_ids: vec!["clinician-read".to_owned()],
        break_glass: false,
        sealed_detail: None,
    }
}

fn encode_leaves() -> Vec<Vec<u8>> {
    let mut leaves = Vec::with_capacity(TREE_SIZE as usize);
    let (mut to_value, mut canonical) = (Duration::ZERO, Duration::ZERO);
    for chunk_start in (0..TREE_SIZE).step_by(100_000) {
        let events: Vec<AuditEvent> = (chunk_start..chunk_start + 100_000).map(event).collect();
        let start = Instant::now();
        let values: Vec<serde_json::Value> = events
            .iter()
            .map(|e| serde_json::to_value(e).expect("to value"))
            .collect();
        to_value += start.elapsed();
        let start = Instant::now();
        leaves.extend(values.iter().map(|v| canonical_json(v).expect("canonical")));
        canonical += start.elapsed();
    }
    report(
        "leaf encoding: AuditEvent -> serde_json::Value",
        TREE_SIZE,
        to_value,
    );
    report(
        "leaf encoding: canonical_json (RFC 8785)",
        TREE_SIZE,
        canonical,
    );
    let average = leaves.iter().map(Vec::len).sum::<usize>() / leaves.len();
    println!("{:<48} {average:>10} B", "average leaf size");
    leaves
}

fn build_tree(leaves: &[Vec<u8>]) -> (Vec<Hash>, MemoryNodeStore, CompactRange) {
    let start = Instant::now();
    let hashes: Vec<Hash> = leaves.iter().map(|leaf| leaf_hash(leaf)).collect();
    report("leaf hashing", TREE_SIZE, start.elapsed());

    let start = Instant::now();
    let mut range = CompactRange::new();
    let mut nodes = Vec::with_capacity(2 * hashes.len());
    for hash in &hashes {
        range.append(*hash, &mut nodes).expect("append");
    }
    report(
        "compact-range appends (leaf hash given)",
        TREE_SIZE,
        start.elapsed(),
    );

    let start = Instant::now();
    let mut batched = CompactRange::new();
    let mut node_count = 0usize;
    for chunk in hashes.chunks(256) {
        node_count += batched.append_batch(chunk).expect("batch").nodes.len();
    }
    report(
        "batched appends (256 per group commit)",
        TREE_SIZE,
        start.elapsed(),
    );
    assert_eq!(node_count, nodes.len());
    assert_eq!(batched.root(), range.root());

    let mut store = MemoryNodeStore::new();
    store.extend(&nodes).expect("store");
    (hashes, store, range)
}

fn bench_proofs(hashes: &[Hash], store: &MemoryNodeStore) {
    let root = root_at(store, TREE_SIZE).expect("root");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let indexes: Vec<u64> = (0..PROOFS).map(|_| rng.below(TREE_SIZE)).collect();

    let start = Instant::now();
    let proofs: Vec<Vec<Hash>> = indexes
        .iter()
        .map(|&index| inclusion_proof(store, index, TREE_SIZE).expect("proof"))
        .collect();
    report(
        "inclusion proof generation (1M tree)",
        PROOFS,
        start.elapsed(),
    );

    let start = Instant::now();
    for (index, proof) in indexes.iter().zip(&proofs) {
        verify_inclusion(&hashes[*index as usize], *index, TREE_SIZE, proof, &root)
            .expect("inclusion verifies");
    }
    report(
        "inclusion proof verification (1M tree)",
        PROOFS,
        start.elapsed(),
    );

    let sizes: Vec<u64> = (0..PROOFS / 10)
        .map(|_| 1 + rng.below(TREE_SIZE - 1))
        .collect();
    let roots: Vec<Hash> = sizes
        .iter()
        .map(|&size| root_at(store, size).expect("root"))
        .collect();
    let start = Instant::now();
    let consistency: Vec<Vec<Hash>> = sizes
        .iter()
        .map(|&size| consistency_proof(store, size, TREE_SIZE).expect("proof"))
        .collect();
    report(
        "consistency proof generation (to 1M)",
        sizes.len() as u64,
        start.elapsed(),
    );
    let start = Instant::now();
    for ((size, old_root), proof) in sizes.iter().zip(&roots).zip(&consistency) {
        verify_consistency(*size, TREE_SIZE, old_root, &root, proof).expect("consistent");
    }
    report(
        "consistency proof verification (to 1M)",
        sizes.len() as u64,
        start.elapsed(),
    );
}

fn request(leaves: &[Vec<u8>], indexes: &[u64]) -> ExportRequest {
    ExportRequest {
        origin: ORIGIN.to_owned(),
        tree_size: TREE_SIZE,
        query: "bench".to_owned(),
        entries: indexes
            .iter()
            .map(|&index| ExportEntryInput {
                index,
                leaf: leaves[index as usize].clone(),
                detail: None,
            })
            .collect(),
        previous_checkpoint: None,
    }
}

fn bench_export(
    label: &str,
    leaves: &[Vec<u8>],
    indexes: &[u64],
    store: &MemoryNodeStore,
    signer: &NoteSigner,
) {
    let request = request(leaves, indexes);
    let start = Instant::now();
    let export = build_export(request, store, signer).expect("export builds");
    let built = start.elapsed();

    let start = Instant::now();
    let json = serde_json::to_vec(&export).expect("serialize");
    let serialized = start.elapsed();
    let start = Instant::now();
    let parsed: Export = serde_json::from_slice(&json).expect("parse");
    let parsed_in = start.elapsed();

    let start = Instant::now();
    let summary = verify_export(&parsed, &[signer.verifier()], None).expect("export verifies");
    let verified = start.elapsed();
    black_box(&summary);
    println!(
        "export {label}: build {:.3} s, verify {:.3} s, json {:.1} MB (write {:.3} s, parse {:.3} s), {} range + {} inclusion proofs",
        built.as_secs_f64(),
        verified.as_secs_f64(),
        json.len() as f64 / 1e6,
        serialized.as_secs_f64(),
        parsed_in.as_secs_f64(),
        summary.range_proofs,
        summary.inclusion_proofs,
    );
}

fn main() {
    println!("glastonbury-audit benchmark (tree of {TREE_SIZE} leaves)");
    let leaves = encode_leaves();
    let (hashes, store, range) = build_tree(&leaves);
    assert_eq!(root_at(&store, TREE_SIZE).expect("root"), range.root());
    bench_proofs(&hashes, &store);

    let signer = NoteSigner::generate(ORIGIN).expect("signer");
    let all: Vec<u64> = (0..TREE_SIZE).collect();
    bench_export("1,000,000 contiguous", &leaves, &all, &store, &signer);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < SPARSE {
        picked.insert(rng.below(TREE_SIZE));
    }
    let sparse: Vec<u64> = picked.into_iter().collect();
    bench_export(
        &format!("{} sparse of 1M", sparse.len()),
        &leaves,
        &sparse,
        &store,
        &signer,
    );
}
