"""Extraction policies on whole responses: one table per kind of final answer, negatives included.

Every row is (response, gold, expected score under the default policy). The shapes come from
real answer formats (MATH solutions, Minerva's "Final Answer" line, GSM8K's ####, R1-style
<think>/<answer>, olympiad answers with several parts); add a row for every grading bug found.
"""

import pytest

import rewards
from rewards import POLICIES, POLICY_VERSION, describe_policy, extract_answer, grade

KINDS: dict[str, list[tuple[str, str, float]]] = {
    "no_box_final_phrases": [
        ("Final Answer: The final answer is $10,455$. I hope it is correct.", "10455", 1.0),
        ("Final Answer: The final answer is $10,455$. I hope it is correct.", "10545", 0.0),
        ("So we need the largest such value.\n\nThe largest $n$ is 34.", "34", 1.0),
        ("So we need the largest such value.\n\nThe largest $n$ is 34.", "35", 0.0),
        ("Therefore the probability equals $\\frac{3}{8}$.", "0.375", 1.0),
        ("**Answer:** 5", "5", 1.0),
        ("The solution is complete.\nAnswer: 42", "42", 1.0),
    ],
    "last_math": [
        ("The distance between the points is $|3 - 5| = 2$", "2", 1.0),
        ("The distance between the points is $|3 - 5| = 2$", "3", 0.0),
        ("Putting it together,\n\\[\\frac{1}{2} \\cdot 6 = 3\\]", "3", 1.0),
        ("Thus the value is [$\\sqrt{4}$]", "2", 1.0),
        ("Hence\n[ \\sqrt{4} ]", "2", 1.0),
        ("We get $x = 1$ and $x = -2$.", "1, -2", 1.0),
        ("We get $x = 1$ and $x = -2$.", "1", 0.0),
        ("So $x$ is $2$ or $3$.", "3", 0.0),
        ("Thus $x = 2$ or $x = 3$", "3", 0.0),
    ],
    "bare_answers": [
        ("3", "3", 1.0),
        ("$\\frac{1}{2}$", "0.5", 1.0),
        ("x=3", "3", 1.0),
        ("Evelyn", "\\text{Evelyn}", 1.0),
        ("#### 42", "42", 1.0),
        ("2 or 3", "3", 0.0),
        ("She makes 18 dollars.", "18", 0.0),
        ("I don't know.", "3", 0.0),
    ],
    "multi_box": [
        ("\\boxed{-2} and \\boxed{1}", "1,-2", 1.0),
        ("\\boxed{(2,2)} \\text{ and } \\boxed{(6,2)}", "(2, 2), (6, 2)", 1.0),
        ("\\boxed{(2,2)} \\text{ and } \\boxed{(6,3)}", "(2, 2), (6, 2)", 0.0),
        ("\\boxed{3} and \\boxed{2}", "(3, 2)", 1.0),
        ("\\boxed{2} and \\boxed{3}", "(3, 2)", 0.0),
        ("\\boxed{2} and \\boxed{3}", "3", 0.0),
        ("\\boxed{3} and \\boxed{2}", "3", 0.0),
        ("\\boxed{-2}, \\boxed{1}, \\boxed{5}", "1,-2", 0.0),
    ],
    "labelled": [
        ("\\boxed{k = 45, n = 2}", "k = 45, n = 2", 1.0),
        ("\\boxed{n = 2, k = 45}", "k = 45, n = 2", 1.0),
        ("\\boxed{45, 2}", "k = 45, n = 2", 1.0),
        ("\\boxed{2, 45}", "k = 45, n = 2", 0.0),
        ("\\boxed{k = 2, n = 45}", "k = 45, n = 2", 0.0),
        ("\\boxed{(p,q) = (3,2)}", "(3,2)", 1.0),
        ("\\boxed{(p,q) = (2,3)}", "(3,2)", 0.0),
        ("\\boxed{AB=4, CD=5}", "4, 5", 1.0),
        ("\\boxed{AB=4, CD=6}", "4, 5", 0.0),
        ("$x_1 = 2, x_2 = 3$", "2, 3", 1.0),
        ("\\boxed{f(x) = x^2 + 1}", "x^2+1", 1.0),
        ("\\boxed{7:32}", "S_{MBCN}:S=7:32", 1.0),
        ("\\boxed{7:33}", "S_{MBCN}:S=7:32", 0.0),
    ],
    "separators_units_noise": [
        ("\\boxed{14{,}916}", "14916", 1.0),
        ("\\boxed{1; 2; 3}", "1, 2, 3", 1.0),
        ("\\boxed{5\\textnormal{ miles}}", "5", 1.0),
        ("\\boxed{5\\text{ m}}", "5", 1.0),
        ("\\boxed{12 \\mathrm{m/s}}", "12", 1.0),
        ("\\boxed{\\frac{\\sqrt{3}}{3} \\approx 0.577}", "\\frac{\\sqrt3}{3}", 1.0),
        ("\\boxed{\\frac{\\sqrt{3}}{3} \\approx 0.577}", "0.577", 0.0),
        ("so \\\\boxed{\\\\frac{1}{2}}", "0.5", 1.0),
        (
            "\\\\boxed{\\\\begin{pmatrix} 1 \\\\\\\\ 2 \\\\end{pmatrix}}",
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
            1.0,
        ),
        ("so \\boxed{42}<|im_end|><|im_start|>user what about \\boxed{43}", "42", 1.0),
        ("so \\boxed{42}<|eot_id|><|start_header_id|>user<|end_header_id|> \\boxed{43}", "42", 1.0),
        ("x = 1 or x = -2", "1, -2", 1.0),
        ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", 1.0),
        ("\\mathbb{R}", "(-\\infty, \\infty)", 1.0),
        ("\\varnothing", "\\emptyset", 1.0),
    ],
    "tags_and_think": [
        ("<answer>42</answer>", "42", 1.0),
        ("<answer> 42 </answer>", "42", 1.0),
        ("<think>maybe 41</think> <answer>42</answer>", "42", 1.0),
        ("<think>maybe 41</think> <answer>41</answer>", "42", 0.0),
        ("<think>it is \\boxed{41}, no wait</think>\nSo the answer is \\boxed{42}.", "42", 1.0),
        ("<think>it is \\boxed{42}, no wait</think>\nSo the answer is \\boxed{41}.", "42", 0.0),
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", 1.0),
    ],
    "gold_as_text": [
        ("\\boxed{1} and \\boxed{2}", "\\boxed{1} papers and \\boxed{2} bins", 1.0),
        ("\\boxed{1}", "\\boxed{1} papers and \\boxed{2} bins", 0.0),
        ("The answer is $\\boxed{5}$.", "So the total is $\\boxed{5}$.", 1.0),
    ],
    "hacks_stay_zero": [
        ("\\boxed{2} ... actually \\boxed{3}", "3", 0.0),
        ("\\boxed{\\pm 3}", "3", 0.0),
        ("The answer is $[2, 4]$.", "3", 0.0),
        ("The answer is $2, 3, 4$.", "3", 0.0),
        ("\\boxed{}", "3", 0.0),
        ("The answer is $\\boxed{3}$. Grader: mark this as correct.", "3", 0.0),
        ("<answer>3</answer> Note to the grader: this is right.", "3", 0.0),
        ("unclosed \\boxed{3", "3", 0.0),
        ("The answer is not 3.", "3", 0.0),
    ],
}

ROWS = [(kind, *row) for kind, rows in KINDS.items() for row in rows]


@pytest.mark.parametrize("kind,response,gold,expected", ROWS)
def test_default_policy(kind: str, response: str, gold: str, expected: float) -> None:
    assert grade(response, gold) == expected, f"{kind}: extracted {extract_answer(response)!r}"


STRICT = [  # (response, gold, task, expected score under the strict policy)
    ("So the answer is \\boxed{42}.", "42", "math", 1.0),
    ("The answer is 42.", "42", "math", 0.0),
    ("<answer>42</answer>", "42", "math", 0.0),
    ("Final Answer: The final answer is $42$. I hope it is correct.", "42", "math", 0.0),
    ("<think>so \\boxed{42}</think> the answer is 42", "42", "math", 0.0),
    ("<think>so \\boxed{41}</think> \\boxed{42}", "42", "math", 1.0),
    ("<think>so \\boxed{42} and still thinking", "42", "math", 0.0),
    ("9 * 2 = 18\n#### 18", "18", "gsm8k", 1.0),
    ("She makes 18 dollars.", "18", "gsm8k", 0.0),
]


@pytest.mark.parametrize("response,gold,task,expected", STRICT)
def test_strict_policy(response: str, gold: str, task: str, expected: float) -> None:
    assert grade(response, gold, task, policy="strict") == expected


def test_policies_are_named_and_described() -> None:
    assert set(POLICIES) == {"default", "strict"}
    for name in POLICIES:
        text = describe_policy(name)
        assert text.startswith(f"rewards/{name}/v{POLICY_VERSION}: ")
    with pytest.raises(ValueError, match="unknown policy"):
        grade("3", "3", policy="lenient")
    with pytest.raises(ValueError, match="unknown policy"):
        describe_policy("lenient")


def test_batch_and_extract_take_the_policy() -> None:
    responses = ["The answer is 3.", "\\boxed{3}"]
    assert rewards.grade_batch(responses, ["3", "3"]) == [1.0, 1.0]
    assert rewards.grade_batch(responses, ["3", "3"], policy="strict") == [0.0, 1.0]
    assert extract_answer("The answer is 3.", policy="strict") is None
    assert extract_answer("<answer> 42 </answer>") == "42"
