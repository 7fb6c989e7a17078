//! Reading the Host of a plaintext HTTP/1 request without consuming it.

/// What a buffer holding the start of a connection says so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpRequest {
    Incomplete,
    /// The request head is complete; the host is lower-cased and without a port.
    Complete {
        host: Option<String>,
    },
    Invalid(&'static str),
}

/// Parses the request line and headers at the start of `buffer`.
pub fn parse_request_head(buffer: &[u8]) -> HttpRequest {
    let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        if buffer.len() >= 3 && !buffer[..3].iter().all(u8::is_ascii_uppercase) {
            return HttpRequest::Invalid("does not start with an HTTP method");
        }
        return HttpRequest::Incomplete;
    };
    let Ok(head) = std::str::from_utf8(&buffer[..end]) else {
        return HttpRequest::Invalid("the request head is not UTF-8");
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return HttpRequest::Invalid("malformed request line");
    };
    if method.is_empty() || !version.starts_with("HTTP/1.") {
        return HttpRequest::Invalid("not an HTTP/1 request");
    }
    let header_host = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim())
    });
    // An absolute-form target (a request to a proxy) names the host itself.
    let target_host = target
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or_default());
    let host = header_host
        .or(target_host)
        .map(strip_port)
        .filter(|host| super::sni::is_plausible_host(host))
        .map(str::to_ascii_lowercase);
    HttpRequest::Complete { host }
}

fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_host_header_without_its_port() {
        assert_eq!(
            parse_request_head(
                b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHOST: Api.Example.com:8080\r\n\r\n"
            ),
            HttpRequest::Complete {
                host: Some("api.example.com".into())
            }
        );
        assert_eq!(
            parse_request_head(b"GET http://proxy.example/x HTTP/1.1\r\n\r\n"),
            HttpRequest::Complete {
                host: Some("proxy.example".into())
            }
        );
        assert_eq!(
            parse_request_head(b"GET / HTTP/1.0\r\n\r\n"),
            HttpRequest::Complete { host: None }
        );
    }

    #[test]
    fn waits_for_the_whole_head_and_rejects_non_http() {
        assert_eq!(
            parse_request_head(b"GET / HTTP/1.1\r\nHost: a"),
            HttpRequest::Incomplete
        );
        assert!(matches!(
            parse_request_head(b"\x16\x03\x01"),
            HttpRequest::Invalid(_)
        ));
        assert!(matches!(
            parse_request_head(b"SSH-2.0\r\n\r\n"),
            HttpRequest::Invalid(_)
        ));
    }
}
