fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "protos/protocol/protocol.proto",
        "protos/comet/comet.proto",
        "protos/logic/logic.proto",
        "protos/job/job.proto",
        "protos/chat/chat.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        // Bodies stay `Bytes` so a push is shared, not copied, on its way to many sockets.
        .bytes(".")
        // goim names an RPC `Connect`, which collides with the generated `connect` constructor;
        // we build channels ourselves.
        .build_transport(false)
        .compile_protos(&protos, &["protos"])?;
    Ok(())
}
