//! Builds the eBPF object (crate `relay-ebpf`) with aya-build so a plain `cargo build` works.
//! Needs the nightly toolchain with rust-src and bpf-linker: `cargo xtask setup` installs them.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let metadata_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("relay crate has no parent directory"))?
        .join("relay-ebpf");
    let root_dir = metadata_dir.to_str().context("non-UTF-8 path to relay-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "relay-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` (nightly rust-src + bpf-linker)",
    )
}
