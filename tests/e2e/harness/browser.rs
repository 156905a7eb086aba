//! Headless Chromium (Debian's `chromium`): the status page as a browser
//! renders it, its DOM and screenshots.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the browser tests leave their screenshots: `target/e2e-artifacts/`.
pub fn artifacts() -> PathBuf {
    let dir = super::repo().join("target/e2e-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn chromium(profile: &Path) -> Command {
    let mut c = Command::new("chromium");
    // The tests may run as root, where Chromium's sandbox cannot start.
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--disable-extensions",
        "--force-color-profile=srgb",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The DOM of `url` after Chromium loaded and rendered it.
pub fn dom(profile: &Path, url: &str) -> String {
    let out = chromium(profile)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium --dump-dom {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A screenshot of `url` at `width`×`height` CSS pixels, written to `png`.
pub fn screenshot(profile: &Path, url: &str, width: u32, height: u32, png: &Path) {
    let _ = std::fs::remove_file(png);
    let out = chromium(profile)
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .unwrap();
    let written = std::fs::metadata(png).map(|m| m.len()).unwrap_or(0);
    assert!(
        out.status.success() && written > 1000,
        "chromium --screenshot {url} wrote {written} bytes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A PNG, not an error page saved under that name.
    let head = std::fs::read(png).unwrap();
    assert_eq!(&head[1..4], b"PNG", "{} is not a PNG", png.display());
}
