//! A small ext4 filesystem on a loop device, for the tests that need a real disk under the store:
//! `power_cut.rs` here (a power cut: copy the backing file) and `crates/tokenwal/tests/full_disk.rs`
//! (a real ENOSPC). Included with `#[path]` + `mod loopfs;`, so it is compiled into each of them.
//!
//! Prerequisites: root, a kernel with loop devices and ext4, and `losetup`, `mkfs.ext4`, `mount`,
//! `umount` (Debian/Ubuntu packages `mount` and `e2fsprogs`). Without them a test prints a loud
//! SKIP and passes ([`missing`]), unless `TOKENWAL_REQUIRE_SYNC_TEST=1`, which makes a missing
//! prerequisite a failure (CI sets it).
#![allow(dead_code)] // each including test uses part of it

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Set to `1` to make a missing prerequisite a failure instead of a SKIP.
pub const REQUIRE_ENV: &str = "TOKENWAL_REQUIRE_SYNC_TEST";

/// Runs a command; `Err` carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!("{program} {}: {} {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin", "/bin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tools, if this machine can run the test.
pub struct Tools {
    losetup: String,
    mkfs: String,
    mount: String,
    umount: String,
}

/// Root, loop devices and the tools; `Err` names what is missing.
pub fn prerequisites() -> Result<Tools, String> {
    let uid = run("id", &["-u"])?;
    if uid != "0" {
        return Err(format!("not root (uid {uid}): loop devices and mount need root"));
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control: the kernel has no loop device support here".into());
    }
    let tool = |n: &str| {
        find_tool(n).map(|p| p.display().to_string()).ok_or_else(|| format!("`{n}` not found (install {})", package(n)))
    };
    Ok(Tools { losetup: tool("losetup")?, mkfs: tool("mkfs.ext4")?, mount: tool("mount")?, umount: tool("umount")? })
}

fn package(tool: &str) -> &'static str {
    if tool == "mkfs.ext4" {
        "e2fsprogs"
    } else {
        "mount"
    }
}

/// A temporary directory for a backing image: on `/dev/shm` when there is one (so the outer
/// fsyncs are free), else the usual temporary directory.
pub fn image_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap()
}

impl Tools {
    /// Creates a `bytes`-long file at `image` and formats it ext4 (`extra`: more `mkfs.ext4`
    /// options). `Err` is a missing prerequisite.
    pub fn mkfs(&self, image: &Path, bytes: u64, extra: &[&str]) -> Result<(), String> {
        std::fs::File::create(image).map_err(|e| e.to_string())?.set_len(bytes).map_err(|e| e.to_string())?;
        let image = image.display().to_string();
        let mut args = vec!["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"];
        args.extend_from_slice(extra);
        args.push(&image);
        run(&self.mkfs, &args).map(|_| ())
    }
}

/// A mounted loop device; unmounted and detached on drop.
pub struct Mounted<'a> {
    tools: &'a Tools,
    device: String,
    at: PathBuf,
    mounted: bool,
}

impl<'a> Mounted<'a> {
    /// Attaches `image` to a free loop device and mounts it at `at`. `Err` is a missing
    /// prerequisite (no free loop device, no permission, no ext4).
    pub fn new(tools: &'a Tools, image: &Path, at: &Path, options: &str) -> Result<Mounted<'a>, String> {
        let device = run(&tools.losetup, &["--find", "--show", &image.display().to_string()])?;
        let mut m = Mounted { tools, device, at: at.to_path_buf(), mounted: false };
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        run(&tools.mount, &["-t", "ext4", "-o", options, &m.device, &at.display().to_string()])?;
        m.mounted = true;
        Ok(m)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.at
    }

    /// Unmounts (lazily if busy); the loop device is detached on drop.
    pub fn unmount(&mut self) {
        if self.mounted {
            if let Err(e) = run(&self.tools.umount, &[&self.at.display().to_string()]) {
                let _ = run(&self.tools.umount, &["-l", &self.at.display().to_string()]);
                eprintln!("umount: {e}");
            }
            self.mounted = false;
        }
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        self.unmount();
        let _ = run(&self.tools.losetup, &["-d", &self.device]);
    }
}

/// Prints past the test harness's capture, so a skip is seen in a normal `cargo test` run.
pub fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr(), "\n{0}\n{msg}\n{0}", "!".repeat(78));
}

/// A missing prerequisite of `test`: SKIP (pass), or fail when the environment requires the test.
/// `what` says what did not run.
pub fn missing(test: &str, what: &str, reason: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: prerequisite missing and {REQUIRE_ENV}=1: {reason}");
    }
    loud(&format!(
        "SKIP {test}: {reason}.\n\
         {what} did NOT run. Run as root with losetup, mkfs.ext4 and mount \
         (packages mount, e2fsprogs);\nset {REQUIRE_ENV}=1 to make this a failure."
    ));
}
