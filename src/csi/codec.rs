//! The gRPC codec for CSI messages: prost's, except that a request that cannot be decoded
//! (truncated wire data, a string field holding invalid UTF-8) is answered INVALID_ARGUMENT, as
//! the CSI spec asks for bad input, instead of tonic's default INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Codec used by the generated CSI server and client code.
#[derive(Debug, Clone)]
pub struct CsiCodec<T, U> {
    inner: ProstCodec<T, U>,
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for CsiCodec<T, U> {
    fn default() -> Self {
        CsiCodec {
            inner: ProstCodec::default(),
            _pd: PhantomData,
        }
    }
}

impl<T, U> Codec for CsiCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CsiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CsiDecoder(self.inner.decoder())
    }
}

/// prost's decoder with CSI's error code.
#[derive(Debug)]
pub struct CsiDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for CsiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|s| Status::invalid_argument(format!("malformed request: {}", s.message())))
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}
