//! Streaming gzip for `/files`: request bodies sent with `Content-Encoding: gzip` are inflated
//! chunk by chunk on their way to disk, and downloads asked for with `Accept-Encoding: gzip`
//! are deflated chunk by chunk on their way out. Memory stays bounded by one chunk plus the
//! codec's window, whatever the file size.

use std::io::{self, Write};

use bytes::Bytes;
use flate2::write::{GzDecoder, GzEncoder};
use flate2::Compression;
use futures::{Stream, StreamExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Something that takes bytes in and accumulates output in a `Vec`.
trait Codec: Write {
    fn output(&mut self) -> &mut Vec<u8>;
    fn end(self) -> io::Result<Vec<u8>>;
}

impl Codec for GzDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn end(self) -> io::Result<Vec<u8>> {
        self.finish()
    }
}

impl Codec for GzEncoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn end(self) -> io::Result<Vec<u8>> {
        self.finish()
    }
}

fn transcode<S, E, C>(input: S, codec: C) -> impl Stream<Item = Result<Bytes, io::Error>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Into<BoxError>,
    C: Codec + Send,
{
    futures::stream::unfold((input, Some(codec)), |(mut input, codec)| async move {
        let mut codec = codec?;
        loop {
            match input.next().await {
                Some(Ok(chunk)) => {
                    if let Err(e) = codec.write_all(&chunk) {
                        return Some((Err(e), (input, None)));
                    }
                    let out = std::mem::take(codec.output());
                    if !out.is_empty() {
                        return Some((Ok(Bytes::from(out)), (input, Some(codec))));
                    }
                }
                Some(Err(e)) => return Some((Err(io::Error::other(e)), (input, None))),
                None => {
                    return match codec.end() {
                        Ok(rest) if rest.is_empty() => None,
                        Ok(rest) => Some((Ok(Bytes::from(rest)), (input, None))),
                        Err(e) => Some((Err(e), (input, None))),
                    }
                }
            }
        }
    })
}

/// Inflates a gzip stream; a corrupt or truncated stream ends with an error item.
pub fn gunzip<S, E>(input: S) -> impl Stream<Item = Result<Bytes, io::Error>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Into<BoxError>,
{
    transcode(input, GzDecoder::new(Vec::new()))
}

/// Deflates a stream into gzip at the fastest level: `/files` is about throughput on a local
/// link, not about the last percent of size.
pub fn gzip<S, E>(input: S) -> impl Stream<Item = Result<Bytes, io::Error>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Into<BoxError>,
{
    transcode(input, GzEncoder::new(Vec::new(), Compression::fast()))
}

/// Whether an `Accept-Encoding` value accepts gzip (`gzip` or `x-gzip` with a non-zero q, or
/// `*`).
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    accept_encoding.split(',').any(|item| {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q_zero = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        !q_zero && matches!(coding.as_str(), "gzip" | "x-gzip" | "*")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(s: impl Stream<Item = Result<Bytes, io::Error>>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        futures::pin_mut!(s);
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    fn chunks(data: &[u8], size: usize) -> impl Stream<Item = Result<Bytes, io::Error>> + Unpin {
        let v: Vec<Result<Bytes, io::Error>> = data
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(v)
    }

    #[tokio::test]
    async fn round_trip_in_odd_chunks() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let packed = collect(gzip(chunks(&data, 4096))).await.unwrap();
        assert!(packed.len() < data.len());
        let unpacked = collect(gunzip(chunks(&packed, 7))).await.unwrap();
        assert_eq!(unpacked, data);
        assert_eq!(
            collect(gunzip(chunks(
                &collect(gzip(chunks(b"", 1))).await.unwrap(),
                3
            )))
            .await
            .unwrap(),
            b""
        );
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        assert!(collect(gunzip(chunks(b"definitely not gzip", 4)))
            .await
            .is_err());
        let packed = collect(gzip(chunks(&[1u8; 10_000], 100))).await.unwrap();
        assert!(collect(gunzip(chunks(&packed[..packed.len() / 2], 5)))
            .await
            .is_err());
    }

    #[test]
    fn accept_encoding() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("br, gzip;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip(""));
    }
}
