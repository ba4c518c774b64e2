//! Object handles.

use std::sync::Arc;

use rdax_proto::model::{ByteRange, ObjectKey};
use rdax_proto::pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};

/// Called with the running byte count during streamed transfers.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Bytes per message of a streamed write.
const WRITE_CHUNK: usize = 1 << 20;

/// A handle on one object. Creating the handle does not contact the server.
#[derive(Clone, Debug)]
pub struct Object {
    client: Client,
    key: ObjectKey,
}

impl Object {
    pub(crate) fn new(client: Client, key: ObjectKey) -> Self {
        Self { client, key }
    }

    /// The object's name.
    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    fn oref(&self) -> pb::ObjectRef {
        pb::ObjectRef::from(&self.key)
    }

    /// Create it, empty (sparse), `size` bytes long. Not retried (a retry could report
    /// `AlreadyExists` for its own success).
    pub async fn create(&self, size: u64) -> Result<pb::ObjectStat> {
        let mut c = self.client.objects.clone();
        let r = self.client.request(pb::CreateRequest { object: Some(self.oref()), size, ..Default::default() });
        Ok(c.create(r).await?.into_inner())
    }

    /// Create it as a block volume of `size` bytes (a non-zero multiple of 4 KiB), exported
    /// by the daemon's NBD server as `namespace/name`: allocated in full, or left `sparse`.
    /// Not retried.
    pub async fn create_volume(&self, size: u64, sparse: bool) -> Result<pb::ObjectStat> {
        let mut c = self.client.objects.clone();
        let r = self.client.request(pb::CreateRequest { object: Some(self.oref()), size, volume: true, sparse });
        Ok(c.create(r).await?.into_inner())
    }

    /// Size and allocation.
    pub async fn stat(&self) -> Result<pb::ObjectStat> {
        self.client
            .retry(|| {
                let mut c = self.client.objects.clone();
                let r = self.client.request(pb::StatRequest { object: Some(self.oref()) });
                async move { c.stat(r).await.map(|r| r.into_inner()) }
            })
            .await
    }

    /// Grow (sparse) or shrink.
    pub async fn resize(&self, size: u64) -> Result<pb::ObjectStat> {
        self.resize_with(size, false).await
    }

    /// Grow to `size` bytes unless the object is at least that long already (then it is left
    /// as it is). The server decides, so concurrent grows never shrink each other's work.
    pub async fn grow(&self, size: u64) -> Result<pb::ObjectStat> {
        self.resize_with(size, true).await
    }

    async fn resize_with(&self, size: u64, grow_only: bool) -> Result<pb::ObjectStat> {
        self.client
            .retry(|| {
                let mut c = self.client.objects.clone();
                let r = self.client.request(pb::ResizeRequest { object: Some(self.oref()), size, grow_only });
                async move { c.resize(r).await.map(|r| r.into_inner()) }
            })
            .await
    }

    /// Deallocate `[offset, offset + length)`; it reads zero afterwards.
    pub async fn punch_hole(&self, offset: u64, length: u64) -> Result<()> {
        self.client
            .retry(|| {
                let mut c = self.client.objects.clone();
                let r = self.client.request(pb::PunchHoleRequest { object: Some(self.oref()), offset, length });
                async move { c.punch_hole(r).await.map(drop) }
            })
            .await
    }

    /// Delete it. Not retried. A volume that NBD clients have open is refused
    /// ([`ErrorKind::FailedPrecondition`]); see [`Object::delete_force`].
    pub async fn delete(&self) -> Result<()> {
        self.delete_with(false).await
    }

    /// Delete it, disconnecting the NBD clients of a volume first. Not retried.
    pub async fn delete_force(&self) -> Result<()> {
        self.delete_with(true).await
    }

    async fn delete_with(&self, force: bool) -> Result<()> {
        let mut c = self.client.objects.clone();
        c.delete(self.client.request(pb::DeleteRequest { object: Some(self.oref()), force })).await?;
        Ok(())
    }

    /// Make `[offset, offset + length)` durable (`length` 0: to the end).
    pub async fn flush(&self, offset: u64, length: u64) -> Result<()> {
        self.client
            .retry(|| {
                let mut c = self.client.objects.clone();
                let r = self.client.request(pb::FlushRequest { object: Some(self.oref()), offset, length });
                async move { c.flush(r).await.map(drop) }
            })
            .await
    }

    /// Read `length` bytes at `offset` into memory (`length` 0: to the end).
    pub async fn read(&self, offset: u64, length: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_to(offset, length, &mut out, None).await?;
        Ok(out)
    }

    /// Stream `length` bytes at `offset` (0: to the end) into `w`. Returns the bytes copied.
    pub async fn read_to<W: AsyncWrite + Unpin>(
        &self,
        offset: u64,
        length: u64,
        w: &mut W,
        progress: Option<Progress>,
    ) -> Result<u64> {
        if length != 0 {
            ByteRange::new(offset, length)?;
        }
        let mut c = self.client.objects.clone();
        let req = pb::ReadRequest { object: Some(self.oref()), offset, length, chunk_size: 0 };
        let mut stream = c.read(tonic::Request::new(req)).await?.into_inner();
        let mut at = offset;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if chunk.offset != at {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("read chunk at {} where {at} was expected", chunk.offset),
                ));
            }
            w.write_all(&chunk.data).await?;
            at += chunk.data.len() as u64;
            if let Some(p) = &progress {
                p(at - offset);
            }
        }
        w.flush().await?;
        if length != 0 && at - offset != length {
            return Err(Error::new(ErrorKind::Protocol, format!("read ended after {} of {length} bytes", at - offset)));
        }
        Ok(at - offset)
    }

    /// Write `data` at `offset`, within the current size; with `persist`, durable on return.
    pub async fn write(&self, offset: u64, data: Vec<u8>, persist: bool) -> Result<u64> {
        self.write_from(offset, std::io::Cursor::new(data), false, persist, None).await
    }

    /// Stream everything `r` yields to `offset..`. With `extend`, the object grows as needed
    /// (for input of unknown length); with `persist`, the data is durable on return.
    /// Returns the bytes written.
    pub async fn write_from<R>(
        &self,
        offset: u64,
        mut r: R,
        extend: bool,
        persist: bool,
        progress: Option<Progress>,
    ) -> Result<u64>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteChunk>(4);
        let header = pb::WriteHeader { object: Some(self.oref()), offset, persist, extend };
        let reader = tokio::spawn(async move {
            let mut header = Some(header);
            let mut sent = 0u64;
            loop {
                let mut buf = Vec::with_capacity(WRITE_CHUNK);
                let n = (&mut r).take(WRITE_CHUNK as u64).read_to_end(&mut buf).await?;
                if n == 0 && header.is_none() {
                    return Ok::<u64, std::io::Error>(sent);
                }
                sent += n as u64;
                if tx.send(pb::WriteChunk { header: header.take(), data: buf }).await.is_err() {
                    return Ok(sent); // the call failed; its status is reported below
                }
                if let Some(p) = &progress {
                    p(sent);
                }
                if n < WRITE_CHUNK {
                    return Ok(sent);
                }
            }
        });
        let mut c = self.client.objects.clone();
        let call = c.write(tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx))).await;
        let sent = reader.await.map_err(|e| Error::new(ErrorKind::Io, format!("reader task failed: {e}")))??;
        let resp = call?.into_inner();
        if resp.bytes_written != sent {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("sent {sent} bytes, server wrote {}", resp.bytes_written),
            ));
        }
        Ok(resp.bytes_written)
    }
}
