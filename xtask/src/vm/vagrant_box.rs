//! `cargo xtask vm --box`: the matrix image as a libvirt Vagrant box.

use std::path::Path;

use anyhow::{Result, bail};

use super::image::Image;

pub fn write(_image: &Image, path: &Path) -> Result<()> {
    bail!("writing {} is not implemented yet", path.display())
}
