//! Man page and shell completions generated from the clap definition.

use clap::CommandFactory as _;

use crate::cli::Cli;

/// `mcrelay man`: the man page in roff on standard output.
pub fn man() -> anyhow::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(())
}

/// `mcrelay completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    clap_complete::generate(shell, &mut Cli::command(), "mcrelay", &mut std::io::stdout());
    Ok(())
}
