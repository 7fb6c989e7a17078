//! `cargo xtask vm --box`: the matrix image as a libvirt Vagrant box, for machines
//! that cannot download one. It is the same provisioned tree plus what Vagrant needs
//! to reach a box: sshd, a `vagrant` user with Vagrant's well-known insecure key
//! (Vagrant replaces it on first boot), and DHCP on the first interface. The box has
//! no bootloader: its own Vagrantfile boots the kernel and initramfs it carries.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result};

use super::image::{Boot, Image};
use crate::check;

const BOX_DISK_SIZE: &str = "8G";

const BOX_VAGRANTFILE: &str = r#"# Written by `cargo xtask vm --box`: boots the kernel the box carries.
Vagrant.configure("2") do |config|
  box_dir = File.dirname(__FILE__)
  config.vm.provider :libvirt do |libvirt|
    libvirt.kernel = File.join(box_dir, "vmlinuz")
    libvirt.initrd = File.join(box_dir, "initrd.img")
    libvirt.cmd_line = "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0"
    libvirt.disk_bus = "virtio"
  end
end
"#;

const NETWORK: &str = "[Match]\nName=eth*\n\n[Network]\nDHCP=yes\n";

pub fn write(image: &Image, boot: &Boot, vm_dir: &Path, path: &Path) -> Result<()> {
    let key = vagrant_insecure_key()?;
    let tree = vm_dir.join("box-rootfs");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    println!("xtask vm: copying the image for the box");
    check(Command::new("cp").arg("-a").arg(image.rootfs()).arg(&tree))?;
    // The chroot has the host's network: apt reaches the mirror the tree names.
    let in_tree = |script: &str| {
        check(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(format!(
                    "mount -t proc proc {0}/proc && mount --rbind /dev {0}/dev && \
                     cp /etc/resolv.conf {0}/etc/resolv.conf && exec chroot {0} sh -ec '{script}'",
                    tree.display()
                ))
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        )
    };
    in_tree(
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends openssh-server sudo && \
         useradd --create-home --shell /bin/bash vagrant && \
         echo \"vagrant ALL=(ALL) NOPASSWD: ALL\" > /etc/sudoers.d/vagrant && \
         chmod 0440 /etc/sudoers.d/vagrant && install -d -m 0700 -o vagrant -g vagrant \
         /home/vagrant/.ssh && systemctl enable systemd-networkd ssh && \
         systemctl unmask systemd-networkd-wait-online.service && apt-get clean",
    )?;
    let ssh = tree.join("home/vagrant/.ssh/authorized_keys");
    fs::write(&ssh, key)?;
    in_tree(
        "chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys && \
         chmod 0600 /home/vagrant/.ssh/authorized_keys",
    )?;
    fs::write(tree.join("etc/systemd/network/10-eth.network"), NETWORK)?;
    fs::write(tree.join("etc/fstab"), "/dev/vda / ext4 defaults 0 1\n")?;

    let staging = vm_dir.join("box");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    let raw = vm_dir.join("box-rootfs.img");
    let _ = fs::remove_file(&raw);
    check(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(&tree)
            .arg(&raw)
            .arg(BOX_DISK_SIZE),
    )?;
    check(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(staging.join("box.img")),
    )?;
    fs::remove_file(&raw)?;
    fs::remove_dir_all(&tree)?;
    fs::copy(&boot.vmlinuz, staging.join("vmlinuz"))?;
    fs::copy(&boot.initrd, staging.join("initrd.img"))?;
    fs::write(staging.join("Vagrantfile"), BOX_VAGRANTFILE)?;
    fs::write(
        staging.join("metadata.json"),
        format!(
            "{{\"provider\": \"libvirt\", \"format\": \"qcow2\", \"virtual_size\": {}}}\n",
            BOX_DISK_SIZE.trim_end_matches('G')
        ),
    )?;
    check(
        Command::new("tar")
            .arg("-czf")
            .arg(path)
            .arg("-C")
            .arg(&staging)
            .args([
                "metadata.json",
                "Vagrantfile",
                "box.img",
                "vmlinuz",
                "initrd.img",
            ]),
    )?;
    fs::remove_dir_all(&staging)?;
    println!(
        "xtask vm: wrote {} (kernel {}); add it with: vagrant box add --name interceptor/local {}",
        path.display(),
        boot.release,
        path.display()
    );
    Ok(())
}

/// Vagrant's insecure public key, from the installed Vagrant (Debian's package or
/// upstream's), so the box takes no key from anywhere else.
fn vagrant_insecure_key() -> Result<String> {
    let output = Command::new("sh")
        .args([
            "-c",
            "ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
             /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -1",
        ])
        .output()
        .context("looking for Vagrant's key")?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if path.is_empty() {
        anyhow::bail!(
            "--box needs Vagrant installed (apt-get install vagrant) for its insecure public key"
        );
    }
    fs::read_to_string(&path).with_context(|| format!("reading {path}"))
}
