import json
from collections import Counter
from pathlib import Path

import easy_vqa
import pytest

from pipeline.tasks.vqa_metrics import (
    accuracy_by_type,
    easyvqa_question_type,
    normalize_answer,
    process_punctuation,
    question_type,
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
        # mean over the 10 leave-one-out subsets (9 answers each) of min(1, matches/3); leaving out a
        # matching answer leaves n_match - 1 matches, leaving out another leaves n_match:
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),        # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),        # 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_accuracy_ten_answers(n_match, expected):
    answers = ["2"] * n_match + ["3"] * (10 - n_match)
    assert vqa_accuracy("Two.", answers) == pytest.approx(expected)  # the prediction is normalised: "2"


def test_accuracy_hand_worked_examples():
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("red", ["red"] * 3 + ["dark red"] * 3 + ["maroon"] * 4) == pytest.approx(0.9)
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)  # contraction restored
    assert vqa_accuracy("The dog!", ["dog"] * 2 + ["puppy"] * 8) == pytest.approx(0.6)


def test_accuracy_processes_human_answers_as_the_official_script_does():
    """Human answers only go through processPunctuation, and only when they disagree."""
    assert vqa_accuracy("black and white", ["black-and-white"] * 4 + ["gray"] * 6) == 1.0
    assert vqa_accuracy("black and white", ["black-and-white"] * 10) == 0.0  # all the same: left as they are
    assert vqa_accuracy("two", ["two"] * 3 + ["3"] * 7) == 0.0  # "two" -> "2" for the prediction only
    assert vqa_accuracy("yes", ["yes!"] * 3 + ["no"] * 7) == 0.0  # "yes!" -> "yes " (in-word punctuation)


def test_official_normalisation_quirks():
    assert process_punctuation("yes!") == "yes "
    assert process_punctuation("." * 40) == "." * 8  # re.UNICODE passed as sub()'s count: 32 periods at most
    assert normalize_answer("whatll") == "what'll" and normalize_answer("somebody'd") == "somebodyd"
    assert normalize_answer("im") == "im"  # the official map has "Im", which lower-cased text never matches
    assert normalize_answer("The 3.5 ft. pole") == "3.5 ft pole"


def test_question_type_is_the_stored_answer_type_else_easyvqa():
    assert question_type({"question": "Is it?", "answers": ["yes"] * 10, "answer_type": "yes/no"}) == "yes_no"
    assert question_type({"question": "How many?", "answers": ["2"] * 10, "answer_type": "number"}) == "number"
    assert question_type({"question": "what color is the circle?", "answers": ["red"], "answer_type": ""}) == "color"
    assert question_type({"question": "is there a red shape?", "answers": ["no"]}) == "yes_no"


def test_summary_keys_per_answer_type():
    from pipeline.tasks.vqa import summarise

    records = [{"question_type": t, "open_accuracy": a, "closed_accuracy": 1.0}
               for t, a in (("yes_no", 1.0), ("number", 0.3), ("other", 0.0), ("other", 0.9))]
    metrics = summarise(records, "0shot")
    assert metrics["0shot_open_accuracy"] == pytest.approx(100 * 2.2 / 4)
    assert metrics["0shot_open_yes_no_accuracy"] == 100.0 and metrics["0shot_open_number_accuracy"] == 30.0
    assert metrics["0shot_open_other_accuracy"] == pytest.approx(45.0)
    assert not any("/" in k for k in metrics)


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
