//! Running external commands: inherited stdio, and errors that name the failing command.

use std::{
    env,
    ffi::OsStr,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

/// Runs `cmd` with inherited stdio; fails when it cannot start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output, or `None` when it cannot start or fails.
/// Standard error is discarded: this is for questions ("is it installed?"), not for work.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let output = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `cmd` and returns its standard output; fails, naming the command, when it does.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !output.status.success() {
        bail!("`{}` failed ({})", describe(cmd), output.status);
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", describe(cmd)))
}

/// The command as a shell line (environment assignments first), for messages.
pub fn describe(cmd: &Command) -> String {
    let envs = cmd
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), quote(value?))));
    let words = std::iter::once(quote(cmd.get_program())).chain(cmd.get_args().map(quote));
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

/// Quotes one word for a POSIX shell when it needs it.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Finds an executable by name in `PATH`, like `command -v`.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    env::split_paths(&env::var_os("PATH")?).map(|dir| dir.join(name)).find(|path| {
        path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The cargo that runs this xtask (cargo sets `CARGO`), so nested builds use the same toolchain.
pub fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_what_needs_it() {
        let mut cmd = Command::new("dpkg-query");
        cmd.args(["-W", "-f=${Status}", "it's"]).env("DEBIAN_FRONTEND", "noninteractive");
        assert_eq!(
            describe(&cmd),
            r"DEBIAN_FRONTEND=noninteractive dpkg-query -W '-f=${Status}' 'it'\''s'"
        );
    }
}
