"""The embedded demo task: files and schema, held-out sentences, agreement rules of kd/demo.py."""

import json
import random
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


# ---- the options that give the demo what real data has: ambiguity, noise, monolingual text ----

def jsonl_digest(folder):
    """sha256 over every *.jsonl file of a prepared folder (names and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.jsonl")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


SMALL = ["--demo-train-pairs", "300", "--demo-eval-pairs", "20", "--seed", "1"]


def prepare(out, *extra):
    stats = prepare_data.main(["--demo", "--out", str(out), *SMALL, *extra])
    return stats, read_jsonl(out / "train.jsonl")


def held_out_files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in [out / "valid.jsonl", *sorted((out / "test").iterdir())]}


def test_new_options_leave_the_default_corpus_unchanged(tmp_path):
    # the digest of this corpus as prepare_data.py wrote it before the options existed
    prepare_data.main(["--demo", "--out", str(tmp_path / "a"), "--demo-train-pairs", "100",
                       "--demo-eval-pairs", "20", "--seed", "1"])
    assert jsonl_digest(tmp_path / "a") == "f230967796e759ce65fe0087d40e74d5e09bacd000626935d265f1e5a2a38078"
    stats = prepare_data.main(["--demo", "--out", str(tmp_path / "b"), "--demo-train-pairs", "100",
                               "--demo-eval-pairs", "20", "--seed", "1", "--demo-ambiguity", "0",
                               "--demo-noise", "0", "--demo-monolingual", "0"])
    assert output_files(tmp_path / "a") == output_files(tmp_path / "b")
    assert set(stats["demo"]) == {"train_pairs", "eval_pairs"}


def test_alternatives_are_correct_renderings_of_one_sentence():
    big_car = NounPhrase(NOUNS["car"], "def", adjectives=(ADJECTIVES["big"],))
    sentence = Sentence(Clause("I", VERBS["see"], "past", big_car, adverb=ADVERBS["yesterday"],
                               place=PLACES["in the garden"]))
    assert demo.alternatives(sentence, "en") == [
        "Yesterday I saw the big car in the garden.", "Yesterday I saw the large car in the garden.",
        "I saw the big car in the garden yesterday.", "I saw the large car in the garden yesterday."]
    assert demo.alternatives(sentence, "de") == [
        "Gestern habe ich das große Auto im Garten gesehen.",
        "Gestern habe ich den großen Wagen im Garten gesehen.",  # Wagen is masculine: den großen
        "Ich habe gestern das große Auto im Garten gesehen.",
        "Im Garten habe ich gestern das große Auto gesehen.",
        "Gestern habe ich im Garten das große Auto gesehen.",
        "Ich habe gestern den großen Wagen im Garten gesehen.",
        "Im Garten habe ich gestern den großen Wagen gesehen.",
        "Gestern habe ich im Garten den großen Wagen gesehen.",
        "Ich habe gestern im Garten das große Auto gesehen.",
        "Ich habe gestern im Garten den großen Wagen gesehen."]
    assert demo.alternatives(sentence, "cs") == [
        "Včera jsem viděl to velké auto na zahradě.", "Včera jsem viděl to veliké auto na zahradě.",
        "Včera jsem viděl ten velký automobil na zahradě.",  # automobil is masculine inanimate
        "Viděl jsem včera to velké auto na zahradě.", "Na zahradě jsem včera viděl to velké auto.",
        "Včera jsem viděl ten veliký automobil na zahradě.",
        "Viděl jsem včera to veliké auto na zahradě.", "Na zahradě jsem včera viděl to veliké auto.",
        "Viděl jsem včera ten velký automobil na zahradě.", "Na zahradě jsem včera viděl ten velký automobil.",
        "Viděl jsem včera ten veliký automobil na zahradě.", "Na zahradě jsem včera viděl ten veliký automobil."]
    # an optional word, and a clause with no variant context has one rendering
    saying = Sentence(Clause(NounPhrase(NOUNS["dog"], "def"), VERBS["sleep"], "present"), "she", "say")
    assert demo.alternatives(saying, "en") == ["She says that the dog sleeps.", "She says the dog sleeps."]
    assert demo.alternatives(saying, "de") == ["Sie sagt, dass der Hund schläft.", "Sie sagt, der Hund schläft."]
    assert demo.alternatives(saying, "cs") == ["Ona říká, že ten pes spí."]
    # the feminine girl: holka takes dívka's endings; a subject agrees with the synonym's gender
    girls = Sentence(Clause(NounPhrase(NOUNS["girl"], "num", 2), VERBS["sleep"], "past"))
    assert demo.alternatives(girls, "cs") == ["Dvě dívky spaly.", "Dvě holky spaly."]
    assert demo.alternatives(Sentence(Clause(NounPhrase(NOUNS["car"], "num", 2), VERBS["sleep"], "past")),
                             "cs") == ["Dvě auta spala.", "Dva automobily spaly."]


def test_demo_ambiguity_draws_references_from_the_alternatives(tmp_path):
    stats_plain, plain = prepare(tmp_path / "plain")
    stats, train = prepare(tmp_path / "ambiguous", "--demo-ambiguity", "1")
    # the same sentences: the same ids in the same order, byte-identical canonical valid and test sets
    assert [r["id"] for r in train] == [r["id"] for r in plain]
    assert held_out_files(tmp_path / "plain") == held_out_files(tmp_path / "ambiguous")
    # every training pair renders the same sentence structure as the plain corpus's pair
    structures = []
    clean_pairs = demo.sample_pairs(random.Random("kd-demo-1-de"), "de", 300, set(), {},
                                    demo.LEXICONS["compact"], structures)
    plain_pairs = {r["id"]: (r["source"], r["reference"]) for r in plain if r["direction"] == "de-en"}
    assert [plain_pairs[f"train-de-en-{i:06d}"] for i in range(300)] == clean_pairs
    drawn = {r["id"]: (r["source"], r["reference"]) for r in train if r["direction"] == "de-en"}
    changed = 0
    for i, sentence in enumerate(structures):
        german, english = drawn[f"train-de-en-{i:06d}"]
        assert german in demo.alternatives(sentence, "de") and english in demo.alternatives(sentence, "en")
        changed += (german, english) != clean_pairs[i]
    assert 0.2 * 300 < changed < 0.8 * 300
    # the teacher sees one German word with two English translations: a genuinely soft target
    big = [r["reference"] for r in train if r["direction"] == "de-en" and "große" in r["source"]]
    assert any(" big " in f" {t} " for t in big) and any(" large " in f" {t} " for t in big)
    # stats: a histogram of the number of alternatives per direction; all drawn at share 1
    report = stats["demo"]["ambiguity"]
    assert report["share"] == 1.0 and set(report["directions"]) == set(DIRECTIONS)
    for direction, entry in report["directions"].items():
        histogram = {int(n): pairs for n, pairs in entry["alternatives_histogram"].items()}
        assert sum(histogram.values()) == 300 and max(histogram) >= 4
        assert entry["sources_with_alternatives"] == sum(p for n, p in histogram.items() if n > 1) / 300
        assert entry["references_drawn"] == 1.0
        assert 0.1 < entry["references_not_canonical"] < entry["sources_with_alternatives"]
    # the default share is 0.5
    stats_half, _ = prepare(tmp_path / "half", "--demo-ambiguity")
    assert stats_half["demo"]["ambiguity"]["share"] == 0.5
    assert 0.35 < stats_half["demo"]["ambiguity"]["directions"]["de-en"]["references_drawn"] < 0.65


def test_demo_noise_fraction_matches_p_within_sampling_error(tmp_path):
    p = 0.3
    _, clean = prepare(tmp_path / "clean")
    stats, noisy = prepare(tmp_path / "noisy", "--demo-noise", str(p))
    assert held_out_files(tmp_path / "clean") == held_out_files(tmp_path / "noisy")
    assert [(r["id"], r["source"], r["prompt"]) for r in noisy] == [(r["id"], r["source"], r["prompt"]) for r in clean]
    corrupted = [(c, n) for c, n in zip(clean, noisy) if c["reference"] != n["reference"]]
    n = len(noisy)
    measured = len(corrupted) / n
    assert abs(measured - p) < 4 * (p * (1 - p) / n) ** 0.5  # 4 binomial standard deviations
    report = stats["demo"]["noise"]
    assert report["corrupted"] == len(corrupted) and report["fraction"] == measured and report["rows"] == n
    assert sum(report["by_kind"].values()) == len(corrupted) and min(report["by_kind"].values()) > 0.15 * len(corrupted)
    for direction in DIRECTIONS:
        entry = report["by_direction"][direction]
        assert entry["corrupted"] == sum(c["direction"] == direction for c, _ in corrupted)
    # corrupted references are made of words of their own language (crawled noise, not gibberish)
    def words(text):
        return {w.strip(",.").lower() for w in text.split()}

    vocabulary = {}
    for row in clean:
        vocabulary.setdefault(row["tgt_lang"], set()).update(words(row["reference"]))
    for c, n_row in corrupted:
        assert n_row["reference"].endswith(".") and n_row["reference"][0].isupper()
        assert words(n_row["reference"]) <= vocabulary[c["tgt_lang"]]
    # seeded: the same seed corrupts the same rows the same way
    _, again = prepare(tmp_path / "again", "--demo-noise", str(p))
    assert again == noisy


def test_demo_monolingual_sentences_are_not_held_out(tmp_path):
    stats, train = prepare(tmp_path / "mono", "--demo-monolingual", "400", "--demo-ambiguity")
    out = tmp_path / "mono"
    mono, mono_valid = read_jsonl(out / "mono.jsonl"), read_jsonl(out / "mono_valid.jsonl")
    assert len(mono) == 3 * 400 and len(mono_valid) == 3 * 50
    assert stats["counts"]["mono"] == 1200 and stats["counts"]["mono_valid"] == 150
    for lang in ("en", "de", "cs"):
        assert sum(r["direction"] == f"mono-{lang}" for r in mono) == 400
    held_out = {text for path in [out / "valid.jsonl", *(out / "test").iterdir()]
                for row in read_jsonl(path) for text in (row["source"], row["reference"])}
    for row in mono + mono_valid:
        assert list(row) == ROW_KEYS and row["prompt"] == "" and row["source"] == ""
        assert row["src_lang"] == row["tgt_lang"] == row["direction"][len("mono-"):]
        assert row["reference"] not in held_out
    assert not {r["reference"] for r in mono} & {r["reference"] for r in mono_valid}
    assert len({r["id"] for r in mono + mono_valid}) == len(mono) + len(mono_valid)
    # it knows the languages: the monolingual German holds the canonical words and the synonyms
    german = " ".join(r["reference"] for r in mono if r["tgt_lang"] == "de")
    assert "Auto" in german and "Wagen" in german
    # adding monolingual text changes nothing else
    prepare(tmp_path / "plain", "--demo-ambiguity")
    assert jsonl_digest(tmp_path / "plain") == jsonl_digest_without(out, ("mono.jsonl", "mono_valid.jsonl"))


def jsonl_digest_without(folder, names):
    import shutil

    copy = folder.parent / (folder.name + "-without")
    shutil.copytree(folder, copy)
    for name in names:
        (copy / name).unlink()
    return jsonl_digest(copy)


@pytest.mark.parametrize("extra, flag", [
    (["--demo-noise", "1.5"], "--demo-noise"),
    (["--demo-noise", "-0.1"], "--demo-noise"),
    (["--demo-noise", "nan"], "--demo-noise"),
    (["--demo-ambiguity", "2"], "--demo-ambiguity"),
    (["--demo-monolingual", "-1"], "--demo-monolingual"),
])
def test_demo_option_bad_values_are_refused(tmp_path, extra, flag):
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["--demo", "--out", str(tmp_path / "out"), *extra])
    message = str(stop.value.code)
    assert message.startswith(f"prepare_data.py: {flag}") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_demo_options_need_demo(tmp_path, shared_alma):
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["--data-dir", str(shared_alma), "--out", str(tmp_path / "out"), "--demo-noise", "0.1"])
    assert "add --demo" in str(stop.value.code)


def test_sft_on_monolingual_rows_trains_a_base_model(tmp_path, tiny_models):
    import train_kd
    from transformers import AutoTokenizer

    from kd.data import IGNORE_INDEX, encode_example

    prepare(tmp_path / "data", "--demo-monolingual", "60")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    row = read_jsonl(tmp_path / "data" / "mono.jsonl")[0]
    example = encode_example(tokenizer, row["prompt"], row["reference"], 512)
    sentence = tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
    # an empty prompt: BOS + sentence + EOS, the loss on the sentence and EOS
    assert example["input_ids"] == [tokenizer.bos_token_id] + sentence + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] + sentence + [tokenizer.eos_token_id]
    out = tmp_path / "base"
    train_kd.main(["--method", "sft", "--student", tiny_models["student"],
                   "--train-file", str(tmp_path / "data" / "mono.jsonl"),
                   "--valid-file", str(tmp_path / "data" / "mono_valid.jsonl"), "--output-dir", str(out),
                   "--batch-size", "8", "--micro-batch-size", "8", "--max-steps", "3", "--lr", "3e-3",
                   "--eval-steps", "3", "--logging-steps", "1"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [m for m in metrics if m["type"] == "valid"]
    assert valid and all(f"valid_loss/mono-{lang}" in valid[-1] for lang in ("en", "de", "cs"))
    assert (out / "final" / "model.safetensors").is_file()
