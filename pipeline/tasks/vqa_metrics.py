"""VQA scoring: the official answer normalisation and VQA accuracy, question types.

`normalize_answer` and `vqa_accuracy` mirror the official VQA evaluation script
(vqaEval.py in GT-Vision-Lab/VQA: processPunctuation, processDigitArticle and the
leave-one-out accuracy), quirks included, so our numbers are comparable with published
ones. The tables below are the script's own (its punctuation list, number map, articles
and contractions map, entries as published, Copyright (c) 2014 Aishwarya Agrawal).
"""

from __future__ import annotations

import re
from collections import defaultdict

# processDigitArticle: number words (and "none") become digits so "two" matches "2".
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Apostrophes are never stripped, so the official script restores them on apostrophe-less
# spellings instead: "dont" and "don't" then compare equal. The full official map, including its
# entries that can never match after lower-casing ("Im", "Ive") and its one reversed entry
# ("somebody'd" -> "somebodyd").
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# Official punctuation list: note it leaves out "'", ":" and "." (periods have their own rule).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                "-", ">", "<", "@", "`", ",", "?", "!"]
# The official period rule, pattern as published: its "(?!<=\d)" is a look-ahead that never fires,
# so a period is dropped unless a digit follows ("3.5" survives, "dog." does not).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The script passes re.UNICODE (32) where sub() takes its count: at most 32 periods are dropped.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_COMMA_IN_NUMBER = re.compile(r"(\d)(\,)(\d)")
# Humans needed for full credit (VQA accuracy = min(1, #humans who gave the answer / 3)).
_HUMANS_FOR_FULL_CREDIT = 3


def process_punctuation(text: str) -> str:
    """The official processPunctuation: punctuation touching a space (or any punctuation in a text
    with a number like "1,000") is deleted, punctuation inside a word becomes a space ("black-and-white"
    -> "black and white", "yes!" -> "yes "); then the period rule."""
    out = text
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, number words to digits, drop articles, restore
    contractions, single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation sees it: line breaks and tabs to spaces, strip,
    processPunctuation, processDigitArticle."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against the human answers of one question, as vqaEval.py computes it.

    The prediction is normalised (`normalize_answer`); the human answers only go through
    processPunctuation, and only when they are not all the same string (they were normalised when the
    dataset was built). Accuracy is the mean over the leave-one-out subsets (each answer left out once)
    of min(1, #matches in the subset / 3): with VQAv2's ten answers 1 match gives 0.3, 2 give 0.6,
    3 give 0.9, 4 or more give 1.0. With fewer than four answers full credit needs min(3, n - 1)
    matches. A single answer (easy-VQA) has nothing to leave out: accuracy is 1.0 on an exact match
    after normalising both, else 0.0.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    n = len(answers)
    if n == 1:
        return float(normalize_answer(answers[0]) == pred)
    humans = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = [h == pred for h in humans]
    k, total = min(_HUMANS_FOR_FULL_CREDIT, n - 1), sum(matches)
    # Leaving out answer i removes one match exactly when answer i itself matched.
    return sum(min(1.0, (total - m) / k) for m in matches) / n


def answer_type_key(answer_type: str) -> str:
    """VQAv2's answer_type as a metric-key part: "yes/no" -> "yes_no" (no "/" in metric names)."""
    return re.sub(r"[^0-9a-z]+", "_", answer_type.lower()).strip("_")


def question_type(question: dict) -> str:
    """The type a question's accuracy is reported under: its stored answer_type (VQAv2: yes_no, number,
    other) where the source has one, else the easy-VQA template's (color, shape, yes_no)."""
    if question.get("answer_type"):
        return answer_type_key(question["answer_type"])
    return easyvqa_question_type(question["question"], question["answers"][0])


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
