//! The `mcrelay` command.

use clap::Parser as _;
use relay::{
    cli::{Cli, Command},
    settings::SettingsSource,
};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt.block_on(dispatch(cli)),
            Err(e) => Err(anyhow::Error::new(e).context("starting the async runtime")),
        };
    if let Err(err) = result {
        eprintln!("mcrelay: error: {err:#}");
        std::process::exit(exit_status(&err));
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let pin_root = cli.pin_root();
    match cli.command {
        Command::Run(args) => relay::daemon::run(SettingsSource::new(*args, cli.pin_root)).await,
        Command::Groups(o) => relay::inspect::groups(&pin_root, o.json),
        Command::Ports(o) => relay::inspect::ports(&pin_root, o.json),
        Command::Stats(s) => relay::inspect::stats(&pin_root, s.json, s.watch),
        Command::Detach => relay::inspect::detach(&pin_root),
        Command::Reload => relay::daemon::reload(),
        Command::CheckConfig { file } => relay::config::check_config(&file),
        Command::Man => relay::manpage::man(),
        Command::Completions { shell } => relay::manpage::completions(shell),
        Command::Doctor(args) => {
            let status = relay::doctor::run(&args).await?;
            if status != 0 {
                std::process::exit(status);
            }
            Ok(())
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "info,relay=debug,mcrelay=debug",
        _ => "debug,relay=trace,mcrelay=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Exit status for a runtime failure.
const EXIT_RUNTIME: i32 = 1;
/// Exit status for usage and configuration errors.
const EXIT_USAGE: i32 = 2;

/// The exit status for an error returned by a command: decided by the error types in the
/// chain, never by message text.
fn exit_status(err: &anyhow::Error) -> i32 {
    let usage = |e: &(dyn std::error::Error + 'static)| {
        e.downcast_ref::<relay::error::UsageError>().is_some()
            || e.downcast_ref::<relay::config::ConfigError>().is_some()
            || e.downcast_ref::<relay::dataplane::DataplaneError>().is_some_and(|d| d.is_usage())
            || e.downcast_ref::<relay::instance::InstanceError>().is_some_and(|i| i.is_usage())
            || e.downcast_ref::<relay::inspect::InspectError>().is_some_and(|i| i.is_usage())
    };
    if err.chain().any(usage) {
        EXIT_USAGE
    } else {
        EXIT_RUNTIME
    }
}
