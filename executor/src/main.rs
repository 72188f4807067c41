//! `executor`: build a container image from a Dockerfile, kaniko-style.

use std::io::Write;
use std::process::ExitCode;

use kiln_build::Builder;
use kiln_executor::cli::{self, Command, Invocation};
use kiln_executor::exit;
use kiln_executor::render::Renderer;

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
                // LEAD WIRING POINT (issue 6): the base-image warmer lives in kiln-cache,
                // which does not exist yet.
                fail(
                    &renderer,
                    &"executor warm: the cache warmer is not available in this build yet",
                    exit::BUILD_FAILED,
                )
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

/// Runs the build and returns the process exit code.
fn build(renderer: &Renderer, invocation: Invocation) -> i32 {
    if invocation.cache.enabled {
        // The cache flags are parsed (CacheFlags) but the engine has no cache options yet.
        renderer.warn(
            "--cache: the layer cache is not available in this build yet; building without it",
        );
    }
    // The engine runs stages on blocking threads and needs a multi-threaded runtime.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return fail(
                renderer,
                &format!("cannot start the async runtime: {error}"),
                exit::BUILD_FAILED,
            )
        }
    };
    let builder = Builder::new(invocation.options).events(renderer.sink());
    match runtime.block_on(builder.build()) {
        Ok(_report) => {
            renderer.finish(None);
            exit::SUCCESS
        }
        Err(error) => {
            let code = exit::build_failure_code(&error);
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
