import base64
import io

import pytest
from PIL import Image

from pipeline.tasks.caption_metrics import caption_scores, cider_by_domain, domain_key, write_examples_html

REFERENCES = {
    "0": ["A red circle on a white background.", "a red circle"],
    "1": ["A small blue triangle.", "a blue triangle in the corner"],
    "2": ["A green rectangle.", "a large green rectangle near the top"],
}
KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


@pytest.fixture(scope="module")
def scores():
    # Two real pycocoevalcap runs (each starts the PTB tokenizer and METEOR JVMs).
    identical = {k: refs[0] for k, refs in REFERENCES.items()}
    wrong = {"0": "a yellow dog", "1": "two people walking", "2": "a plate of food"}
    return caption_scores(REFERENCES, identical), caption_scores(REFERENCES, wrong)


def test_identical_predictions_score_high(scores):
    good, bad = scores
    assert list(good) == KEYS
    assert good["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert good["METEOR"] > 0.9 and good["ROUGE-L"] == pytest.approx(1.0)
    for key in KEYS:
        assert good[key] > bad[key], key
    assert good["CIDEr"] > 1.0 > bad["CIDEr"]


def test_one_meteor_jvm_per_process_and_a_dead_one_is_replaced(scores):
    from pipeline.tasks import caption_metrics

    identical = {k: refs[0] for k, refs in REFERENCES.items()}
    jvm = caption_metrics._meteor.meteor_p  # the fixture's two scorings ran on it
    assert caption_scores(REFERENCES, identical) == scores[0] and caption_metrics._meteor.meteor_p is jvm
    jvm.kill()
    jvm.wait()
    assert caption_scores(REFERENCES, identical) == scores[0]  # on a new JVM
    assert caption_metrics._meteor.meteor_p is not jvm and caption_metrics._meteor.meteor_p.poll() is None


def test_mismatched_ids_raise():
    with pytest.raises(ValueError, match="ids differ"):
        caption_scores(REFERENCES, {"0": "a red circle", "9": "x"})


def _png_bytes(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_examples_html_is_escaped_self_contained_and_atomic(tmp_path):
    image_file = tmp_path / "img.png"
    image_file.write_bytes(_png_bytes("blue"))
    rows = [
        {
            "image_b64": base64.b64encode(_png_bytes("red")).decode(),
            "generated": "a <b>red</b> circle & more",
            "references": ['a "red" circle'],
        },
        {"image_path": str(image_file), "generated": "a blue square", "references": ["x < y"]},
    ]
    out = write_examples_html(tmp_path / "pages" / "examples.html", rows, title="Caps <test>")

    page = out.read_text(encoding="utf-8")
    assert "a &lt;b&gt;red&lt;/b&gt; circle &amp; more" in page
    assert "a &quot;red&quot; circle" in page and "x &lt; y" in page
    assert "<b>red</b>" not in page and "Caps &lt;test&gt;" in page
    assert page.count('src="data:image/png;base64,') == 2
    assert base64.b64encode(_png_bytes("blue")).decode() in page
    assert [p.name for p in out.parent.iterdir()] == ["examples.html"]  # no temp file left


def test_nocaps_cider_per_domain_scores_each_subset_on_its_own():
    """Against pycocoevalcap's Cider run directly on each domain's images (captions already in PTB form:
    lower case, no punctuation), so each subset's IDF comes from its own references."""
    from pycocoevalcap.cider.cider import Cider

    refs = {"0": ["a red circle", "a red round shape"], "1": ["a blue square", "a small blue square"],
            "2": ["a green triangle", "a triangle in green"], "3": ["two dogs on grass", "dogs playing on grass"],
            "4": ["a cat on a sofa", "a sleepy cat"], "5": ["a bowl of fruit", "fruit in a bowl"]}
    preds = {"0": "a red circle", "1": "a blue shape", "2": "a green square", "3": "a dog on grass",
             "4": "a cat", "5": "a plate of food"}
    domains = {"0": "in-domain", "1": "in-domain", "2": "near-domain", "3": "near-domain", "4": "out-domain",
               "5": "out-domain"}
    scores = cider_by_domain(refs, preds, domains)
    assert set(scores) == {"CIDEr_in", "CIDEr_near", "CIDEr_out", "CIDEr_overall"}

    def direct(ids):
        return Cider().compute_score({i: refs[i] for i in ids}, {i: [preds[i]] for i in ids})[0]

    for key, domain in (("in", "in-domain"), ("near", "near-domain"), ("out", "out-domain")):
        assert scores[f"CIDEr_{key}"] == pytest.approx(direct([i for i in refs if domains[i] == domain]))
    assert scores["CIDEr_overall"] == pytest.approx(direct(list(refs)))
    assert scores["CIDEr_in"] != pytest.approx(  # a subset's score is not that of its images within the whole
        sum(Cider().compute_score(refs, {i: [preds[i]] for i in refs})[1][:2]) / 2)
    assert domain_key("out-domain") == "out" and domain_key("Near Domain") == "near_domain"
