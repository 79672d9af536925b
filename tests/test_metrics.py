"""Task metrics: the normalisation each one documents, and the metric a task's references call for."""

import pytest

from routing.metrics import METRICS, infer_metric, option_letter, score


@pytest.mark.parametrize("prediction, reference, expected", [
    ("  Positive \n", "positive", 1.0),          # case and whitespace
    ("positive.", "positive", 0.0),              # punctuation is part of the answer
])
def test_exact(prediction, reference, expected):
    assert score("exact", prediction, reference) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("B", "B. Fingertip of the index finger", 1.0),   # a letter answers a lettered reference
    ("(B) fingertip", "B", 1.0),
    ("Answer: C", "C. 1730万元", 1.0),
    ("c", "C", 1.0),                                 # a lone letter in either case
    ("D. Fingertip", "B. Fingertip", 0.0),           # the letter decides, not the text
    ("A score of 7", "A score of 9", 0.0),           # "A " opens a sentence, it names no option
    ("Yes.", "yes", 1.0),                            # labels: edge punctuation and case ignored
    ("negative\nbecause the stock fell", "Negative", 1.0),  # labels: the first line
    ("neutral", "negative", 0.0),
])
def test_accuracy(prediction, reference, expected):
    assert score("accuracy", prediction, reference) == expected


def test_option_letter():
    assert [option_letter(t) for t in ("B", "(b)", "b", "B) x", "The answer is: D", "Because", "a cat")] == \
        ["B", None, "B", "B", "D", None, None]


def test_rouge_l_and_bleu_grade_partial_answers_where_exact_gives_zero():
    reference = "C-reactive protein is a biomarker that indicates inflammation in the body"
    close = "C-reactive protein is a marker of inflammation in the body"
    far = "The patient should rest and drink water"
    for name in ("rouge_l", "bleu"):
        assert score(name, reference, reference) == pytest.approx(1.0)
        assert 0 <= score(name, far, reference) < score(name, close, reference) < 1, name
    assert score("exact", close, reference) == 0.0
    # CJK text is scored by character: rouge-score's own tokenizer would drop it all and give 0.
    assert 0.5 < score("rouge_l", "甲公司出售设备", "甲公司出售生产设备") < 1
    assert 0 < score("bleu", "甲公司出售设备", "甲公司出售生产设备") < 1


def test_every_metric_is_in_unit_range_and_unknown_names_are_refused():
    for name in METRICS:
        for p, r in [("", "x"), ("x", "x"), ("a b c", "c b a")]:
            assert 0.0 <= score(name, p, r) <= 1.0
    with pytest.raises(ValueError, match="unknown metric 'f1'; known: accuracy, bleu"):
        score("f1", "a", "a")


def test_infer_metric_from_references():
    assert infer_metric(["A", "C. 1730万元", "B. x"] * 10) == "accuracy"          # multiple choice
    assert infer_metric(["Relevant", "Irrelevant"] * 30) == "accuracy"         # a label set
    assert infer_metric(["osteoarthritis", "chronic kidney disease"]) == "accuracy"   # a few words each
    long = [f"The patient has a history of condition number {i} and takes medication daily" for i in range(50)]
    assert infer_metric(long) == "rouge_l"
    with pytest.raises(ValueError):
        infer_metric([])
