"""Benchmark: batched greedy captioning vs one-at-a-time `generate`, same model, same prefixes, same run.

    python bench/generate.py [--captions 64] [--batch-size 32] [--max-new-tokens 12]

Prefixes are [bridge(tokens) ; prompt] for the first N cached easy-VQA test images, with the trained
vlap bridge (data/models/vlap/) when it exists, else a seeded random linear bridge (said in
the output). The batched path is pipeline.generation.greedy_decode on batches of --batch-size (what
the caption evaluation runs); the reference calls transformers' `generate` once per image. Both
decode greedily with the real SmolLM2; the bench asserts they produce the same captions.
"""
from __future__ import annotations

import argparse
import os

import common  # noqa: F401  (offline, repo root, allocator)
import torch  # noqa: E402

from harness import time_call  # noqa: E402
from pipeline.bridge import LinearBridge, load_bridge  # noqa: E402
from pipeline.features import FeatureCache, features_file  # noqa: E402
from pipeline.generation import greedy_decode, text_embeds  # noqa: E402
from pipeline.lms import load_lm  # noqa: E402
from pipeline.paths import Dirs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args()
    dirs = Dirs()
    lm = load_lm("smollm2-135m", torch.device("cpu"))
    with FeatureCache(features_file(dirs.features, "test")) as cache:
        tokens = torch.from_numpy(cache.tokens(cache.ids[: args.captions])).float()  # (n, 49, 1280)
    bridge_path = dirs.models / "vlap"
    if (bridge_path / "model.safetensors").exists():
        bridge, meta = load_bridge(bridge_path)
        prompt, which = meta["prompt"], "trained vlap bridge"
    else:
        torch.manual_seed(0)
        bridge, prompt, which = LinearBridge(tokens.shape[-1], lm.hidden_size).eval(), "A picture of", "random bridge"
    with torch.inference_mode():
        prefixes = torch.cat([bridge(tokens), text_embeds(lm, prompt).expand(len(tokens), -1, -1)], 1)  # (n, T, D)
    tok = lm.tokenizer

    def batched() -> list[str]:
        out = []
        for i in range(0, len(prefixes), args.batch_size):
            chunk = prefixes[i : i + args.batch_size]
            out += greedy_decode(lm, chunk, torch.ones(chunk.shape[:2], dtype=torch.long), args.max_new_tokens)
        return out

    @torch.inference_mode()
    def one_at_a_time() -> list[str]:
        out = []
        for prefix in prefixes:
            ids = lm.model.generate(inputs_embeds=prefix[None], attention_mask=torch.ones(1, prefix.shape[0],
                                    dtype=torch.long), max_new_tokens=args.max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append(tok.decode(ids[0], skip_special_tokens=True).strip())
        return out

    batched()  # warm-up (kernels, allocator); each path is then timed once
    timings = {}
    for name, fn in (("one-at-a-time generate", one_at_a_time), ("batched greedy_decode", batched)):
        run = time_call(fn, repeats=1, warmup=0)
        timings[name] = (run.median, run.result)
    (t_ref, ref), (t_ours, ours) = timings.values()
    same = sum(a == b for a, b in zip(ref, ours))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, SmolLM2-135M, {which}, "
          f"{len(prefixes)} prefixes of {prefixes.shape[1]} tokens, max {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, load average {os.getloadavg()[0]:.2f}\n")
    print("| path | captions | seconds | captions/s |\n|---|---:|---:|---:|")
    for name, (seconds, caps) in timings.items():
        print(f"| {name} | {len(caps)} | {seconds:.2f} | {len(caps) / seconds:.2f} |")
    print(f"\nspeed-up batched / one-at-a-time: {t_ref / t_ours:.2f}x; identical captions: {same}/{len(ref)}")
    print(f"examples: {ours[:3]}")
    assert same >= 0.9 * len(ref), "batched and one-at-a-time decoding disagree"


if __name__ == "__main__":
    main()
