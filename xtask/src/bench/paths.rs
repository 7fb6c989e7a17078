//! The paths a run measures, one entry each, in table order, and the like-for-like
//! pairs the report compares. A new path is one more entry in [`all`].

/// How a path's proxy is run; `Direct` has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Direct,
    /// The daemon, with these flags after the run's `--daemon-arg`s.
    Interceptor {
        args: Vec<String>,
    },
    /// HAProxy in TCP mode with `option splice-auto`; `busy_polling` adds the global
    /// `busy-polling`.
    Haproxy {
        busy_polling: bool,
    },
    /// nginx's stream proxy.
    Nginx,
}

#[derive(Debug, Clone)]
pub struct PathSpec {
    /// The table's column, at most 12 characters.
    pub name: &'static str,
    pub kind: Kind,
}

impl PathSpec {
    pub fn is_proxy(&self) -> bool {
        self.kind != Kind::Direct
    }
}

/// An interceptor path and the peers raced against it: figures are compared only
/// within a pair, never across, because a spinning proxy buys latency with CPU.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    /// Short label for the table's ratio column.
    pub label: &'static str,
    pub interceptor: &'static str,
    pub peers: &'static [&'static str],
}

/// Busy polling on both sides: the daemon's adaptive spinning against HAProxy's
/// `busy-polling`. nginx has no such option, so it is not in this pair.
pub const POLL_PAIR: Pair = Pair {
    label: "poll",
    interceptor: "icpt-poll",
    peers: &["haproxy-poll"],
};

/// No spinning anywhere: `--busy-poll-us 0` against HAProxy and nginx as shipped
/// for this job; the better of the two is the bar.
pub const BLOCKING_PAIR: Pair = Pair {
    label: "no-poll",
    interceptor: "icpt",
    peers: &["haproxy", "nginx"],
};

pub const PAIRS: [Pair; 2] = [POLL_PAIR, BLOCKING_PAIR];

/// The busy-polling window of the `icpt-poll` path: the daemon's default, spelled
/// out so a change of default does not silently change the race.
const BUSY_POLL_US: &str = "50";

/// Flags every proxied interceptor path of the race gets: the plain-TCP STATIC entry
/// the bench uses would otherwise take the kernel path, which has a column of its own.
const PROXY_PATH: &[&str] = &["--datapath", "proxy"];

fn interceptor(extra: &[&str]) -> Kind {
    Kind::Interceptor {
        args: PROXY_PATH
            .iter()
            .chain(extra)
            .map(|&arg| arg.to_owned())
            .collect(),
    }
}

/// The interceptor path whose connects go straight to a backend.
pub const KERNEL_PATH: &str = "icpt-kernel";

/// Every path, in table order.
pub fn all() -> Vec<PathSpec> {
    vec![
        PathSpec {
            name: "direct",
            kind: Kind::Direct,
        },
        PathSpec {
            name: "icpt-poll",
            kind: interceptor(&["--busy-poll-us", BUSY_POLL_US]),
        },
        PathSpec {
            name: "haproxy-poll",
            kind: Kind::Haproxy { busy_polling: true },
        },
        PathSpec {
            name: "icpt",
            kind: interceptor(&["--busy-poll-us", "0"]),
        },
        PathSpec {
            name: "haproxy",
            kind: Kind::Haproxy {
                busy_polling: false,
            },
        },
        PathSpec {
            name: "nginx",
            kind: Kind::Nginx,
        },
        // The kernel path has no peer to pair with: no proxy can skip the second
        // connection, so it is compared with direct only.
        PathSpec {
            name: KERNEL_PATH,
            kind: Kind::Interceptor {
                args: vec!["--datapath".into(), "auto".into()],
            },
        },
    ]
}

/// The position of `name` in `paths`.
pub fn index(paths: &[PathSpec], name: &str) -> Option<usize> {
    paths.iter().position(|path| path.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair_names_existing_paths_and_columns_fit() {
        let paths = all();
        for pair in PAIRS {
            assert!(
                index(&paths, pair.interceptor).is_some(),
                "{}",
                pair.interceptor
            );
            for peer in pair.peers {
                assert!(index(&paths, peer).is_some(), "{peer}");
            }
        }
        assert!(paths.iter().all(|path| path.name.len() <= 12));
        let mut names: Vec<&str> = paths.iter().map(|path| path.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), paths.len(), "path names are unique");
    }

    #[test]
    fn the_pairs_differ_only_in_busy_polling() {
        let paths = all();
        let args = |name| match &paths[index(&paths, name).unwrap()].kind {
            Kind::Interceptor { args } => args.clone(),
            other => panic!("{name} is {other:?}"),
        };
        assert!(args(POLL_PAIR.interceptor).ends_with(&["--busy-poll-us".into(), "50".into()]));
        assert!(args(BLOCKING_PAIR.interceptor).ends_with(&["--busy-poll-us".into(), "0".into()]));
        assert_eq!(
            paths[index(&paths, POLL_PAIR.peers[0]).unwrap()].kind,
            Kind::Haproxy { busy_polling: true }
        );
    }
}
