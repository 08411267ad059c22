#!/usr/bin/env python3
"""llama.cpp's speed on the same GGUF files and threads as `mrrec bench --parts llm`.

Prefill: one N-token prompt evaluated from an empty context (llama.cpp's default batch sizes).
Decode: single tokens appended one at a time after a 32-token prompt (no sampling cost).
Prints one JSON object: {"llama_cpp_python": version, "system_info": ..., "models": {path: {...}}}.
Run by `mrrec bench --parts llm` through scripts/llama-cpp-bench.sh, which builds the package once.
"""
import argparse
import json
import time

import llama_cpp


def bench(path, threads, prompt_tokens, decode_tokens, repeats):
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=max(2048, prompt_tokens + 64),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    text = "The quick brown fox jumps over the lazy dog while the assistant writes notes. " * 80
    ids = llm.tokenize(text.encode(), add_bos=False)[:prompt_tokens]
    assert len(ids) == prompt_tokens, f"only {len(ids)} tokens"
    llm.reset()
    llm.eval(ids[:16])  # warm-up
    prefill = []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill.append(time.perf_counter() - t)
    decode = []
    for _ in range(repeats):
        llm.reset()
        llm.eval(ids[:32])
        t = time.perf_counter()
        for i in range(decode_tokens):
            llm.eval([ids[32 + i]])
        decode.append(time.perf_counter() - t)
    prefill.sort()
    decode.sort()
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_tokens_per_s": prompt_tokens / prefill[len(prefill) // 2],
        "decode_tokens_per_s": decode_tokens / decode[len(decode) // 2],
        "threads": threads,
        "repeats": repeats,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="GGUF files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    out = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "models": {
            m: bench(m, a.threads, a.prompt_tokens, a.decode_tokens, a.repeats) for m in a.models
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
