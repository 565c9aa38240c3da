"""Benchmark: the inductive assignment scorer vs the transductive one it replaced, same problems, same run.

    python bench/retrieval_scorers.py [--test 1000 5000] [--fit 1000] [--vocab 49152]

Inductive (`pipeline.tasks.retrieval`): one Sinkhorn per modality on `--fit` training samples fixes the
word columns; each test image and text is then assigned on its own (softmax(S / eps + log b)) and the
two are compared by the Bhattacharyya coefficient. Reference, the transductive scorer: one Sinkhorn
per modality over the whole test gallery, so a query's score depends on the other test items.
Both use pipeline.ot.sinkhorn (eps 0.01, 3 iterations, as evaluate.retrieval). Random unit vectors
(D = 576, SmolLM2's width) against K word prototypes, a power-law prior; a gallery of `n` images and
`n` texts. Prints a markdown table: median seconds of each, the ratio transductive / inductive, and
the fit's share (paid once per evaluation, whatever the gallery size).
"""
from __future__ import annotations

import argparse
import statistics

import common  # noqa: F401  (offline, repo root, allocator)
import torch
import torch.nn.functional as F

from harness import time_call, time_calls  # noqa: E402
from pipeline.ot import sinkhorn  # noqa: E402
from pipeline.prototypes import Prototypes  # noqa: E402
from pipeline.tasks.retrieval import TrainingFit, fit_columns, scorer_similarities  # noqa: E402

D, EPSILON, ITERS, REPEATS = 576, 0.01, 3, 3


def unit(n: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=g), dim=-1)


def word_prototypes(K: int, g: torch.Generator) -> Prototypes:
    rank = torch.randperm(K, generator=g).float() + 1
    prior = rank**-1.2
    return Prototypes(path=None, key="bench", prototypes=unit(K, g), token_ids=torch.arange(K),
                      prior=prior / prior.sum(), text_index={}, z_t=torch.empty(0, D), attrs={})


def inductive(z_v, z_t, fit_v, fit_t, protos) -> tuple[torch.Tensor, float]:
    fitted = time_call(lambda: TrainingFit(mean_v=fit_v.mean(0), mean_t=fit_t.mean(0), epsilon=EPSILON,
                                           log_b_v=fit_columns(fit_v, protos, EPSILON, ITERS),
                                           log_b_t=fit_columns(fit_t, protos, EPSILON, ITERS)),
                       repeats=1, warmup=0)  # the fit's share of this one call
    return scorer_similarities(z_v, z_t, protos, fitted.result, scorers=("assignment",))["assignment"], fitted.median


def transductive(z_v, z_t, protos) -> torch.Tensor:
    q_v = sinkhorn(z_v @ protos.prototypes.T, protos.prior, EPSILON, ITERS).assignments
    q_t = sinkhorn(z_t @ protos.prototypes.T, protos.prior, EPSILON, ITERS).assignments
    return q_v.float().sqrt() @ q_t.float().sqrt().T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test", type=int, nargs="+", default=[1000, 5000], help="gallery sizes (images = texts)")
    p.add_argument("--fit", type=int, default=1000, help="training samples per modality (evaluate.retrieval.fit_images)")
    p.add_argument("--vocab", type=int, default=49_152, help="K word prototypes (SmolLM2: 49,152)")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    protos = word_prototypes(args.vocab, g)
    fit_v, fit_t = unit(args.fit, g), unit(args.fit, g)
    print(f"K = {args.vocab}, D = {D}, fit = {args.fit} per modality, eps = {EPSILON}, {ITERS} iterations, "
          f"{torch.get_num_threads()} threads; median of {REPEATS}\n")
    print("| gallery (images = texts) | transductive s | inductive s (of which fit) | transductive / inductive |")
    print("|---:|---:|---:|---:|")
    with torch.inference_mode():
        for n in args.test:
            z_v, z_t = unit(n, g), unit(n, g)
            inductive(z_v[:8], z_t[:8], fit_v, fit_t, protos)  # warm-up (on a small gallery, not timed)
            t_fit = []  # each timed inductive call's fit seconds
            trans, ind = time_calls(  # alternated, so both see the same machine load
                [lambda: transductive(z_v, z_t, protos),
                 lambda: t_fit.append(inductive(z_v, z_t, fit_v, fit_t, protos)[1])],
                repeats=REPEATS, warmup=0)
            print(f"| {n} | {trans.median:.2f} | {ind.median:.2f} ({statistics.median(t_fit):.2f}) | "
                  f"{trans.median / ind.median:.2f} |")


if __name__ == "__main__":
    main()
