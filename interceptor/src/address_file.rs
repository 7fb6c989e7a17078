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

#[derive(Debug, thiserror::Error)]
pub enum AddressFileError {
    #[error("cannot write the address file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot read the address file {path}: {source} (is the daemon running with --address-file {path}?)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the address file {path} is not one interceptor wrote: {source}")]
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
}

/// The file of a running daemon, kept current and removed when it stops.
#[derive(Debug)]
pub struct AddressFile {
    path: PathBuf,
    addresses: Mutex<Addresses>,
}

impl AddressFile {
    /// Removes what a previous daemon left at `path`, which may name ports that
    /// someone else listens on now, before this daemon has anything to say.
    pub fn clear_stale(path: &Path) -> Result<(), AddressFileError> {
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
            warn!(%error, "probes reading the address file still find the previous admin address");
        }
    }

    pub fn read(path: &Path) -> Result<Addresses, AddressFileError> {
        let text = std::fs::read(path).map_err(|source| AddressFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| AddressFileError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

impl Drop for AddressFile {
    /// A stopped daemon answers nowhere; a probe should say so rather than ask
    /// whoever takes its ports next.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Replaces the file whole, so a reader never sees half of it.
fn write(path: &Path, addresses: &Addresses) -> Result<(), AddressFileError> {
    let error = |source| AddressFileError::Write {
        path: path.to_owned(),
        source,
    };
    let mut staged = path.as_os_str().to_owned();
    staged.push(".tmp");
    let staged = PathBuf::from(staged);
    let mut file = std::fs::File::create(&staged).map_err(error)?;
    let mut text = serde_json::to_vec_pretty(addresses).expect("addresses serialize");
    text.push(b'\n');
    file.write_all(&text).map_err(error)?;
    std::fs::rename(&staged, path).map_err(error)
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
            Err(AddressFileError::Read { .. })
        ));

        let first = Addresses {
            admin: "127.0.0.1:40000".parse().unwrap(),
            proxy: vec!["127.0.0.1:40001".parse().unwrap()],
            pid: 7,
        };
        let file = AddressFile::create(path.clone(), first.clone()).unwrap();
        assert_eq!(AddressFile::read(&path).unwrap(), first);
        file.admin_moved("127.0.0.1:15000".parse().unwrap());
        assert_eq!(
            AddressFile::read(&path).unwrap().admin,
            "127.0.0.1:15000".parse::<SocketAddr>().unwrap()
        );
        drop(file);
        assert!(!path.exists());
        std::fs::write(&path, "{\"admin\": 1}").unwrap();
        assert!(matches!(
            AddressFile::read(&path),
            Err(AddressFileError::Parse { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
