//! The ssh-agent a `RUN --mount=type=ssh` step sees: a socket of the step's own, with the
//! mount's mode and owner, that forwards each connection to the agent named by `--ssh`. As with
//! BuildKit, the step can ask the agent to sign but never sees where the agent lives, its keys
//! never touch the rootfs, and the socket disappears when the step ends.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A forwarding socket, open until dropped.
pub(crate) struct AgentForward {
    socket: PathBuf,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl AgentForward {
    /// Listens at `socket` (mode `mode`, owned by `uid:gid`) and forwards every connection to
    /// the agent listening at `agent`. `agent` must be a socket: a key file is refused, since
    /// keys are handed over by the agent that holds them, not read by the build.
    pub(crate) fn start(
        agent: &Path,
        socket: &Path,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<AgentForward, String> {
        let meta =
            std::fs::metadata(agent).map_err(|e| format!("ssh agent {}: {e}", agent.display()))?;
        if !meta.file_type().is_socket() {
            return Err(format!(
                "ssh agent {} is not a socket: give --ssh the socket of an ssh-agent holding the \
                 keys (ssh-add them; its path is in SSH_AUTH_SOCK), not a key file",
                agent.display()
            ));
        }
        let fail = |e: io::Error| format!("ssh agent socket {}: {e}", socket.display());
        let listener = UnixListener::bind(socket).map_err(fail)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
        std::os::unix::fs::chown(socket, Some(uid), Some(gid)).map_err(fail)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (agent, stopping) = (agent.to_path_buf(), stopping.clone());
            std::thread::Builder::new()
                .name("ssh-agent-forward".into())
                .spawn(move || accept(listener, &agent, &stopping))
                .map_err(fail)?
        };
        Ok(AgentForward {
            socket: socket.to_path_buf(),
            stopping,
            acceptor: Some(acceptor),
        })
    }
}

/// Takes connections until told to stop; each gets its own connection to the agent.
fn accept(listener: UnixListener, agent: &Path, stopping: &AtomicBool) {
    for client in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = client else { continue };
        // An agent that went away refuses the step's connection, as a missing agent would.
        let Ok(upstream) = UnixStream::connect(agent) else {
            continue;
        };
        std::thread::spawn(move || relay(client, upstream));
    }
}

/// Copies both ways until either side closes; the step's end closes its side.
fn relay(client: UnixStream, upstream: UnixStream) {
    let (Ok(mut client_reader), Ok(mut upstream_writer)) =
        (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let requests = std::thread::spawn(move || {
        let _ = io::copy(&mut client_reader, &mut upstream_writer);
        let _ = upstream_writer.shutdown(std::net::Shutdown::Write);
    });
    let (mut upstream_reader, mut client_writer) = (upstream, client);
    let _ = io::copy(&mut upstream_reader, &mut client_writer);
    let _ = client_writer.shutdown(std::net::Shutdown::Both);
    let _ = requests.join();
}

impl Drop for AgentForward {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which sees the flag and ends, closing the listener.
        let _ = UnixStream::connect(&self.socket);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// An "agent" that answers every request with the request reversed, until it is dropped.
    fn echo_agent(path: &Path) -> JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut request = Vec::new();
                stream.read_to_end(&mut request).unwrap();
                request.reverse();
                if request == b"pots" {
                    return;
                }
                stream.write_all(&request).unwrap();
            }
        })
    }

    #[test]
    fn connections_are_forwarded_through_a_socket_with_the_mounts_mode_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent.sock");
        let server = echo_agent(&agent);
        let socket = dir.path().join("step.sock");
        let forward = AgentForward::start(&agent, &socket, 0o660, 1234, 5678).unwrap();
        let meta = std::fs::metadata(&socket).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
        for request in ["first", "second"] {
            let mut client = UnixStream::connect(&socket).unwrap();
            client.write_all(request.as_bytes()).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).unwrap();
            assert_eq!(answer, request.chars().rev().collect::<String>());
        }
        drop(forward);
        assert!(
            !socket.exists(),
            "the step's socket is gone with the forward"
        );
        let mut stop = UnixStream::connect(&agent).unwrap();
        stop.write_all(b"stop").unwrap();
        stop.shutdown(std::net::Shutdown::Write).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn a_key_file_or_a_missing_agent_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id_ed25519");
        std::fs::write(&key, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        let socket = dir.path().join("step.sock");
        let error = AgentForward::start(&key, &socket, 0o600, 0, 0)
            .err()
            .unwrap();
        assert!(error.contains("is not a socket"), "{error}");
        assert!(error.contains(&key.display().to_string()), "{error}");
        let missing = dir.path().join("gone.sock");
        let error = AgentForward::start(&missing, &socket, 0o600, 0, 0)
            .err()
            .unwrap();
        assert!(error.contains(&missing.display().to_string()), "{error}");
        assert!(!socket.exists());
    }
}
