//! `--model ./file.gguf`: a GGUF file from disk runs like the registered model it holds, under an
//! id that names its content; bad files are refused with the file and the fault named.

#![allow(clippy::unwrap_used)]

use mrrec_llm::Sampling;
use mrrec_llm_local::*;

fn greedy(m: &LocalModel) -> Vec<u32> {
    let p = m
        .info()
        .encode("<|im_start|>user\nSuggest a gift for a runner.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let s = Sampling {
        max_tokens: 16,
        temperature: 0.0,
        ..Default::default()
    };
    m.generate(&p, &s, &mut |_| {}).unwrap().ids
}

#[test]
fn a_gguf_file_by_path_answers_as_the_registered_model_under_its_sha256() {
    let registered = LocalModel::from_registry("smollm2-135m-instruct").unwrap();
    let source = LocalModel::source_file("smollm2-135m-instruct").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("my model.gguf");
    std::fs::copy(&source, &copy).unwrap();
    let by_path = LocalModel::open(copy.to_str().unwrap()).unwrap();
    let id = mrrec_llm::ChatModel::id(&by_path).to_string();
    let sha = mrrec_models::sha256_file(&source).unwrap();
    assert!(id.starts_with(&format!("{FILE_ID_PREFIX}{sha}")), "{id}");
    assert!(
        !id.contains("my model"),
        "the id names the content, not the path: {id}"
    );
    assert_eq!(greedy(&by_path), greedy(&registered));
    // Nothing is written beside the user's file: the conversion lives under the home.
    let beside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(beside.len(), 1);
    // A second open finds the remembered hash and the converted file.
    let again = LocalModel::open(copy.to_str().unwrap()).unwrap();
    assert_eq!(mrrec_llm::ChatModel::id(&again), id);
    // The id is known without loading the weights (a lazily loaded model is named by it), for a
    // file and for a registered model alike.
    assert_eq!(LocalModel::resolve(copy.to_str().unwrap()).unwrap().0, id);
    assert_eq!(
        LocalModel::resolve("smollm2-135m-instruct").unwrap().0,
        mrrec_llm::ChatModel::id(&registered)
    );

    // Truncated: named as such, with the sizes.
    let bytes = std::fs::read(&source).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = LocalModel::open(cut.to_str().unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
}
