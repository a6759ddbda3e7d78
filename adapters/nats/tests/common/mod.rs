//! Helpers shared by the NATS test binaries.

use std::time::{Duration, Instant};

/// A private nats-server with JetStream on its own port and store.
pub struct PrivateServer {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl PrivateServer {
    fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> std::process::Child {
        std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server on the PATH")
    }

    /// Starts it with `extra` command-line arguments (TLS, a config file).
    pub fn start(port: u16, dir: &std::path::Path, extra: &[&str]) -> PrivateServer {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        PrivateServer {
            child: Self::spawn(port, dir, &extra),
            port,
            dir: dir.to_owned(),
            extra,
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "private nats-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server and starts it again on the same port and store
    /// (the store survives: only `Drop` removes it).
    #[allow(dead_code)] // not every test binary restarts
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, &self.dir, &self.extra);
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
