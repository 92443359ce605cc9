//! The PyTorch checkpoint reader against files written by torch
//! (`tools/reference/make_pth_fixtures.py`), hand-made pickles and corrupted copies. No GPU.

use std::path::PathBuf;

use hrnet_ocr::formats::pth::{parse_pth, read_pth, PthTensor};
use hrnet_ocr::Error;
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth").join(name)
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The expected tensors as (name, shape, f32 bits), in the state dict's order (kept in the
/// metadata because safetensors sorts its tensors by name).
fn expected() -> Vec<(String, Vec<usize>, Vec<u32>)> {
    let bytes = fixture_bytes("expected.safetensors");
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let order = metadata.metadata().as_ref().and_then(|m| m.get("order")).expect("order metadata").clone();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    order
        .split(' ')
        .map(|name| {
            let t = tensors.tensor(name).unwrap();
            assert_eq!(t.dtype(), Dtype::F32, "{name}");
            let bits =
                t.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name.to_string(), t.shape().to_vec(), bits)
        })
        .collect()
}

fn assert_expected(file: &str, got: &[PthTensor]) {
    let want = expected();
    let got_names: Vec<&str> = got.iter().map(|t| t.name.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(got_names, want_names, "{file}: names and order");
    for (t, (name, shape, bits)) in got.iter().zip(&want) {
        assert_eq!(&t.shape, shape, "{file}: shape of {name}");
        // Bit-exact, so NaN, -0.0 and the f16 subnormals count too.
        let got_bits: Vec<u32> = t.data.iter().map(|x| x.to_bits()).collect();
        assert_eq!(&got_bits, bits, "{file}: values of {name}");
    }
}

fn assert_reads_expected(file: &str) {
    let got = read_pth(&fixture(file)).unwrap_or_else(|e| panic!("{e}"));
    assert_expected(file, &got);
}

/// The message of a format error, after checking that it names the source.
fn format_error(result: hrnet_ocr::Result<Vec<PthTensor>>, source: &str) -> String {
    match result {
        Err(Error::Format { path, what }) => {
            assert!(path.ends_with(source), "error names {path}, not {source}");
            what
        }
        Err(other) => panic!("{source}: expected a format error, got {other}"),
        Ok(tensors) => panic!("{source}: expected an error, got {} tensors", tensors.len()),
    }
}

fn fixture_error(file: &str) -> String {
    format_error(read_pth(&fixture(file)), file)
}

/// A legacy stream (magic, protocol 1001, empty sys_info, `main`, no storages) around a
/// hand-written main pickle.
fn legacy_stream(main: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0x80, 2, 0x8a, 10];
    bytes.extend_from_slice(&0x1950_a86a_20f9_469c_fc6c_u128.to_le_bytes()[..10]);
    bytes.extend_from_slice(b".\x80\x02M\xe9\x03.\x80\x02}.");
    bytes.extend_from_slice(main);
    bytes.extend_from_slice(b"\x80\x02].");
    bytes
}

#[test]
fn legacy_format_matches_torch() {
    assert_reads_expected("legacy.pth");
}

#[test]
fn zip_format_matches_torch() {
    assert_reads_expected("zip.pth");
}

#[test]
fn zip64_extra_fields_and_end_records_are_read() {
    assert_reads_expected("zip64.pth");
}

#[test]
fn python2_ordered_dicts_are_read() {
    assert_reads_expected("py2_legacy.pth");
}

#[test]
fn checkpoint_wrapper_yields_its_state_dict() {
    // {'epoch', 'best_mIoU', 'state_dict', 'optimizer'}; the zip one uses pickle protocol 4.
    assert_reads_expected("checkpoint_legacy.pth");
    assert_reads_expected("checkpoint_zip.pth");
}

#[test]
fn parse_pth_matches_read_pth() {
    let got = parse_pth(&fixture_bytes("zip.pth"), "in memory").unwrap();
    assert_expected("zip.pth in memory", &got);
}

#[test]
fn hostile_global_is_refused_by_name() {
    let what = fixture_error("hostile.pth");
    assert!(what.contains("`os.system`"), "{what}");
}

#[test]
fn truncated_file_is_an_error() {
    let what = fixture_error("truncated.pth");
    assert!(what.contains("truncated"), "{what}");
}

#[test]
fn compressed_entries_are_refused() {
    let what = fixture_error("deflated.pth");
    assert!(what.contains("compressed"), "{what}");
}

#[test]
fn big_endian_is_refused() {
    let what = fixture_error("big_endian.pth");
    assert!(what.contains("big-endian"), "{what}");
}

#[test]
fn expanded_view_beyond_the_output_budget_is_refused() {
    // One stored element viewed as 2^20 x 2^20 with stride 0: 4 TiB as f32.
    let what = fixture_error("expanded_bomb.pth");
    assert!(what.contains("`x`") && what.contains("output limit"), "{what}");
}

#[test]
fn missing_file_is_an_io_error() {
    match read_pth(&fixture("no_such_file.pth")) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("no_such_file.pth"), "{path}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn garbage_is_not_a_checkpoint() {
    let what = format_error(parse_pth(b"hello, world", "garbage"), "garbage");
    assert!(what.contains("not a PyTorch checkpoint"), "{what}");
}

#[test]
fn dict_without_tensors_is_an_error() {
    // {'epoch': 3}
    let bytes = legacy_stream(b"\x80\x02}X\x05\x00\x00\x00epochK\x03s.");
    let what = format_error(parse_pth(&bytes, "epoch only"), "epoch only");
    assert!(what.contains("no tensors"), "{what}");
}

#[test]
fn global_outside_the_allow_list_is_refused_by_stack_global() {
    // Protocol 4 spelling: 'builtins' 'eval' STACK_GLOBAL.
    let bytes = legacy_stream(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.");
    let what = format_error(parse_pth(&bytes, "eval"), "eval");
    assert!(what.contains("`builtins.eval`"), "{what}");
}

#[test]
fn deep_nesting_and_cycles_do_not_overflow_the_stack() {
    const DEPTH: usize = 1_000_000;
    // A tuple nested a million deep: EMPTY_TUPLE then TUPLE1 over and over.
    let mut tuples = b"\x80\x02)".to_vec();
    tuples.extend(std::iter::repeat_n(0x85, DEPTH));
    tuples.push(b'.');
    // Lists nested a million deep: a million EMPTY_LISTs, then APPENDs fold them together.
    let mut lists = b"\x80\x02".to_vec();
    lists.extend(std::iter::repeat_n(b']', DEPTH));
    lists.extend(std::iter::repeat_n(b'a', DEPTH - 1));
    lists.push(b'.');
    // A list that contains itself through the memo.
    let cycle = b"\x80\x02]q\x00h\x00a.".to_vec();
    for (name, main) in [("tuples", tuples), ("lists", lists), ("cycle", cycle)] {
        let what = format_error(parse_pth(&legacy_stream(&main), name), name);
        assert!(what.contains("not a dict"), "{name}: {what}");
    }
}

/// An official `checkpoint.pth.tar` from the second epoch on holds `best_mIoU` as a numpy
/// float64: `numpy.core.multiarray.scalar` (numpy 2: `numpy._core`) of a `numpy.dtype` and
/// its raw bytes (`_codecs.encode(text, 'latin1')` in protocol 2). The allow-list reads
/// them without running anything; other numpy globals stay refused by name.
#[test]
fn numpy_scalars_of_a_training_checkpoint_are_read() {
    // Written by torch with numpy 2 (tools/reference/make_micro_fixtures.py).
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/micro_checkpoint.pth.tar");
    let tensors = read_pth(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tensors.len(), 378, "the state dict, optimizer state left out");
    assert!(tensors.iter().all(|t| t.name.starts_with("model.")), "{}", tensors[0].name);
    // numpy 1's module name, by hand: past the scalar, the dict holds no tensor.
    let scalar = b"\x80\x02}X\t\x00\x00\x00best_mIoUcnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tbc_codecs\nencode\nX\x02\x00\x00\x00abX\x06\x00\x00\x00latin1\x86R\x86Rs.";
    let what = format_error(parse_pth(&legacy_stream(scalar), "scalar.pth"), "scalar.pth");
    assert!(what.contains("holds no tensors"), "{what}");
    let array = b"\x80\x02}X\x01\x00\x00\x00acnumpy.core.multiarray\n_reconstruct\n)Rs.";
    let what = format_error(parse_pth(&legacy_stream(array), "array.pth"), "array.pth");
    assert!(what.contains("`numpy.core.multiarray._reconstruct`"), "{what}");
}
