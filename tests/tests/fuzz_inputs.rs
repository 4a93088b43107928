//! The fuzzers' inputs without the fuzzer: every committed seed (`fuzz/seeds/`) and every
//! input a fuzzer once crashed on (`fuzz/regressions/`) goes through the same entry points as
//! the fuzz targets (`corald::fuzz_entry`). Seeds are valid inputs and must be accepted;
//! regression inputs must no longer panic or break a contract.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use corald::fuzz_entry::{self, Outcome};

const TARGETS: [&str; 4] = ["config", "rpc_params", "probe", "embed_decode"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The seed directory of a target (the decoder shares the probe's audio files).
fn seed_dir(target: &str) -> PathBuf {
    let name = if target == "embed_decode" {
        "probe"
    } else {
        target
    };
    fuzz_dir().join("seeds").join(name)
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs one input; a panic or a contract violation is an `Err` naming the file.
fn run(target: &str, file: &Path) -> Result<Outcome, String> {
    let entry = fuzz_entry::by_target(target).ok_or_else(|| format!("no target {target}"))?;
    let data = fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    match catch_unwind(AssertUnwindSafe(|| entry(&data))) {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(v)) => Err(format!("{target} {}: {v}", file.display())),
        Err(_) => Err(format!("{target} {}: panicked", file.display())),
    }
}

#[test]
fn seeds_are_accepted() {
    let mut failures = Vec::new();
    for target in TARGETS {
        let seeds = files_in(&seed_dir(target));
        assert!(seeds.len() >= 4, "{target}: only {} seeds", seeds.len());
        for seed in seeds {
            match run(target, &seed) {
                // Every seed, the Opus one included (decoded through libopus).
                Ok(Outcome::Accepted(_)) => {}
                Ok(Outcome::Rejected(why)) => {
                    failures.push(format!("{target} {}: rejected: {why}", seed.display()))
                }
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn regression_inputs_no_longer_fail() {
    let mut failures = Vec::new();
    let mut count = 0;
    for target in TARGETS {
        for input in files_in(&fuzz_dir().join("regressions").join(target)) {
            count += 1;
            if let Err(e) = run(target, &input) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{count} regression inputs checked");
}

#[test]
fn contract_checks_can_fail() {
    // Not accepted: the entry points do look at what the daemon answers.
    let rejected = |target: &str, data: &[u8]| {
        let entry = fuzz_entry::by_target(target).expect("target");
        matches!(entry(data), Ok(Outcome::Rejected(_)))
    };
    assert!(rejected("config", b"[scan]\nbatch_size = 0\n"));
    assert!(rejected("config", b"[scan\n"));
    assert!(rejected("rpc_params", b"track.search\n[\"  --  \"]"));
    assert!(rejected("rpc_params", b"scan.start\n[1, \"../etc\"]"));
    assert!(rejected("rpc_params", b"track.get\n[\"x\"]"));
    assert!(rejected("rpc_params", b"no.such.method\n"));
    assert!(rejected("probe", b""));
    assert!(rejected("probe", b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f"));
    assert!(rejected("embed_decode", b"RIFF\x00\x00\x00\x00WAVE"));
}
