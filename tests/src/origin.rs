//! TLS origin servers for the DestinationRule tests: the proxy, not the client,
//! speaks TLS to them, so they report what the proxy's handshake carried.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    sync::Arc,
};

use rustls::{ServerConfig, pki_types::CertificateDer};

use crate::tls::serve_tls;

/// Serves TLS on `addr`. A request starting `GET ` gets an HTTP/1.1 answer whose
/// body is `<name> sni=<sni> client=<label>`; any other first line gets that text
/// plus ` got=<line>` on one line. `<label>` names the client certificate the proxy
/// presented, from `clients` (DER, label), `-` for none and `?` for an unknown one.
pub fn start_origin_server(
    name: &str,
    addr: &str,
    config: Arc<ServerConfig>,
    clients: Vec<(CertificateDer<'static>, String)>,
) {
    let name = name.to_owned();
    serve_tls(addr, config, move |tls| {
        let sni = tls.conn.server_name().unwrap_or("-").to_owned();
        let client = match tls.conn.peer_certificates().and_then(|chain| chain.first()) {
            None => "-".to_owned(),
            Some(presented) => clients
                .iter()
                .find(|(der, _)| der == presented)
                .map_or_else(|| "?".to_owned(), |(_, label)| label.clone()),
        };
        let who = format!("{name} sni={sni} client={client}");
        let mut reader = BufReader::new(&mut *tls);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        if line.starts_with("GET ") {
            // The rest of the head, to its blank line.
            loop {
                let mut header = String::new();
                match reader.read_line(&mut header) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if header == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let _ = write!(
                tls,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{who}",
                who.len()
            );
        } else {
            let _ = writeln!(tls, "{who} got={}", line.trim());
        }
    });
}
