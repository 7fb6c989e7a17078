//! Loading the configuration and building the registry from it: one way for the
//! daemon's start, its reloads and `interceptor validate`.

use std::path::PathBuf;

use tracing::{info, warn};

use crate::{
    config::{self, ConfigSet, Finding},
    registry::{Allocations, BuildError, Registry},
};

/// A configuration that can be served.
#[derive(Debug)]
pub struct Loaded {
    pub registry: Registry,
    /// What the loader and the build accept but ignore or doubt, in that order.
    pub warnings: Vec<Finding>,
    /// Documents of kinds this program does not handle.
    pub skipped: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] config::LoadError),
    /// Every document parsed and checked, but the whole cannot be served.
    #[error("{error}")]
    Build {
        error: BuildError,
        warnings: Vec<Finding>,
        skipped: Vec<String>,
    },
}

impl LoadError {
    /// Whether the load failed only because the daemon ran short of descriptors or
    /// memory while reading files: the configuration may be fine, and a later try
    /// may load it.
    pub fn is_shortage(&self) -> bool {
        match self {
            Self::Config(config::LoadError::Read { source, .. }) => {
                crate::limits::is_shortage(source)
            }
            Self::Config(_) => false,
            Self::Build { error, .. } => error.shortage,
        }
    }

    /// Every finding, warnings first, for `validate`; `Err` for a failure that is no
    /// finding (a file that cannot be read, a directory without configuration).
    pub fn into_findings(self) -> Result<Vec<Finding>, config::LoadError> {
        match self {
            Self::Config(config::LoadError::Invalid { findings }) => Ok(findings),
            Self::Config(error) => Err(error),
            Self::Build {
                error, warnings, ..
            } => Ok(warnings.into_iter().chain(error.findings).collect()),
        }
    }
}

/// Loads and checks the whole configuration at `paths` and builds a registry from it.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, LoadError> {
    load_with(paths, ConfigSet::default(), &Allocations::default())
}

/// [`load`], with resources from the Kubernetes API beside the files', keeping the
/// `previous` VIP allocations where they still hold.
pub fn load_with(
    paths: &[PathBuf],
    extra: ConfigSet,
    previous: &Allocations,
) -> Result<Loaded, LoadError> {
    let loaded = config::load_with(paths, extra)?;
    match Registry::build_allocating(&loaded.config, previous) {
        Ok((registry, build_warnings)) => Ok(Loaded {
            registry,
            warnings: loaded.warnings.into_iter().chain(build_warnings).collect(),
            skipped: loaded.skipped,
        }),
        Err(error) => Err(LoadError::Build {
            error,
            warnings: loaded.warnings,
            skipped: loaded.skipped,
        }),
    }
}

/// [`load`], for the daemon: what is skipped or doubtful goes to the log. Nothing is
/// applied unless all of it is valid.
pub fn load_and_log(
    paths: &[PathBuf],
    extra: ConfigSet,
    previous: &Allocations,
) -> Result<Registry, LoadError> {
    let log = |skipped: &[String], warnings: &[Finding]| {
        for skipped in skipped {
            info!("skipping {skipped}: not a kind interceptor handles");
        }
        for warning in warnings {
            warn!("{warning}");
        }
    };
    match load_with(paths, extra, previous) {
        Ok(loaded) => {
            log(&loaded.skipped, &loaded.warnings);
            Ok(loaded.registry)
        }
        Err(error) => {
            if let LoadError::Build {
                warnings, skipped, ..
            } = &error
            {
                log(skipped, warnings);
            }
            Err(error)
        }
    }
}
