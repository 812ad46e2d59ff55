//! One keep-alive HTTP/1.1 connection (hyper's client connection, no pool).

use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A connection that sends one request at a time and keeps the connection open between requests.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

/// A response: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    /// Whether the body contains `needle` (a cheap check of the decision's action).
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.body.windows(needle.len()).any(|w| w == needle)
    }
}

impl Conn {
    /// Opens a connection to `addr` (with `TCP_NODELAY`).
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, host: addr.to_string() })
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&mut self, method: Method, path: &str, body: Option<Bytes>) -> anyhow::Result<Answer> {
        self.sender.ready().await?;
        let mut request = Request::builder().method(method).uri(path).header(header::HOST, &self.host);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(body.unwrap_or_default()))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer { status, body })
    }

    /// `POST path` with a JSON body.
    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> anyhow::Result<Answer> {
        self.send(Method::POST, path, Some(body.into())).await
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<Answer> {
        self.send(Method::GET, path, None).await
    }
}
