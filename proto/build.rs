//! Compiles `rdax/v1/rdax.proto` (and the test-only `rdax/testing/v1/testing.proto`) with
//! protox (pure Rust, so no system `protoc` is needed) and writes the descriptor set that the
//! server's reflection service publishes (the public protocol only).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let proto = "rdax/v1/rdax.proto";
    let testing = "rdax/testing/v1/testing.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={testing}");
    let fds = protox::compile([proto], ["."])?;
    std::fs::write(out.join("rdax_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    let fds = protox::compile([testing], ["."])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
