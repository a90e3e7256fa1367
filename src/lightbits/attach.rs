//! Host side of the attach: make a volume's namespace appear on this host over NVMe/TCP and find
//! its block device by the volume UUID (reference B.6, os-brick's `LightOSConnector`).
//!
//! Two modes: write the discovery-client file (`<dir>/<uuid>.conf`, the daemon connects), or run
//! `nvme connect` against each node's endpoint ourselves. The file content and the argv are pure
//! functions so tests can assert them exactly. The cluster API is not used here: the caller has
//! already put this host's NQN into the volume's ACL.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::model::{DISCOVERY_PORT, Endpoint};
use super::{LightbitsError, Result};

/// How a volume is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// Write the discovery-client file; the daemon runs `nvme connect` (what os-brick does).
    #[default]
    DiscoveryClient,
    /// Run `nvme connect` to each node's NVMe endpoint ourselves.
    NvmeConnect,
}

/// Host-side settings: plain data.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Attach mode.
    pub mode: AttachMode,
    /// This host's NQN; when `None` it is read from `host_nqn_path`.
    pub host_nqn: Option<String>,
    /// Where the host NQN is read from (`/etc/nvme/hostnqn`).
    pub host_nqn_path: PathBuf,
    /// discovery-client's watched directory (`/etc/discovery-client/discovery.d`).
    pub discovery_dir: PathBuf,
    /// The `nvme` binary.
    pub nvme_binary: PathBuf,
    /// `--ctrl-loss-tmo` for `nvme connect` (seconds; `-1` = retry forever); omitted when `None`.
    pub ctrl_loss_tmo: Option<i32>,
    /// The by-id directory (`/dev/disk/by-id`).
    pub by_id_dir: PathBuf,
    /// Root of sysfs (`/sys`); tests point it at a fake tree.
    pub sysfs_root: PathBuf,
    /// Where `/dev/<name>` nodes are (`/dev`).
    pub dev_dir: PathBuf,
    /// How long to wait for the device (os-brick: 60 s).
    pub device_timeout: Duration,
    /// How often to look for it (os-brick: 1 s).
    pub device_poll_interval: Duration,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            mode: AttachMode::DiscoveryClient,
            host_nqn: None,
            host_nqn_path: PathBuf::from("/etc/nvme/hostnqn"),
            discovery_dir: PathBuf::from("/etc/discovery-client/discovery.d"),
            nvme_binary: PathBuf::from("nvme"),
            ctrl_loss_tmo: None,
            by_id_dir: PathBuf::from("/dev/disk/by-id"),
            sysfs_root: PathBuf::from("/sys"),
            dev_dir: PathBuf::from("/dev"),
            device_timeout: Duration::from_secs(60),
            device_poll_interval: Duration::from_secs(1),
        }
    }
}

/// What is attached: the volume (namespace) UUID, the cluster's subsystem NQN, and the nodes'
/// NVMe endpoints (`nvmeEndpoint`, data port).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    /// Volume UUID = namespace UUID.
    pub volume_uuid: String,
    /// The cluster's `subsystemNQN`.
    pub subsys_nqn: String,
    /// One entry per node.
    pub endpoints: Vec<Endpoint>,
}

impl AttachOptions {
    /// This host's NQN: configured, or the trimmed content of `host_nqn_path`.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::HostNqn`] if the file cannot be read or is empty.
    pub fn host_nqn(&self) -> Result<String> {
        if let Some(nqn) = &self.host_nqn {
            return Ok(nqn.clone());
        }
        let text = fs::read_to_string(&self.host_nqn_path).map_err(|source| {
            LightbitsError::HostNqn { path: self.host_nqn_path.clone(), source }
        })?;
        let nqn = text.trim();
        if nqn.is_empty() {
            return Err(LightbitsError::HostNqn {
                path: self.host_nqn_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "empty"),
            });
        }
        Ok(nqn.to_owned())
    }
}

/// `<dir>/<uuid>.conf`, the name os-brick uses (so an attach by os-brick and one by ferry of the
/// same volume are the same file).
pub fn discovery_file_path(discovery_dir: &Path, volume_uuid: &str) -> PathBuf {
    discovery_dir.join(format!("{volume_uuid}.conf"))
}

/// The discovery-client file exactly as os-brick writes it: a comment line, then one
/// `-t tcp -a <ip> -s 8009 -q <host nqn> -n <subsysnqn>` line per node (the discovery port, not
/// the node's data port).
pub fn discovery_file_content(target: &Target, host_nqn: &str) -> String {
    let mut content =
        format!("# os_brick connector dsc file for LightOS volume: {}\n", target.volume_uuid);
    for endpoint in &target.endpoints {
        content.push_str(&format!(
            "-t tcp -a {} -s {DISCOVERY_PORT} -q {host_nqn} -n {}\n",
            endpoint.address, target.subsys_nqn
        ));
    }
    content
}

/// `nvme connect -t tcp -a <ip> -s <port> -n <subsysnqn> -q <hostnqn> [--ctrl-loss-tmo N]` for one
/// node (argv\[0\] is `binary`).
pub fn nvme_connect_argv(
    binary: &Path,
    endpoint: &Endpoint,
    subsys_nqn: &str,
    host_nqn: &str,
    ctrl_loss_tmo: Option<i32>,
) -> Vec<String> {
    let mut argv = vec![
        binary.display().to_string(),
        "connect".to_owned(),
        "-t".to_owned(),
        "tcp".to_owned(),
        "-a".to_owned(),
        endpoint.address.clone(),
        "-s".to_owned(),
        endpoint.port.to_string(),
        "-n".to_owned(),
        subsys_nqn.to_owned(),
        "-q".to_owned(),
        host_nqn.to_owned(),
    ];
    if let Some(seconds) = ctrl_loss_tmo {
        argv.push("--ctrl-loss-tmo".to_owned());
        argv.push(seconds.to_string());
    }
    argv
}

/// `nvme disconnect -n <subsysnqn>`: drops every controller of the subsystem on this host.
pub fn nvme_disconnect_argv(binary: &Path, subsys_nqn: &str) -> Vec<String> {
    vec![
        binary.display().to_string(),
        "disconnect".to_owned(),
        "-n".to_owned(),
        subsys_nqn.to_owned(),
    ]
}

fn local_io(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LightbitsError {
    let path = path.to_path_buf();
    move |source| LightbitsError::LocalIo { operation, path, source }
}

/// Writes `content` to `path` atomically: temp file in the same directory, fsync, rename, fsync
/// the directory.
///
/// # Errors
///
/// [`LightbitsError::LocalIo`].
pub fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name =
        path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    {
        let mut file = fs::File::create(&temp).map_err(local_io("create", &temp))?;
        file.write_all(content).map_err(local_io("write", &temp))?;
        file.sync_all().map_err(local_io("fsync", &temp))?;
    }
    fs::rename(&temp, path).map_err(local_io("rename into", path))?;
    fs::File::open(dir).and_then(|dir_file| dir_file.sync_all()).map_err(local_io("fsync", dir))?;
    Ok(())
}

/// Removes `path`; a missing file is success. Returns whether it existed.
///
/// # Errors
///
/// [`LightbitsError::LocalIo`].
pub fn remove_file_idempotent(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(LightbitsError::LocalIo {
            operation: "remove",
            path: path.to_path_buf(),
            source: error,
        }),
    }
}

/// Runs `argv`, mapping a spawn failure or a non-zero exit to [`LightbitsError::Command`].
///
/// # Errors
///
/// [`LightbitsError::Command`].
pub fn run_command(argv: &[String]) -> Result<()> {
    let command_line = argv.join(" ");
    let Some((program, args)) = argv.split_first() else {
        return Err(LightbitsError::Command {
            command: command_line,
            message: "empty argv".into(),
        });
    };
    let output = Command::new(program).args(args).output().map_err(|error| {
        LightbitsError::Command { command: command_line.clone(), message: error.to_string() }
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(LightbitsError::Command {
        command: command_line,
        message: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
    })
}

/// True when this host already has a controller of `subsys_nqn`
/// (`<sysfs>/class/nvme/*/subsysnqn`), i.e. an `nvme connect` is not ours to undo.
pub fn subsystem_connected(sysfs_root: &Path, subsys_nqn: &str) -> bool {
    let Ok(entries) = fs::read_dir(sysfs_root.join("class/nvme")) else {
        return false;
    };
    entries.flatten().any(|entry| {
        fs::read_to_string(entry.path().join("subsysnqn"))
            .is_ok_and(|content| content.trim() == subsys_nqn)
    })
}

/// True for a namespace node under a controller or subsystem in sysfs: `nvme<X>n<Y>` (a
/// namespace, or a multipath head) or `nvme<X>c<Y>n<Z>` (one path of a multipath namespace).
fn is_namespace_node(name: &str) -> bool {
    if is_per_path_node(name) {
        return true;
    }
    let Some((controller, namespace)) =
        name.strip_prefix("nvme").and_then(|rest| rest.split_once('n'))
    else {
        return false;
    };
    [controller, namespace]
        .iter()
        .all(|part| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit()))
}

/// The identity of a namespace directory: its UUID from `wwid` (`uuid.<uuid>`) or `uuid`, else a
/// description that matches no volume UUID (so an unidentifiable namespace counts as foreign).
fn namespace_uuid(directory: &Path) -> String {
    let read =
        |name: &str| fs::read_to_string(directory.join(name)).map(|text| text.trim().to_owned());
    if let Ok(wwid) = read("wwid")
        && let Some(uuid) = wwid.strip_prefix("uuid.")
    {
        return uuid.to_owned();
    }
    match read("uuid") {
        Ok(uuid) if !uuid.is_empty() && uuid.bytes().any(|byte| byte != b'0' && byte != b'-') => {
            uuid
        }
        _ => format!(
            "{} (no uuid: wwid {})",
            directory
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
            read("wwid").unwrap_or_else(|_| "unreadable".to_owned())
        ),
    }
}

/// The namespaces this host sees through `subsys_nqn`, by UUID: the namespace directories of
/// every controller (`<sysfs>/class/nvme/*`) and subsystem (`<sysfs>/class/nvme-subsystem/*`)
/// whose `subsysnqn` is `subsys_nqn`. On Lightbits all volumes of a cluster are namespaces of one
/// subsystem, so this lists every volume attached to this host, whoever attached it.
pub fn subsystem_namespaces(sysfs_root: &Path, subsys_nqn: &str) -> BTreeSet<String> {
    let mut namespaces = BTreeSet::new();
    for class in ["class/nvme", "class/nvme-subsystem"] {
        let Ok(entries) = fs::read_dir(sysfs_root.join(class)) else { continue };
        for entry in entries.flatten() {
            let controller = entry.path();
            let matches = fs::read_to_string(controller.join("subsysnqn"))
                .is_ok_and(|content| content.trim() == subsys_nqn);
            let Ok(children) = fs::read_dir(&controller) else { continue };
            if !matches {
                continue;
            }
            for child in children.flatten() {
                if is_namespace_node(&child.file_name().to_string_lossy()) {
                    let _new = namespaces.insert(namespace_uuid(&child.path()));
                }
            }
        }
    }
    namespaces
}

/// True for per-path nodes `nvme<X>c<Y>n<Z>`, which os-brick skips.
fn is_per_path_node(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let Some((controller, namespace)) = rest.split_once('c') else {
        return false;
    };
    let Some((path_index, namespace_index)) = namespace.split_once('n') else {
        return false;
    };
    [controller, path_index, namespace_index]
        .iter()
        .all(|part| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit()))
}

/// Looks once for the device of `volume_uuid`: `<by_id>/nvme-uuid.<uuid>` (resolved), else a
/// `<sysfs>/class/block/*/wwid` of `uuid.<uuid>` (per-path nodes skipped) → `<dev>/<name>`.
pub fn find_device(options: &AttachOptions, volume_uuid: &str) -> Option<PathBuf> {
    let link = options.by_id_dir.join(format!("nvme-uuid.{volume_uuid}"));
    if let Ok(device) = fs::canonicalize(&link) {
        return Some(device);
    }
    let wanted = format!("uuid.{volume_uuid}");
    let entries = fs::read_dir(options.sysfs_root.join("class/block")).ok()?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !is_per_path_node(name))
        .collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let wwid =
            fs::read_to_string(options.sysfs_root.join("class/block").join(&name).join("wwid"))
                .ok()?;
        (wwid.trim() == wanted).then(|| options.dev_dir.join(&name))
    })
}

/// Polls [`find_device`] every `device_poll_interval` up to `device_timeout`.
///
/// # Errors
///
/// [`LightbitsError::DeviceNotFound`].
pub fn wait_device(options: &AttachOptions, volume_uuid: &str) -> Result<PathBuf> {
    let started = Instant::now();
    loop {
        if let Some(device) = find_device(options, volume_uuid) {
            return Ok(device);
        }
        if started.elapsed() >= options.device_timeout {
            return Err(LightbitsError::DeviceNotFound {
                uuid: volume_uuid.to_owned(),
                waited: started.elapsed(),
                looked_in: format!(
                    "{}, {}",
                    options.by_id_dir.display(),
                    options.sysfs_root.join("class/block").display()
                ),
            });
        }
        std::thread::sleep(options.device_poll_interval);
    }
}

/// Flushes a device before it goes away: `fsync` of the block device (writes back dirty pages and
/// sends a cache flush). A device that is already gone is not an error.
///
/// # Errors
///
/// [`LightbitsError::LocalIo`] when the fsync fails.
pub fn flush_device(device: &Path) -> Result<()> {
    match fs::File::open(device) {
        Ok(file) => file.sync_all().map_err(local_io("fsync", device)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(LightbitsError::LocalIo {
            operation: "open",
            path: device.to_path_buf(),
            source: error,
        }),
    }
}

/// What [`attach`] did, for the journal and for [`detach`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Attachment {
    /// A discovery-client file; `created` is false when it was there already (not ours to remove).
    DiscoveryFile {
        /// The file.
        path: PathBuf,
        /// Whether ferry wrote it.
        created: bool,
    },
    /// `nvme connect`; `connected` is false when the subsystem was connected already.
    NvmeConnect {
        /// The subsystem NQN.
        subsys_nqn: String,
        /// Whether ferry connected it.
        connected: bool,
        /// The nvme binary.
        nvme_binary: PathBuf,
    },
}

/// What [`attach`] is about to do, computed before doing it so the journal can record it first.
///
/// # Errors
///
/// None today; `Result` keeps room for validation.
pub fn plan_attachment(options: &AttachOptions, target: &Target) -> Result<Attachment> {
    Ok(match options.mode {
        AttachMode::DiscoveryClient => {
            let path = discovery_file_path(&options.discovery_dir, &target.volume_uuid);
            Attachment::DiscoveryFile { created: !path.exists(), path }
        }
        AttachMode::NvmeConnect => Attachment::NvmeConnect {
            subsys_nqn: target.subsys_nqn.clone(),
            connected: !subsystem_connected(&options.sysfs_root, &target.subsys_nqn),
            nvme_binary: options.nvme_binary.clone(),
        },
    })
}

/// Carries out a planned attachment. Idempotent: an existing file is left as is, a connected
/// subsystem is not connected again.
///
/// # Errors
///
/// [`LightbitsError::LocalIo`] or [`LightbitsError::Command`] (all nodes failing to connect).
pub fn attach(
    options: &AttachOptions,
    target: &Target,
    host_nqn: &str,
    attachment: &Attachment,
) -> Result<()> {
    match attachment {
        Attachment::DiscoveryFile { path, created } => {
            if *created && !path.exists() {
                write_atomically(path, discovery_file_content(target, host_nqn).as_bytes())?;
            }
            Ok(())
        }
        Attachment::NvmeConnect { connected: false, .. } => Ok(()),
        Attachment::NvmeConnect { subsys_nqn, nvme_binary, .. } => {
            let mut last_error = None;
            let mut any_connected = false;
            for endpoint in &target.endpoints {
                let argv = nvme_connect_argv(
                    nvme_binary,
                    endpoint,
                    subsys_nqn,
                    host_nqn,
                    options.ctrl_loss_tmo,
                );
                match run_command(&argv) {
                    Ok(()) => any_connected = true,
                    Err(error) => last_error = Some(error),
                }
            }
            match last_error {
                Some(error) if !any_connected => Err(error),
                _ => Ok(()),
            }
        }
    }
}

/// What [`detach`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detached {
    /// The discovery file was removed, or the subsystem disconnected (or already was).
    Done,
    /// Nothing to undo: the file or connection was there before ferry.
    NotOurs,
    /// The connection ferry made was left up, because the controller also exposes these
    /// namespaces (UUIDs), which are not ferry's: disconnecting would drop them too.
    LeftConnected {
        /// The subsystem left connected.
        subsys_nqn: String,
        /// The namespaces that are not ferry's.
        foreign: Vec<String>,
    },
}

impl Detached {
    /// The warning an operator should see, if any.
    pub fn warning(&self) -> Option<String> {
        let Detached::LeftConnected { subsys_nqn, foreign } = self else { return None };
        Some(format!(
            "left the NVMe connection to {subsys_nqn} up: it also carries namespaces that are not \
             ferry's ({}); ferry's own namespace goes away with its ACL entry",
            foreign.join(", ")
        ))
    }
}

/// Undoes what ferry did in an attachment: removes the file it wrote, or disconnects the
/// subsystem it connected, but only when every namespace the subsystem's controllers expose is
/// in `ours` (the volumes whose access ferry is about to remove); otherwise the connection is
/// left up ([`Detached::LeftConnected`]), because `nvme disconnect` would drop the other
/// volumes with it. Idempotent.
///
/// # Errors
///
/// [`LightbitsError::LocalIo`] or [`LightbitsError::Command`].
pub fn detach(
    attachment: &Attachment,
    sysfs_root: &Path,
    ours: &BTreeSet<String>,
) -> Result<Detached> {
    match attachment {
        Attachment::DiscoveryFile { path, created: true } => {
            remove_file_idempotent(path).map(|_| Detached::Done)
        }
        Attachment::NvmeConnect { subsys_nqn, connected: true, nvme_binary } => {
            if !subsystem_connected(sysfs_root, subsys_nqn) {
                return Ok(Detached::Done);
            }
            let foreign: Vec<String> = subsystem_namespaces(sysfs_root, subsys_nqn)
                .into_iter()
                .filter(|uuid| !ours.contains(uuid))
                .collect();
            if !foreign.is_empty() {
                return Ok(Detached::LeftConnected { subsys_nqn: subsys_nqn.clone(), foreign });
            }
            run_command(&nvme_disconnect_argv(nvme_binary, subsys_nqn))?;
            Ok(Detached::Done)
        }
        _ => Ok(Detached::NotOurs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            volume_uuid: "0f6c3c2e-1111-2222-3333-444455556666".into(),
            subsys_nqn: "nqn.2016-01.com.lightbitslabs:uuid:abc".into(),
            endpoints: vec![
                Endpoint { address: "10.0.0.1".into(), port: 4420 },
                Endpoint { address: "fe80::2".into(), port: 4420 },
            ],
        }
    }

    /// The discovery file is byte-for-byte what os-brick writes: discovery port 8009, -q before -n.
    #[test]
    fn discovery_file_matches_os_brick() {
        let content = discovery_file_content(&target(), "nqn.host");
        assert_eq!(
            content,
            "# os_brick connector dsc file for LightOS volume: 0f6c3c2e-1111-2222-3333-444455556666\n\
             -t tcp -a 10.0.0.1 -s 8009 -q nqn.host -n nqn.2016-01.com.lightbitslabs:uuid:abc\n\
             -t tcp -a fe80::2 -s 8009 -q nqn.host -n nqn.2016-01.com.lightbitslabs:uuid:abc\n"
        );
        assert_eq!(
            discovery_file_path(Path::new("/etc/discovery-client/discovery.d"), "u"),
            Path::new("/etc/discovery-client/discovery.d/u.conf")
        );
    }

    /// The nvme argv is exact, with and without --ctrl-loss-tmo.
    #[test]
    fn nvme_argv() {
        let endpoint = Endpoint { address: "10.0.0.1".into(), port: 4420 };
        let argv =
            nvme_connect_argv(Path::new("/usr/sbin/nvme"), &endpoint, "nqn.sub", "nqn.host", None);
        assert_eq!(
            argv,
            [
                "/usr/sbin/nvme",
                "connect",
                "-t",
                "tcp",
                "-a",
                "10.0.0.1",
                "-s",
                "4420",
                "-n",
                "nqn.sub",
                "-q",
                "nqn.host"
            ]
        );
        let argv = nvme_connect_argv(Path::new("nvme"), &endpoint, "nqn.sub", "nqn.host", Some(-1));
        assert_eq!(argv[12..], ["--ctrl-loss-tmo", "-1"]);
        assert_eq!(
            nvme_disconnect_argv(Path::new("nvme"), "nqn.sub"),
            ["nvme", "disconnect", "-n", "nqn.sub"]
        );
    }

    /// The device is found through the by-id link first, else sysfs wwid, skipping per-path nodes.
    #[test]
    fn device_discovery() {
        let root = std::env::temp_dir().join(format!("lbctl-attach-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let options = AttachOptions {
            by_id_dir: root.join("by-id"),
            sysfs_root: root.join("sys"),
            dev_dir: root.join("dev"),
            device_timeout: Duration::from_millis(50),
            device_poll_interval: Duration::from_millis(10),
            ..AttachOptions::default()
        };
        for dir in [
            "by-id",
            "dev",
            "sys/class/block/nvme0c0n1",
            "sys/class/block/nvme0n1",
            "sys/class/block/sda",
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::write(root.join("sys/class/block/nvme0c0n1/wwid"), "uuid.u1\n").unwrap();
        fs::write(root.join("sys/class/block/sda/wwid"), "naa.123\n").unwrap();
        assert!(matches!(wait_device(&options, "u1"), Err(LightbitsError::DeviceNotFound { .. })));
        fs::write(root.join("sys/class/block/nvme0n1/wwid"), "uuid.u1\n").unwrap();
        assert_eq!(find_device(&options, "u1").unwrap(), root.join("dev/nvme0n1"));
        fs::write(root.join("dev/loop7"), b"").unwrap();
        std::os::unix::fs::symlink(root.join("dev/loop7"), root.join("by-id/nvme-uuid.u1"))
            .unwrap();
        assert_eq!(
            wait_device(&options, "u1").unwrap(),
            fs::canonicalize(root.join("dev/loop7")).unwrap()
        );
        assert!(is_per_path_node("nvme12c3n45"));
        assert!(!is_per_path_node("nvme1n1"));
        fs::remove_dir_all(&root).unwrap();
    }

    /// `nvme disconnect` runs only when every namespace of the subsystem (plain, per-path and
    /// multipath-head nodes, by `wwid` or `uuid`) is ferry's; otherwise the connection stays up
    /// and the foreign namespaces are named. `false` as the nvme binary shows whether it ran.
    #[test]
    fn nvme_detach_spares_foreign_namespaces() {
        let root = std::env::temp_dir().join(format!("lbctl-nvme-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let write = |path: &str, content: &str| {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        };
        write("class/nvme/nvme0/subsysnqn", "nqn.sub\n");
        write("class/nvme/nvme0/nvme0c0n1/wwid", "uuid.u1\n");
        write("class/nvme/nvme1/subsysnqn", "nqn.other-cluster\n");
        write("class/nvme/nvme1/nvme1n1/wwid", "uuid.x\n");
        let attachment = Attachment::NvmeConnect {
            subsys_nqn: "nqn.sub".into(),
            connected: true,
            nvme_binary: PathBuf::from("false"),
        };
        let ours = BTreeSet::from(["u1".to_owned()]);
        assert_eq!(subsystem_namespaces(&root, "nqn.sub"), ours);
        let tried = detach(&attachment, &root, &ours).unwrap_err();
        assert!(tried.to_string().contains("false disconnect -n nqn.sub"), "{tried}");

        write("class/nvme-subsystem/nvme-subsys0/subsysnqn", "nqn.sub\n");
        write("class/nvme-subsystem/nvme-subsys0/nvme0n1/wwid", "uuid.u1\n");
        write("class/nvme-subsystem/nvme-subsys0/nvme0n2/uuid", "u2\n");
        write("class/nvme-subsystem/nvme-subsys0/nvme0n3/wwid", "eui.0025385b71b0a2c4\n");
        let detached = detach(&attachment, &root, &ours).unwrap();
        let Detached::LeftConnected { foreign, .. } = &detached else { panic!("{detached:?}") };
        assert_eq!(foreign[1], "u2");
        assert!(foreign[0].starts_with("nvme0n3 (no uuid"), "{foreign:?}");
        assert!(detached.warning().unwrap().contains("u2"));
        let all = BTreeSet::from(["u1".to_owned(), "u2".to_owned(), foreign[0].clone()]);
        assert!(detach(&attachment, &root, &all).is_err(), "all ours: disconnect runs");
        assert!(is_namespace_node("nvme12n3") && is_namespace_node("nvme1c2n3"));
        assert!(
            !is_namespace_node("nvme-subsys0")
                && !is_namespace_node("nvme1")
                && !is_namespace_node("nvmen1")
        );
        fs::remove_dir_all(&root).unwrap();
    }

    /// Attach writes the file atomically and detach removes only a file ferry wrote.
    #[test]
    fn discovery_attach_detach() {
        let root = std::env::temp_dir().join(format!("lbctl-dsc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let options = AttachOptions { discovery_dir: root.clone(), ..AttachOptions::default() };
        let attachment = plan_attachment(&options, &target()).unwrap();
        attach(&options, &target(), "nqn.host", &attachment).unwrap();
        let path = discovery_file_path(&root, &target().volume_uuid);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            discovery_file_content(&target(), "nqn.host")
        );
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1, "no temp file left");
        let foreign = plan_attachment(&options, &target()).unwrap();
        assert_eq!(foreign, Attachment::DiscoveryFile { path: path.clone(), created: false });
        let none = BTreeSet::new();
        assert_eq!(detach(&foreign, &root, &none).unwrap(), Detached::NotOurs);
        assert!(path.exists(), "a file ferry did not write stays");
        assert_eq!(detach(&attachment, &root, &none).unwrap(), Detached::Done);
        assert_eq!(detach(&attachment, &root, &none).unwrap(), Detached::Done);
        assert!(!path.exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
