//! The guest image's `spec.json`: what to boot and how, validated with clear errors.
//!
//! `scripts/build-guest-image` writes it beside the kernel and initramfs:
//!
//! ```json
//! { "format": 1, "kernel": "vmlinux", "kernel_bzimage": "vmlinuz",
//!   "initrd": "initrd.img", "kernel_version": "6.1.0-NN-cloud-amd64",
//!   "cmdline": "console=ttyS0 panic=-1 ...", "memory_mib": 512, "vcpus": 1,
//!   "machine": "microvm", "shell": "/bin/sh", "agent_port": "agent0",
//!   "volumes": [ { "name": "work", "mount": "/work", "size_mib": 2048, "journal": false } ] }
//! ```
//!
//! Paths are relative to the spec's directory. `cmdline` is a base: the runner adds
//! `tsc_early_khz=` (microvm) and `reel.volumes=` itself.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The only spec format this runner reads.
pub const FORMAT: u32 = 1;
/// The most volumes a guest gets (virtio-blk devices `vda`..`vdh`).
pub const MAX_VOLUMES: usize = 8;

/// The machine type QEMU emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// `-M microvm`: no PCI, no ACPI, virtio-mmio; boots the ELF kernel by PVH.
    Microvm,
    /// `-M q35`: a PC; boots the bzImage; slower, for guests microvm cannot run.
    Q35,
}

/// One volume: a sparse ext4 file attached as a virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// A short name (`work`): the file is `<name>.img`.
    pub name: String,
    /// Where the guest mounts it.
    pub mount: String,
    /// Its size (the job's `disk_mib` overrides the first volume's).
    pub size_mib: u64,
    /// Whether ext4 keeps a journal (the workspace needs none: it dies with the VM).
    #[serde(default)]
    pub journal: bool,
}

/// The spec as written.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    format: u32,
    kernel: PathBuf,
    #[serde(default)]
    kernel_bzimage: Option<PathBuf>,
    initrd: PathBuf,
    #[serde(default)]
    kernel_version: String,
    cmdline: String,
    memory_mib: u64,
    vcpus: u32,
    machine: Machine,
    #[serde(default = "default_shell")]
    shell: String,
    agent_port: String,
    #[serde(default)]
    volumes: Vec<VolumeSpec>,
}

fn default_shell() -> String {
    "/bin/sh".to_owned()
}

/// A validated spec with absolute paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The image directory.
    pub dir: PathBuf,
    /// The kernel QEMU boots for the spec's machine (ELF for microvm, bzImage for q35).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The guest kernel's release, for people.
    pub kernel_version: String,
    /// The base kernel command line.
    pub cmdline: String,
    /// Guest memory unless the job asks for more or less.
    pub memory_mib: u64,
    /// vCPUs unless the job asks.
    pub vcpus: u32,
    /// The machine type.
    pub machine: Machine,
    /// The shell steps run with (`<shell> -c <command>`).
    pub shell: String,
    /// The virtio-serial port name the agent listens on.
    pub agent_port: String,
    /// The volumes, in the order they are attached (`vda`, `vdb`, ...).
    pub volumes: Vec<VolumeSpec>,
}

/// Why a spec was refused, in one sentence naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// Reads and validates the spec of the image at `path` (the image directory or its
/// `spec.json`).
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let file = if path.is_dir() {
        path.join("spec.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        SpecError(format!(
            "cannot read the guest image spec {}: {e} (build the image with \
             scripts/build-guest-image)",
            file.display()
        ))
    })?;
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    parse(&text, &dir).map_err(|e| SpecError(format!("{}: {}", file.display(), e.0)))
}

/// Parses and validates spec text whose relative paths are under `dir`.
pub fn parse(text: &str, dir: &Path) -> Result<Spec, SpecError> {
    let raw: RawSpec = serde_json::from_str(text).map_err(|e| SpecError(e.to_string()))?;
    if raw.format != FORMAT {
        return Err(SpecError(format!(
            "spec format {} is not the format {FORMAT} this runner reads",
            raw.format
        )));
    }
    let kernel = match raw.machine {
        Machine::Microvm => raw.kernel.clone(),
        Machine::Q35 => raw.kernel_bzimage.clone().unwrap_or(raw.kernel.clone()),
    };
    let kernel = dir.join(kernel);
    let initrd = dir.join(&raw.initrd);
    for (what, p) in [("kernel", &kernel), ("initrd", &initrd)] {
        if !p.is_file() {
            return Err(SpecError(format!(
                "the {what} {} does not exist",
                p.display()
            )));
        }
    }
    if raw.machine == Machine::Microvm && !is_elf(&kernel) {
        return Err(SpecError(format!(
            "the kernel {} is not an ELF vmlinux, which -M microvm needs (it boots by PVH)",
            kernel.display()
        )));
    }
    if raw.memory_mib < 64 {
        return Err(SpecError(format!(
            "memory_mib {} is below the 64 MiB a guest needs",
            raw.memory_mib
        )));
    }
    if raw.vcpus == 0 || raw.vcpus > 64 {
        return Err(SpecError(format!("vcpus {} is not in 1..=64", raw.vcpus)));
    }
    if raw.agent_port.is_empty() || !raw.agent_port.bytes().all(name_byte) {
        return Err(SpecError(format!(
            "agent_port {:?} must be a non-empty name of letters, digits, `-` and `_`",
            raw.agent_port
        )));
    }
    if raw.cmdline.contains("reel.volumes=") {
        return Err(SpecError(
            "cmdline must not set reel.volumes: the runner sets it from the volumes".to_owned(),
        ));
    }
    if raw.volumes.len() > MAX_VOLUMES {
        return Err(SpecError(format!(
            "{} volumes are more than the {MAX_VOLUMES} a guest gets",
            raw.volumes.len()
        )));
    }
    for (i, v) in raw.volumes.iter().enumerate() {
        if v.name.is_empty() || !v.name.bytes().all(name_byte) {
            return Err(SpecError(format!(
                "volume {} has the name {:?}: use letters, digits, `-` and `_`",
                i + 1,
                v.name
            )));
        }
        if raw.volumes[..i].iter().any(|w| w.name == v.name) {
            return Err(SpecError(format!("volume name {:?} is used twice", v.name)));
        }
        if !v.mount.starts_with('/') || v.mount.contains([',', ':', ' ']) {
            return Err(SpecError(format!(
                "volume {:?} mounts at {:?}: an absolute path without `,`, `:` or spaces",
                v.name, v.mount
            )));
        }
        if v.size_mib < 16 {
            return Err(SpecError(format!(
                "volume {:?} is {} MiB, below the 16 MiB ext4 needs",
                v.name, v.size_mib
            )));
        }
    }
    Ok(Spec {
        dir: dir.to_path_buf(),
        kernel,
        initrd,
        kernel_version: raw.kernel_version,
        cmdline: raw.cmdline,
        memory_mib: raw.memory_mib,
        vcpus: raw.vcpus,
        machine: raw.machine,
        shell: raw.shell,
        agent_port: raw.agent_port,
        volumes: raw.volumes,
    })
}

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF rest").unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"MZ bzimage").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"cpio").unwrap();
        dir
    }

    const GOOD: &str = r#"{ "format": 1, "kernel": "vmlinux", "kernel_bzimage": "vmlinuz",
        "initrd": "initrd.img", "kernel_version": "6.1.0-1-cloud-amd64",
        "cmdline": "console=ttyS0", "memory_mib": 256, "vcpus": 1, "machine": "microvm",
        "shell": "/bin/sh", "agent_port": "agent0",
        "volumes": [ { "name": "work", "mount": "/work", "size_mib": 1024, "journal": false } ] }"#;

    #[test]
    fn a_good_spec_has_absolute_paths_and_the_machines_kernel() {
        let dir = image();
        let spec = parse(GOOD, dir.path()).unwrap();
        assert_eq!(spec.kernel, dir.path().join("vmlinux"));
        assert_eq!(spec.volumes[0].mount, "/work");
        let q35 = parse(&GOOD.replace("microvm", "q35"), dir.path()).unwrap();
        assert_eq!(q35.kernel, dir.path().join("vmlinuz"));
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let dir = image();
        let cases = [
            (
                GOOD.replace("\"format\": 1", "\"format\": 2"),
                "spec format 2",
            ),
            (GOOD.replace("\"vcpus\": 1", "\"vcpus\": 0"), "vcpus 0"),
            (GOOD.replace("256", "32"), "below the 64 MiB"),
            (GOOD.replace("agent0", "a b"), "agent_port"),
            (GOOD.replace("\"/work\"", "\"work\""), "absolute path"),
            (
                GOOD.replace("initrd.img\"", "missing.img\""),
                "does not exist",
            ),
            (GOOD.replace("\"shell\"", "\"shel\""), "unknown field"),
            (
                GOOD.replace("console=ttyS0", "reel.volumes=x"),
                "reel.volumes",
            ),
            (GOOD.replace("vmlinux\"", "vmlinuz\""), "not an ELF"),
        ];
        for (text, want) in cases {
            let err = parse(&text, dir.path()).unwrap_err();
            assert!(err.0.contains(want), "{want:?} not in {:?}", err.0);
        }
    }

    #[test]
    fn a_missing_spec_says_how_to_build_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.0.contains("scripts/build-guest-image"), "{}", err.0);
    }
}
