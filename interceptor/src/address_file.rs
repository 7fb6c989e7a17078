//! The addresses a daemon really listens on, in a file that only it writes.
//!
//! A daemon started next to a running one finds the configured ports taken and
//! listens on free ones, so for a while the configured admin address answers for the
//! other daemon. A probe that must ask this daemon, such as the readiness probe of a
//! DaemonSet's surge pod (whose file lives in its own emptyDir), reads the admin
//! address here instead (`interceptor ready --address-file`).

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::report::Chain;

#[derive(Debug, thiserror::Error)]
pub enum AddressFileError {
    #[error("cannot write the address file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no address file at {path}: no daemon is running with --address-file {path}")]
    Missing { path: PathBuf },
    #[error("cannot read the address file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the address file {path} belongs to another running interceptor (pid {pid}); give each daemon a file of its own"
    )]
    InUse { path: PathBuf, pid: u32 },
    #[error("the address file {path} is not one interceptor wrote")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What the file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addresses {
    /// Where the admin server answers; the configured address once it is free.
    pub admin: SocketAddr,
    /// The proxy's listeners, the container ones included.
    pub proxy: Vec<SocketAddr>,
    pub pid: u32,
    /// Random per daemon, and sent by its admin server with every readiness answer,
    /// so a probe can tell this daemon from one that took its addresses after it
    /// died (pids cannot: in containers each daemon may be pid 1).
    pub instance: u64,
}

/// A number no other daemon picks.
pub fn new_instance() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    // std seeds each RandomState's keys from the OS's random source.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// The file of a running daemon, kept current and removed when it stops.
#[derive(Debug)]
pub struct AddressFile {
    path: PathBuf,
    addresses: Mutex<Addresses>,
}

impl AddressFile {
    /// Removes what a previous daemon left at `path` (one that was killed, say),
    /// which may name ports that someone else listens on now, before this daemon has
    /// anything to say; but refuses to take the file of a daemon still running.
    pub fn clear_stale(path: &Path) -> Result<(), AddressFileError> {
        if let Ok(previous) = Self::read(path)
            && previous.pid != std::process::id()
            && is_interceptor(previous.pid)
        {
            return Err(AddressFileError::InUse {
                path: path.to_owned(),
                pid: previous.pid,
            });
        }
        match std::fs::remove_file(path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(AddressFileError::Write {
                    path: path.to_owned(),
                    source: error,
                })
            }
            _ => Ok(()),
        }
    }

    pub fn create(path: PathBuf, addresses: Addresses) -> Result<Self, AddressFileError> {
        write(&path, &addresses)?;
        Ok(Self {
            path,
            addresses: Mutex::new(addresses),
        })
    }

    /// Records that the admin server now also answers at `admin`.
    pub fn admin_moved(&self, admin: SocketAddr) {
        let mut addresses = self
            .addresses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        addresses.admin = admin;
        if let Err(error) = write(&self.path, &addresses) {
            warn!(error = %Chain(&error), "probes reading the address file still find the previous admin address");
        }
    }

    pub fn read(path: &Path) -> Result<Addresses, AddressFileError> {
        let text = std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => AddressFileError::Missing {
                path: path.to_owned(),
            },
            _ => AddressFileError::Read {
                path: path.to_owned(),
                source,
            },
        })?;
        serde_json::from_slice(&text).map_err(|source| AddressFileError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

impl Drop for AddressFile {
    /// A stopped daemon answers nowhere; a probe should say so rather than ask
    /// whoever takes its ports next. A file that another daemon has written since is
    /// that one's.
    fn drop(&mut self) {
        let instance = self
            .addresses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .instance;
        if Self::read(&self.path).is_ok_and(|on_disk| on_disk.instance == instance) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `pid` runs a program of the same name as this one.
fn is_interceptor(pid: u32) -> bool {
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    comm(&pid.to_string()).is_some_and(|theirs| Some(theirs) == comm("self"))
}

/// Replaces the file whole, so a reader never sees half of it.
fn write(path: &Path, addresses: &Addresses) -> Result<(), AddressFileError> {
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!(".{}.tmp", std::process::id()));
    let staged = PathBuf::from(staged);
    let mut text = serde_json::to_vec_pretty(addresses).expect("addresses serialize");
    text.push(b'\n');
    let written = std::fs::File::create(&staged)
        .and_then(|mut file| file.write_all(&text))
        .and_then(|()| std::fs::rename(&staged, path));
    written.map_err(|source| {
        let _ = std::fs::remove_file(&staged);
        AddressFileError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_follows_the_admin_address_and_goes_with_the_daemon() {
        let dir = std::env::temp_dir().join(format!("address-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("addresses.json");
        std::fs::write(&path, "left by a previous daemon").unwrap();
        AddressFile::clear_stale(&path).unwrap();
        assert!(matches!(
            AddressFile::read(&path),
            Err(AddressFileError::Missing { .. })
        ));

        let first = Addresses {
            admin: "127.0.0.1:40000".parse().unwrap(),
            proxy: vec!["127.0.0.1:40001".parse().unwrap()],
            pid: std::process::id(),
            instance: new_instance(),
        };
        let file = AddressFile::create(path.clone(), first.clone()).unwrap();
        assert_eq!(AddressFile::read(&path).unwrap(), first);
        file.admin_moved("127.0.0.1:15000".parse().unwrap());
        assert_eq!(
            AddressFile::read(&path).unwrap().admin,
            "127.0.0.1:15000".parse::<SocketAddr>().unwrap()
        );
        // A running process of the same name as this one keeps its file: `sleep`
        // under this test binary's name (a process's name is its file's).
        let name = std::fs::read_to_string("/proc/self/comm").unwrap();
        let namesake = dir.join(name.trim_end());
        std::os::unix::fs::symlink("/bin/sleep", &namesake).unwrap();
        let mut other = std::process::Command::new(&namesake)
            .arg("10")
            .spawn()
            .unwrap();
        let theirs = Addresses {
            pid: other.id(),
            instance: new_instance(),
            ..first.clone()
        };
        assert_ne!(theirs.instance, first.instance);
        write(&path, &theirs).unwrap();
        let refused = AddressFile::clear_stale(&path);
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(
            matches!(refused, Err(AddressFileError::InUse { pid, .. }) if pid == theirs.pid),
            "{refused:?}"
        );
        // And this daemon, stopping, leaves a file another one has written since.
        drop(file);
        assert_eq!(AddressFile::read(&path).unwrap(), theirs);
        write(&path, &first).unwrap();
        drop(AddressFile {
            path: path.clone(),
            addresses: Mutex::new(first),
        });
        assert!(!path.exists());
        std::fs::write(&path, "{\"admin\": 1}").unwrap();
        assert!(matches!(
            AddressFile::read(&path),
            Err(AddressFileError::Parse { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
