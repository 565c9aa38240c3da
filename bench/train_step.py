"""Benchmark: one VLAP training step (fp32 and bf16) vs its FLOP floor on this machine, same run.

    python bench/train_step.py [--profile] [--compile] [--batch-size 32] [--steps 3] [--threads T]
                               [--precisions fp32 bf16]

One step = pipeline.train.train_step (method vlap, default params.yaml: compute_losses under the
precision's autocast, backward, AdamW, the method's after-step hook, the lr schedule) on the run
pipeline.train.build_training builds (LinearBridge(1280, 576)), with the real SmolLM2-135M, inside the
same attention and compile contexts as pipeline.train.train_bridge (`pipeline.device.training_attention`;
`--compile` as `train.compile: true`). Visual tokens are the cached train features when
data/features/index.json exists, else random tokens (the output says which); prototypes from
data/prototypes.

Floor: the FLOPs of the frozen-LLM forward plus its input-gradient backward for one batch (matmuls
counted with torch's FlopCounterMode on captioning_loss + backward w.r.t. the bridged tokens V, plus
the attention products computed analytically, which the counter misses on CPU), divided by
this machine's measured matmul rate (bench/flops.py: fp32 peak for fp32, bf16 peak for bf16), timed
in every round just before that precision's step; the fp32 and bf16 steps alternate. On a CPU without
native bf16 (oneDNN emulates it, ~50x slower than fp32) the default measures fp32 only.
The whole step's matmul FLOPs (LLM + bridge + L_AP scores; counter only) are printed too, for scale.

GEMMs alone: the same frozen-LLM forward and input-gradient backward run once more per precision (its
autocast and attention) under a dispatch mode that records every matrix product it calls (op, shapes,
strides, dtype); those products are then replayed on their own, back to back, on random tensors (up to
four per signature, taken in turn, so the replay does not read one cache-warm buffer). Their time is
what the step's matrix products cost at these shapes with torch's kernels, before any other work: the
floor divides FLOPs by a 2,048-cube rate, and "GEMMs / floor" shows how far the model's own shapes
(hidden 576, T ~ 57) are from it. CPU SDPA's fused attention is not a product and is left out.
"""
from __future__ import annotations

import argparse
import os
import statistics

import common  # noqa: F401  (offline, repo root, allocator)
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from flops import bf16_native, matmul_gflops  # noqa: E402
from harness import time_call, time_calls  # noqa: E402
from pipeline.distributed import Ranks  # noqa: E402
from pipeline.paths import Dirs  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.device import training_attention, training_autocast  # noqa: E402
from pipeline.lms import load_lm  # noqa: E402
from pipeline.losses import captioning_loss  # noqa: E402
from pipeline.prototypes import load_prototypes, prototypes_file  # noqa: E402
from pipeline.train import Training, batch_indices, build_training, load_train_data, train_step  # noqa: E402

D_VISION, N_TOKENS = 1280, 49
METHOD = "vlap"
PRECISIONS = ("fp32", "bf16")


def training_batches(cfg, protos, batch_size: int, count: int) -> tuple[str, int, list]:
    """(source, d_vision, `count` (tokens, captions) batches): cached features if present, else random tokens."""
    if (Dirs().features / "index.json").exists():
        data = load_train_data(cfg, Dirs())
        source = f"cached train features ({len(data.captions)} pairs, key {data.features_key[:12]})"
        picks = [batch_indices(len(data.captions), batch_size, cfg.train.seed, s) for s in range(count)]
        return source, data.d_vision, [(data.tokens(i).float(), [data.captions[j] for j in i.tolist()])
                                       for i in picks]
    texts = sorted(protos.text_index)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, N_TOKENS, D_VISION, generator=g),
                [texts[j] for j in torch.randint(len(texts), (batch_size,), generator=g).tolist()])
               for _ in range(count)]
    return "random tokens (no data/features/index.json)", D_VISION, batches


def step(run: Training, batch, compile: bool = False) -> dict[str, float]:
    """pipeline.train.train_step in train_bridge's contexts: its attention kernel for this precision
    (eager for CPU bf16) and train.compile's compiled body when asked. Entered per step, since the
    precisions alternate and each has its own attention."""
    tokens, captions = batch
    with run.lm.attention(training_attention(run.precision, run.lm.device)), run.lm.compiled(compile):
        return train_step(run, tokens, captions)


def llm_gflops(cfg, lm, batch, prompt_ids) -> tuple[float, float]:
    """Frozen-LLM forward + input-gradient backward of one batch: (matmul GFLOP counted by FlopCounterMode,
    attention GFLOP computed analytically: torch's counter has no formula for CPU's fused SDPA kernel)."""
    tokens, captions = batch
    V = torch.randn(tokens.shape[0], N_TOKENS, lm.hidden_size, requires_grad=True)
    caption_ids, caption_mask = lm.tokenize_captions(captions, cfg.train.max_caption_tokens, cfg.train.prompt)
    with FlopCounterMode(display=False) as counter:
        captioning_loss(lm, V, prompt_ids, caption_ids, caption_mask).backward()
    c = lm.model.config
    T = N_TOKENS + len(prompt_ids) + caption_ids.shape[1]
    # QK^T and PV forward (2 products of 2*B*H*T*T*hd each, dense T x T), backward twice the forward.
    attention = 3 * 2 * 2 * tokens.shape[0] * c.num_attention_heads * T * T * c.head_dim * c.num_hidden_layers
    return counter.get_total_flops() / 1e9, attention / 1e9


COPIES = 4  # operand buffers per GEMM signature in the replay
GEMM_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default)


class GemmRecorder(TorchDispatchMode):
    """Records the matrix products run under it: (op, [(shape, stride, dtype) or scalar per arg], kwargs)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMM_OPS:
            spec = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, spec, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def llm_gemm_seconds(cfg, lm, batch, prompt_ids, precision: str, repeats: int = 3) -> tuple[float, int]:
    """(median seconds to replay the frozen-LLM step's matrix products alone, how many there are)."""
    tokens, captions = batch
    V = torch.randn(tokens.shape[0], N_TOKENS, lm.hidden_size, requires_grad=True)
    caption_ids, caption_mask = lm.tokenize_captions(captions, cfg.train.max_caption_tokens, cfg.train.prompt)
    recorder = GemmRecorder()
    with lm.attention(training_attention(precision, lm.device)), recorder:
        with training_autocast(precision, lm.device):
            loss = captioning_loss(lm, V, prompt_ids, caption_ids, caption_mask)
        loss.backward()
    # Up to COPIES random tensors per (shape, stride, dtype), taken in turn: consecutive products read
    # different buffers, as the step's do, rather than one cache-warm tensor.
    operands, uses = {}, {}
    replay = []
    for func, spec, kwargs in recorder.calls:
        args = []
        for a in spec:
            if isinstance(a, tuple):
                copies = operands.setdefault(a, [])
                turn = uses.get(a, 0)
                uses[a] = turn + 1
                if len(copies) < COPIES:
                    copies.append(torch.empty_strided(a[0], a[1], dtype=a[2]).normal_())
                args.append(copies[turn % COPIES])
            else:
                args.append(a)
        replay.append((func, args, kwargs))

    def products() -> None:
        for func, args, kwargs in replay:
            func(*args, **kwargs)

    return time_call(products, repeats=repeats, warmup=1).median, len(replay)  # the warm-up pass warms kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--profile", action="store_true", help="also profile one more step of each precision: the "
                                                          "share of its time in matmuls, and the top ops")
    p.add_argument("--compile", action="store_true", help="train.compile: the LLM body through torch.compile "
                                                          "(two more untimed warm-up steps compile it)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="default: fp32 and bf16, or fp32 alone where this CPU has no native bf16")
    args = p.parse_args()
    precisions = args.precisions or (PRECISIONS if bf16_native() else ("fp32",))
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    cfg = load_config()
    device = torch.device("cpu")
    lm = load_lm(cfg.prototypes.llm, device)
    protos = load_prototypes(prototypes_file(Dirs().prototypes), device)
    source, d_vision, batches = training_batches(cfg, protos, args.batch_size, args.steps + 1)
    prompt_ids = lm.prompt_ids(cfg.train.prompt)
    matmul_gflop, attention_gflop = llm_gflops(cfg, lm, batches[0], prompt_ids)
    floor_gflop = matmul_gflop + attention_gflop

    # The pipeline's run per precision (seeded bridge, method, AdamW, schedule). The lr schedule only
    # scales the step size, not the work: it spans the steps run here, without warm-up.
    total = len(batches) + (2 if args.compile else 0) + (1 if args.profile else 0)
    runs = {precision: build_training(METHOD, cfg, lm, protos, d_vision, total, 0, Ranks(), precision)
            for precision in precisions}
    gemms = {precision: llm_gemm_seconds(cfg, lm, batches[0], prompt_ids, precision) for precision in precisions}
    step_gflop = {}
    for precision, run in runs.items():  # warm-up step, FLOPs counted
        with FlopCounterMode(display=False) as counter:
            step(run, batches[0])
        step_gflop[precision] = counter.get_total_flops() / 1e9
        # Compiled: eager under the counter (its module hooks would be traced into the graph), then two
        # compiling steps; a second caption width recompiles once with dynamic shapes, out of the timing.
        for batch in batches[:2] if args.compile else []:
            step(run, batch, args.compile)
    # Timed rounds: each measures the matmul peak and then one step of every precision (each round its
    # next batch), so all see the same load. The peak calls' own timings are not used.
    peaks = {precision: [] for precision in precisions}
    calls = []
    for precision, run in runs.items():
        dtype, todo = torch.bfloat16 if precision == "bf16" else torch.float32, iter(batches[1:])
        calls += [lambda dtype=dtype, out=peaks[precision]: out.append(matmul_gflops(dtype, repeats=3)),
                  lambda run=run, todo=todo: step(run, next(todo), args.compile)]
    timings = time_calls(calls, repeats=args.steps, warmup=0)
    times = dict(zip(precisions, timings[1::2]))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {lm.spec}, method {METHOD}, "
          f"batch {args.batch_size}, {source}, {'LLM body compiled, ' if args.compile else ''}median of "
          f"{args.steps} steps after {3 if args.compile else 1} warm-up (precisions "
          f"alternated), 1-min load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after\n"
          f"LLM forward + input-gradient backward: {floor_gflop:.1f} GFLOP/step = {matmul_gflop:.1f} "
          f"(linear layers + LM head at caption positions, FlopCounterMode) + {attention_gflop:.1f} "
          f"(attention, analytic)\n")
    print("| precision | s/step | samples/s | step matmul GFLOP (counted) | matmul peak GFLOP/s | floor s | step / floor "
          "| LLM GEMMs alone s (count) | GEMMs / floor | step / GEMMs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for precision in precisions:
        seconds, peak = times[precision].median, statistics.median(peaks[precision])
        floor = floor_gflop / peak
        gemm_seconds, gemm_count = gemms[precision]
        print(f"| {precision} | {seconds:.2f} | {args.batch_size / seconds:.1f} | {step_gflop[precision]:.1f} | "
              f"{peak:.1f} | {floor:.2f} | {seconds / floor:.2f} | {gemm_seconds:.2f} ({gemm_count}) | "
              f"{gemm_seconds / floor:.2f} | {seconds / gemm_seconds:.2f} |")
    if args.profile:
        for precision, run in runs.items():
            profile_step(precision, lambda: step(run, batches[-1]))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_dot_product")


def profile_step(precision: str, step) -> None:
    """Where one step's CPU time goes: matmul kernels against everything else (casts, elementwise,
    the OT and loss code), and the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS) or "mkldnn" in e.key
                 or "onednn" in e.key)
    print(f"\n{precision} step profile: {total / 1e6:.2f} s of op self time, {100 * matmul / total:.0f}% in matmul "
          f"kernels, {100 * (total - matmul) / total:.0f}% elsewhere; top ops by self time:\n")
    print("| op | calls | self s | share |")
    print("|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.3f} | {100 * e.self_cpu_time_total / total:.1f}% |")


if __name__ == "__main__":
    main()
