//! `executor`: build a container image from a Dockerfile, kaniko-style.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use kiln_engine::{Builder, Cancel};
use kiln_executor::cli::{
    self, Command, Invocation, PruneInvocation, RebaseInvocation, WarmInvocation,
};
use kiln_executor::exit;
use kiln_executor::interrupt::Interrupts;
use kiln_executor::render::Renderer;
use kiln_oci::{Platform, Reference};

fn main() -> ExitCode {
    let env = cli::process_env();
    let code = match cli::parse(std::env::args_os(), &env) {
        Err(usage) => {
            eprintln!("{}", exit::error_line(&usage));
            eprintln!("Run 'executor --help' for the list of flags.");
            exit::USAGE
        }
        Ok(Command::Help(text)) => {
            print!("{text}");
            let _ = std::io::stdout().flush();
            exit::SUCCESS
        }
        Ok(Command::Version) => {
            println!("Kiln executor version {}", env!("CARGO_PKG_VERSION"));
            exit::SUCCESS
        }
        Ok(Command::Warm(mut warm)) => {
            let renderer = Renderer::for_process(&warm.output);
            for warning in &warm.warnings {
                renderer.warn(warning);
            }
            if let Err(error) = warm.load_credentials(&env) {
                fail(&renderer, &error, exit::BUILD_FAILED)
            } else {
                warm_cache_dir(&renderer, &warm)
            }
        }
        Ok(Command::CachePrune(mut prune)) => {
            let renderer = Renderer::for_process(&prune.output);
            match prune.load_credentials(&env) {
                Err(error) => fail(&renderer, &error, exit::BUILD_FAILED),
                Ok(()) => prune_caches(&renderer, &prune),
            }
        }
        Ok(Command::Rebase(mut rebase)) => {
            let renderer = Renderer::for_process(&rebase.output);
            match rebase.load_credentials(&env) {
                Err(error) => fail(&renderer, &error, exit::BUILD_FAILED),
                Ok(()) => rebase_image(&renderer, *rebase),
            }
        }
        Ok(Command::Build(mut invocation)) => {
            let renderer = Renderer::for_process(&invocation.output);
            for warning in &invocation.warnings {
                renderer.warn(warning);
            }
            if let Ok(cwd) = std::env::current_dir() {
                invocation.resolve_dockerfile(&cwd);
            }
            match invocation.load_credentials(&env) {
                Err(error) => fail(&renderer, &error, exit::BUILD_FAILED),
                Ok(()) => build(&renderer, *invocation),
            }
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `executor warm`: stores every named image (and every image `--dockerfile` builds from,
/// copies from or mounts) in the cache directory, downloading only what is missing.
fn warm_cache_dir(renderer: &Renderer, warm: &WarmInvocation) -> i32 {
    let runtime = match runtime(renderer) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result: Result<Vec<String>, String> = runtime.block_on(async {
        let platform = warm.platform.clone().unwrap_or_else(Platform::host);
        let mut images = warm.images.clone();
        if let Some(path) = &warm.dockerfile {
            images.extend(dockerfile_images(path, warm, &platform)?);
        }
        if images.is_empty() {
            return Err("executor warm: name an --image or a --dockerfile".to_owned());
        }
        let dir = kiln_cache::BaseImageDir::open(&warm.cache_dir)
            .map_err(|e| format!("--cache-dir {}: {e}", warm.cache_dir.display()))?;
        let client =
            kiln_registry::Client::new(warm.registry.clone()).map_err(|e| e.to_string())?;
        let mut lines = Vec::new();
        for image in images {
            let reference =
                Reference::parse(&image).map_err(|e| format!("--image {image}: {e}"))?;
            let report = dir
                .warm(&client, &reference, &platform)
                .await
                .map_err(|e| format!("warming {image}: {e}"))?;
            lines.push(format!(
                "cached {image} as {} ({} blobs, {} bytes downloaded)",
                report.manifest_digest, report.blobs_fetched, report.bytes_fetched
            ));
        }
        Ok(lines)
    });
    match result {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            exit::SUCCESS
        }
        Err(error) => fail(renderer, &error, exit::BUILD_FAILED),
    }
}

/// `executor cache prune`: prunes the cache repository, the cache directory and/or the Kiln
/// dir's layer trees, printing each report as soon as it is made. Refused deletes are reported and leave the exit status 0
/// (the registry's policy, not a failure of the command); anything that could not be examined
/// or removed makes it 1, after the other cache was pruned all the same.
fn prune_caches(renderer: &Renderer, prune: &PruneInvocation) -> i32 {
    // Both paths are checked before anything is removed, and pruning must not create the
    // layout or directory a mistyped path names.
    if let Some(path) = prune
        .cache_repo
        .as_deref()
        .and_then(|r| r.strip_prefix("oci:"))
    {
        if !std::path::Path::new(path).join("index.json").is_file() {
            let message = format!("--cache-repo oci:{path}: not an OCI layout (no index.json)");
            return fail(renderer, &message, exit::BUILD_FAILED);
        }
    }
    for (flag, dir) in [
        ("--cache-dir", &prune.cache_dir),
        ("--kiln-dir", &prune.layer_trees),
    ] {
        if let Some(dir) = dir.as_ref().filter(|dir| !dir.is_dir()) {
            let message = format!("{flag} {}: no such directory", dir.display());
            return fail(renderer, &message, exit::BUILD_FAILED);
        }
    }
    let runtime = match runtime(renderer) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let options = kiln_cache::PruneOptions {
        older_than: prune.older_than,
        dry_run: prune.dry_run,
    };
    let mut failures = 0;
    let mut report = |result: Result<kiln_cache::PruneReport, String>| match result {
        Ok(report) => {
            for line in kiln_executor::prune::report_lines(&report) {
                println!("{line}");
            }
            if !report.refused.is_empty() {
                renderer.warn(&format!(
                    "{}: the registry refused {} delete{}; those entries stay (deletes are disabled on the registry or not allowed for these credentials)",
                    report.location,
                    report.refused.len(),
                    if report.refused.len() == 1 { "" } else { "s" }
                ));
            }
            failures += report.failed.len();
        }
        Err(error) => {
            println!(
                "failed: {}",
                kiln_executor::render::redact_credentials(&error)
            );
            failures += 1;
        }
    };
    runtime.block_on(async {
        if let Some(repo) = &prune.cache_repo {
            let pruned = async {
                let client = kiln_registry::Client::new(prune.registry.clone())
                    .map_err(|e| e.to_string())?;
                let store = kiln_cache::CacheStore::open(repo, &client, prune.ttl)
                    .map_err(|e| format!("--cache-repo {repo}: {e}"))?;
                store
                    .prune(&options)
                    .await
                    .map_err(|e| format!("pruning {}: {e}", store.location()))
            };
            report(pruned.await);
        }
        if let Some(dir) = &prune.cache_dir {
            let pruned = async {
                kiln_cache::BaseImageDir::open(dir)
                    .map_err(|e| format!("--cache-dir {}: {e}", dir.display()))?
                    .prune(&options)
                    .await
                    .map_err(|e| format!("pruning --cache-dir {}: {e}", dir.display()))
            };
            report(pruned.await);
        }
    });
    runtime.shutdown_background();
    if let Some(dir) = &prune.layer_trees {
        match kiln_executor::prune::prune_layer_trees(dir, prune.older_than, prune.dry_run) {
            Ok(trees) => {
                for line in kiln_executor::prune::tree_report_lines(&trees) {
                    println!("{line}");
                }
                failures += trees.failed.len();
            }
            Err(error) => {
                println!("failed: {error}");
                failures += 1;
            }
        }
    }
    if failures > 0 {
        let message = format!(
            "cache prune: {failures} failure{} (see above)",
            if failures == 1 { "" } else { "s" }
        );
        return fail(renderer, &message, exit::BUILD_FAILED);
    }
    renderer.finish(None);
    exit::SUCCESS
}

/// The images the stages a Dockerfile's last stage needs are built from or copy from
/// (`FROM image`, `COPY --from=image`, `RUN --mount=from=image`), each once.
fn dockerfile_images(
    path: &std::path::Path,
    warm: &WarmInvocation,
    platform: &Platform,
) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path.display().to_string();
    let dockerfile =
        kiln_dockerfile::Dockerfile::parse(&text).map_err(|e| format!("{name}:{e}"))?;
    let to_df = |p: &Platform| kiln_dockerfile::Platform::parse(&p.to_string());
    let plan = dockerfile
        .plan(&kiln_dockerfile::PlanOptions {
            build_args: warm.build_args.clone(),
            target: None,
            target_platform: to_df(platform)?,
            build_platform: to_df(&Platform::host())?,
        })
        .map_err(|e| format!("{name}:{e}"))?;
    let mut images: Vec<String> = Vec::new();
    for image in plan.stages().iter().flat_map(|stage| &stage.images) {
        if !images.contains(image) {
            images.push(image.clone());
        }
    }
    Ok(images)
}

/// The async runtime, multi-threaded because the engine runs stages on blocking threads; on
/// failure, the exit code (the error is reported).
fn runtime(renderer: &Renderer) -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            fail(
                renderer,
                &format!("cannot start the async runtime: {error}"),
                exit::BUILD_FAILED,
            )
        })
}

/// `executor rebase`: the new manifest pushed, its digest printed (and written to
/// `--digest-file`).
fn rebase_image(renderer: &Renderer, rebase: RebaseInvocation) -> i32 {
    let runtime = match runtime(renderer) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(kiln_engine::rebase(rebase.options, renderer.sink()));
    runtime.shutdown_background();
    let report = match result {
        Ok(report) => report,
        Err(error) => return fail(renderer, &error, exit::BUILD_FAILED),
    };
    if let Some(path) = &rebase.digest_file {
        if let Err(error) = std::fs::write(path, report.digest.to_string()) {
            return fail(
                renderer,
                &format!("--digest-file {}: {error}", path.display()),
                exit::BUILD_FAILED,
            );
        }
    }
    renderer.finish(None);
    println!("{}@{}", report.destination, report.digest);
    exit::SUCCESS
}

/// Runs the build and returns the process exit code.
fn build(renderer: &Renderer, invocation: Invocation) -> i32 {
    let mut invocation = invocation;
    invocation.options.cache = invocation.cache.engine_options();
    let runtime = match runtime(renderer) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let cancel = Cancel::new();
    let warner = renderer.clone();
    let interrupts = match Interrupts::install(&runtime, cancel.clone(), move |m| warner.warn(m)) {
        Ok(interrupts) => interrupts,
        Err(error) => {
            let message = format!("cannot handle SIGTERM and SIGINT: {error}");
            return fail(renderer, &message, exit::BUILD_FAILED);
        }
    };
    let builder = Builder::new(invocation.options)
        .events(renderer.sink())
        .cancel_with(cancel);
    let result = runtime.block_on(builder.build());
    // The build is over and its files are closed; waiting for idle worker threads to wind
    // down would only delay the exit.
    runtime.shutdown_background();
    match result {
        Ok(_report) => {
            renderer.finish(None);
            exit::SUCCESS
        }
        Err(error) => {
            let code = interrupts
                .exit_code()
                .unwrap_or_else(|| exit::build_failure_code(&error));
            fail(renderer, &error, code)
        }
    }
}

/// Reports a failure (also as a final JSON object in JSON style) and returns `code`.
fn fail(renderer: &Renderer, error: &dyn std::fmt::Display, code: i32) -> i32 {
    let message = error.to_string();
    renderer.finish(Some((&message, code)));
    eprintln!("{}", exit::error_line(&message));
    code
}
