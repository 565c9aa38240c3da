"""Evaluation stages on real cached easy-VQA features, the real SmolLM2 and real pycocoevalcap."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections import Counter
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.manifest import ImageRow, Split, read_manifest, read_questions, write_split
from pipeline.bridge import load_bridge, save_bridge
from pipeline.features import FeatureCache, features_file
from pipeline.errors import MismatchError
from pipeline.prototypes import prototypes_file
from reference_ranking import unchunked_rank_candidates
from pipeline.generation import (RANKING_MEMORY, SharedPrefix, greedy_decode, left_pad, prefill, prefill_shared_leads,
                                 rank_candidates, text_embeds)
from pipeline.tasks.inputs import load_eval_inputs
from stages import evaluate_arithmetic, evaluate_caption, evaluate_retrieval, evaluate_vqa, summarize, train


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_pipeline, smollm2, tmp_path_factory):
    """A limber bridge trained briefly on the 64 cached training images; eval on 8 test images."""
    cfg, dirs = tiny_pipeline
    eval_dirs = dirs.sharing_inputs(tmp_path_factory.mktemp("eval") / "data")
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=15, batch_size=8, checkpoint_every=100),
        evaluate=dataclasses.replace(
            cfg.evaluate,
            common=dataclasses.replace(cfg.evaluate.common, test_images=8, batch_size=4),
            vqa=dataclasses.replace(cfg.evaluate.vqa, questions=6, shots=1),
            arithmetic=dataclasses.replace(cfg.evaluate.arithmetic, queries=4, examples=2),
        ),
    )
    train.run(cfg, eval_dirs, "limber", lm=smollm2)
    return cfg, eval_dirs


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def independent_cider_d(refs: dict[str, list[list[str]]], hyps: dict[str, list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D written out from Vedantam et al. (2015) as the COCO evaluation defines it: tf-idf
    n-gram vectors (n = 1..4, idf from the references' document frequency), hypothesis counts
    clipped by the reference's, a Gaussian penalty on the length difference, x10, mean over
    references, images and n."""
    df = Counter(g for rs in refs.values() for g in set().union(*[set(ngrams(r, n)) for r in rs for n in range(1, 5)]))
    log_images = np.log(float(len(refs)))

    def vector(tokens: list[str]) -> list[dict]:
        return [{g: c * (log_images - np.log(max(1.0, df[g]))) for g, c in ngrams(tokens, n).items()}
                for n in range(1, 5)]

    scores = []
    for image, rs in refs.items():
        vh = vector(hyps[image])
        per_ref = []
        for r in rs:
            vr, penalty = vector(r), np.exp(-((len(hyps[image]) - len(r)) ** 2) / (2 * sigma ** 2))
            sims = []
            for h_n, r_n in zip(vh, vr):
                dot = sum(min(v, r_n.get(g, 0.0)) * r_n.get(g, 0.0) for g, v in h_n.items())
                norms = np.sqrt(sum(v * v for v in h_n.values())) * np.sqrt(sum(v * v for v in r_n.values()))
                sims.append(dot / norms * penalty if norms else 0.0)
            per_ref.append(10.0 * np.mean(sims))
        scores.append(np.mean(per_ref))
    return float(np.mean(scores))


def independent_bleu_1(refs: dict[str, list[list[str]]], hyps: dict[str, list[str]]) -> float:
    """Corpus BLEU-1: clipped unigram precision times the brevity penalty (closest reference length)."""
    matched = total = hyp_len = ref_len = 0
    for image, rs in refs.items():
        h = hyps[image]
        best = Counter()
        for r in rs:
            best |= Counter(r)
        matched += sum(min(c, best[w]) for w, c in Counter(h).items())
        total += len(h)
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    return matched / total * (1.0 if hyp_len > ref_len else np.exp(1 - ref_len / hyp_len))


@pytest.mark.slow
def test_captioning_eval_on_8_images(trained, smollm2):
    """The stage's captions are what the bridge and LM decode, and its BLEU-1 and CIDEr equal ones
    recomputed by hand from the saved captions (tokenised as the COCO evaluation does)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cfg, dirs = trained
    metrics = evaluate_caption.run(cfg, dirs, "limber", lm=smollm2)
    assert metrics["images"] == 8
    assert set(metrics) >= {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    captions = json.loads((dirs.plots / "caption" / "limber" / "captions.json").read_text())
    assert len(captions) == 8 and all(v["references"] for v in captions.values())
    tokenizer = PTBTokenizer()
    refs = {k: [c.split() for c in v] for k, v in tokenizer.tokenize(
        {k: [{"caption": c} for c in v["references"]] for k, v in captions.items()}).items()}
    hyps = {k: v[0].split() for k, v in tokenizer.tokenize(
        {k: [{"caption": v["generated"]}] for k, v in captions.items()}).items()}
    assert metrics["CIDEr"] == pytest.approx(independent_cider_d(refs, hyps), abs=6e-5)  # saved to 4 decimals
    assert metrics["BLEU-1"] == pytest.approx(independent_bleu_1(refs, hyps), abs=6e-5)
    # the first image's caption, decoded alone from its cached tokens through the saved bridge
    image_id = next(iter(captions))
    bridge, meta = load_bridge(dirs.models / "limber")
    with FeatureCache(features_file(dirs.features, "test")) as cache:
        tokens = torch.from_numpy(cache.tokens([image_id])).float()
    with torch.inference_mode():
        prefix = torch.cat([bridge(tokens)[0], text_embeds(smollm2, meta["prompt"])])
    alone = greedy_decode(smollm2, *left_pad([prefix]), cfg.evaluate.caption.max_new_tokens)[0]
    assert captions[image_id]["generated"] == alone
    page = (dirs.pages / "caption" / "limber.html").read_text()
    assert page.count("data:image/png;base64,") == 8
    saved = json.loads((dirs.metrics / "caption" / "limber.json").read_text())
    assert saved["CIDEr"] == pytest.approx(metrics["CIDEr"], abs=1e-4)


@pytest.mark.slow
def test_vqa_eval_zero_and_few_shot(trained, smollm2):
    """Accuracies equal exact-match rates recomputed from answers.json (easy-VQA has one answer per
    question), overall and per question type; the 1-shot answers, which the stage computes from a
    shared KV-cached prefix, equal answers decoded and ranked from the whole [shot][V] question."""
    cfg, dirs = trained
    metrics = evaluate_vqa.run(cfg, dirs, "limber", lm=smollm2)
    assert metrics["questions"] == 6
    answers = json.loads((dirs.plots / "vqa" / "limber" / "answers.json").read_text())
    for setting in ("0shot", "1shot"):
        records = answers[setting]
        assert len(records) == 6 and all(len(r["answers"]) == 1 for r in records)
        for mode in ("open", "closed"):
            hits = [float(r[mode].strip().lower() == r["answers"][0]) for r in records]
            assert metrics[f"{setting}_{mode}_accuracy"] == pytest.approx(100 * np.mean(hits), abs=1e-3)
            for qtype in {r["question_type"] for r in records}:
                typed = [h for h, r in zip(hits, records) if r["question_type"] == qtype]
                assert metrics[f"{setting}_{mode}_{qtype}_accuracy"] == pytest.approx(100 * np.mean(typed), abs=1e-3)
    vocab = {"yes", "no", "red", "green", "blue", "black", "gray", "teal", "brown", "yellow", "circle", "rectangle",
             "triangle"}
    assert all(r["closed"] in vocab for r in answers["0shot"])  # closed mode always answers from the set
    assert {r["question_type"] for r in answers["0shot"]} <= {"color", "shape", "yes_no"}
    # 1-shot, independently: the shot and each query as one whole sequence, no cache anywhere
    shots, shot_tokens = evaluate_vqa.pick_shots(dirs, 1, cfg.evaluate.common.seed)
    bridge, _ = load_bridge(dirs.models / "limber")
    with torch.inference_mode():
        shot_embeds = torch.cat([bridge(shot_tokens[0][None].float())[0], text_embeds(
            smollm2, f" Question: {shots[0]['question']} Answer: {shots[0]['answers'][0]}\n")])
    test_questions = {q["question_id"]: q for q in read_questions(dirs.prepared, "test")}
    answer_set = sorted({r["closed"] for r in answers["1shot"]} | {"yes", "no", "circle"})
    with FeatureCache(features_file(dirs.features, "test")) as cache:
        for record in answers["1shot"][:3]:
            image = test_questions[record["question_id"]]["image_id"]
            with torch.inference_mode():
                V = bridge(torch.from_numpy(cache.tokens([image])).float())[0]
            whole = torch.cat([shot_embeds, V, text_embeds(smollm2, f" Question: {record['question']} Answer:")])
            embeds, mask = left_pad([whole])
            decoded = greedy_decode(smollm2, embeds, mask, cfg.evaluate.vqa.max_new_tokens)[0]
            assert record["open"] == re.split(r"[\n,.]", decoded.strip(), maxsplit=1)[0].strip()
            scores = rank_candidates(smollm2, embeds, mask, [f" {a}" for a in answer_set])[0]
            if record["closed"] in answer_set:  # the stage ranked a superset: its choice must win here too
                assert answer_set[int(scores.argmax())] == record["closed"]


def independent_ranks(scores: np.ndarray, relevant: np.ndarray) -> list[int]:
    """1 + the number of irrelevant candidates scoring at least the best relevant one, query by query."""
    out = []
    for row, rel in zip(scores, relevant):
        best = max(v for v, r in zip(row, rel) if r)
        out.append(1 + sum(1 for v, r in zip(row, rel) if not r and v >= best))
    return out


@pytest.mark.slow
def test_retrieval_stage_equals_an_independent_calculation(trained, smollm2):
    cfg, dirs = trained
    metrics = evaluate_retrieval.run(cfg, dirs, "limber")
    saved = json.loads((dirs.plots / "retrieval" / "limber" / "ranks.json").read_text())
    ids, texts = saved["image_ids"], saved["texts"]
    # Independently: the bridge on the cached tokens, z_t from the prototypes file, the relevance by caption text.
    bridge, _ = load_bridge(dirs.models / "limber")
    with FeatureCache(features_file(dirs.features, "test")) as cache:
        tokens = torch.from_numpy(cache.tokens(ids)).float()
    with torch.inference_mode():
        z_v = F.normalize(bridge(tokens).mean(1), dim=-1).numpy()
    with h5py.File(prototypes_file(dirs.prototypes), "r") as f:
        all_texts = [t.decode() for t in f["texts"][:]]
        z_t = f["z_t"][:][[all_texts.index(t) for t in texts]].astype(np.float64)
    captions = {r.image_id: r.captions for r in read_manifest(dirs.prepared, "test").images}
    assert texts == list(dict.fromkeys(c for i in ids for c in captions[i]))  # distinct texts, no tied copies
    assert len(ids) == 8 and metrics["distinct_texts"] == len(texts) == len(set(texts))
    relevant = np.array([[t in captions[i] for t in texts] for i in ids])
    cosine = z_v.astype(np.float64) @ z_t.T
    for name, sim in (("cosine", cosine),):
        i2t, t2i = independent_ranks(sim, relevant), independent_ranks(sim.T, relevant.T)
        assert saved["ranks"][name] == {"i2t": i2t, "t2i": t2i}
        for k in (1, 5):
            assert metrics[f"{name}_i2t_R@{k}"] == pytest.approx(100 * np.mean(np.array(i2t) <= k), abs=1e-3)
            assert metrics[f"{name}_t2i_R@{k}"] == pytest.approx(100 * np.mean(np.array(t2i) <= k), abs=1e-3)
    assert set(saved["ranks"]) == {"cosine", "assignment", "centred"}
    curve = json.loads((dirs.plots / "retrieval" / "limber" / "recall_at_k.json").read_text())
    assert [row["k"] for row in curve] == list(range(1, 11))
    for scorer in saved["ranks"]:
        assert curve[0][f"{scorer}_i2t"] == pytest.approx(metrics[f"{scorer}_i2t_R@1"], abs=1e-3)
    # chance: a random ranking of the distinct texts, each image relevant to exactly one of them
    assert metrics["chance_i2t_R@1"] == pytest.approx(100 / len(texts), abs=1e-6)


@pytest.mark.slow
def test_arithmetic_and_summary_cells_equal_the_metrics_files(trained, smollm2):
    cfg, dirs = trained
    arith = evaluate_arithmetic.run(cfg, dirs, "limber", lm=smollm2)
    assert {"color_swap_top1", "shape_swap_top1"} <= arith.keys()
    assert (dirs.pages / "arithmetic" / "limber.html").exists()
    evaluate_retrieval.run(cfg, dirs, "limber")
    summarize.run(cfg, dirs)
    rows = {}
    for line in (dirs.metrics / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "/" in cells[0] and len(cells) >= 5:
            rows[cells[0]] = cells[2]  # the limber column (vlap, limber, contrastive, chance[, study])
    for task in ("retrieval", "arithmetic"):
        saved = json.loads((dirs.metrics / task / "limber.json").read_text())
        for key, shown in rows.items():
            if key.startswith(task + "/") and shown != "–":
                value = saved[key.split("/", 1)[1]]
                assert shown == (value if isinstance(value, str) else f"{value:.1f}"), key
    # every scorer's row compares the methods under that one scorer
    assert {f"retrieval/{s}_{d}_R@1" for s in ("cosine", "assignment", "centred") for d in ("i2t", "t2i")} <= rows.keys()
    assert (dirs.plots / "summary.png").stat().st_size > 1000


def test_ranking_with_shared_prefix_equals_full_sequences(smollm2):
    prompts = ["Question: what color is the sky? Answer:", "The shape is a"]
    embeds, mask = left_pad([text_embeds(smollm2, p) for p in prompts])
    candidates = [" blue", " teal", " circle"]  # " teal" is two tokens: exercises the KV-cache path
    scores = rank_candidates(smollm2, embeds, mask, candidates)
    for i, p in enumerate(prompts):
        for j, c in enumerate(candidates):
            ids = smollm2.tokenizer(p, add_special_tokens=False)["input_ids"]
            cid = smollm2.tokenizer(c, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logp = F.log_softmax(smollm2.model(torch.tensor([ids + cid])).logits[0].float(), -1)
            expected = sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(cid))
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-3)


def test_batched_greedy_equals_one_at_a_time(smollm2):
    seqs = [text_embeds(smollm2, p) for p in ["The capital of France is", "One, two, three,"]]
    batched = greedy_decode(smollm2, *left_pad(seqs), max_new_tokens=5)
    single = [greedy_decode(smollm2, *left_pad([s]), max_new_tokens=5)[0] for s in seqs]
    assert batched == single and "Paris" in batched[0]


def test_cached_shot_prefix_and_prefill_equal_the_whole_sequences(smollm2):
    """The n-shot prefix run once and each batch prefilled once give the answers and candidate
    log-likelihoods of running every whole sequence [shots][query] from scratch."""
    shots = text_embeds(smollm2, "Question: what colour is a lemon? Answer: yellow\nQuestion: what colour is "
                                 "grass? Answer: green\n")
    queries = [text_embeds(smollm2, p) for p in ["Question: what colour is the sky? Answer:",
                                                  "Question: what colour is snow in winter? Answer:"]]
    candidates = [" blue", " white", " teal"]  # " teal" is two tokens
    prefix = SharedPrefix(smollm2, shots)
    assert prefix.cache is not None and prefix.cache.get_seq_length() == len(shots)
    state = prefill(smollm2, queries, prefix)
    assert state.cache.get_seq_length() == state.embeds.shape[1] - 1  # everything but the last position
    cached_answers = greedy_decode(smollm2, state.embeds, state.mask, 3, cache=state.cache_copy())
    cached_scores = rank_candidates(smollm2, state.embeds, state.mask, candidates, cache=state.cache)
    embeds, mask = left_pad([torch.cat([shots, q]) for q in queries])
    assert cached_answers == greedy_decode(smollm2, embeds, mask, 3)
    assert torch.allclose(cached_scores, rank_candidates(smollm2, embeds, mask, candidates), atol=1e-3)
    assert cached_answers[0].startswith("blue") and cached_scores[0].argmax() == 0  # the sky is blue
    assert prefix.cache.get_seq_length() == len(shots)  # batches copy the shared cache, never extend it



@pytest.mark.parametrize("with_shots", [False, True])
def test_rows_sharing_a_lead_run_it_once_and_equal_the_whole_sequences(smollm2, with_shots):
    """Questions about one image share its visual tokens (here: a lead of 6 real token embeddings): each lead
    runs once, after the shots if any, and the answers and candidate log-likelihoods equal those of every
    whole sequence [shots][lead][question] run from scratch."""
    ids = smollm2.tokenizer(["a red circle on a white", "a blue square on a black"], add_special_tokens=False,
                            return_tensors="pt")["input_ids"]
    assert ids.shape == (2, 6)
    leads = smollm2.embed(ids)  # (U=2, N=6, D)
    questions = [text_embeds(smollm2, p) for p in [" Question: what colour is it? Answer:",
                                                    " Question: which shape is drawn here? Answer:",
                                                    " Question: what colour? Answer:"]]
    lead_of = [0, 1, 0]
    shots = text_embeds(smollm2, "Question: what colour is a lemon? Answer: yellow\n")
    prefix = SharedPrefix(smollm2, shots) if with_shots else None
    state = prefill_shared_leads(smollm2, leads, lead_of, questions, prefix)
    assert state.cache.get_seq_length() == state.embeds.shape[1] - 1  # everything but the last position
    candidates = [" red", " blue", " circle", " teal"]  # " teal" is two tokens
    answers = greedy_decode(smollm2, state.embeds, state.mask, 3, cache=state.cache_copy())
    scores = rank_candidates(smollm2, state.embeds, state.mask, candidates, cache=state.cache)
    lead = [shots] if with_shots else []
    embeds, mask = left_pad([torch.cat([*lead, leads[j], q]) for j, q in zip(lead_of, questions)])
    assert answers == greedy_decode(smollm2, embeds, mask, 3)
    assert torch.allclose(scores, rank_candidates(smollm2, embeds, mask, candidates), atol=1e-3)
    assert not torch.allclose(scores[0], scores[2], atol=1e-3)  # one lead, two questions: two distributions
    if with_shots:
        assert prefix.cache.get_seq_length() == len(shots)  # the shared cache is copied, never extended

@pytest.mark.slow
def test_bridge_from_another_encoder_is_refused(trained, smollm2, tmp_path):
    cfg, dirs = trained
    bridge, meta = load_bridge(dirs.models / "limber")
    other = dirs.sharing_inputs(tmp_path / "data")
    save_bridge(other.models / "limber", bridge, meta | {"encoder_weights_sha256": "0" * 64})
    with pytest.raises(MismatchError) as err:
        load_eval_inputs(cfg, "limber", other, lm=smollm2)
    assert "another encoder" in str(err.value) and "\n" not in str(err.value)


def test_missing_bridge_fails_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  common:\n    test_images: 4\n")
    row = ImageRow("1", "1.png", "0" * 64, ["a red circle"])
    write_split(tmp_path / "prepared", Split("test", "package:easy_vqa", [row]))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.evaluate_caption", "--method", "vlap", "--params", str(params),
         "--data", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}/models/vlap/model.safetensors: trained bridge not found (run the train stage first)"]


@pytest.mark.parametrize("memory", [1, 64 << 20, RANKING_MEMORY])  # one row per chunk, a few chunks, one chunk
def test_chunked_ranking_equals_the_unchunked_scores(smollm2, memory):
    prompts = ["Question: what color is the sky? Answer:", "The shape is a", "Question: how many sides? Answer:"]
    embeds, mask = left_pad([text_embeds(smollm2, p) for p in prompts])
    candidates = [" blue", " teal", " circle", " dark turquoise", " yes", " a rectangle with rounded corners",
                  " 12", " magenta"]
    assert len({len(smollm2.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in candidates}) >= 3
    expected = unchunked_rank_candidates(smollm2, embeds, mask, candidates)  # the ranking before chunking
    scores = rank_candidates(smollm2, embeds, mask, candidates, memory=memory)
    assert torch.allclose(scores, expected, atol=1e-4), (scores - expected).abs().max()
    assert torch.equal(scores.argmax(-1), expected.argmax(-1))
