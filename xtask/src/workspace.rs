//! Where things are in the workspace, and building the `mcrelay` binary.

use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{ensure, Context as _};

use crate::cmd;

/// The workspace root: the parent of this crate's directory.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `<root>/target`.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                Ok(dir)
            } else {
                Ok(env::current_dir().context("reading the current directory")?.join(dir))
            }
        }
        None => Ok(root().join("target")),
    }
}

/// Which cargo profile to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    pub fn from_release_flag(release: bool) -> Self {
        if release {
            Self::Release
        } else {
            Self::Debug
        }
    }

    /// The directory under `target/` that cargo uses for this profile.
    fn dir_name(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

/// Builds package `relay` (which builds the eBPF object in its build script) and returns the
/// absolute path of the `mcrelay` binary.
pub fn build_mcrelay(profile: Profile) -> anyhow::Result<PathBuf> {
    let mut build = cmd::cargo();
    build.current_dir(root()).args(["build", "--package", "relay"]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    println!("[build] {}", cmd::describe(&build));
    cmd::run(&mut build)?;

    let binary = target_dir()?.join(profile.dir_name()).join("mcrelay");
    ensure!(binary.is_file(), "cargo build succeeded but {} does not exist", binary.display());
    println!("[build] built {}", binary.display());
    Ok(binary)
}
