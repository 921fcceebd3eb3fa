import pytest

from lorawatch.data.tasks.scoring import gold_answer, is_correct, normalize_choice, normalize_number, training_target


@pytest.mark.parametrize("text, letter", [
    ("B", "B"),
    ("B. hawkish", "B"),
    ("(C) neutral", "C"),
    ("The answer is C.", "C"),
    ("**Final answer: A**", "A"),
    ("I think option D is right", "D"),
    ("<think>A or B?</think> Answer: B", "B"),
    ("Looking at A and B, it must be C", "C"),
    ("A<|im_end|>", "A"),
    ("none of these", ""),
    ("", ""),
    # marker kinds in the published priority order: the first kind found anywhere decides
    ("Answer: B. Final answer: C", "C"),
    ("Final answer: B, though one could say answer: C", "B"),
    ("The answer is A. Option B is wrong.", "A"),
    ("Option B or choice C? Answer: d", "D"),
    ("Choice: option E", "E"),
    # the leading option letter in either case
    ("b. hawkish", "B"),
    ("(c) neutral", "C"),
])
def test_choice_normalisation(text, letter):
    assert normalize_choice(text) == letter


@pytest.mark.parametrize("text, number", [
    ("42", "42"),
    ("The total is 1,234 apples", "1234"),
    ("186.0", "186"),
    ("3 + 4 = 7. Final answer: 7", "7"),
    ("First 2 then 5 so \\boxed{12} done 99", "12"),
    ("-3", "-3"),
    ("0.50", "0.5"),
    ("no number", "NO NUMBER"),
    ("It is a weekday.\nFriday", "FRIDAY"),
    ("", ""),
    ("The answer is 8 because 4 * 2", "2"),  # the last number after the marker, as published
])
def test_number_normalisation(text, number):
    assert normalize_number(text) == number


def test_gold_answers_and_targets():
    assert gold_answer("multiple_choice", "B\nA clause is a group of words") == "B"
    assert training_target("multiple_choice", "B\nA clause is a group of words") == "B"
    assert gold_answer("numeric", "186.0") == "186"
    assert gold_answer("numeric", "FRIDAY") == "FRIDAY"
    assert is_correct("numeric", "friday", "FRIDAY")
    assert not is_correct("multiple_choice", "", "A")
    assert is_correct("multiple_choice", "A", "A")


def test_a_word_gold_is_matched_as_text_when_no_number_is_present():
    # NumGLUE-cm has golds such as "Friday": the published code compares the last line, upper-cased
    gold = gold_answer("numeric", "Friday")
    assert is_correct("numeric", normalize_number("Friday"), gold)
    assert is_correct("numeric", normalize_number("Let me think.\n**Friday**"), gold)
    assert not is_correct("numeric", normalize_number("The day is Friday"), gold)  # the whole line is compared
    assert not is_correct("numeric", normalize_number("Friday, 13"), gold)  # a number wins over the text
