//! The image the local node runs (hack/build-image.sh, made without a registry) and the
//! one users build with hack/Dockerfile agree: same user, same default command, the same
//! binaries in /usr/local/bin, and every shared library those binaries load is inside.
//! No cluster needed.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// What hack/Dockerfile's final stage says about the image.
#[derive(Debug)]
struct DockerfileImage {
    user: String,
    cmd: Value,
    binaries: BTreeSet<String>,
}

fn parse_dockerfile(text: &str) -> DockerfileImage {
    let mut user = None;
    let mut cmd = None;
    let mut binaries = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("USER") => user = words.next().map(str::to_owned),
            Some("CMD") => cmd = Some(serde_json::from_str(line["CMD".len()..].trim()).unwrap()),
            // COPY --from=build /out/<binary>... /usr/local/bin/
            Some("COPY") if line.contains("--from=build") && line.ends_with("/usr/local/bin/") => {
                let sources: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
                for source in &sources[..sources.len() - 1] {
                    binaries.insert(source.rsplit('/').next().unwrap().to_owned());
                }
            }
            _ => {}
        }
    }
    DockerfileImage {
        user: user.expect("hack/Dockerfile has a USER"),
        cmd: cmd.expect("hack/Dockerfile has a CMD"),
        binaries,
    }
}

fn tar_member(archive: &Path, member: &str) -> Vec<u8> {
    let output = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(member)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "tar -xOf {} {member}",
        archive.display()
    );
    output.stdout
}

fn blob(archive: &Path, digest: &str) -> Vec<u8> {
    tar_member(
        archive,
        &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
    )
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn the_script_built_image_matches_the_dockerfile() {
    let root = shardop_e2e::repo_root();
    let dockerfile =
        parse_dockerfile(&std::fs::read_to_string(root.join("hack/Dockerfile")).unwrap());
    assert_eq!(
        dockerfile.binaries,
        BTreeSet::from(["shardop-assigner".to_owned(), "shardop-worker".to_owned()])
    );

    let bin_dir = shardop_e2e::process::bin_dir();
    let output = Command::new("bash")
        .arg(root.join("hack/build-image.sh"))
        .arg(&bin_dir)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let archive = root.join("target/images/shardop.tar");

    let index = json(&tar_member(&archive, "index.json"));
    let manifest = json(&blob(
        &archive,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let config = json(&blob(
        &archive,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    assert_eq!(config["config"]["User"], dockerfile.user.as_str());
    assert_eq!(config["config"]["Cmd"], dockerfile.cmd);

    let layer = root.join("target/images/shardop-layer.tar");
    std::fs::write(
        &layer,
        blob(&archive, manifest["layers"][0]["digest"].as_str().unwrap()),
    )
    .unwrap();
    let listing = Command::new("tar").arg("-tf").arg(&layer).output().unwrap();
    let files: BTreeSet<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(|l| format!("/{}", l.trim_start_matches("./")))
        .collect();
    let passwd = String::from_utf8(tar_member(&layer, "./etc/passwd")).unwrap();
    std::fs::remove_file(&layer).unwrap();
    for binary in &dockerfile.binaries {
        assert!(
            files.contains(&format!("/usr/local/bin/{binary}")),
            "{binary} missing: {files:?}"
        );
        // Every library the binary loads (and the loader) is in the image.
        let ldd = Command::new("ldd")
            .arg(bin_dir.join(binary))
            .output()
            .unwrap();
        for library in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            assert!(
                files.contains(library),
                "{binary} needs {library}, not in the image"
            );
        }
    }
    // The user the image runs as exists in it (distroless' nonroot).
    let uid = dockerfile.user.split(':').next().unwrap();
    assert!(
        passwd.lines().any(|l| l.split(':').nth(2) == Some(uid)),
        "no user {uid} in /etc/passwd:\n{passwd}"
    );
}
