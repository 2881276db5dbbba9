//! Compiles `proto/csi.proto` into Rust at build time. protox parses the file in pure Rust, so
//! building k8scsi needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let descriptors = protox::compile(["csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // Our codec turns undecodable requests (bad wire data, invalid UTF-8 in a string field)
        // into INVALID_ARGUMENT instead of tonic's default INTERNAL.
        .codec_path("crate::csi::codec::CsiCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
