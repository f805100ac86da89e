"""Undoing the tokenisation of the zero-shot text sets (WikiText, Penn Treebank, One
Billion Words), so that GPT-2 sees running text."""

import re


def wikitext(text: str) -> str:
    """Undo WikiText's tokenization (spaced punctuation, @-@ joiners)."""
    for spaced, plain in (
        (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
        (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "), (" 's", "'s"),
        ("( ", "("), (" )", ")"), ("[ ", "["), (" ]", "]"), ("{ ", "{"), (" }", "}"),
        (" n't", "n't"), (" 're", "'re"), (" 've", "'ve"), (" 'll", "'ll"), (" 'm", "'m"),
    ):  # fmt: skip
        text = text.replace(spaced, plain)
    text = re.sub(r"= = = (.*?) = = =", r"=== \1 ===", text)
    return re.sub(r"= = (.*?) = =", r"== \1 ==", text)


def ptb(text: str) -> str:
    """Undo the Penn Treebank's tokenization."""
    for spaced, plain in (
        (" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n", "\n"), ("\\/", "/"),
        (" , ", ", "), (" . ", ". "), (" ; ", "; "), (" : ", ": "), (" ? ", "? "),
        (" ! ", "! "), ("$ ", "$"), (" %", "%"), ("<unk>", "?"), (" 're", "'re"),
        (" 've", "'ve"), (" 'll", "'ll"), (" 'm", "'m"), (" 'd", "'d"),
    ):  # fmt: skip
        text = text.replace(spaced, plain)
    return text


def lm1b(text: str) -> str:
    """Undo One Billion Words' tokenization."""
    for spaced, plain in (
        (" 's", "'s"), (" n't", "n't"), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
        (" : ", ": "), (" ? ", "? "), (" ! ", "! "), ("( ", "("), (" )", ")"),
    ):  # fmt: skip
        text = text.replace(spaced, plain)
    return re.sub(r" \.$", ".", text)
