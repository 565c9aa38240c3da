"""VQA scoring: the official answer normalisation, VQA accuracy, easy-VQA question types.

`normalize_answer` follows the official VQA evaluation script (vqaEval.py,
processPunctuation + processDigitArticle) so our numbers are comparable with
published ones; the contraction map is abbreviated to its common entries.
"""

from __future__ import annotations

import re
from collections import defaultdict

# Official map: number words (and "none") become digits so "two" matches "2".
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Apostrophes are never stripped, so the official script restores them on the
# common apostrophe-less spellings instead: "dont" and "don't" then compare equal.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
    "couldve": "could've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd",
    "hes": "he's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "lets": "let's", "mightnt": "mightn't", "mustnt": "mustn't",
    "shant": "shan't", "shes": "she's", "shouldnt": "shouldn't",
    "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# Official punctuation list: note it leaves out "'", ":" and "." (periods have their own rule).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                "-", ">", "<", "@", "`", ",", "?", "!"]
# A period not followed by a digit is dropped, so "3.5" survives but "dog." does not.
# (The official pattern "(?!<=\d)(\.)(?!\d)" has a broken look-behind; this is what it does.)
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")


def _process_punctuation(text: str) -> str:
    # Official rule: punctuation touching a space (or any text with a number like "1,000")
    # is deleted; punctuation inside a word becomes a space ("black-and-white" -> 3 words).
    out = text
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """Normalise an answer as the official VQA eval does.

    Steps: whitespace characters to spaces and strip; punctuation rules (see
    `_process_punctuation`); lower-case; number words to digits; drop articles;
    restore common contractions; collapse whitespace.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against the human answers of one question.

    Prediction and answers are all normalised with `normalize_answer`. With n >= 2
    answers this is the official formula: the mean over the n leave-one-out subsets
    of min(1, #matches / k), where k = min(3, n - 1) is the number of agreeing humans
    needed for full credit; with VQA's 10 answers, k = 3 exactly as in the paper.
    With a single answer (easy-VQA) there is nothing to leave out, so the one subset is
    the answer itself with k = 1: accuracy is 1.0 on an exact normalised match, else 0.0.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    n = len(matches)
    if n == 1:
        return float(matches[0])
    k = min(3, n - 1)
    total = sum(matches)
    # Leaving out answer i removes one match exactly when answer i itself matched.
    return sum(min(1.0, (total - m) / k) for m in matches) / n


def accuracy_by_type(records: list[dict]) -> dict[str, float]:
    """Mean `accuracy` per `question_type`, keys sorted; an empty input gives {}."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_type[r["question_type"]].append(float(r["accuracy"]))
    return {t: sum(v) / len(v) for t, v in sorted(by_type.items())}


# easy-VQA has 24 question templates; the open ones ask "what color ..." /
# "what is the color of ..." or "what shape ..." / "what is the <color> shape?",
# every other template is a yes/no question starting with "is" or "does".
_COLOR_Q = re.compile(r"^what (color|is the color)\b")
_SHAPE_Q = re.compile(r"^what (shape\b|is the \w+ shape\?$)")
_YES_NO_Q = re.compile(r"^(is|does)\b")


def easyvqa_question_type(question: str, answer: str) -> str:
    """Classify an easy-VQA question as `color`, `shape` or `yes_no`.

    The type comes from the question text; the ground-truth answer is a consistency
    check (a yes/no question must have a yes/no answer and an open one must not), so a
    template we do not know raises ValueError instead of being silently mis-filed.
    """
    q = " ".join(question.lower().split())
    is_yes_no_answer = answer.strip().lower() in {"yes", "no"}
    if _COLOR_Q.match(q):
        qtype = "color"
    elif _SHAPE_Q.match(q):
        qtype = "shape"
    elif _YES_NO_Q.match(q):
        qtype = "yes_no"
    else:
        raise ValueError(f"unknown easy-VQA question template: {question!r}")
    if (qtype == "yes_no") != is_yes_no_answer:
        raise ValueError(f"question {question!r} classified {qtype} but answer is {answer!r}")
    return qtype
