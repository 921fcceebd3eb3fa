"""The built-in `stance` task (like FOMC): is a central-bank style sentence dovish, hawkish or neutral?"""

from __future__ import annotations

from functools import partial

from lorawatch.data.tasks.builtin_rng import Row, _Cycle, _Rng, _unique


# --------------------------------------------------------------------------------------------------
# stance: like TRACE FOMC. The stance is carried by the action and the reason, never by the subject,
# the framing verb or the lead-in, which are all stance-free.

_STANCE_PROMPT = (
    "What is the monetary policy stance for the following text? A. dovish, B. hawkish, C. neutral. "
    "Choose one from A, B and C.\nText:\n{sentence}\nStance:"
)

_STANCE_SUBJECTS = (
    "The Committee",
    "The Board",
    "Policymakers",
    "Most participants",
    "Several members",
    "The central bank",
    "Federal Reserve officials",
    "The Federal Open Market Committee",
    "Many participants",
    "A majority of members",
    "The monetary policy committee",
    "Board members",
)

_STANCE_FRAMES = (
    "decided to",
    "agreed to",
    "voted to",
    "judged it appropriate to",
    "saw it as appropriate to",
    "expected to",
    "signaled a readiness to",
    "indicated that it would be appropriate to",
)

# letter -> (actions, reasons)
_STANCE_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "A": (  # dovish
        (
            "lower the target range for the federal funds rate",
            "cut the policy rate by 25 basis points",
            "reduce the policy rate by 50 basis points",
            "ease monetary policy further",
            "expand asset purchases",
            "provide additional policy accommodation",
            "lower interest rates again",
            "keep monetary policy accommodative for longer",
            "cut interest rates",
        ),
        (
            "to support employment",
            "to support the economic recovery",
            "in response to a weakening labor market",
            "to counter rising downside risks to growth",
            "because economic activity had slowed markedly",
            "as unemployment continued to rise",
        ),
    ),
    "B": (  # hawkish
        (
            "raise the target range for the federal funds rate",
            "raise the policy rate by 25 basis points",
            "increase the policy rate by 50 basis points",
            "tighten monetary policy further",
            "shrink the balance sheet at a faster pace",
            "remove policy accommodation more quickly",
            "raise interest rates again",
            "firm the stance of monetary policy",
            "continue raising the policy rate",
        ),
        (
            "to contain inflation pressures",
            "to bring inflation back down to 2 percent",
            "to keep inflation expectations well anchored",
            "in response to persistently high inflation",
            "because inflation remained well above target",
            "as price pressures continued to build",
        ),
    ),
    "C": (  # neutral
        (
            "maintain the target range for the federal funds rate",
            "leave the policy rate unchanged",
            "keep the stance of monetary policy unchanged",
            "hold interest rates steady",
            "keep asset purchases at their current pace",
            "make no change to the policy rate",
            "maintain the current level of interest rates",
            "keep the federal funds rate where it is",
            "leave interest rates unchanged",
        ),
        (
            "while monitoring incoming data",
            "while assessing the economic outlook",
            "pending further information on the outlook",
            "until the outlook becomes clearer",
            "as risks to the outlook appeared roughly balanced",
            "while evaluating the effects of earlier policy actions",
        ),
    ),
}

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_STANCE_LEADS = tuple(f"At the {month} meeting, " for month in _MONTHS) + (
    "In the policy statement, ",
    "After reviewing recent economic data, ",
    "Following a lengthy discussion, ",
    "On Wednesday, ",
    "At the conclusion of the meeting, ",
    "In the minutes of the meeting, ",
)


def _stance_row(rng: _Rng, letter: str) -> Row:
    actions, reasons = _STANCE_PHRASES[letter]
    subject = rng.choice(_STANCE_SUBJECTS)
    clause = f"{rng.choice(_STANCE_FRAMES)} {rng.choice(actions)} {rng.choice(reasons)}"
    if rng.chance(2, 3):
        sentence = f"{rng.choice(_STANCE_LEADS)}{subject[:1].lower()}{subject[1:]} {clause}."
    else:
        sentence = f"{subject} {clause}."
    return _STANCE_PROMPT.format(sentence=sentence), letter


def _stance_region(rng: _Rng, seen: set[str], size: int) -> list[Row]:
    # The label mix of TRACE's FOMC split (about 28% dovish, 23% hawkish, 49% neutral), so that the task
    # rewards what real stance data rewards, the class prior included.
    letters = _Cycle(rng, ("A", "A", "A", "B", "B", "C", "C", "C", "C", "C"))
    rows = []
    for _ in range(size):
        letter = letters.next()
        rows.append(_unique(seen, partial(_stance_row, rng, letter), f"stance/{letter}"))
    return rows
