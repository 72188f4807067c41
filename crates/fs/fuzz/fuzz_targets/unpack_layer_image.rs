//! Arbitrary bytes as a layer blob (gzip-compressed by the harness when the first byte is odd),
//! made into a layer image with `unpack_layer_image`. Whatever the layer holds, making the image
//! must return (Ok or an error, never panic), write nothing but the image file, and, when it
//! succeeds, produce an image whose superblock and metadata area lie inside the file. Mounting is left to the tests (`tests/layer_images.rs`): the fuzzer runs unprivileged.

#![no_main]

use std::io::Write;

use flate2::write::GzEncoder;
use kiln_fs::unpack::unpack_layer_image;
use kiln_oci::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let blob = match data.first() {
        Some(first) if first % 2 == 1 => {
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&data[1..]).unwrap();
            gz.finish().unwrap()
        }
        _ => data.to_vec(),
    };
    let digest = Digest::sha256_of(&blob);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("layer.img");
    let made = unpack_layer_image(&image, &blob[..], &digest, None);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.len() <= 1, "only the image is written: {names:?}");
    if made.is_ok() {
        let bytes = std::fs::read(&image).unwrap();
        assert!(bytes.len() >= 4096 && bytes.len() % 512 == 0, "{} bytes", bytes.len());
        assert_eq!(&bytes[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
        let blocks = u32::from_le_bytes(bytes[1060..1064].try_into().unwrap()) as usize;
        let meta_block = u32::from_le_bytes(bytes[1064..1068].try_into().unwrap()) as usize;
        assert_eq!(blocks * 512, bytes.len());
        assert!(meta_block < blocks);
    }
});
