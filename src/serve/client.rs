//! A small blocking HTTP/1.1 client with keep-alive, for talking to `sd2 serve` from Rust
//! without an HTTP stack: the load generator of `sd2 bench serve` and the tests' client. Plain
//! HTTP only (no TLS, no redirects); bodies are sent with a length.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest answer body read (an answer for a 256-frame video is well under this).
const MAX_ANSWER: usize = 64 << 20;

/// An answer.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> std::io::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| bad(format!("answer is not JSON: {e}")))
    }
}

/// One connection to a server, reopened when the server closes it.
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    conn: Option<BufReader<TcpStream>>,
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

impl Client {
    /// A client of the server at `addr`; each read or write may take `timeout`.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Client {
        Client {
            addr,
            timeout,
            conn: None,
        }
    }

    fn connect(&mut self) -> std::io::Result<&mut BufReader<TcpStream>> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        self.conn
            .as_mut()
            .ok_or_else(|| bad("no connection".into()))
    }

    /// Sends `method path` with `headers` and `body`; a kept-alive connection the server had
    /// closed is reopened once.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        let reused = self.conn.is_some();
        match self.try_request(method, path, headers, body) {
            Err(e) if reused && is_closed(&e) => {
                self.conn = None;
                self.try_request(method, path, headers, body)
            }
            r => r,
        }
    }

    /// `POST path` with `body` as `content_type`.
    pub fn post(&mut self, path: &str, content_type: &str, body: &[u8]) -> std::io::Result<Answer> {
        self.request("POST", path, &[("content-type", content_type)], body)
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> std::io::Result<Answer> {
        self.request("GET", path, &[], &[])
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        let host = self.addr;
        let conn = self.connect()?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let s = conn.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let r = read_answer(conn);
        let close = match &r {
            Ok(a) => a.header("connection") == Some("close"),
            Err(_) => true,
        };
        if close {
            self.conn = None;
        }
        r
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted
    )
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    let n = r.by_ref().take(64 << 10).read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    Ok(line.trim_end().to_string())
}

fn read_answer(r: &mut impl BufRead) -> std::io::Result<Answer> {
    let status_line = read_line(r)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line `{status_line}`")))?;
    let mut headers = vec![];
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        if headers.len() > 256 {
            return Err(bad("too many headers".into()));
        }
    }
    let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let mut body = vec![];
    if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let size = read_line(r)?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(format!("bad chunk size `{size}`")))?;
            if size > MAX_ANSWER - body.len() {
                return Err(bad("answer too large".into()));
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..])?;
            read_line(r).or_else(|e| if size == 0 { Ok(String::new()) } else { Err(e) })?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad content-length `{len}`")))?;
        if len > MAX_ANSWER {
            return Err(bad("answer too large".into()));
        }
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if status != 204 && status != 304 {
        r.take(MAX_ANSWER as u64).read_to_end(&mut body)?;
        headers.push(("connection".into(), "close".into()));
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_a_length_or_in_chunks_are_read() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello";
        let a = read_answer(&mut &raw[..]).unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(a.header("x-a"), Some("b"));
        let raw = b"HTTP/1.1 503 Busy\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let a = read_answer(&mut &raw[..]).unwrap();
        assert_eq!((a.status, a.body.as_slice()), (503, &b"abcde"[..]));
        assert!(read_answer(&mut &b"garbage\r\n\r\n"[..]).is_err());
        assert!(read_answer(&mut &b""[..]).is_err());
    }
}
