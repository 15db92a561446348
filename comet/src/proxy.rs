//! The PROXY protocol (HAProxy's, versions 1 and 2) a load balancer puts before a client's
//! bytes, so the comet sees the client's address instead of the balancer's. Pure: parsed
//! from bytes, tested on bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 2's 12-byte signature.
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's longest line, CRLF included.
const V1_MAX: usize = 107;
/// The most a v2 header may carry (addresses and TLVs); more is refused, not buffered.
const V2_MAX_BODY: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("bad PROXY protocol header: {0}")]
    Bad(&'static str),
}

/// A parsed header: the client's address (`None` for `LOCAL`/`UNKNOWN`: the balancer's own
/// connection, such as a health check) and the header's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub source: Option<SocketAddr>,
    pub len: usize,
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] == V2_SIG[..n] {
        return if buf.len() < 16 { Ok(None) } else { v2(buf) };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return v1(buf);
    }
    Err(ProxyError::Missing)
}

fn v1(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::Bad("v1 line too long"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Bad("v1 not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let source = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Bad("v1 source address"))?;
            if ip.is_ipv4() != (*fam == "TCP4") {
                return Err(ProxyError::Bad("v1 address family mismatch"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Bad("v1 source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Bad("v1 fields")),
    };
    Ok(Some(Header {
        source,
        len: end + 2,
    }))
}

fn v2(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Bad("v2 version"));
    }
    let body_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if body_len > V2_MAX_BODY {
        return Err(ProxyError::Bad("v2 header too long"));
    }
    let len = 16 + body_len;
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[16..len];
    let source = match (ver_cmd & 0x0f, buf[13]) {
        // LOCAL: the balancer speaking for itself.
        (0, _) => None,
        // PROXY over TCP/IPv4 or TCP/IPv6 (UDP and UNIX are not ours to serve).
        (1, 0x11) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        (1, 0x21) if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Some(SocketAddr::new(Ipv6Addr::from(a).into(), port))
        }
        (1, 0x00) => None,
        (1, _) => return Err(ProxyError::Bad("v2 family or length")),
        _ => return Err(ProxyError::Bad("v2 command")),
    };
    Ok(Some(Header { source, len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn version_1() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 3101\r\nrest";
        assert_eq!(
            parse(line),
            Ok(Some(Header {
                source: Some("203.0.113.7:51234".parse().unwrap()),
                len: line.len() - 4
            }))
        );
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 3101\r\n";
        assert_eq!(
            parse(v6).unwrap().unwrap().source,
            Some("[2001:db8::1]:4000".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().source, None);
        // Byte by byte: more is needed until the line ends.
        for i in 0..line.len() - 4 {
            assert_eq!(parse(&line[..i]), Ok(None), "{i}");
        }
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(matches!(parse(bad), Err(ProxyError::Bad(_))), "{bad:?}");
        }
        assert_eq!(parse(&[b'P'; 200][..]), Err(ProxyError::Missing));
        let mut long = b"PROXY ".to_vec();
        long.extend([b'x'; 200]);
        assert!(matches!(parse(&long), Err(ProxyError::Bad(_))));
        assert_eq!(parse(b"GET /sub HTTP/1.1\r\n"), Err(ProxyError::Missing));
        assert_eq!(parse(&[0, 0, 0, 16]), Err(ProxyError::Missing));
    }

    #[test]
    fn version_2() {
        let mut v4 = vec![198, 51, 100, 9, 10, 0, 0, 1];
        v4.extend_from_slice(&4242u16.to_be_bytes());
        v4.extend_from_slice(&3101u16.to_be_bytes());
        let h = v2_header(1, 0x11, &v4);
        assert_eq!(
            parse(&h),
            Ok(Some(Header {
                source: Some("198.51.100.9:4242".parse().unwrap()),
                len: 28
            }))
        );
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Ok(None), "{i}");
        }
        let mut v6 = Ipv6Addr::LOCALHOST.octets().to_vec();
        v6.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
        v6.extend_from_slice(&7u16.to_be_bytes());
        v6.extend_from_slice(&8u16.to_be_bytes());
        // TLVs after the addresses are skipped.
        v6.extend_from_slice(&[0x04, 0, 1, 0]);
        assert_eq!(
            parse(&v2_header(1, 0x21, &v6)).unwrap().unwrap().source,
            Some("[::1]:7".parse().unwrap())
        );
        assert_eq!(parse(&v2_header(0, 0, &[])).unwrap().unwrap().source, None);
        let mut bad_ver = v2_header(1, 0x11, &v4);
        bad_ver[12] = 0x11;
        for bad in [
            bad_ver,
            v2_header(1, 0x11, &v4[..6]),
            v2_header(1, 0x12, &v4),
            v2_header(2, 0x11, &v4),
            v2_header(1, 0x11, &[0u8; 600]),
        ] {
            assert!(matches!(parse(&bad), Err(ProxyError::Bad(_))), "{bad:?}");
        }
    }
}
