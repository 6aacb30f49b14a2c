//! Wiring and graceful shutdown; everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use sluice::ConfigError;
use sluice::ServerError;
use sluice::SystemClock;
use sluice::settings::{self, CheckArgs, Cli, Command, LogFormat, RuntimeShape, Settings};

// A request allocates (prost's owned strings, the answer's headers): mimalloc's thread-local
// free lists cost less than glibc's malloc on that path (measured in BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Validate {
            dir,
            merge_domain_config,
        } => validate(&dir, merge_domain_config),
        Command::Check(args) => check(args),
        Command::Serve(mut settings) => {
            let given = matches
                .subcommand_matches("serve")
                .expect("serve was parsed");
            let vars = std::env::vars().collect();
            let adopted = match settings::peer::adopt(&mut settings, given, &vars) {
                Ok(adopted) => adopted,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    return ExitCode::FAILURE;
                }
            };
            serve_or_fail(*settings, adopted)
        }
    }
}

fn serve_or_fail(settings: Settings, adopted: settings::peer::Adopted) -> ExitCode {
    match serve(settings, adopted) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_errors(errors: &[ConfigError]) {
    for error in errors {
        eprintln!("{error}");
    }
}

fn validate(dir: &std::path::Path, merge_domain_config: bool) -> ExitCode {
    match sluice::load_dir_with(dir, settings::domain_files(merge_domain_config)) {
        Ok(set) => {
            println!(
                "{}: {} domains, {} rules: ok",
                dir.display(),
                set.domains().count(),
                set.rule_count()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_errors(&errors);
            eprintln!("{}: {} errors", dir.display(), errors.len());
            ExitCode::FAILURE
        }
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let descriptors = match args
        .descriptors
        .iter()
        .map(|d| sluice::client::parse_descriptor(d))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(descriptors) => descriptors,
        Err(e) => {
            eprintln!("sluice check: {e}");
            return ExitCode::from(2);
        }
    };
    let request = envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
        domain: args.domain,
        descriptors,
        hits_addend: args.hits,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sluice check: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sluice::client::check(
        args.addr,
        request.clone(),
        args.timeout,
    )) {
        Ok(response) => {
            print!("{}", sluice::client::describe(&request, &response));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice check: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Asks the kernel not to back this process with transparent huge pages. mimalloc asks for
/// them (`MADV_HUGEPAGE`), and each time the counter table doubled, the copy into its new array
/// faulted that array in 2 MiB pages, each zeroed on the fault, within a few calls: the slowest
/// answer with a million new keys was 25-31 ms, against 7-10 ms without (load bench, three
/// runs each in turn; `perf`: `clear_page_erms` under papaya's resize).
#[cfg(target_os = "linux")]
fn without_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    let answer = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if answer != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "could not turn transparent huge pages off; the counter table's growth may pause answers");
    }
}

#[cfg(not(target_os = "linux"))]
fn without_transparent_huge_pages() {}

fn init_logging(settings: &Settings) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log_level)
        .with_context(|| format!("invalid --log-level `{}`", settings.log_level))?;
    // Colours only on a terminal: a log file or a collector gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour);
    match settings.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// How long an idle blocking-pool thread (the counter sweep's, every 10 s; the rule rescan's,
/// every 30 s) stays before it exits. At tokio's default, 10 s, a sweep or rescan often found
/// its thread gone and started a new one (thread ids seen changing every 10-20 s).
const BLOCKING_THREADS_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

fn serve(settings: Settings, adopted: settings::peer::Adopted) -> anyhow::Result<()> {
    init_logging(&settings)?;
    if !settings.transparent_huge_pages {
        without_transparent_huge_pages();
    }
    for taken in &adopted.taken {
        tracing::info!("envoyproxy/ratelimit setting taken: {taken}");
    }
    for ignored in &adopted.ignored {
        tracing::warn!("envoyproxy/ratelimit setting not applied: {ignored}");
    }
    let mut runtime = match settings.runtime {
        // The gRPC threads are the server's own; this one runs the rest.
        RuntimeShape::PerCore => tokio::runtime::Builder::new_current_thread(),
        RuntimeShape::MultiThread => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime
        .enable_all()
        .thread_keep_alive(BLOCKING_THREADS_KEPT)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let grace = settings.shutdown_grace;
        let config = settings.config.clone();
        let mut running = match sluice::start(settings, Arc::new(SystemClock)).await {
            Ok(running) => running,
            Err(ServerError::Rules(errors)) => {
                print_errors(&errors);
                anyhow::bail!(
                    "refusing to start: {} errors in {}",
                    errors.len(),
                    config.display()
                );
            }
            Err(e) => return Err(e.into()),
        };
        tokio::select! {
            signal = shutdown_signal() => {
                tracing::info!(signal, "shutting down");
            }
            ended = running.serving() => {
                return match ended {
                    Ok(result) => result.map_err(Into::into),
                    Err(e) => Err(e.into()),
                };
            }
        }
        match tokio::time::timeout(grace, running.stop()).await {
            Ok(result) => result.map_err(anyhow::Error::from),
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "calls still in flight after the grace period; exiting"
                );
                Ok(())
            }
        }
    })
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
