//! `corefour bench io` end to end on a small disk: the virtio-blk rows run (reads served from
//! the file's mapping, writes with pwrite) and the JSON has the measured figures. Figures are
//! not judged here: performance goals are checked by running the bench, not by tests.

use std::process::Command;

#[test]
fn bench_io_blk_rows_run_and_print_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_corefour"))
        .args(["bench", "io", "--no-net", "--json", "--size-mb", "8"])
        .args(["--random-ops", "2000", "--direct-random-ops", "100"])
        .args(["--only", "4K", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run corefour bench io");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("O_DIRECT") {
        eprintln!("SKIP: the temp dir's file system has no O_DIRECT: {stderr}");
        return;
    }
    assert!(out.status.success(), "bench io failed: {stderr}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON rows");
    let rows = rows.as_array().expect("an array of rows");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["test"].as_str()).collect();
    assert_eq!(
        names,
        [
            "blk rand read 4K buffered",
            "blk rand read 4K buffered pread",
            "blk rand write 4K buffered",
            "blk rand read 4K direct",
            "blk rand read 4K direct, peer qd",
            "blk rand write 4K direct",
            "blk rand write 4K direct, peer qd"
        ]
    );
    for r in rows {
        for k in ["virtio_iops", "peer_iops", "ratio"] {
            let v = r[k].as_f64().unwrap_or(0.0);
            assert!(v > 0.0 && v.is_finite(), "{k} in {r}");
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the test disk is removed"
    );
}
