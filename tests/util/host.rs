//! "Host N": a process context that ferry's lease logic sees as another machine.
//!
//! A lease names its host by hostname and boot id (`/proc/sys/kernel/random/boot_id`) and its
//! job by pid and process start time; a job on the same boot id is judged by its pid, a job on
//! another by the age of its lease. Each `Host` is a set of Linux namespaces held open by a
//! `sleep` that is pid 1 in them: its own UTS namespace (hostname `ferry-host-N`), its own pid
//! namespace with its own `/proc`, and its own mount namespace in which a private file holding
//! a fresh boot id is bind-mounted over `/proc/sys/kernel/random/boot_id`. Every command run
//! on the host enters all three (`nsenter`), so the host's processes see each other's pids, as
//! on a real machine, and no other host's.
//!
//! What it does not separate: the network (every host reaches the store on loopback), the
//! filesystem (paths are shared; the repository is in the store anyway) and the clock (ferry's
//! garbage collection reads only the store's clock). Needs root, or unprivileged user
//! namespaces (then `--user --map-root-user` is added).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running host; its namespaces (and anything still running in them) end on drop.
pub struct Host {
    pub name: String,
    pub boot_id: String,
    holder: Child,
    /// Pid (in the test's namespace) of the host's pid 1, the `sleep` holding the namespaces.
    init_pid: u32,
}

impl Host {
    /// Starts host `number`, keeping its boot-id file in `dir`.
    pub fn start(number: u32, dir: &Path) -> Result<Host, String> {
        let name = format!("ferry-host-{number}");
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let boot_id = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            std::process::id(),
            number,
            nanos & 0xfff,
            (nanos >> 12) & 0xfff,
            (nanos >> 24) & 0xffff_ffff_ffff
        );
        let boot_id_file = dir.join(format!("boot_id-{number}"));
        std::fs::write(&boot_id_file, format!("{boot_id}\n")).map_err(|e| e.to_string())?;
        let script = format!(
            "hostname {name} && mount --bind {} /proc/sys/kernel/random/boot_id && echo ready \
             && exec sleep infinity",
            boot_id_file.display()
        );
        let mut command = Command::new("unshare");
        if !is_root() {
            command.args(["--user", "--map-root-user"]);
        }
        let mut holder = command
            .args(["--uts", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        let mut line = String::new();
        let _ = BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line);
        if line.trim() != "ready" {
            let _ = holder.kill();
            let output = holder.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "could not make host {number}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children", pid = holder.id()))
                .map_err(|e| e.to_string())?;
        let init_pid = children.trim().parse().map_err(|_| format!("children: {children:?}"))?;
        let host = Host { name, boot_id, holder, init_pid };
        host.check()?;
        Ok(host)
    }

    /// A command that runs `program` on this host.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.init_pid.to_string()])
            .args(if is_root() { &[][..] } else { &["--user", "--preserve-credentials"][..] })
            .args(["--uts", "--mount", "--pid", "--"])
            .arg(program);
        command
    }

    /// Proves the host is what it claims: its hostname and boot id as a process on it reads
    /// them, and its own pid namespace with its own `/proc` (a process there has a small pid).
    fn check(&self) -> Result<(), String> {
        let output = self
            .command(Path::new("/bin/sh"))
            // What ferry's lease reads: these two files and its own pid.
            .args(["-c", "cat /proc/sys/kernel/hostname /proc/sys/kernel/random/boot_id; echo $$"])
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let pid: u32 = lines.get(2).and_then(|pid| pid.parse().ok()).unwrap_or(u32::MAX);
        if lines.first() != Some(&self.name.as_str())
            || lines.get(1) != Some(&self.boot_id.as_str())
            || pid > 1000
        {
            return Err(format!("host {} is not separate: {text:?}", self.name));
        }
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // SIGKILL to the namespace's pid 1 ends every process in it.
        let _ = Command::new("kill").args(["-KILL", &self.init_pid.to_string()]).status();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}
