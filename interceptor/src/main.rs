fn main() {
    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));
    println!("{}", bytes.len());
}
