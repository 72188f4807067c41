//! Prints how long it takes to walk and content-hash a directory as a build context, once cold
//! (every file read) and once more with the same hasher (memoised, as a second COPY of the same
//! files within one build would be).
//!
//! Usage: `cargo run --release -p kiln-context --example hash_tree -- DIR [SOURCE]`

use std::time::Instant;

use kiln_context::{open_dir, ContextHasher, HashOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: hash_tree DIR [SOURCE]")?;
    let source = args.next().unwrap_or_else(|| ".".to_owned());
    let context = open_dir(std::path::Path::new(&dir), None)?;
    let hasher = ContextHasher::new();

    let start = Instant::now();
    let sources = context.resolve_sources(&source)?;
    let entries: usize = sources
        .iter()
        .map(|s| context.walk(s.entry()).map(|w| w.len()))
        .sum::<Result<usize, _>>()?;
    let walked = start.elapsed();

    let start = Instant::now();
    let digest = context.hash_sources(&hasher, &sources, HashOptions::default())?;
    let cold = start.elapsed();
    let bytes_read = hasher.files_read();

    let start = Instant::now();
    let again = context.hash_sources(&hasher, &sources, HashOptions::default())?;
    let memoised = start.elapsed();
    assert_eq!(digest, again);

    println!("{dir} {source}: {entries} entries, {bytes_read} files read");
    println!("walk only:            {walked:?}");
    println!("walk + hash (cold):   {cold:?}");
    println!("walk + hash (memo):   {memoised:?}");
    println!("digest: {digest}");
    Ok(())
}
