"""Anatomy texts as the public fVLM code builds them (prep.template_texts, prep.normal_from_impression).

alibaba-damo-academy/fvlm d768ec1, lavis/datasets/datasets/caption_datasets.py:63-91 and :116-122,
lavis/models/blip_models/blip_pretrain.py:203-206 and :249:
- the caption of an anatomy is its impression text + its findings text, each ending in "."; with no impression text
  it starts with the template "<anatomy> shows no significant abnormalities." (so an anatomy the report does not
  describe gets the template alone); double and single quotes and parentheses are removed;
- a caption that starts with the template is a normal one, every other caption is abnormal;
- the template is removed from a caption before it is tokenized, unless the caption is the template alone;
- identical captions (the whole caption, template included) are positives of each other.
The public code joins impression and findings without a space ("...effusion.The lungs..."); here a space joins
them: its BERT tokenizer splits at the period either way, this project's sentencepiece tokenizer does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from input_pipeline.report_split import AnatomyText

_REMOVED = "\"'()"


def template(anatomy: str) -> str:
    return f"{anatomy} shows no significant abnormalities."


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text + "." if text and not text.endswith(".") else text


def reference_caption(anatomy: str, findings: str, impression: str) -> str:
    """The public code's caption of one anatomy from its findings and impression texts (either may be empty)."""
    text = " ".join(t for t in (_sentence(impression) or template(anatomy), _sentence(findings)) if t)
    for ch in _REMOVED:
        text = text.replace(ch, "")
    return text


def is_normal_caption(anatomy: str, caption: str) -> bool:
    return caption.startswith(template(anatomy))


def encoded_text(anatomy: str, caption: str) -> str:
    """What the text encoder reads of a caption: the caption with the template removed, unless it is the template
    alone (blip_pretrain.py:204-206 removes every occurrence, as here)."""
    t = template(anatomy)
    if caption.startswith(t) and caption != t:
        return " ".join(caption.replace(t, "").split())
    return caption


def anatomy_texts(findings: Mapping[str, AnatomyText], impression: Mapping[str, AnatomyText],
                  anatomies: Sequence[str], *, template_texts: bool, normal_from_impression: bool,
                  ) -> dict[str, AnatomyText]:
    """{anatomy: AnatomyText} of one scan from its findings part and its impression part, each already split per
    anatomy ({anatomy: AnatomyText}, e.g. report_split.split_report of that part alone).

    template_texts: every anatomy gets `reference_caption` (an undescribed one the template); else an anatomy that
    neither part describes has no text, and the text is findings then impression. normal_from_impression: normal
    means no impression text; else no disease found in either part. Diseases are those of both parts.
    """
    out = {}
    for a in anatomies:
        d, c = findings.get(a), impression.get(a)
        d_text, c_text = (d.text if d else ""), (c.text if c else "")
        if template_texts:
            text = reference_caption(a, d_text, c_text)
        elif d_text or c_text:
            text = " ".join(t for t in (d_text, c_text) if t)
        else:
            continue
        diseases = tuple(sorted({*(d.diseases if d else ()), *(c.diseases if c else ())}))
        normal = not c_text if normal_from_impression else not diseases
        out[a] = AnatomyText(text=text, normal=normal, diseases=diseases)
    return out
