//! A throwaway PostgreSQL cluster on loopback, for tests and benchmarks: `initdb` into a temporary
//! directory, `pg_ctl start` on a free port, trust authentication, stopped and deleted on drop.
//! `initdb` and `pg_ctl` refuse to run as root: as root, the cluster runs as the `postgres`
//! system user (override with `MRREC_PG_USER`) through `runuser`.

use std::path::PathBuf;
use std::process::Command;

/// A running throwaway cluster.
pub struct TestCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<String>,
}

fn find_bin() -> Option<PathBuf> {
    if let Ok(b) = std::env::var("MRREC_PG_BIN") {
        return Some(PathBuf::from(b));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Some(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl TestCluster {
    /// Starts a cluster, or says why it cannot.
    pub fn start() -> Result<TestCluster, String> {
        let bin = find_bin().ok_or("PostgreSQL binaries not found (install postgresql, or set MRREC_PG_BIN to the directory holding initdb and pg_ctl)")?;
        let run_as = if is_root() {
            Some(std::env::var("MRREC_PG_USER").unwrap_or_else(|_| "postgres".into()))
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!(
            "mrrec-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = free_port().map_err(|e| e.to_string())?;
        let c = TestCluster {
            dir,
            bin,
            port,
            run_as,
        };
        if let Some(u) = &c.run_as {
            let st = Command::new("chown")
                .args(["-R", u])
                .arg(&c.dir)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("chown {u} {} failed", c.dir.display()));
            }
        }
        let data = c.dir.join("data");
        c.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "mrrec",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        c.start_again()?;
        Ok(c)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            Err(format!(
                "{tool} failed: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Connection URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://mrrec@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a fresh database and returns its URL (one per test keeps tests independent).
    pub fn fresh_database(&self, name: &str) -> Result<String, String> {
        let mut c =
            postgres::Client::connect(&self.url(), postgres::NoTls).map_err(|e| e.to_string())?;
        let name: String = name
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() {
                    ch.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(|e| e.to_string())?;
        Ok(format!("postgres://mrrec@127.0.0.1:{}/{name}", self.port))
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the (stopped) cluster again on the same port and data.
    pub fn start_again(&self) -> Result<(), String> {
        let c = self;
        let data = self.data_dir();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c shared_buffers=32MB",
            c.port,
            c.dir.display()
        );
        c.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &opts,
                "-l",
                &c.dir.join("log").to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(())
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`: no checkpoint, every
    /// backend killed; committed transactions survive through the WAL).
    pub fn crash(&self) {
        self.stop();
    }

    fn stop(&self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir().to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
