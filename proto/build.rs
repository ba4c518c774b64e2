//! Compiles `rdax/v1/rdax.proto` with protox (pure Rust, so no system `protoc` is needed) and
//! writes the descriptor set that the server's reflection service publishes.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "rdax/v1/rdax.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("rdax_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
