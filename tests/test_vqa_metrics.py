import json
from collections import Counter
from pathlib import Path

import easy_vqa
import pytest

from pipeline.tasks.vqa_metrics import (
    accuracy_by_type,
    easyvqa_question_type,
    normalize_answer,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  Yes ", "yes"),                          # case, strip
        ("Red.", "red"),                            # trailing period dropped
        ("3.5", "3.5"),                             # period before a digit kept
        ("1,000", "1000"),                          # comma inside a number removed
        ("black-and-white", "black and white"),     # in-word punctuation -> space
        ("yes !", "yes"),                           # punctuation next to a space removed
        ("what?!", "what"),
        ("a circle", "circle"),                     # articles
        ("The   Triangle", "triangle"),             # article + whitespace collapse
        ("an apple", "apple"),
        ("two", "2"),                               # number words
        ("Ten dogs", "10 dogs"),
        ("none", "0"),
        ("dont", "don't"),                          # contractions restored
        ("don't", "don't"),
        ("isnt it", "isn't it"),
        ("red\tcircle\n", "red circle"),            # tabs and newlines
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_accuracy_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("The Circle.", ["circle"]) == 1.0
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("triangle", ["circle"]) == 0.0


@pytest.mark.parametrize(
    "n_match, expected",
    [
        # mean over 10 leave-one-out subsets of min(1, matches/3):
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),        # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),        # 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_accuracy_ten_answers(n_match, expected):
    answers = ["two"] * n_match + ["3"] * (10 - n_match)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_accuracy_needs_an_answer():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_accuracy_by_type():
    records = [
        {"question_type": "color", "accuracy": 1.0},
        {"question_type": "color", "accuracy": 0.0},
        {"question_type": "yes_no", "accuracy": 1.0},
    ]
    assert accuracy_by_type(records) == {"color": 0.5, "yes_no": 1.0}
    assert accuracy_by_type([]) == {}


def test_question_types_over_all_easyvqa_train_questions():
    path = Path(easy_vqa.__file__).parent / "data" / "train" / "questions.json"
    questions = json.loads(path.read_text())
    types = Counter(easyvqa_question_type(q, a) for q, a, _ in questions)

    answers = Counter(a for _, a, _ in questions)
    shapes = {"circle", "rectangle", "triangle"}
    expected = Counter(
        {
            "yes_no": answers["yes"] + answers["no"],
            "shape": sum(answers[s] for s in shapes),
            "color": sum(n for a, n in answers.items() if a not in shapes | {"yes", "no"}),
        }
    )
    assert types == expected
    assert sum(types.values()) == len(questions)


def test_question_type_rejects_unknown_template_and_inconsistent_answer():
    with pytest.raises(ValueError, match="unknown"):
        easyvqa_question_type("how many shapes are there?", "1")
    with pytest.raises(ValueError, match="classified"):
        easyvqa_question_type("what color is the shape?", "yes")


def test_open_ended_answer_is_cut_at_first_clause():
    from pipeline.tasks.vqa import first_answer

    assert first_answer(" no, there is") == "no"
    assert first_answer("Blue.\nQuestion: what") == "Blue"
    assert first_answer("a red circle") == "a red circle"
