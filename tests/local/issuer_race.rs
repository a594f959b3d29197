//! The test issuer's cached key is shared by test binaries that run at once
//! (`./test.sh` runs two lanes): every loader must end up with the same key.

use crate::support::k8s::TestIssuer;

#[test]
fn parallel_loaders_of_the_test_issuer_agree_on_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("issuer-key.pem");
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                TestIssuer::load_or_generate(&path)
                    .expect("load or generate")
                    .kid()
                    .to_string()
            })
        })
        .collect();
    let kids: Vec<String> = loaders.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(kids.iter().all(|k| k == &kids[0]), "{kids:?}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "temporary files left behind: {left:?}");
}
