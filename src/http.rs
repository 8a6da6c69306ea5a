//! The operator's HTTP endpoint: `/healthz` (the process serves), `/readyz` (start-up checks
//! passed, caches filled) and `/metrics` (Prometheus text format). Plain HTTP/1.1 over tokio;
//! every response closes the connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Renders the metrics exposition.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Readiness and metrics shared with the rest of the operator.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    metrics: Arc<OnceLock<Render>>,
}

impl Health {
    /// What `/metrics` serves (set once, when the controllers have started).
    pub fn set_metrics(&self, render: Render) {
        let _ = self.metrics.set(render);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// The response (status, content type, body) for a request line, e.g. `GET /readyz HTTP/1.1`.
pub fn respond(request_line: &str, health: &Health) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain";
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return (405, TEXT, "method not allowed\n".into());
    }
    match path {
        "/healthz" => (200, TEXT, "ok\n".into()),
        "/readyz" if health.is_ready() => (200, TEXT, "ready\n".into()),
        "/readyz" => (503, TEXT, "not ready\n".into()),
        "/metrics" => match health.metrics.get() {
            Some(render) => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                render(),
            ),
            // a standby (or a leader still starting): a valid scrape saying so
            None => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                crate::metrics::STANDBY.into(),
            ),
        },
        _ => (404, TEXT, "not found\n".into()),
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, health: Health) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            // the request may arrive in pieces: read until the end of the headers (or 8 KiB)
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                match tokio::time::timeout_at(deadline, sock.read(&mut chunk)).await {
                    Ok(Ok(0)) => break,
                    Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
                    _ => return,
                }
            }
            let n = buf.len();
            let text = String::from_utf8_lossy(&buf[..n]);
            let line = text.lines().next().unwrap_or("");
            // rendering reads the caches: off the reactor
            let line = line.to_string();
            let h = health.clone();
            let Ok((code, ctype, body)) =
                tokio::task::spawn_blocking(move || respond(&line, &h)).await
            else {
                return;
            };
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_and_readiness_over_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let health = Health::default();
        let server = tokio::spawn(serve(listener, health.clone()));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let mut out = String::new();
            s.read_to_string(&mut out)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        // a request that arrives in pieces is read whole
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for piece in ["GET ", "/healthz", " HTTP/1.1\r\n", "host: x\r\n\r\n"] {
            s.write_all(piece.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let standby = get("/metrics").await;
        assert!(
            standby.starts_with("HTTP/1.1 200") && standby.contains("\nkvm_operator_leader 0\n"),
            "{standby}"
        );
        health.set_metrics(Arc::new(|| "# EOF\n".to_string()));
        let m = get("/metrics").await;
        assert!(
            m.starts_with("HTTP/1.1 200") && m.contains("openmetrics") && m.ends_with("# EOF\n"),
            "{m}"
        );
        server.abort();
    }
}
