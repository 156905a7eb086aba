//! Streams synthetic data through the real S3 uploader (the part plan, the
//! cutter, parts in flight, completion and the size check) to an endpoint,
//! within a memory budget, and prints what it held: for `bench/s3-parts.sh`,
//! which points it at a loopback S3 that discards bodies.
//!
//! `s3_stream ENDPOINT GIB MEMORY_MIB [EXPECTED_GIB]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backstop_storage::{S3Options, S3Storage, Storage, StreamItem};
use bytes::Bytes;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, endpoint, gib, memory_mib, rest @ ..] = args.as_slice() else {
        eprintln!("usage: s3_stream ENDPOINT GIB MEMORY_MIB [EXPECTED_GIB]");
        std::process::exit(2);
    };
    let total: u64 = (gib.parse::<f64>().expect("GIB") * (1u64 << 30) as f64) as u64;
    let memory: u64 = memory_mib.parse::<u64>().expect("MEMORY_MIB") << 20;
    let expected = rest
        .first()
        .map(|g| (g.parse::<f64>().expect("EXPECTED_GIB") * (1u64 << 30) as f64) as u64);
    let store = S3Storage::new(S3Options {
        name: "bench".into(),
        bucket: "bench".into(),
        prefix: String::new(),
        region: "us-east-1".into(),
        endpoint: Some(endpoint.clone()),
        force_path_style: true,
        storage_class: None,
        sse: None,
        kms_key_id: None,
        credentials: Some(("bench".into(), "bench-secret-not-real".into())),
        part_size: None,
        max_in_flight_parts: None,
        max_parts: backstop_storage::MAX_PARTS,
        equal_parts: true,
    })
    .await;
    // Peak RSS, sampled every 20 ms from before the upload to its end.
    let baseline = rss_kib();
    let (peak, stop) = (
        Arc::new(AtomicU64::new(baseline)),
        Arc::new(AtomicBool::new(false)),
    );
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // 1 MiB chunks of text-like bytes, shared (as the stream's are).
    let chunk: Bytes = (0..1u32 << 20)
        .map(|i| {
            let text = b"lorem ipsum dolor sit amet, {\"id\": 42} ";
            text[i as usize % text.len()]
        })
        .collect::<Vec<u8>>()
        .into();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let producer = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(chunk.len() as u64) as usize;
            if tx.send(StreamItem::Data(chunk.slice(..n))).await.is_err() {
                return;
            }
            sent += n as u64;
        }
        let _ = tx.send(StreamItem::Finish).await;
    });
    let start = Instant::now();
    let result = store
        .put_stream_within(
            "bench/object",
            rx,
            memory,
            expected.map_or(
                backstop_storage::SizeHint::Unknown,
                backstop_storage::SizeHint::Expected,
            ),
        )
        .await;
    let secs = start.elapsed().as_secs_f64();
    let _ = producer.await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let peak = peak.load(Ordering::Relaxed);
    match result {
        Ok(n) => println!(
            "bytes={n} seconds={secs:.1} mb_per_s={:.0} memory_budget_mib={} baseline_rss_mib={:.1} peak_rss_mib={:.1} over_baseline_mib={:.1}",
            n as f64 / secs / 1e6,
            memory >> 20,
            baseline as f64 / 1024.0,
            peak as f64 / 1024.0,
            (peak - baseline) as f64 / 1024.0
        ),
        Err(e) => {
            println!("refused_or_failed: {e}");
            std::process::exit(1);
        }
    }
}
