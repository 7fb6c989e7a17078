//! Reading the SNI from a TLS ClientHello without consuming it: the bytes stay in the
//! caller's buffer and are replayed to the upstream unchanged. TLS is never terminated.

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_client_hello_extensions,
    parse_tls_message_handshake,
};

/// What a buffer holding the start of a connection says so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHello {
    /// More bytes are needed.
    Incomplete,
    /// A whole ClientHello, with its server name if it sent one.
    Complete { server_name: Option<String> },
    /// Not a TLS ClientHello; the reason is for the log.
    Invalid(&'static str),
}

const RECORD_HEADER_LEN: usize = 5;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;
/// RFC 8446 allows records up to 2^14 bytes of plaintext (+256 for older versions).
const MAX_RECORD_LEN: usize = (1 << 14) + 256;

/// Parses the ClientHello at the start of `buffer`, reassembling it across TLS records
/// (a ClientHello may be fragmented into several) and however TCP split the bytes.
pub fn parse_client_hello(buffer: &[u8]) -> ClientHello {
    if let Some(&first) = buffer.first()
        && first != CONTENT_TYPE_HANDSHAKE
    {
        return ClientHello::Invalid("the first byte is not a TLS handshake record");
    }
    let mut handshake = Vec::new();
    let mut offset = 0;
    while buffer.len() >= offset + RECORD_HEADER_LEN {
        let header = &buffer[offset..offset + RECORD_HEADER_LEN];
        if header[0] != CONTENT_TYPE_HANDSHAKE {
            return ClientHello::Invalid(
                "a record before the end of the ClientHello is not a handshake record",
            );
        }
        if header[1] != 3 {
            return ClientHello::Invalid("unknown TLS record version");
        }
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if record_len == 0 || record_len > MAX_RECORD_LEN {
            return ClientHello::Invalid("TLS record length out of range");
        }
        let payload_start = offset + RECORD_HEADER_LEN;
        let Some(payload) = buffer.get(payload_start..payload_start + record_len) else {
            return ClientHello::Incomplete;
        };
        handshake.extend_from_slice(payload);
        offset = payload_start + record_len;

        if handshake.len() < 4 {
            continue;
        }
        if handshake[0] != HANDSHAKE_TYPE_CLIENT_HELLO {
            return ClientHello::Invalid("the first handshake message is not a ClientHello");
        }
        let message_len =
            u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
        if handshake.len() >= 4 + message_len {
            return server_name(&handshake[..4 + message_len]);
        }
    }
    ClientHello::Incomplete
}

fn server_name(message: &[u8]) -> ClientHello {
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        parse_tls_message_handshake(message)
    else {
        return ClientHello::Invalid("malformed ClientHello");
    };
    let Some(extensions) = hello.ext else {
        return ClientHello::Complete { server_name: None };
    };
    let Ok((_, extensions)) = parse_tls_client_hello_extensions(extensions) else {
        return ClientHello::Invalid("malformed ClientHello extensions");
    };
    let server_name = extensions.iter().find_map(|extension| match extension {
        TlsExtension::SNI(names) => names
            .iter()
            .find(|(kind, _)| *kind == SNIType::HostName)
            .and_then(|(_, name)| std::str::from_utf8(name).ok())
            .filter(|name| is_plausible_host(name))
            .map(str::to_ascii_lowercase),
        _ => None,
    });
    ClientHello::Complete { server_name }
}

/// DNS names only: anything else in an SNI is a client bug or an attack, and must not
/// reach logs or metrics labels unchecked.
pub fn is_plausible_host(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2-style ClientHello with one SNI, built by hand.
    pub(crate) fn client_hello(server_name: &str) -> Vec<u8> {
        let name = server_name.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut extensions = Vec::new();
        extensions.extend_from_slice(&0u16.to_be_bytes());
        extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![HANDSHAKE_TYPE_CLIENT_HELLO];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        handshake
    }

    fn records(handshake: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in handshake.chunks(chunk) {
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn reads_the_server_name_from_one_record() {
        let bytes = records(&client_hello("API.Example.com"), 1 << 14);
        assert_eq!(
            parse_client_hello(&bytes),
            ClientHello::Complete {
                server_name: Some("api.example.com".into())
            }
        );
    }

    #[test]
    fn reassembles_a_hello_split_across_records_and_segments() {
        let bytes = records(&client_hello("split.example.com"), 7);
        for cut in 0..bytes.len() {
            assert_eq!(
                parse_client_hello(&bytes[..cut]),
                ClientHello::Incomplete,
                "cut {cut}"
            );
        }
        assert_eq!(
            parse_client_hello(&bytes),
            ClientHello::Complete {
                server_name: Some("split.example.com".into())
            }
        );
    }

    #[test]
    fn rejects_what_is_not_a_client_hello() {
        assert!(matches!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            ClientHello::Invalid(_)
        ));
        assert!(matches!(
            parse_client_hello(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            ClientHello::Invalid(_)
        ));
        assert!(matches!(
            parse_client_hello(&[0x16, 9, 1, 0, 4]),
            ClientHello::Invalid(_)
        ));
        assert!(matches!(
            parse_client_hello(&records(&client_hello("bad name\n"), 1 << 14)),
            ClientHello::Complete { server_name: None }
        ));
    }
}
