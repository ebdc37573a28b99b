"""Instruction prompts for translation, exactly as the paper and ALMA write them.

`build_prompt` returns the full prompt text up to and including the response marker; the model's
target is the reference translation that follows it (kd/data.py appends it and the EOS token).

    >>> print(build_prompt("Hallo Welt.", "de", "en"))
    Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.
    <BLANKLINE>
    ### Instruction:
    Translate the following sentences from German to English.
    <BLANKLINE>
    ### Input:
    Hallo Welt.
    <BLANKLINE>
    ### Response:
    <BLANKLINE>
"""

LANGUAGE_NAMES = {
    "ar": "Arabic",
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "ha": "Hausa",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "liv": "Livonian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "uk": "Ukrainian",
    "zh": "Chinese",
}

# The paper's prompt (Alpaca / ParroT style): preface, instruction, input, response marker,
# sections separated by a blank line.
ALPACA_PREFACE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
ALPACA_TEMPLATE = (
    ALPACA_PREFACE + "\n\n"
    "### Instruction:\nTranslate the following sentences from {src_name} to {tgt_name}.\n\n"
    "### Input:\n{source}\n\n"
    "### Response:\n"
)

# ALMA's own prompt (Xu et al., 2024); the response follows the space after "English:".
ALMA_TEMPLATE = "Translate this from {src_name} to {tgt_name}:\n{src_name}: {source}\n{tgt_name}:"

TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "alma": ALMA_TEMPLATE}


def language_name(code: str) -> str:
    """English name of an ISO 639-1 code; an unknown code is an error listing the known ones."""
    try:
        return LANGUAGE_NAMES[code]
    except KeyError:
        known = ", ".join(sorted(LANGUAGE_NAMES))
        raise ValueError(
            f"unknown language code {code!r}; known codes: {known} "
            "(add it to LANGUAGE_NAMES in kd/prompts.py)"
        ) from None


def build_prompt(source: str, src_lang: str, tgt_lang: str, template: str = "alpaca") -> str:
    """The full prompt for translating `source` from `src_lang` to `tgt_lang`."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template].format(
        src_name=language_name(src_lang), tgt_name=language_name(tgt_lang), source=source
    )

