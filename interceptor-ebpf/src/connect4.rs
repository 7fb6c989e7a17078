use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::{ipv4_in_mapped, ipv4_mapped};

use crate::{
    maps::globals,
    redirect::{Redirect, proxies_for_ipv4, redirect, set_user_ipv4, user_ipv4},
};

/// connect4 must return 1: 0 fails the application's connect() with EPERM.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let globals = globals();
    if crate::dns::capture4(&ctx, &globals) {
        return ALLOW;
    }
    let (addr, port) = user_ipv4(ctx.sock_addr);
    match redirect(
        &ctx,
        &globals,
        (ipv4_mapped(addr), port),
        proxies_for_ipv4(&globals),
        true,
    ) {
        Some(Redirect::Proxy((to_addr, to_port)) | Redirect::Backend((to_addr, to_port))) => {
            if let Some(to_addr) = ipv4_in_mapped(to_addr) {
                set_user_ipv4(ctx.sock_addr, (to_addr, to_port));
            }
        }
        Some(Redirect::Refuse) => {
            match crate::dns::refusal((ipv4_mapped(addr), port))
                .and_then(|(to, port)| Some((ipv4_in_mapped(to)?, port)))
            {
                Some(to) => set_user_ipv4(ctx.sock_addr, to),
                None => return REJECT,
            }
        }
        None => {
            if let Some((to, port)) = crate::dns::refuse(&ctx, &globals, (ipv4_mapped(addr), port))
                && let Some(to) = ipv4_in_mapped(to)
            {
                set_user_ipv4(ctx.sock_addr, (to, port));
            }
        }
    }
    ALLOW
}
