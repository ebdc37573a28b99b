"""The embedded demo task: files and schema, held-out sentences, agreement rules of kd/demo.py."""

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import prepare_data  # noqa: E402
from kd import demo  # noqa: E402
from kd.demo import ADJECTIVES, ADVERBS, NOUNS, PLACES, VERBS, Clause, NounPhrase, Sentence, render  # noqa: E402
from kd.prompts import build_prompt  # noqa: E402

ROW_KEYS = ["id", "direction", "src_lang", "tgt_lang", "source", "reference", "prompt"]
DIRECTIONS = ["de-en", "en-de", "cs-en", "en-cs"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def output_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """The default demo data, as the quickstart makes it."""
    out = tmp_path_factory.mktemp("demo")
    stats = prepare_data.main(["--demo", "--out", str(out)])
    return out, stats


def test_demo_files_counts_and_schema(demo_out):
    out, stats = demo_out
    train = read_jsonl(out / "train.jsonl")
    assert len(train) == 2 * 2 * 4000
    assert {d: sum(r["direction"] == d for r in train) for d in DIRECTIONS} == dict.fromkeys(DIRECTIONS, 4000)
    valid = read_jsonl(out / "valid.jsonl")
    assert [r["direction"] for r in valid] == ["en-de"] * 200 + ["cs-en"] * 200
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(f"{d}.jsonl" for d in DIRECTIONS)
    for direction in DIRECTIONS:
        rows = read_jsonl(out / "test" / f"{direction}.jsonl")
        assert len(rows) == 200 and {r["direction"] for r in rows} == {direction}
    assert stats["counts"] == {"train": 16000, "valid": 400, **{f"test/{d}": 200 for d in DIRECTIONS}}
    assert stats["data_source"].startswith("demo") and stats["demo"]["train_pairs"] == 4000
    assert json.loads((out / "stats.json").read_text()) == stats
    for row in train[:300] + valid[:50]:
        assert list(row) == ROW_KEYS
        assert row["direction"] == f"{row['src_lang']}-{row['tgt_lang']}"
        assert row["prompt"] == build_prompt(row["source"], row["src_lang"], row["tgt_lang"], "alpaca")
        assert re.fullmatch(r"(train|valid)-[a-z]{2}-[a-z]{2}-\d{6}", row["id"])
    # both directions of every training pair
    by_id = {r["id"]: r for r in train}
    for row in train[:300]:
        src, tgt = row["direction"].split("-")
        twin = by_id[row["id"].replace(row["direction"], f"{tgt}-{src}")]
        assert (twin["source"], twin["reference"]) == (row["reference"], row["source"])


def test_demo_sentences_look_like_sentences(demo_out):
    out, _ = demo_out
    rows = read_jsonl(out / "train.jsonl")
    english = [r["source"] for r in rows if r["src_lang"] == "en"]
    lengths = [len(text.split()) for text in english]
    # the default "compact" lexicon: short sentences that tiny models learn in minutes of CPU
    assert min(lengths) == 4 and max(lengths) == 8  # varied lengths, within the range
    assert sum(n >= 7 for n in lengths) > 0.3 * len(lengths)
    for row in rows[:2000]:
        for text in (row["source"], row["reference"]):
            assert text[0].isupper() and text.endswith(".") and "  " not in text
    # a vocabulary of one to a few hundred word forms per language
    for lang, low, high in (("en", 100, 200), ("de", 150, 300), ("cs", 250, 600)):
        words = {w.strip(".,").lower() for r in rows if r["tgt_lang"] == lang for w in r["reference"].split()}
        assert low <= len(words) <= high, (lang, len(words))
    # every rule still shows up: subordinate clauses (verb-final German), negation, numerals 5-20
    german = [r["reference"] for r in rows if r["tgt_lang"] == "de"]
    assert sum(", dass " in text for text in german) > 200
    assert sum(" nicht" in text or " kein" in text for text in german) > 300
    czech = [r["reference"] for r in rows if r["tgt_lang"] == "cs"]
    assert sum(any(w.lower() in demo.CZECH_NUMBERS[3:] for w in text.split()) for text in czech) > 200


def test_demo_full_lexicon():
    """lexicon="full": every word of the tables, sentences of 4 to 15 words."""
    corpus = demo.generate_demo_corpus(train_pairs=4000, eval_pairs=5, seed=42, lexicon="full")
    english = [e for lang in ("de", "cs") for _, e in corpus[lang]["train"]]
    lengths = [len(text.split()) for text in english]
    assert min(lengths) == 4 and max(lengths) == 15
    assert sum(n >= 10 for n in lengths) > 0.15 * len(lengths)
    texts = {"en": english, "de": [o for o, _ in corpus["de"]["train"]], "cs": [o for o, _ in corpus["cs"]["train"]]}
    for lang, low, high in (("en", 150, 400), ("de", 200, 600), ("cs", 300, 1200)):
        words = {w.strip(".,").lower() for text in texts[lang] for w in text.split()}
        assert low <= len(words) <= high, (lang, len(words))
    compact = demo.generate_demo_corpus(train_pairs=4000, eval_pairs=5, seed=42)
    compact_nouns = {w for _, e in compact["de"]["train"] + compact["cs"]["train"] for w in e.lower().split()}
    assert "banana" in {w.strip(".") for text in english for w in text.lower().split()}
    assert not {"banana", "bananas", "cake", "cakes"} & {w.strip(".") for w in compact_nouns}
    with pytest.raises(ValueError, match="unknown lexicon"):
        demo.generate_demo_corpus(train_pairs=3, eval_pairs=1, lexicon="huge")


def test_demo_held_out_sentences_are_new(demo_out):
    out, _ = demo_out
    train = read_jsonl(out / "train.jsonl")
    assert len({(r["direction"], r["source"]) for r in train}) == len(train)  # no duplicates
    train_texts = {text for r in train for text in (r["source"], r["reference"])}
    held_out = read_jsonl(out / "valid.jsonl")
    for direction in DIRECTIONS:
        held_out += read_jsonl(out / "test" / f"{direction}.jsonl")
    for row in held_out:
        assert row["source"] not in train_texts and row["reference"] not in train_texts, row
    # the held-out sets do not share sentences with each other either
    english = [r["source"] if r["src_lang"] == "en" else r["reference"] for r in held_out]
    pairs_of = {lang: [e for e, r in zip(english, held_out) if lang in r["direction"]] for lang in ("de", "cs")}
    for lang, sentences in pairs_of.items():
        assert len(set(sentences)) == len(sentences), lang


def test_demo_is_deterministic_and_seeded(tmp_path):
    small = ["--demo", "--demo-train-pairs", "300", "--demo-eval-pairs", "20"]
    prepare_data.main(small + ["--out", str(tmp_path / "a")])
    prepare_data.main(small + ["--out", str(tmp_path / "b")])
    prepare_data.main(small + ["--out", str(tmp_path / "c"), "--seed", "3"])
    first = output_files(tmp_path / "a")
    assert first == output_files(tmp_path / "b")
    other = output_files(tmp_path / "c")
    assert other["train.jsonl"] != first["train.jsonl"] and other["test/de-en.jsonl"] != first["test/de-en.jsonl"]
    assert len(read_jsonl(tmp_path / "a" / "train.jsonl")) == 1200
    assert len(read_jsonl(tmp_path / "a" / "test" / "en-cs.jsonl")) == 20
    # only de-en asked: only its files
    prepare_data.main(small + ["--out", str(tmp_path / "de"), "--pairs", "de-en"])
    assert sorted(output_files(tmp_path / "de")) == ["stats.json", "test/de-en.jsonl", "test/en-de.jsonl",
                                                     "train.jsonl", "valid.jsonl"]
    with pytest.raises(SystemExit, match="the demo task has only de-en and cs-en"):
        prepare_data.main(small + ["--out", str(tmp_path / "fr"), "--pairs", "fr-en"])
    assert not (tmp_path / "fr").exists()


# ---- agreement rules, spot-checked on sentences built by hand ----

def phrase(noun, determiner="def", number=1, *adjectives):
    return NounPhrase(NOUNS[noun], determiner, number, tuple(ADJECTIVES[a] for a in adjectives))


def test_german_articles_cases_and_adjective_endings():
    see = VERBS["see"]
    sentence = Sentence(Clause(phrase("dog", "def", 1, "big"), see, "present", obj=phrase("cat", "indef", 1, "black")))
    assert render(sentence)["de"] == "Der große Hund sieht eine schwarze Katze."
    sentence = Sentence(Clause(phrase("cat", "indef", 1, "black"), see, "present", obj=phrase("dog", "def", 1, "big")))
    assert render(sentence) == {"en": "A black cat sees the big dog.",
                                "de": "Eine schwarze Katze sieht den großen Hund.",
                                "cs": "Černá kočka vidí toho velkého psa."}
    sentence = Sentence(Clause("we", see, "present", obj=phrase("horse", "indef", 1, "old")))
    assert render(sentence) == {"en": "We see an old horse.", "de": "Wir sehen ein altes Pferd.",
                                "cs": "Vidíme starého koně."}
    sentence = Sentence(Clause("I", see, "present", obj=phrase("dog", "indef", 1, "young"), negated=True))
    assert render(sentence) == {"en": "I do not see a young dog.", "de": "Ich sehe keinen jungen Hund.",
                                "cs": "Nevidím mladého psa."}
    sentence = Sentence(Clause("she", see, "present", obj=phrase("cat", "def"), negated=True))
    assert render(sentence)["de"] == "Sie sieht die Katze nicht."
    sentence = Sentence(Clause(phrase("dog", "num", 3, "big"), see, "present", obj=phrase("mouse", "defpl", 1, "small")))
    assert render(sentence) == {"en": "Three big dogs see the small mice.",
                                "de": "Drei große Hunde sehen die kleinen Mäuse.",
                                "cs": "Tři velcí psi vidí ty malé myši."}


def test_german_word_order_tense_and_subordinate_clause():
    clause = Clause(phrase("dog"), VERBS["see"], "past", obj=phrase("cat"), adverb=ADVERBS["yesterday"])
    assert render(Sentence(clause)) == {"en": "Yesterday the dog saw the cat.",
                                        "de": "Gestern hat der Hund die Katze gesehen.",
                                        "cs": "Včera ten pes viděl tu kočku."}
    clause = Clause("you", VERBS["run"], "past", place=PLACES["in the park"])
    assert render(Sentence(clause))["de"] == "Du bist im Park gelaufen."
    clause = Clause("they", VERBS["eat"], "future", obj=phrase("apple", "defpl", 1, "red"), negated=True)
    assert render(Sentence(clause)) == {"en": "They will not eat the red apples.",
                                        "de": "Sie werden die roten Äpfel nicht essen.",
                                        "cs": "Oni nebudou jíst ta červená jablka."}
    clause = Clause(phrase("woman", "def"), VERBS["buy"], "past", obj=phrase("car", "indef", 1, "new"))
    sentence = Sentence(clause, sayer="I", saying_verb="think")
    assert render(sentence) == {"en": "I think that the woman bought a new car.",
                                "de": "Ich denke, dass die Frau ein neues Auto gekauft hat.",
                                "cs": "Myslím, že ta žena kupovala nové auto."}
    sentence = Sentence(Clause("I", VERBS["sleep"], "past"), sayer=phrase("teacher", "defpl"), saying_verb="know")
    assert render(sentence) == {"en": "The teachers know that I slept.",
                                "de": "Die Lehrer wissen, dass ich geschlafen habe.",
                                "cs": "Ti učitelé vědí, že jsem spal."}


def test_czech_agreement_numerals_and_clitics():
    sleep = VERBS["sleep"]
    assert render(Sentence(Clause(phrase("dog", "num", 5), sleep, "past")))["cs"] == "Pět psů spalo."
    assert render(Sentence(Clause(phrase("dog", "num", 2), sleep, "past")))["cs"] == "Dva psi spali."
    assert render(Sentence(Clause(phrase("cat", "num", 2), sleep, "past")))["cs"] == "Dvě kočky spaly."
    assert render(Sentence(Clause(phrase("cat", "num", 7, "lazy"), sleep, "present")))["cs"] == "Sedm líných koček spí."
    assert render(Sentence(Clause("she", sleep, "past")))["cs"] == "Ona spala."
    assert render(Sentence(Clause("you", sleep, "past", negated=True)))["cs"] == "Nespal jsi."
    clause = Clause("we", VERBS["feed"], "past", obj=phrase("cow", "indef", 1, "hungry"), adverb=ADVERBS["last week"])
    assert render(Sentence(clause)) == {"en": "Last week we fed a hungry cow.",
                                        "de": "Letzte Woche haben wir eine hungrige Kuh gefüttert.",
                                        "cs": "Minulý týden jsme krmili hladovou krávu."}
    clause = Clause(phrase("girl", "def", 1, "happy"), VERBS["hold"], "future", obj=phrase("letter", "def"))
    assert render(Sentence(clause)) == {"en": "The happy girl will hold the letter.",
                                        "de": "Das glückliche Mädchen wird den Brief halten.",
                                        "cs": "Ta šťastná dívka bude držet ten dopis."}


def test_generated_german_articles_agree_with_noun_gender(demo_out):
    """Every unambiguous singular noun in the generated German has an article of its gender."""
    out, _ = demo_out
    articles = {"m": {"der", "den", "ein", "einen", "kein", "keinen"}, "f": {"die", "eine", "keine"},
                "n": {"das", "ein", "kein"}}
    singular = {n.german[0]: n.german_gender for n in NOUNS.values() if n.german[0] != n.german[1]}
    adjective_stems = tuple(a.german_stem for a in ADJECTIVES.values())
    checked = 0
    for row in read_jsonl(out / "train.jsonl"):
        if row["tgt_lang"] != "de":
            continue
        words = row["reference"].rstrip(".").replace(",", "").split()
        for position, word in enumerate(words):
            if word in singular:
                before = position - 1
                while words[before].startswith(adjective_stems) and words[before] not in ("eine", "einen"):
                    before -= 1
                assert words[before].lower() in articles[singular[word]], row["reference"]
                checked += 1
    assert checked > 2000


def test_generated_negation_and_czech_numerals_are_consistent(demo_out):
    out, _ = demo_out
    genitive_plurals = {n.czech["pl", "gen"] for n in NOUNS.values()}
    five_and_more = set(demo.CZECH_NUMBERS[3:])
    negated = 0
    for row in read_jsonl(out / "train.jsonl"):
        if row["src_lang"] != "en":
            continue
        english, other = row["source"], row["reference"]
        english_negated = " not " in english
        if row["tgt_lang"] == "de":
            assert english_negated == bool(re.search(r"\b(nicht|kein|keine|keinen)\b", other)), row
        else:
            assert english_negated == any(w.lower().startswith("ne") for w in other.split()), row
            words = other.rstrip(".").replace(",", "").lower().split()
            for position, word in enumerate(words[:-1]):
                if word in five_and_more:  # 5-20: adjectives and noun in the genitive plural
                    after = position + 1
                    while words[after].endswith("ých"):
                        after += 1
                    assert words[after] in genitive_plurals, other
        negated += english_negated
    assert negated > 1000
