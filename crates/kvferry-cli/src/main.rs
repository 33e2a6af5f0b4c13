//! The `kvferry` command.

fn main() {
    println!("kvferry {}", env!("CARGO_PKG_VERSION"));
}
