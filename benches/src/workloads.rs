//! The five reference workloads of the benchmark suite: each is a Dockerfile kept in
//! `benches/workloads/NAME/` plus a context generated here from a fixed seed, so every run on
//! every machine measures the same bytes.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// The workloads, in the order the runner measures them.
pub const WORKLOADS: &[&str] = &[
    "small",
    "copy-tree",
    "run-many-files",
    "noop-steps",
    "multistage",
];

/// A small deterministic generator (xorshift64*): the contexts must not depend on a crate's
/// algorithm choices between versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed` (zero is replaced, xorshift cannot leave it).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }
}

/// Words that file contents are made of: text-like data compresses about as well as source
/// code does, unlike random bytes, which no real context consists of.
const WORDS: &[&str] = &[
    "fn", "let", "mut", "impl", "struct", "return", "match", "self", "layer", "image", "build",
    "registry", "digest", "config", "snapshot", "context", "=>", "{", "}", "(", ")", ";", "0x1f",
    "42", "kiln", "stage", "copy", "run", "env", "user", "path", "file", "tree", "blob", "push",
    "pull", "cache", "key", "value", "\n", "\n    ", "//", "#", "const", "pub", "use", "mod",
];

/// Writes `size` bytes of text-like content made from `rng` into `path`.
pub fn write_text_file(path: &Path, size: u64, rng: &mut Rng) -> io::Result<()> {
    let mut out = io::BufWriter::with_capacity(64 << 10, fs::File::create(path)?);
    let mut written = 0u64;
    while written < size {
        let word = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
        let token = if rng.next_u64().is_multiple_of(7) {
            format!("{word}{} ", rng.next_u64() % 100_000)
        } else {
            format!("{word} ")
        };
        let take = (size - written).min(token.len() as u64) as usize;
        out.write_all(&token.as_bytes()[..take])?;
        written += take as u64;
    }
    out.flush()
}

/// What a generated context holds.
#[derive(Debug, Default, Clone, Copy)]
pub struct ContextSummary {
    /// Regular files written (the Dockerfile included).
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// Makes the context of workload `name` in `dest` (which must not exist yet): its Dockerfile
/// from `workloads_dir/NAME/Dockerfile` and the files the Dockerfile copies.
pub fn generate(name: &str, workloads_dir: &Path, dest: &Path) -> io::Result<ContextSummary> {
    fs::create_dir_all(dest)?;
    let dockerfile = fs::read(workloads_dir.join(name).join("Dockerfile"))?;
    fs::write(dest.join("Dockerfile"), &dockerfile)?;
    let mut summary = ContextSummary {
        files: 1,
        bytes: dockerfile.len() as u64,
    };
    let mut rng = Rng::new(0x6b69_6c6e ^ name.len() as u64);
    let mut file = |path: &Path, size: u64, rng: &mut Rng| -> io::Result<()> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        write_text_file(path, size, rng)?;
        summary.files += 1;
        summary.bytes += size;
        Ok(())
    };
    match name {
        "small" => {
            for i in 0..4 {
                let size = rng.between(200, 4000);
                file(&dest.join(format!("config/part-{i}.conf")), size, &mut rng)?;
            }
            let start = dest.join("bin/start.sh");
            fs::create_dir_all(start.parent().unwrap())?;
            let script =
                "#!/bin/sh\necho \"small workload: $(cat /app/config-lines) config lines\"\n";
            fs::write(&start, script)?;
            summary.files += 1;
            summary.bytes += script.len() as u64;
        }
        "copy-tree" => {
            // About 300 MB in 25,000 files: mostly 1-20 KB, and seven of 1-10 MB.
            for i in 0..24_993u64 {
                let path = dest.join(format!(
                    "tree/d{:03}/s{:02}/f{i:05}.txt",
                    i / 250,
                    (i / 25) % 10
                ));
                let size = rng.between(1 << 10, 20 << 10);
                file(&path, size, &mut rng)?;
            }
            for i in 0..7 {
                let size = rng.between(1 << 20, 10 << 20);
                file(
                    &dest.join(format!("tree/large/blob-{i}.dat")),
                    size,
                    &mut rng,
                )?;
            }
        }
        "multistage" => {
            for i in 0..3 {
                let size = rng.between(10 << 10, 100 << 10);
                file(&dest.join(format!("src/module-{i}.rs")), size, &mut rng)?;
            }
        }
        "run-many-files" | "noop-steps" => {}
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown workload {other:?}"),
            ))
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_the_same_bytes_every_time() {
        let workloads = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        let dir = tempfile::tempdir().unwrap();
        let a = generate("small", &workloads, &dir.path().join("a")).unwrap();
        let b = generate("small", &workloads, &dir.path().join("b")).unwrap();
        assert_eq!((a.files, a.bytes), (b.files, b.bytes));
        for i in 0..4 {
            let rel = format!("config/part-{i}.conf");
            assert_eq!(
                fs::read(dir.path().join("a").join(&rel)).unwrap(),
                fs::read(dir.path().join("b").join(&rel)).unwrap()
            );
        }
        assert!(generate("nope", &workloads, &dir.path().join("c")).is_err());
    }
}
