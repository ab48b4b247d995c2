//! `cargo xtask install [--prefix DIR] [--dry-run]`: builds the release binary and installs it
//! with its systemd unit, default configuration, man page and shell completions.
//!
//! Layout:
//!
//! | file | default (`/usr/local`) | `--prefix DIR` (any other) |
//! | --- | --- | --- |
//! | binary | /usr/local/bin/mcrelay | DIR/bin/mcrelay |
//! | unit | /etc/systemd/system/mcrelay.service | DIR/lib/systemd/system/mcrelay.service |
//! | config | /etc/mcrelay/mcrelay.toml | DIR/etc/mcrelay/mcrelay.toml |
//! | man page | /usr/local/share/man/man1/mcrelay.1 | DIR/share/man/man1/mcrelay.1 |
//! | bash | /usr/local/share/bash-completion/completions/mcrelay | DIR/share/... |
//! | zsh | /usr/local/share/zsh/site-functions/_mcrelay | DIR/share/... |
//! | fish | /usr/local/share/fish/vendor_completions.d/mcrelay.fish | DIR/share/... |
//! | sysusers.d | - (the group is created instead) | DIR/lib/sysusers.d/mcrelay.conf |
//!
//! The `mcrelay` group (whose members read the daemon's pins and state without root, and
//! which the unit's `SupplementaryGroups=` names): the default install creates it as a system
//! group when it is missing (`groupadd --system`, nothing when it exists); an install under
//! another prefix never touches the system's groups and installs a systemd-sysusers(8) file
//! instead, for the package or the administrator to apply.
//!
//! With the default prefix the unit and the configuration go where systemd and mcrelay look
//! for them (/etc); with any other prefix everything stays under it (a self-contained tree for
//! /opt, a package staging root or a test), and the installed unit's `ExecStart=` names the
//! binary and the configuration under that prefix. The configuration is never overwritten;
//! every other file is replaced only when its content changed, so a second run changes
//! nothing. `--dry-run` builds nothing and writes nothing: it prints what would happen.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _};

use crate::{
    cmd, setup,
    workspace::{self, build_mcrelay, Profile},
};

/// The prefix that installs the unit and the configuration under /etc.
pub const DEFAULT_PREFIX: &str = "/usr/local";

/// Where the unit file lives in the source tree.
const UNIT_SOURCE: &str = "packaging/mcrelay.service";
/// The commented default configuration (installed when it exists).
const CONFIG_SOURCE: &str = "packaging/mcrelay.toml";
/// The systemd-sysusers(8) file that declares the `mcrelay` group.
const SYSUSERS_SOURCE: &str = "packaging/mcrelay.sysusers";
/// The group whose members may read the daemon's pins and state (`relay::paths::ACCESS_GROUP`).
const GROUP: &str = "mcrelay";
/// `ExecStart=` of the unit as shipped, i.e. for the default prefix.
const SHIPPED_BINARY: &str = "/usr/local/bin/mcrelay";
const SHIPPED_CONFIG: &str = "/etc/mcrelay/mcrelay.toml";

/// Where each installed file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub binary: PathBuf,
    pub unit: PathBuf,
    pub config: PathBuf,
    pub man: PathBuf,
    pub bash: PathBuf,
    pub zsh: PathBuf,
    pub fish: PathBuf,
    /// The sysusers.d file declaring the group (`None`: the default install creates the group).
    pub sysusers: Option<PathBuf>,
}

impl Layout {
    /// The layout for `prefix` (absolute): see the module documentation.
    pub fn for_prefix(prefix: &Path) -> Self {
        let share = prefix.join("share");
        let (unit_dir, etc, sysusers) = if prefix == Path::new(DEFAULT_PREFIX) {
            (PathBuf::from("/etc/systemd/system"), PathBuf::from("/etc"), None)
        } else {
            (
                prefix.join("lib/systemd/system"),
                prefix.join("etc"),
                Some(prefix.join("lib/sysusers.d/mcrelay.conf")),
            )
        };
        Self {
            binary: prefix.join("bin/mcrelay"),
            unit: unit_dir.join("mcrelay.service"),
            config: etc.join("mcrelay/mcrelay.toml"),
            man: share.join("man/man1/mcrelay.1"),
            bash: share.join("bash-completion/completions/mcrelay"),
            zsh: share.join("zsh/site-functions/_mcrelay"),
            fish: share.join("fish/vendor_completions.d/mcrelay.fish"),
            sysusers,
        }
    }
}

/// `cargo xtask install`.
pub fn run(prefix: &Path, dry_run: bool) -> anyhow::Result<()> {
    let prefix = absolute_prefix(prefix)?;
    let layout = Layout::for_prefix(&prefix);
    let root = workspace::root();
    let unit_template = fs::read_to_string(root.join(UNIT_SOURCE))
        .with_context(|| format!("reading {}", root.join(UNIT_SOURCE).display()))?;
    let unit = unit_for(&unit_template, &layout)?;
    let config_source = root.join(CONFIG_SOURCE);
    let default_config = if config_source.is_file() {
        Some(
            fs::read(&config_source)
                .with_context(|| format!("reading {}", config_source.display()))?,
        )
    } else {
        None
    };

    let sysusers = fs::read(root.join(SYSUSERS_SOURCE))
        .with_context(|| format!("reading {}", root.join(SYSUSERS_SOURCE).display()))?;

    if dry_run {
        println!("[install] dry run: nothing is built or written");
        println!("[install] would build: cargo build --package relay --release");
        plan(&layout, default_config.is_some())?;
        return ensure_group(&layout, true);
    }

    setup::run(setup::Scope::Toolchain)?;
    let built = build_mcrelay(Profile::Release)?;
    let binary = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    let man = generate(&built, &["man"])?;
    let bash = generate(&built, &["completions", "bash"])?;
    let zsh = generate(&built, &["completions", "zsh"])?;
    let fish = generate(&built, &["completions", "fish"])?;

    install_file(&layout.binary, &binary, 0o755)?;
    install_file(&layout.unit, unit.as_bytes(), 0o644)?;
    match &default_config {
        Some(config) => install_config(&layout.config, config)?,
        None => println!(
            "[install] {CONFIG_SOURCE} does not exist yet: no default configuration installed \
             (the unit reads {})",
            layout.config.display()
        ),
    }
    install_file(&layout.man, &man, 0o644)?;
    install_file(&layout.bash, &bash, 0o644)?;
    install_file(&layout.zsh, &zsh, 0o644)?;
    install_file(&layout.fish, &fish, 0o644)?;
    if let Some(path) = &layout.sysusers {
        install_file(path, &sysusers, 0o644)?;
    }
    ensure_group(&layout, false)?;

    if prefix == Path::new(DEFAULT_PREFIX) {
        println!(
            "[install] done; to start mcrelay at boot: edit {}, then\n    systemctl \
             daemon-reload && systemctl enable --now mcrelay",
            layout.config.display()
        );
    } else {
        println!(
            "[install] done; the unit is {} (link or copy it into /etc/systemd/system to use it)",
            layout.unit.display()
        );
    }
    Ok(())
}

/// Creates the `mcrelay` system group when missing (default prefix only; see the module
/// documentation). With `dry_run`, says what it would do.
fn ensure_group(layout: &Layout, dry_run: bool) -> anyhow::Result<()> {
    if let Some(sysusers) = &layout.sysusers {
        println!(
            "[install] group {GROUP}: not touched (--prefix); {} declares it for \
             systemd-sysusers, or create it with `groupadd --system {GROUP}`",
            sysusers.display()
        );
        return Ok(());
    }
    let exists = nix::unistd::Group::from_name(GROUP)
        .with_context(|| format!("looking up the group {GROUP}"))?
        .is_some();
    match (exists, dry_run) {
        (true, _) => println!("[install] group {GROUP}: exists"),
        (false, true) => println!("[install] group {GROUP}: would create (groupadd --system)"),
        (false, false) => {
            let mut command = Command::new("groupadd");
            command.args(["--system", GROUP]);
            cmd::output(&mut command)
                .with_context(|| format!("creating the group {GROUP}{}", hint()))?;
            println!("[install] group {GROUP}: created (members read mcrelay's pins and state)");
        }
    }
    Ok(())
}

/// `prefix` made absolute (relative to the current directory); rejects what `ExecStart=`
/// could not hold unquoted.
fn absolute_prefix(prefix: &Path) -> anyhow::Result<PathBuf> {
    let prefix = if prefix.is_absolute() {
        prefix.to_path_buf()
    } else {
        std::env::current_dir().context("reading the current directory")?.join(prefix)
    };
    let text = prefix
        .to_str()
        .with_context(|| format!("--prefix {} is not valid UTF-8", prefix.display()))?;
    if let Some(c) = text.chars().find(|c| c.is_whitespace() || "\"'\\%$;".contains(*c)) {
        bail!("--prefix {text}: the character {c:?} cannot appear in the unit's ExecStart= line");
    }
    // Normalise "/usr/local/" and "/usr/local/." to the default prefix.
    Ok(prefix.components().collect())
}

/// The shipped unit with `ExecStart=` pointing at the layout's binary and configuration.
pub fn unit_for(template: &str, layout: &Layout) -> anyhow::Result<String> {
    let mut found = false;
    let mut out = String::with_capacity(template.len());
    for line in template.lines() {
        if line.starts_with("ExecStart=") {
            ensure!(
                line.contains(SHIPPED_BINARY) && line.contains(SHIPPED_CONFIG),
                "{UNIT_SOURCE}: ExecStart= no longer names {SHIPPED_BINARY} and \
                 {SHIPPED_CONFIG}; update xtask/src/install.rs"
            );
            found = true;
            let binary = layout.binary.display().to_string();
            let config = layout.config.display().to_string();
            out.push_str(&line.replace(SHIPPED_BINARY, &binary).replace(SHIPPED_CONFIG, &config));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    ensure!(found, "{UNIT_SOURCE} has no ExecStart= line");
    Ok(out)
}

/// Runs the built binary's hidden generator subcommand (`man`, `completions SHELL`).
fn generate(binary: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let mut command = Command::new(binary);
    command.args(args);
    let text = cmd::output(&mut command)?;
    ensure!(!text.trim().is_empty(), "`{}` printed nothing", cmd::describe(&command));
    Ok(text.into_bytes())
}

/// Writes `content` to `path` (mode `mode`) unless it already holds exactly that; atomic
/// (temporary file in the same directory, then rename).
fn install_file(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let current = fs::read(path).ok();
    let permissions_ok = fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if current.as_deref() == Some(content) && permissions_ok {
        println!("[install] {}: unchanged", path.display());
        return Ok(());
    }
    let dir = path.parent().with_context(|| format!("{} has no parent", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}{}", dir.display(), hint()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.xtask-install.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(content)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("installing {}{}", path.display(), hint()));
    }
    let what = if current.is_some() { "updated" } else { "installed" };
    println!("[install] {}: {what}", path.display());
    Ok(())
}

/// Installs the default configuration unless a configuration is already there.
fn install_config(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    if path.exists() {
        let note = if fs::read(path).is_ok_and(|c| c == content) {
            "unchanged"
        } else {
            "kept (locally modified; the new default is packaging/mcrelay.toml)"
        };
        println!("[install] {}: {note}", path.display());
        return Ok(());
    }
    install_file(path, content, 0o644)
}

/// `--dry-run`: what a real run would do to each destination.
fn plan(layout: &Layout, have_config: bool) -> anyhow::Result<()> {
    let files = [
        (&layout.binary, "binary (target/release/mcrelay)"),
        (&layout.unit, "systemd unit"),
        (&layout.man, "man page (mcrelay man)"),
        (&layout.bash, "bash completion"),
        (&layout.zsh, "zsh completion"),
        (&layout.fish, "fish completion"),
    ];
    let sysusers = layout.sysusers.as_ref().map(|path| (path, "sysusers.d file (mcrelay group)"));
    for (path, what) in files.into_iter().chain(sysusers) {
        let action = if path.exists() { "would update (if changed)" } else { "would install" };
        println!("[install] {}: {action}: {what}", path.display());
    }
    let config = if !have_config {
        format!("nothing: {CONFIG_SOURCE} does not exist")
    } else if layout.config.exists() {
        "would keep the existing configuration".to_owned()
    } else {
        "would install the default configuration".to_owned()
    };
    println!("[install] {}: {config}", layout.config.display());
    Ok(())
}

fn hint() -> &'static str {
    if nix::unistd::geteuid().is_root() {
        ""
    } else {
        " (not running as root: use sudo, or --prefix with a directory you own)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_puts_unit_and_config_under_etc() {
        let layout = Layout::for_prefix(Path::new(DEFAULT_PREFIX));
        assert_eq!(layout.binary, Path::new("/usr/local/bin/mcrelay"));
        assert_eq!(layout.unit, Path::new("/etc/systemd/system/mcrelay.service"));
        assert_eq!(layout.config, Path::new("/etc/mcrelay/mcrelay.toml"));
        assert_eq!(layout.man, Path::new("/usr/local/share/man/man1/mcrelay.1"));
        assert_eq!(layout.sysusers, None, "the default install creates the group instead");
    }

    #[test]
    fn other_prefixes_keep_everything_under_them() {
        let layout = Layout::for_prefix(Path::new("/opt/mc"));
        for path in [
            &layout.binary,
            &layout.unit,
            &layout.config,
            &layout.man,
            &layout.bash,
            &layout.zsh,
            &layout.fish,
            layout.sysusers.as_ref().expect("a sysusers.d file under a prefix"),
        ] {
            assert!(path.starts_with("/opt/mc"), "{}", path.display());
        }
        assert_eq!(layout.unit, Path::new("/opt/mc/lib/systemd/system/mcrelay.service"));
    }

    #[test]
    fn unit_exec_start_follows_the_prefix() {
        let template = fs::read_to_string(workspace::root().join(UNIT_SOURCE)).expect("unit");
        let shipped =
            unit_for(&template, &Layout::for_prefix(Path::new(DEFAULT_PREFIX))).expect("default");
        assert_eq!(shipped.trim_end(), template.trim_end());
        let moved = unit_for(&template, &Layout::for_prefix(Path::new("/opt/mc"))).expect("moved");
        assert!(
            moved.contains(
                "ExecStart=/opt/mc/bin/mcrelay run --config /opt/mc/etc/mcrelay/mcrelay.toml\n"
            ),
            "{moved}"
        );
    }

    #[test]
    fn prefixes_are_normalised_and_checked() {
        assert_eq!(
            absolute_prefix(Path::new("/usr/local/")).expect("ok"),
            Path::new(DEFAULT_PREFIX)
        );
        assert!(absolute_prefix(Path::new("/opt/my relay")).is_err());
        assert!(absolute_prefix(Path::new("rel")).expect("ok").is_absolute());
    }
}
