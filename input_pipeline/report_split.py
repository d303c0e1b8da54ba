"""Deterministic rule-based decomposition of a radiology report into one text per anatomy (no network, no LLM).

Rules (documented because they decide labels):
- A sentence ends at ".", "!" or "?" followed by white space; a period inside a number ("1.5 cm"), after a
  known abbreviation followed by a lower-case word or a number ("approx. 2 cm", "e.g. a cyst") or after a list
  number ("1. ...") does not end a sentence, and list numbers are stripped.
- A sentence belongs to every anatomy whose lexicon term it contains (whole words, case-insensitive; a hyphen
  ends a word, so "pleural-pericardial" names both). Terms are matched longest first across anatomies, so
  "pulmonary artery" (mediastinum) is not also "pulmonary" (lung), nor "lobe of the liver" "lobe", nor "main
  bronchi" "bronchi". Window settings ("lung parenchyma window") name no anatomy.
- Disease triggers are matched globally, longest match first, so "pericardial effusion" can never also count as
  "pleural effusion" and "coronary artery wall calcification" never as "arterial wall calcification".
  A trigger listed under several anatomies (e.g. "calcified plaques" for heart and aorta, "cyst" for liver and
  kidney) goes to those of them named in the same clause, else to the nearest one named in the sentence.
- Negation: a trigger preceded in its sentence by a negation cue ("no", "not", "without", "no evidence of",
  "negative for", "absence of", "free of", ...) is negated, unless a scope breaker ("but", "however",
  "although", "except", ";") lies between them; a trigger followed in its clause by a post-cue ("is not seen",
  "has resolved", "is excluded", ...) is negated too, and so is a trigger followed, with no verb of its own in
  between, by "(was|were) not detected/observed/seen/identified/found/present" before a scope breaker (CT-RATE's
  "Bilateral pleural effusion, pneumothorax were not detected").
- Hedges count as positive: "likely", "probable", "suggestive of", "consistent with", and also the uncertain
  "possible", "cannot be excluded", "may represent" (a radiologist raising a disease is treated as a
  positive mention, which favours sensitivity; "cannot be excluded" is matched before the negating "excluded").

The words are configuration (`prep.report_vocabulary`, or a YAML/JSON file in `prep.report_vocabulary_file`):
per anatomy, the "words" that give it a sentence and, optionally, its "diseases" with their trigger phrases.
`chest_ct_vocabulary()` is the shipped default for CT-RATE and the demo. Anatomies of the vocabulary that are not
configured still take part in the splitting (their trigger phrases are matched and their texts dropped), so
adding one never changes the labels of another.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class AnatomyText:
    """The report text about one anatomy and the diseases it states as present."""

    text: str
    normal: bool
    diseases: tuple[str, ...]


DEFAULT_LEXICON: dict[str, tuple[str, ...]] = {
    "lung": ("lung", "lungs", "pulmonary", "lobe", "lobes", "lobar", "pleural", "pleura", "hemithorax",
             "hemithoraces", "lingula", "lingular", "bronchi", "bronchial", "emphysema", "emphysematous",
             "atelectasis", "bronchiectasis", "consolidation", "pneumothorax", "pneumonia", "pneumonias", "pneumonic",
             "airspace", "bronchitis", "bronchiolitis", "ground glass", "ground-glass", "fissure", "fissures",
             "subpleural", "interlobular", "interseptal", "septal", "peribronchial", "apical", "apicoposterior",
             "anterobasal", "laterobasal", "mediobasal", "posterobasal"),
    "heart": ("heart", "cardiac", "pericardial", "pericardium", "coronary", "cardiomegaly", "myocardium",
              "ventricle", "atrium", "cardiothoracic", "CTO", "aortic valve", "mitral valve"),
    "esophagus": ("esophagus", "esophageal", "oesophagus", "oesophageal", "hiatal", "hiatus",
                  "gastroesophageal"),
    "aorta": ("aorta", "aortic", "main vascular structures", "major vascular structures",
              "mediastinal vascular structures", "great vessels"),
    "liver": ("liver", "hepatic", "hepatosteatosis", "steatosis", "lobe of the liver", "caudate lobe"),
    "spleen": ("spleen", "splenic", "splenomegaly"),
    "kidney": ("kidney", "kidneys", "renal"),
    "mediastinum": ("mediastinum", "mediastinal", "hilar", "hila", "lymph node", "lymph nodes",
                    "lymphadenopathy", "LAP", "pacemaker", "sternotomy", "catheter", "port catheter", "trachea",
                    "tracheal", "main bronchi", "main bronchus", "pulmonary artery", "pulmonary arteries",
                    "pulmonary arterial", "pulmonary trunk", "pulmonary embolism", "tube", "stent", "prosthesis",
                    "prosthetic", "suture", "sutures"),
}

DEFAULT_VOCABULARY: dict[str, dict[str, tuple[str, ...]]] = {
    "lung": {
        "Emphysema": ("emphysema", "emphysematous", "bulla", "bullae", "bullous"),
        "Atelectasis": ("atelectasis", "atelectatic", "collapse"),
        "Lung nodule": ("nodule", "nodules", "nodular opacity", "nodular opacities", "pulmonary mass", "lung mass",
                        "nodular appearance", "nodular density", "nodular densities", "nodular lesion",
                        "nodular lesions"),
        "Lung opacity": ("opacity", "opacities", "ground-glass", "ground glass", "infiltrate", "infiltrates", "density",
                         "densities"),
        "Pulmonary fibrotic sequela": ("fibrotic", "fibrosis", "fibrotic sequela", "fibrotic sequelae",
                                       "scarring", "fibroatelectasis", "fibroatelectatic", "sequela", "sequelae",
                                       "pleuroparenchymal band", "pleuroparenchymal bands"),
        "Pleural effusion": ("pleural effusion", "pleural effusions", "pleural fluid", "hydrothorax", "effusion",
                             "effusions"),
        "Mosaic attenuation pattern": ("mosaic attenuation", "mosaic pattern", "mosaic perfusion"),
        "Peribronchial thickening": ("peribronchial thickening", "bronchial wall thickening",
                                     "peribronchial cuffing", "peribronchial sheath"),
        "Consolidation": ("consolidation", "consolidations", "consolidated", "consolidative", "pneumonia",
                          "pneumonic"),
        "Bronchiectasis": ("bronchiectasis", "bronchiectatic"),
        "Interlobular septal thickening": ("interlobular septal thickening", "septal thickening",
                                           "thickened interlobular septa", "interlobular septa",
                                           "interlobular septal thickenings", "septal thickenings",
                                           "interseptal thickening", "interseptal thickenings", "septal thickness"),
    },
    "heart": {
        "Cardiomegaly": ("cardiomegaly", "enlarged", "enlargement", "increased in size", "larger than normal",
                         "size increased", "size has increased"),
        "Pericardial effusion": ("pericardial effusion", "pericardial effusions", "pericardial fluid",
                                 "hemopericardium", "effusion", "effusions"),
        "Coronary artery wall calcification": (
            "coronary artery wall calcification", "coronary artery calcification", "coronary artery calcifications",
            "coronary calcification", "coronary calcifications", "coronary atherosclerosis",
            "calcified plaque", "calcified plaques", "calcification", "calcifications", "atherosclerotic",
            "atherosclerosis", "calcified", "calcific", "atheroma", "atheromatous", "plaque", "plaques"),
    },
    "esophagus": {
        "Hiatal hernia": ("hiatal hernia", "hiatus hernia", "hernia", "herniation"),
    },
    "aorta": {
        "Arterial wall calcification": (
            "arterial wall calcification", "aortic calcification", "aortic wall calcification",
            "wall calcification", "mural calcification", "mural calcifications", "calcified plaque",
            "calcified plaques", "calcification", "calcifications", "atherosclerotic", "atherosclerosis",
            "calcified", "calcific", "atheroma", "atheromatous", "plaque", "plaques"),
    },
    "liver": {
        "Liver lesion": ("lesion", "lesions", "cyst", "cysts", "mass", "metastasis", "metastases", "hemangioma"),
        "Hepatic steatosis": ("steatosis", "hepatosteatosis", "fatty liver", "fatty infiltration", "fatty change"),
    },
    "spleen": {
        "Splenomegaly": ("splenomegaly", "enlarged", "enlargement", "increased in size", "larger than normal",
                         "size increased", "size has increased"),
    },
    "kidney": {
        "Renal cyst": ("cyst", "cysts", "renal cyst", "renal cysts"),
    },
    "mediastinum": {
        "Lymphadenopathy": ("lymphadenopathy", "enlarged lymph node", "enlarged lymph nodes",
                            "pathologically enlarged", "lymph node enlargement", "LAP"),
        "Medical material": ("pacemaker", "catheter", "stent", "sternotomy", "prosthesis", "port catheter",
                             "surgical clips", "cerclage wires", "tube", "prosthetic", "suture", "sutures"),
    },
}



def chest_ct_vocabulary() -> dict[str, dict]:
    """The shipped report vocabulary (CT-RATE's anatomies, the demo's, and the mediastinum) in the configuration's
    form: {anatomy: {"words": (...), "diseases": {disease: (...)}}}."""
    return {a: {"words": words, "diseases": dict(DEFAULT_VOCABULARY.get(a, {}))}
            for a, words in DEFAULT_LEXICON.items()}


def _phrases(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(
            isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where} must be a list of non-empty words or phrases")
    return tuple(v.strip() for v in value)


def parse_vocabulary(spec: Mapping) -> tuple[dict[str, tuple[str, ...]], dict[str, dict[str, tuple[str, ...]]]]:
    """(lexicon, disease vocabulary) for `split_report` from a report vocabulary {anatomy: {"words": [...],
    "diseases": {disease: [...]}}} ("diseases" optional). Raises ValueError naming the first malformed entry."""
    if not isinstance(spec, Mapping):
        raise ValueError("the report vocabulary must map anatomy -> {words: [...], diseases: {disease: [...]}}")
    lexicon, vocabulary = {}, {}
    for anatomy, entry in spec.items():
        if not isinstance(entry, Mapping) or set(entry) - {"words", "diseases"}:
            raise ValueError(f"report vocabulary {anatomy!r}: expected {{words: [...], diseases: {{...}}}}, got "
                             f"{entry!r}")
        lexicon[str(anatomy)] = _phrases(entry.get("words", ()), f"report vocabulary {anatomy!r} words")
        diseases = entry.get("diseases") or {}
        if not isinstance(diseases, Mapping):
            raise ValueError(f"report vocabulary {anatomy!r} diseases must map disease -> [trigger phrases]")
        vocabulary[str(anatomy)] = {str(d): _phrases(p, f"report vocabulary {anatomy!r} disease {d!r}")
                                    for d, p in diseases.items()}
    return lexicon, vocabulary


def read_vocabulary(path: str) -> dict:
    """A report vocabulary from a YAML (.yaml, .yml) or JSON (.json) file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".json"):
        raise ValueError(f"report vocabulary file {path}: use a .yaml, .yml or .json file")
    if not os.path.isfile(path):
        raise ValueError(f"report vocabulary file {path} not found")
    with open(path, encoding="utf-8") as f:
        if ext == ".json":
            return json.load(f)
        import yaml

        return yaml.safe_load(f)


def configured_vocabulary(prep) -> tuple[dict[str, tuple[str, ...]], dict[str, dict[str, tuple[str, ...]]]]:
    """(lexicon, disease vocabulary) of a config's prep section: the file prep.report_vocabulary_file when set,
    else prep.report_vocabulary."""
    path = prep.report_vocabulary_file
    return parse_vocabulary(read_vocabulary(path) if path else prep.report_vocabulary)


def vocabulary_errors(prep, decomposition_dir: str) -> list[str]:
    """One line per problem: a malformed vocabulary, or a configured anatomy without words (unless the
    decomposition files give the texts)."""
    try:
        lexicon, _ = configured_vocabulary(prep)
    except ValueError as e:
        return [str(e)]
    if decomposition_dir:
        return []
    source = f"prep.report_vocabulary_file={prep.report_vocabulary_file}" if prep.report_vocabulary_file else \
        "prep.report_vocabulary"
    return [f"prep.anatomies: {a!r} has no words in {source} (and no data.decomposition_dir): no report text "
            "could ever be given to it" for a in prep.anatomies if not lexicon.get(a)]


PLACEHOLDERS = ("not given", "not available", "none", "n/a", "na", "nan", "-", "--")


def report_text(value) -> str:
    """A report field as text: None and placeholders such as CT-RATE's "Not given." are empty."""
    text = (value or "").strip()
    return "" if text.rstrip(".").strip().lower() in PLACEHOLDERS else text


_NEG_PRE = ("no evidence of", "no signs of", "no sign of", "negative for", "absence of", "free of", "without",
            "no", "not", "nor", "rather than", "resolution of")
_NEG_POST = ("is not seen", "are not seen", "is not identified", "are not identified", "not present", "is absent",
             "are absent", "has resolved", "have resolved", "is excluded", "are excluded", "is ruled out",
             "are ruled out")
# "X was not detected", "X, Y were not observed": a post-cue negates a trigger before it when no verb of its own
# lies between them (the trigger is then one of the cue's subjects, a comma-separated list included).
_NEG_POST_LIST = re.compile(r"\b(?:(?:is|are|was|were)\s+)?not\s+(?:detected|observed|seen|identified|found|present)\b",
                            re.IGNORECASE)
_VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|shows?|showed|observed|seen|detected|noted|identified|found|"
                   r"present)\b", re.IGNORECASE)
# Window settings name an anatomy without describing it ("When examined in the lung parenchyma window; ...").
_TECHNIQUE = re.compile(r"\b(?:lung\s+)?parenchym(?:a|al)\s+windows?\b|\b(?:lung|mediastinal)\s+windows?\b",
                        re.IGNORECASE)
_UNCERTAIN = ("cannot be excluded", "can not be excluded", "cannot be ruled out", "not excluded",
              "not ruled out", "not be excluded")
_BREAKERS = re.compile(r"\b(?:but|however|although|though|except|whereas|while)\b|;", re.IGNORECASE)
_CLAUSE = re.compile(r"[,;:()]|\b(?:but|however|although|whereas|while)\b", re.IGNORECASE)

_ABBREVIATIONS = ("approx", "e.g", "i.e", "vs", "cm", "mm", "no", "nr", "fig", "dr", "max", "min", "ca", "resp",
                  "etc", "incl", "seg")
_ENUM = re.compile(r"^\s*\(?\d{1,2}[.)]\s+")


def split_sentences(text: str) -> list[str]:
    """Splits report text into sentences, keeping decimals, abbreviations and list numbers intact."""
    out, start = [], 0
    text = text or ""
    for m in re.finditer(r"[.!?]+(?=\s|$)", text):
        before = text[start:m.start()]
        word = re.search(r"([A-Za-z][A-Za-z.]*)$", before)
        if m.group().startswith(".") and word and word.group(1).lower().rstrip(".") in _ABBREVIATIONS:
            nxt = text[m.end():].lstrip()[:1]
            if not nxt.isupper():  # "approx. 2 cm" continues; "... 2 cm. The liver" ends
                continue
        if m.group() == "." and re.fullmatch(r"\s*\(?\d{1,2}", before):
            continue  # a list number "1." is part of the next sentence
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    sentences = []
    for s in out:
        s = _ENUM.sub("", s.strip()).strip()
        if s and re.search(r"[A-Za-z]", s):
            sentences.append(s)
    return sentences


def _phrase_regex(phrase: str, hyphen_bound: bool = False) -> str:
    """A phrase as whole words. hyphen_bound: a hyphen ends a word too ("pleural-pericardial" holds "pleural"),
    else a hyphenated compound is one word ("non-calcified" does not hold "calcified")."""
    words = [re.escape(w) for w in phrase.split()]
    edge = r"\w" if hyphen_bound else r"[\w-]"
    return rf"(?<!{edge})" + r"\s+".join(words) + rf"(?!{edge})"


@functools.cache
def _compiled(phrase: str, hyphen_bound: bool = False) -> re.Pattern:
    # Compiled once: a vocabulary holds more phrases than the re module's own cache.
    return re.compile(_phrase_regex(phrase, hyphen_bound), re.IGNORECASE)


def _find_all(sentence: str, phrases: Sequence[str], hyphen_bound: bool = False) -> list[tuple[int, int]]:
    spans = []
    for p in phrases:
        spans += [(m.start(), m.end()) for m in _compiled(p, hyphen_bound).finditer(sentence)]
    return spans


def _longest_matches(sentence: str, owners: Mapping[str, list], hyphen_bound: bool
                     ) -> list[tuple[int, int, list]]:
    """Non-overlapping spans of the phrases of `owners` (phrase -> its owners), longest first, each with its
    owners."""
    candidates = []
    lower = sentence.lower()
    for phrase, owner in owners.items():
        if phrase.split()[0].lower() not in lower:  # a cheap test first: most phrases are absent
            continue
        for s, e in _find_all(sentence, [phrase], hyphen_bound):
            candidates.append((s, e, owner))
    candidates.sort(key=lambda c: (-(c[1] - c[0]), c[0]))
    taken = [False] * len(sentence)
    chosen = []
    for s, e, owner in candidates:
        if not any(taken[s:e]):
            taken[s:e] = [True] * (e - s)
            chosen.append((s, e, owner))
    return sorted(chosen)


def _trigger_matches(sentence: str, vocabulary) -> list[tuple[int, int, list[tuple[str, str]]]]:
    """Non-overlapping trigger spans, longest first, each with the (anatomy, disease) pairs it can mean."""
    owners: dict[str, list[tuple[str, str]]] = {}
    for anatomy, diseases in vocabulary.items():
        for disease, phrases in diseases.items():
            for p in phrases:
                owners.setdefault(p.lower(), []).append((anatomy, disease))
    return _longest_matches(sentence, owners, hyphen_bound=False)


def _negated(sentence: str, start: int, end: int) -> bool:
    lower = sentence.lower()
    after = lower[end:]
    clause_end = _CLAUSE.search(after)
    post = after[:clause_end.start()] if clause_end else after
    if any(_compiled(u).search(post) for u in _UNCERTAIN):
        return False
    if any(_compiled(c).search(post) for c in _NEG_POST):
        return True
    breaker = _BREAKERS.search(after)
    cue = _NEG_POST_LIST.search(after[:breaker.start()] if breaker else after)
    if cue and not _VERB.search(after[:cue.start()]):
        return True
    before = lower[:start]
    breakers = list(_BREAKERS.finditer(before))
    scope = before[breakers[-1].end():] if breakers else before
    return any(_compiled(c).search(scope) for c in _NEG_PRE)


def _mentions(sentence: str, lexicon) -> dict[str, list[int]]:
    """Anatomy -> character positions where one of its lexicon terms occurs. Terms are matched longest first
    across anatomies ("pulmonary artery" is not "pulmonary", "lobe of the liver" not "lobe"), a hyphen ends a word,
    and window settings ("lung parenchyma window") are skipped."""
    masked = _TECHNIQUE.sub(lambda m: " " * len(m.group()), sentence)
    owners: dict[str, list[str]] = {}
    for anatomy, words in lexicon.items():
        for w in words:
            owners.setdefault(w.lower(), []).append(anatomy)
    found: dict[str, list[int]] = {}
    for start, _, anatomies in _longest_matches(masked, owners, hyphen_bound=True):
        for anatomy in anatomies:
            found.setdefault(anatomy, []).append(start)
    return found


def _clause_id(sentence: str) -> list[int]:
    ids, k, last = [], 0, 0
    for m in _CLAUSE.finditer(sentence):
        ids += [k] * (m.start() - last)
        ids += [k] * (m.end() - m.start())
        last, k = m.end(), k + 1
    ids += [k] * (len(sentence) - last)
    return ids


def split_report(findings: str, impression: str, lexicon: Mapping[str, Sequence[str]] = DEFAULT_LEXICON,
                 vocabulary: Mapping[str, Mapping[str, Sequence[str]]] = DEFAULT_VOCABULARY,
                 ) -> dict[str, AnatomyText]:
    """Decomposes a report into per-anatomy texts with the diseases each states as present.

    findings, impression: free text (either may be empty). lexicon: anatomy -> synonym words/phrases that
    assign a sentence to it. vocabulary: anatomy -> disease -> trigger phrases. Returns {anatomy: AnatomyText}
    for every anatomy mentioned at least once; its text is its sentences (findings first, then impression,
    deduplicated) joined by spaces, `diseases` the sorted non-negated diseases found, `normal` = no diseases.
    """
    texts: dict[str, list[str]] = {}
    diseases: dict[str, set[str]] = {}
    for sentence in split_sentences(findings) + split_sentences(impression):
        mentions = _mentions(sentence, lexicon)
        if not mentions:
            continue
        for anatomy in mentions:
            if sentence not in texts.setdefault(anatomy, []):
                texts[anatomy].append(sentence)
            diseases.setdefault(anatomy, set())
        clause = _clause_id(sentence)
        for start, end, owner in _trigger_matches(sentence, vocabulary):
            owners = [(a, d) for a, d in owner if a in mentions]
            if not owners or _negated(sentence, start, end):
                continue
            if len({a for a, _ in owners}) > 1:
                same = [(a, d) for a, d in owners if any(clause[p] == clause[start] for p in mentions[a])]
                if same:
                    owners = same
                else:
                    nearest = min(owners, key=lambda o: min(abs(p - start) for p in mentions[o[0]]))
                    owners = [nearest]
            for anatomy, disease in owners:
                diseases[anatomy].add(disease)
    return {a: AnatomyText(text=" ".join(texts[a]), normal=not diseases[a], diseases=tuple(sorted(diseases[a])))
            for a in texts}
