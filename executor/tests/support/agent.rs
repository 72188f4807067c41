//! A real ssh-agent for `RUN --mount=type=ssh` tests.

use std::process::Command;

/// A real ssh-agent holding one key, on a socket in a temporary directory; killed on drop.
pub struct Agent {
    child: std::process::Child,
    /// The agent's socket.
    pub socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts an agent holding a new ed25519 key whose comment is `comment`.
    pub fn start(comment: &str) -> Agent {
        kiln_testkit::require_tools(&["ssh-agent", "ssh-add", "ssh-keygen"]);
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        kiln_testkit::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                .arg(&key),
        );
        let socket = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        kiln_testkit::run(
            Command::new("ssh-add")
                .arg(&key)
                .env("SSH_AUTH_SOCK", &socket),
        );
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
