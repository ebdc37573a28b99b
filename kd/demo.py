"""The embedded demo task: a small synthetic English-German and English-Czech translation task.

The quickstart must run on a fresh machine without a download, and its BLEU table must mean
something: real ALMA data gives tiny from-scratch models a BLEU of about 1 after minutes of CPU
training. This module generates parallel sentences from a small grammar and a bilingual lexicon
(a few hundred word forms per language) with rules that a bigger model learns better than a
smaller one:

  German  article gender and case (der/den, ein/einen, kein/keinen), adjective endings after
          der/ein/no article, verb conjugation by person, V2 order after a fronted adverb, the
          past participle or infinitive at the end (Perfekt with haben/sein, Futur with werden),
          verb-final subordinate clauses after "dass", nicht vs kein.
  Czech   no articles (the English "the" becomes the demonstrative ten/ta/to), noun and adjective
          endings by gender (masculine animate/inanimate, feminine, neuter), number and case,
          numerals (2-4 take the plural, 5-20 the genitive plural and a singular neuter verb),
          dropped 1st/2nd person pronouns, past tense by gender with the auxiliary jsem/jsi/jsme
          in second position, future with budu, negation as the prefix ne-.

Options of prepare_data.py --demo: `alternatives` (--demo-ambiguity: synonyms, free word orders,
optional words), `generate_monolingual` (--demo-monolingual) and `add_reference_noise`
(--demo-noise), at the end of this module.

Simplifications, consistent throughout: numbers run from 2 to 20 ("one" would make "a dog" and
"one dog" the same German); "you" is always singular (du, ty); "I", "you" and "we" are masculine
in Czech; "they" is masculine (oni, -li); "the teacher" is male; Czech future is budu + the
imperfective infinitive for every verb.

Two lexicons: "compact" (the default, the quickstart's task: 12 nouns, 9 verbs, 8 adjectives,
sentences of 4 to 8 English words) and "full" (every word of the tables below, 4 to 15 words).
Every rule above applies in both. Why compact: a from-scratch model must see each word often before
it learns to read the source at all. Measured with a Llama of 2 layers x 128 (batch 16, lr 3e-3,
greedy, 100 test sentences per direction): after 500 steps the compact task gives a BLEU of 21/19
(de-en/cs-en) and 7/5 (en-de/en-cs); the full lexicon, even cut to 9-word sentences, gives 1 to 3
after 300 steps, every output the same sentence whatever the source.

    >>> corpus = generate_demo_corpus(train_pairs=3, eval_pairs=2, seed=0)
    >>> sorted(corpus["de"])
    ['test.de-en', 'test.en-de', 'train', 'valid']
    >>> render(Sentence(Clause(subject="I", verb=VERBS["see"], tense="past",
    ...     obj=NounPhrase(NOUNS["cat"], "indef", adjectives=(ADJECTIVES["big"],)))))
    {'en': 'I saw a big cat.', 'de': 'Ich habe eine große Katze gesehen.', 'cs': 'Viděl jsem velkou kočku.'}
"""

import itertools
import random
from dataclasses import dataclass

# ---- lexicon ----

# English person/number of a subject -> index into the five verb forms of the tables below
PERSONS = ["1sg", "2sg", "3sg", "1pl", "3pl"]

# key: English, German, Czech (empty: dropped), person, Czech gender of the past participle
PRONOUN_TABLE = """
I     ich  -    1sg  m
you   du   -    2sg  m
he    er   on   3sg  m
she   sie  ona  3sg  f
we    wir  -    1pl  m
they  sie  oni  3pl  m
"""

# English sg/pl | German gender sg pl | Czech gender (ma masc. animate, mi masc. inanimate, f, n):
# nominative sg, accusative sg, nominative pl, accusative pl, genitive pl | tags for verbs/adjectives
NOUN_TABLE = """
dog dogs        | m Hund Hunde            | ma pes psa psi psy psů                        | animal washable
man men         | m Mann Männer           | ma muž muže muži muže mužů                    | person
teacher teachers| m Lehrer Lehrer         | ma učitel učitele učitelé učitele učitelů     | person
doctor doctors  | m Arzt Ärzte            | ma lékař lékaře lékaři lékaře lékařů          | person
brother brothers| m Bruder Brüder         | ma bratr bratra bratři bratry bratrů          | person
friend friends  | m Freund Freunde        | ma kamarád kamaráda kamarádi kamarády kamarádů| person
bird birds      | m Vogel Vögel           | ma pták ptáka ptáci ptáky ptáků               | animal small
horse horses    | n Pferd Pferde          | ma kůň koně koně koně koní                    | animal washable
cat cats        | f Katze Katzen          | f kočka kočku kočky kočky koček               | animal small
woman women     | f Frau Frauen           | f žena ženu ženy ženy žen                     | person
sister sisters  | f Schwester Schwestern  | f sestra sestru sestry sestry sester          | person
girl girls      | n Mädchen Mädchen       | f dívka dívku dívky dívky dívek               | person
cow cows        | f Kuh Kühe              | f kráva krávu krávy krávy krav                | animal washable
mouse mice      | f Maus Mäuse            | f myš myš myši myši myší                      | animal small
book books      | n Buch Bücher           | f kniha knihu knihy knihy knih                | thing small readable writable openable
letter letters  | m Brief Briefe          | mi dopis dopis dopisy dopisy dopisů           | thing small readable writable openable
magazine magazines | f Zeitschrift Zeitschriften | mi časopis časopis časopisy časopisy časopisů | thing small readable
car cars        | n Auto Autos            | n auto auto auta auta aut                     | thing washable openable
table tables    | m Tisch Tische          | mi stůl stůl stoly stoly stolů                | thing washable
house houses    | n Haus Häuser           | mi dům dům domy domy domů                     | thing
ball balls      | m Ball Bälle            | mi míč míč míče míče míčů                     | thing small washable
bag bags        | f Tasche Taschen        | f taška tašku tašky tašky tašek               | thing small openable
chair chairs    | m Stuhl Stühle          | f židle židli židle židle židlí               | thing washable
lamp lamps      | f Lampe Lampen          | f lampa lampu lampy lampy lamp                | thing small
bicycle bicycles| n Fahrrad Fahrräder     | n kolo kolo kola kola kol                     | thing washable
window windows  | n Fenster Fenster       | n okno okno okna okna oken                    | thing washable openable
picture pictures| n Bild Bilder           | mi obraz obraz obrazy obrazy obrazů           | thing small
hat hats        | m Hut Hüte              | mi klobouk klobouk klobouky klobouky klobouků | thing small
key keys        | m Schlüssel Schlüssel   | mi klíč klíč klíče klíče klíčů                | thing small
cup cups        | f Tasse Tassen          | mi hrnek hrnek hrnky hrnky hrnků              | thing small washable
flower flowers  | f Blume Blumen          | f květina květinu květiny květiny květin      | thing small
pen pens        | m Stift Stifte          | n pero pero pera pera per                     | thing small
apple apples    | m Apfel Äpfel           | n jablko jablko jablka jablka jablek          | food small washable
pear pears      | f Birne Birnen          | f hruška hrušku hrušky hrušky hrušek          | food small washable
egg eggs        | n Ei Eier               | n vejce vejce vejce vejce vajec               | food small
banana bananas  | f Banane Bananen        | mi banán banán banány banány banánů           | food small
cake cakes      | m Kuchen Kuchen         | mi dort dort dorty dorty dortů                | food small
"""

# English | German stem | Czech stem, masculine animate nominative plural | kind (two adjectives
# of one kind never meet: no "old young") | nouns it describes. The order of the table is the
# order of two adjectives in a phrase ("a beautiful old horse").
ADJECTIVE_TABLE = """
beautiful | schön      | krásn krásní     | looks     | person animal thing
cheap     | billig     | levn levní       | price     | thing food
clever    | klug       | chytr chytří     | character | person animal
lazy      | faul       | lín líní         | character | person animal
happy     | glücklich  | šťastn šťastní   | mood      | person animal
sad       | traurig    | smutn smutní     | mood      | person animal
hungry    | hungrig    | hladov hladoví   | hunger    | person animal
fast      | schnell    | rychl rychlí     | speed     | person animal
big       | groß       | velk velcí       | size      | person animal thing food
small     | klein      | mal malí         | size      | person animal thing food
old       | alt        | star staří       | age       | person animal thing
young     | jung       | mlad mladí       | age       | person animal
new       | neu        | nov noví         | age       | thing
black     | schwarz    | čern černí       | colour    | animal thing
white     | weiß       | bíl bílí         | colour    | animal thing
brown     | braun      | hněd hnědí       | colour    | animal thing
red       | rot        | červen červení   | colour    | thing food
green     | grün       | zelen zelení     | colour    | thing food
"""

# English base 3sg past | German ich du er/sie wir sie, participle, auxiliary |
# Czech já ty on my oni, past (masculine sg), infinitive | subject | objects (empty: intransitive)
VERB_TABLE = """
see sees saw        | sehe siehst sieht sehen sehen gesehen haben               | vidím vidíš vidí vidíme vidí viděl vidět                          | person animal | person animal thing food
buy buys bought     | kaufe kaufst kauft kaufen kaufen gekauft haben            | kupuji kupuješ kupuje kupujeme kupují kupoval kupovat             | person        | animal thing food
need needs needed   | brauche brauchst braucht brauchen brauchen gebraucht haben | potřebuji potřebuješ potřebuje potřebujeme potřebují potřeboval potřebovat | person animal | thing food
love loves loved    | liebe liebst liebt lieben lieben geliebt haben            | miluji miluješ miluje milujeme milují miloval milovat             | person animal | person animal
eat eats ate        | esse isst isst essen essen gegessen haben                 | jím jíš jí jíme jedí jedl jíst                                    | person animal | food
write writes wrote  | schreibe schreibst schreibt schreiben schreiben geschrieben haben | píšu píšeš píše píšeme píšou psal psát                    | person        | writable
hold holds held     | halte hältst hält halten halten gehalten haben            | držím držíš drží držíme drží držel držet                          | person        | small
wash washes washed  | wasche wäschst wäscht waschen waschen gewaschen haben     | myji myješ myje myjeme myjí myl mýt                               | person        | washable
draw draws drew     | zeichne zeichnest zeichnet zeichnen zeichnen gezeichnet haben | kreslím kreslíš kreslí kreslíme kreslí kreslil kreslit        | person        | person animal thing food
feed feeds fed      | füttere fütterst füttert füttern füttern gefüttert haben  | krmím krmíš krmí krmíme krmí krmil krmit                          | person        | animal
visit visits visited| besuche besuchst besucht besuchen besuchen besucht haben  | navštěvuji navštěvuješ navštěvuje navštěvujeme navštěvují navštěvoval navštěvovat | person | person
call calls called   | rufe rufst ruft rufen rufen gerufen haben                 | volám voláš volá voláme volají volal volat                        | person        | person animal
open opens opened   | öffne öffnest öffnet öffnen öffnen geöffnet haben         | otevírám otevíráš otevírá otevíráme otevírají otevíral otevírat   | person        | openable
sell sells sold     | verkaufe verkaufst verkauft verkaufen verkaufen verkauft haben | prodávám prodáváš prodává prodáváme prodávají prodával prodávat | person     | animal thing food
watch watches watched | beobachte beobachtest beobachtet beobachten beobachten beobachtet haben | pozoruji pozoruješ pozoruje pozorujeme pozorují pozoroval pozorovat | person animal | person animal
sleep sleeps slept  | schlafe schläfst schläft schlafen schlafen geschlafen haben | spím spíš spí spíme spí spal spát                               | person animal |
sing sings sang     | singe singst singt singen singen gesungen haben           | zpívám zpíváš zpívá zpíváme zpívají zpíval zpívat                 | person        |
work works worked   | arbeite arbeitest arbeitet arbeiten arbeiten gearbeitet haben | pracuji pracuješ pracuje pracujeme pracují pracoval pracovat  | person        |
wait waits waited   | warte wartest wartet warten warten gewartet haben         | čekám čekáš čeká čekáme čekají čekal čekat                        | person animal |
run runs ran        | laufe läufst läuft laufen laufen gelaufen sein            | běhám běháš běhá běháme běhají běhal běhat                        | person animal |
swim swims swam     | schwimme schwimmst schwimmt schwimmen schwimmen geschwommen sein | plavu plaveš plave plaveme plavou plaval plavat            | person animal |
play plays played   | spiele spielst spielt spielen spielen gespielt haben      | hraji hraješ hraje hrajeme hrají hrál hrát                        | person animal |
come comes came     | komme kommst kommt kommen kommen gekommen sein            | přicházím přicházíš přichází přicházíme přicházejí přicházel přicházet | person animal |
"""

# verbs of the main clause before "that" (present tense only): English base 3sg |
# German ich du er/sie wir sie | Czech já ty on my oni
SAYING_VERB_TABLE = """
say says     | sage sagst sagt sagen sagen         | říkám říkáš říká říkáme říkají
think thinks | denke denkst denkt denken denken    | myslím myslíš myslí myslíme myslí
know knows   | weiß weißt weiß wissen wissen       | vím víš ví víme vědí
"""

GERMAN_AUXILIARIES = {
    "haben": "habe hast hat haben haben".split(),
    "sein": "bin bist ist sind sind".split(),
    "werden": "werde wirst wird werden werden".split(),
}
CZECH_PAST_AUXILIARY = ["jsem", "jsi", None, "jsme", None]  # none in the 3rd person
CZECH_FUTURE_AUXILIARY = "budu budeš bude budeme budou".split()

# tense | English | German | Czech (fronted: German puts the finite verb right after it)
ADVERB_TABLE = """
present | today     | heute         | dnes
present | now       | jetzt         | teď
present | often     | oft           | často
past    | yesterday | gestern       | včera
past    | last week | letzte Woche  | minulý týden
future  | tomorrow  | morgen        | zítra
future  | soon      | bald          | brzy
future  | next week | nächste Woche | příští týden
"""

PLACE_TABLE = """
in the garden  | im Garten       | na zahradě
in the kitchen | in der Küche    | v kuchyni
in the park    | im Park         | v parku
at school      | in der Schule   | ve škole
in the city    | in der Stadt    | ve městě
at home        | zu Hause        | doma
in the forest  | im Wald         | v lese
on the street  | auf der Straße  | na ulici
in the village | im Dorf         | ve vesnici
by the river   | am Fluss        | u řeky
"""

# ---- alternatives (--demo-ambiguity): synonyms, free word orders, an optional word ----

CANONICAL = frozenset()  # no variant: the one rendering the task had before alternatives existed

# adjective synonyms, by language: canonical form -> the synonym (its name as a variant);
# Czech keys and values are (stem, masculine animate nominative plural)
ADJECTIVE_SYNONYMS = {
    "en": {"big": "large", "small": "little"},
    "de": {"glücklich": "froh"},
    "cs": {("velk", "velcí"): ("velik", "velicí")},
}
# noun synonyms, by the English singular: (variant name, gender, forms as the noun tables have them)
GERMAN_NOUN_SYNONYMS = {"car": ("Wagen", "m", ("Wagen", "Wagen"))}
CZECH_NOUN_SYNONYMS = {
    "car": ("automobil", "mi", {("sg", "nom"): "automobil", ("sg", "acc"): "automobil",
                                ("pl", "nom"): "automobily", ("pl", "acc"): "automobily",
                                ("pl", "gen"): "automobilů"}),
    "girl": ("holka", "f", {("sg", "nom"): "holka", ("sg", "acc"): "holku", ("pl", "nom"): "holky",
                            ("pl", "acc"): "holky", ("pl", "gen"): "holek"}),
}
# every variant of each language: adjective and noun synonyms (named by the synonym), word orders
# (see english_clause, german_clause, czech_clause) and optional words ("that", "dass")
VARIANTS = {
    "en": ("large", "little", "adverb-last", "no-that"),
    "de": ("froh", "Wagen", "adverb-inside", "place-first", "place-before-object", "no-dass"),
    "cs": ("veliký", "automobil", "holka", "adverb-inside", "place-first"),
}


def synonym(lang, form, variants):
    """The synonym of an adjective form when `variants` names it, else the form itself."""
    replacement = ADJECTIVE_SYNONYMS[lang].get(form)
    if replacement is None:
        return form
    name = replacement if lang != "cs" else replacement[0] + "ý"
    return replacement if name in variants else form


ENGLISH_NUMBERS = ("two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                   "fifteen sixteen seventeen eighteen nineteen twenty").split()
GERMAN_NUMBERS = ("zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn "
                  "fünfzehn sechzehn siebzehn achtzehn neunzehn zwanzig").split()
CZECH_NUMBERS = ("dva tři čtyři pět šest sedm osm devět deset jedenáct dvanáct třináct čtrnáct "
                 "patnáct šestnáct sedmnáct osmnáct devatenáct dvacet").split()
NUMBERS = range(2, 21)

# German articles by kind, case and gender ("pl" for plural)
GERMAN_ARTICLES = {
    ("def", "nom"): {"m": "der", "f": "die", "n": "das", "pl": "die"},
    ("def", "acc"): {"m": "den", "f": "die", "n": "das", "pl": "die"},
    ("indef", "nom"): {"m": "ein", "f": "eine", "n": "ein"},
    ("indef", "acc"): {"m": "einen", "f": "eine", "n": "ein"},
}
# adjective endings: weak after der/die/das, mixed after ein/kein, strong with no article
GERMAN_ADJECTIVE_ENDINGS = {
    ("def", "nom"): {"m": "e", "f": "e", "n": "e", "pl": "en"},
    ("def", "acc"): {"m": "en", "f": "e", "n": "e", "pl": "en"},
    ("indef", "nom"): {"m": "er", "f": "e", "n": "es"},
    ("indef", "acc"): {"m": "en", "f": "e", "n": "es"},
    ("none", "nom"): {"pl": "e"},
    ("none", "acc"): {"pl": "e"},
}
# Czech hard adjective endings and the demonstrative ten/ta/to by number, case and gender
CZECH_ADJECTIVE_ENDINGS = {
    ("sg", "nom"): {"ma": "ý", "mi": "ý", "f": "á", "n": "é"},
    ("sg", "acc"): {"ma": "ého", "mi": "ý", "f": "ou", "n": "é"},
    ("pl", "nom"): {"ma": None, "mi": "é", "f": "é", "n": "á"},  # None: the table's own form
    ("pl", "acc"): {"ma": "é", "mi": "é", "f": "é", "n": "á"},
}
CZECH_DEMONSTRATIVES = {
    ("sg", "nom"): {"ma": "ten", "mi": "ten", "f": "ta", "n": "to"},
    ("sg", "acc"): {"ma": "toho", "mi": "ten", "f": "tu", "n": "to"},
    ("pl", "nom"): {"ma": "ti", "mi": "ty", "f": "ty", "n": "ta"},
    ("pl", "acc"): {"ma": "ty", "mi": "ty", "f": "ty", "n": "ta"},
}
# Czech past participle ending: singular by gender, plural by gender; numerals 5-20 take "o"
CZECH_PAST_ENDINGS = {
    "sg": {"m": "", "ma": "", "mi": "", "f": "a", "n": "o"},
    "pl": {"m": "i", "ma": "i", "mi": "y", "f": "y", "n": "a"},
}


@dataclass(frozen=True)
class Noun:
    english: tuple  # singular, plural
    german_gender: str
    german: tuple  # singular, plural
    czech_gender: str
    czech: dict  # (number, case) -> form
    tags: frozenset


@dataclass(frozen=True)
class Adjective:
    english: str
    german_stem: str
    czech_stem: str
    czech_masculine_animate_plural: str
    kind: str
    tags: frozenset
    rank: int  # position in a phrase of two adjectives


@dataclass(frozen=True)
class Verb:
    english: tuple  # base, 3sg, past
    german: tuple  # the five present forms
    german_participle: str
    german_auxiliary: str
    czech: tuple  # the five present forms
    czech_past: str
    czech_infinitive: str
    subject_tags: frozenset
    object_tags: frozenset  # empty: intransitive


@dataclass(frozen=True)
class Pronoun:
    english: str
    german: str
    czech: str  # "" when Czech drops it
    person: str
    czech_gender: str


@dataclass(frozen=True)
class Phrase:
    """An adverb or a place: a fixed phrase in each language."""
    english: str
    german: str
    czech: str
    tense: str = ""


def table_rows(table):
    return [[cell.strip() for cell in line.split("|")] for line in table.strip().splitlines()]


def load_nouns():
    nouns = {}
    for english, german, czech, tags in table_rows(NOUN_TABLE):
        german_gender, *german_forms = german.split()
        czech_gender, nom_sg, acc_sg, nom_pl, acc_pl, gen_pl = czech.split()
        czech_forms = {("sg", "nom"): nom_sg, ("sg", "acc"): acc_sg, ("pl", "nom"): nom_pl,
                       ("pl", "acc"): acc_pl, ("pl", "gen"): gen_pl}
        nouns[english.split()[0]] = Noun(tuple(english.split()), german_gender, tuple(german_forms),
                                         czech_gender, czech_forms, frozenset(tags.split()))
    return nouns


def load_adjectives():
    adjectives = {}
    for rank, (english, german, czech, kind, tags) in enumerate(table_rows(ADJECTIVE_TABLE)):
        czech_stem, masculine_animate_plural = czech.split()
        adjectives[english] = Adjective(english, german, czech_stem, masculine_animate_plural, kind,
                                        frozenset(tags.split()), rank)
    return adjectives


def load_verbs():
    verbs = {}
    for english, german, czech, subjects, objects in table_rows(VERB_TABLE):
        german, czech = german.split(), czech.split()
        verbs[english.split()[0]] = Verb(tuple(english.split()), tuple(german[:5]), german[5], german[6],
                                         tuple(czech[:5]), czech[5], czech[6],
                                         frozenset(subjects.split()), frozenset(objects.split()))
    return verbs


PRONOUNS = {row[0]: Pronoun(row[0], row[1], "" if row[2] == "-" else row[2], row[3], row[4])
            for row in (line.split() for line in PRONOUN_TABLE.strip().splitlines())}
NOUNS = load_nouns()
ADJECTIVES = load_adjectives()
VERBS = load_verbs()
SAYING_VERBS = {english.split()[0]: (tuple(english.split()), tuple(german.split()), tuple(czech.split()))
                for english, german, czech in table_rows(SAYING_VERB_TABLE)}
ADVERBS = {english: Phrase(english, german, czech, tense)
           for tense, english, german, czech in table_rows(ADVERB_TABLE)}
PLACES = {english: Phrase(english, german, czech) for english, german, czech in table_rows(PLACE_TABLE)}
TENSES = ("present", "past", "future")

# the words the sentences of each lexicon draw from (the tables define them all; "compact" keeps
# every subject and object tag of its verbs satisfiable: eat -> apple, write -> book, ...)
COMPACT_NOUNS = "dog cat man woman girl teacher horse book car apple ball house".split()
COMPACT_VERBS = "see buy eat love sleep run write wash feed".split()
COMPACT_ADJECTIVES = "big small old young black red happy new".split()


@dataclass(frozen=True)
class Lexicon:
    nouns: tuple
    verbs: tuple
    adjectives: tuple
    min_words: int  # English sentence length range
    max_words: int


LEXICONS = {
    "compact": Lexicon(tuple(NOUNS[k] for k in COMPACT_NOUNS), tuple(VERBS[k] for k in COMPACT_VERBS),
                       tuple(ADJECTIVES[k] for k in COMPACT_ADJECTIVES), 4, 8),
    "full": Lexicon(tuple(NOUNS.values()), tuple(VERBS.values()), tuple(ADJECTIVES.values()), 4, 15),
}


# ---- sentence structure ----

@dataclass(frozen=True)
class NounPhrase:
    noun: Noun
    determiner: str  # "def" (the dog), "indef" (a dog), "defpl" (the dogs), "num" (three dogs)
    number: int = 1  # 2-20 with "num"
    adjectives: tuple = ()

    @property
    def plural(self):
        return self.determiner in ("defpl", "num")


@dataclass(frozen=True)
class Clause:
    subject: object  # a PRONOUNS key or a NounPhrase
    verb: Verb
    tense: str
    obj: NounPhrase = None
    negated: bool = False
    adverb: Phrase = None  # fronted time adverb (main clauses only)
    place: Phrase = None


@dataclass(frozen=True)
class Sentence:
    clause: Clause
    sayer: object = None  # "<sayer> says/thinks/knows that <clause>": a PRONOUNS key or a NounPhrase
    saying_verb: str = None


def english_person(subject):
    if isinstance(subject, str):
        return PRONOUNS[subject].person
    return "3pl" if subject.plural else "3sg"


# ---- English ----

def english_noun_phrase(phrase, variants=CANONICAL):
    words = [synonym("en", adjective.english, variants) for adjective in phrase.adjectives]
    words.append(phrase.noun.english[1 if phrase.plural else 0])
    if phrase.determiner == "num":
        return [ENGLISH_NUMBERS[phrase.number - 2]] + words
    if phrase.determiner == "indef":
        return ["an" if words[0][0] in "aeiou" else "a"] + words
    return ["the"] + words


def english_verb_group(verb, tense, person, negated):
    """I see / he sees / he does not see / he saw / he did not see / he will (not) see."""
    base, third_singular, past = verb.english
    if tense == "future":
        return ["will", "not", base] if negated else ["will", base]
    if tense == "past":
        return ["did", "not", base] if negated else [past]
    if negated:
        return ["does" if person == "3sg" else "do", "not", base]
    return [third_singular if person == "3sg" else base]


def english_clause(clause, variants=CANONICAL):
    subject = ([PRONOUNS[clause.subject].english] if isinstance(clause.subject, str)
               else english_noun_phrase(clause.subject, variants))
    adverb_last = clause.adverb is not None and "adverb-last" in variants
    words = [clause.adverb.english] if clause.adverb and not adverb_last else []
    words += subject + english_verb_group(clause.verb, clause.tense, english_person(clause.subject),
                                          clause.negated)
    if clause.obj:
        words += english_noun_phrase(clause.obj, variants)
    if clause.place:
        words.append(clause.place.english)
    if adverb_last:
        words.append(clause.adverb.english)
    return words


def english_sentence(sentence, variants=CANONICAL):
    words = english_clause(sentence.clause, variants)
    if sentence.sayer is not None:
        base, third_singular = SAYING_VERBS[sentence.saying_verb][0]
        person = english_person(sentence.sayer)
        sayer = ([PRONOUNS[sentence.sayer].english] if isinstance(sentence.sayer, str)
                 else english_noun_phrase(sentence.sayer, variants))
        that = [] if "no-that" in variants else ["that"]
        words = sayer + [third_singular if person == "3sg" else base] + that + words
    return finish(words)


def finish(words):
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


# ---- German ----

def german_noun(noun, variants=CANONICAL):
    """(gender, (singular, plural)) of a noun, or of its synonym when `variants` asks for it."""
    entry = GERMAN_NOUN_SYNONYMS.get(noun.english[0])
    if entry and entry[0] in variants:
        return entry[1], entry[2]
    return noun.german_gender, noun.german


def german_noun_phrase(phrase, case, negated=False, variants=CANONICAL):
    """der große Hund / den großen Hund / einen großen Hund / keinen großen Hund / drei große Hunde."""
    noun_gender, noun_forms = german_noun(phrase.noun, variants)
    gender = "pl" if phrase.plural else noun_gender
    if phrase.determiner == "num":
        article, kind = GERMAN_NUMBERS[phrase.number - 2], "none"
    elif phrase.determiner == "indef":
        kind = "indef"
        article = GERMAN_ARTICLES[kind, case][gender]
        if negated:  # "not a dog" is "kein Hund"
            article = "k" + article
    else:
        kind = "def"
        article = GERMAN_ARTICLES[kind, case][gender]
    ending = GERMAN_ADJECTIVE_ENDINGS[kind, case][gender]
    words = [article] + [synonym("de", adjective.german_stem, variants) + ending
                         for adjective in phrase.adjectives]
    return words + [noun_forms[1 if phrase.plural else 0]]


def german_verb_forms(verb, tense, person):
    """(finite verb, non-finite rest or None): sieht / hat ... gesehen / ist ... gelaufen / wird ... sehen."""
    index = PERSONS.index(person)
    if tense == "present":
        return verb.german[index], None
    if tense == "past":
        return GERMAN_AUXILIARIES[verb.german_auxiliary][index], verb.german_participle
    return GERMAN_AUXILIARIES["werden"][index], verb.german[3]  # the wir form is the infinitive


def german_clause(clause, subordinate=False, variants=CANONICAL):
    """Main clause: subject, finite verb, ... (V2 after a fronted adverb); after dass: verb last.

    Variants (free word orders): "adverb-inside" (Er sieht heute den Hund), "place-first" (Im Garten
    sieht er heute den Hund: the place takes the front, the time adverb goes inside),
    "place-before-object" (Er hat im Garten den Hund gesehen).
    """
    subject = ([PRONOUNS[clause.subject].german] if isinstance(clause.subject, str)
               else german_noun_phrase(clause.subject, "nom", variants=variants))
    finite, nonfinite = german_verb_forms(clause.verb, clause.tense, english_person(clause.subject))
    negate_article = clause.negated and clause.obj is not None and clause.obj.determiner == "indef"
    obj = german_noun_phrase(clause.obj, "acc", negate_article, variants) if clause.obj else []
    place_first = clause.place is not None and "place-first" in variants and not subordinate
    adverb_inside = clause.adverb is not None and ("adverb-inside" in variants or place_first)
    place = [clause.place.german] if clause.place and not place_first else []
    middle = [clause.adverb.german] if adverb_inside else []
    if "place-before-object" in variants:
        middle += place + obj
        place = []
    else:
        middle += obj
    if clause.negated and not negate_article:
        middle.append("nicht")
    middle += place
    if nonfinite:
        middle.append(nonfinite)
    if subordinate:
        return ["dass"] + subject + middle + [finite]
    if place_first:
        return [clause.place.german, finite] + subject + middle
    if clause.adverb and not adverb_inside:
        return [clause.adverb.german, finite] + subject + middle
    return subject + [finite] + middle


def german_sentence(sentence, variants=CANONICAL):
    if sentence.sayer is None:
        return finish(german_clause(sentence.clause, variants=variants))
    forms = SAYING_VERBS[sentence.saying_verb][1]
    sayer = ([PRONOUNS[sentence.sayer].german] if isinstance(sentence.sayer, str)
             else german_noun_phrase(sentence.sayer, "nom", variants=variants))
    verb = forms[PERSONS.index(english_person(sentence.sayer))]
    # "Er sagt, der Hund schläft": after sagen and denken (not wissen) dass may go, with main order
    no_dass = "no-dass" in variants and sentence.saying_verb in ("say", "think")
    return finish(sayer + [verb + ","] + german_clause(sentence.clause, subordinate=not no_dass,
                                                       variants=variants))


# ---- Czech ----

def czech_adjective(adjective, number, case, gender, variants=CANONICAL):
    stem, masculine_animate_plural = synonym(
        "cs", (adjective.czech_stem, adjective.czech_masculine_animate_plural), variants)
    if number == "gen":
        return stem + "ých"
    ending = CZECH_ADJECTIVE_ENDINGS[number, case][gender]
    return masculine_animate_plural if ending is None else stem + ending


def czech_noun(noun, variants=CANONICAL):
    """(gender, {(number, case): form}) of a noun, or of its synonym when `variants` asks for it."""
    entry = CZECH_NOUN_SYNONYMS.get(noun.english[0])
    if entry and entry[0] in variants:
        return entry[1], entry[2]
    return noun.czech_gender, noun.czech


def czech_noun_phrase(phrase, case, variants=CANONICAL):
    """ten velký pes / toho velkého psa / velkou kočku / tři velké kočky / pět velkých psů."""
    gender, forms = czech_noun(phrase.noun, variants)
    if phrase.determiner == "num" and phrase.number >= 5:  # 5-20 take the genitive plural
        adjectives = [czech_adjective(a, "gen", case, gender, variants) for a in phrase.adjectives]
        return [CZECH_NUMBERS[phrase.number - 2]] + adjectives + [forms["pl", "gen"]]
    number = "pl" if phrase.plural else "sg"
    words = [czech_adjective(a, number, case, gender, variants) for a in phrase.adjectives]
    words.append(forms[number, case])
    if phrase.determiner == "num":
        numeral = CZECH_NUMBERS[phrase.number - 2]
        if phrase.number == 2 and gender in ("f", "n"):
            numeral = "dvě"
        return [numeral] + words
    if phrase.determiner in ("def", "defpl"):  # Czech has no article: "the" is ten/ta/to
        return [CZECH_DEMONSTRATIVES[number, "nom" if case == "nom" else "acc"][gender]] + words
    return words


def czech_agreement(subject, variants=CANONICAL):
    """(index of the present form, past participle ending) for a subject."""
    if isinstance(subject, str):
        pronoun = PRONOUNS[subject]
        number = "pl" if pronoun.person.endswith("pl") else "sg"
        return PERSONS.index(pronoun.person), CZECH_PAST_ENDINGS[number][pronoun.czech_gender]
    if subject.determiner == "num" and subject.number >= 5:  # "pět psů spí / spalo": 3sg neuter
        return PERSONS.index("3sg"), CZECH_PAST_ENDINGS["sg"]["n"]
    number = "pl" if subject.plural else "sg"
    return PERSONS.index("3" + number), CZECH_PAST_ENDINGS[number][czech_noun(subject.noun, variants)[0]]


def czech_clause(clause, subordinate=False, variants=CANONICAL):
    """[adverb | že] [subject] verb [object] [place]; jsem/jsi/jsme takes the second position.

    Variants (free word orders): "adverb-inside" (Pes dnes spí, Viděl jsem včera psa), "place-first"
    (Na zahradě pes dnes spí: the place takes the front, the time adverb goes inside).
    """
    negation = "ne" if clause.negated else ""
    index, past_ending = czech_agreement(clause.subject, variants)
    if isinstance(clause.subject, str):
        subject = [PRONOUNS[clause.subject].czech] if PRONOUNS[clause.subject].czech else []
    else:
        subject = czech_noun_phrase(clause.subject, "nom", variants)
    auxiliary = None
    if clause.tense == "present":
        verb = [negation + clause.verb.czech[index]]
    elif clause.tense == "future":
        verb = [negation + CZECH_FUTURE_AUXILIARY[index], clause.verb.czech_infinitive]
    else:
        verb = [negation + clause.verb.czech_past + past_ending]
        auxiliary = CZECH_PAST_AUXILIARY[index]
    place_first = clause.place is not None and "place-first" in variants and not subordinate
    adverb_inside = clause.adverb is not None and ("adverb-inside" in variants or place_first)
    inside = [clause.adverb.czech] if adverb_inside else []
    if subordinate:
        first = ["že"]
    elif place_first:
        first = [clause.place.czech]
    else:
        first = [clause.adverb.czech] if clause.adverb and not adverb_inside else []
    if auxiliary:  # the clitic follows the first element: "Včera jsem viděl", "Viděl jsem"
        words = first + [auxiliary] + subject + inside + verb if first else verb + [auxiliary] + inside
    elif first or subject:
        words = first + subject + inside + verb
    else:  # "Vidím dnes psa", "Budu zítra spát"
        words = verb[:1] + inside + verb[1:]
    if clause.obj:
        words += czech_noun_phrase(clause.obj, "acc", variants)
    if clause.place and not place_first:
        words.append(clause.place.czech)
    return words


def czech_sentence(sentence, variants=CANONICAL):
    if sentence.sayer is None:
        return finish(czech_clause(sentence.clause, variants=variants))
    forms = SAYING_VERBS[sentence.saying_verb][2]
    index, _ = czech_agreement(sentence.sayer, variants)
    if isinstance(sentence.sayer, str):
        sayer = [PRONOUNS[sentence.sayer].czech] if PRONOUNS[sentence.sayer].czech else []
    else:
        sayer = czech_noun_phrase(sentence.sayer, "nom", variants)
    return finish(sayer + [forms[index] + ","] + czech_clause(sentence.clause, subordinate=True,
                                                               variants=variants))


RENDERERS = {"en": english_sentence, "de": german_sentence, "cs": czech_sentence}


def render(sentence, variants=CANONICAL):
    """The sentence in every language; `variants` (names of VARIANTS) picks non-canonical renderings."""
    return {lang: renderer(sentence, variants) for lang, renderer in RENDERERS.items()}


def alternatives(sentence, lang):
    """Every distinct correct rendering of the sentence in `lang`, the canonical one first.

    Each combination of the language's VARIANTS that changes the text gives one alternative
    (synonyms, free word orders, an optional word); a sentence without any of their contexts has
    one rendering.

        >>> alternatives(Sentence(Clause("I", VERBS["see"], "present", NounPhrase(NOUNS["car"], "def"),
        ...     adverb=ADVERBS["today"])), "de")
        ['Heute sehe ich das Auto.', 'Heute sehe ich den Wagen.', 'Ich sehe heute das Auto.', 'Ich sehe heute den Wagen.']
    """
    renderer = RENDERERS[lang]
    canonical = renderer(sentence)
    applicable = [name for name in VARIANTS[lang] if renderer(sentence, frozenset({name})) != canonical]
    texts = [canonical]
    for size in range(1, len(applicable) + 1):
        for names in itertools.combinations(applicable, size):
            text = renderer(sentence, frozenset(names))
            if text not in texts:
                texts.append(text)
    return texts


# ---- random sentences ----

def random_noun_phrase(rng, tags, lexicon):
    noun = rng.choice([n for n in lexicon.nouns if n.tags & tags])
    determiner = rng.choices(["def", "indef", "defpl", "num"], weights=[4, 3, 2, 2])[0]
    number = rng.choice(NUMBERS) if determiner == "num" else 1
    fitting = [a for a in lexicon.adjectives if a.tags & noun.tags]
    count = rng.choices([0, 1, 2], weights=[5, 4, 1])[0]
    adjectives = rng.sample(fitting, count)
    if count == 2 and adjectives[0].kind == adjectives[1].kind:  # no "old young", "red green"
        adjectives = adjectives[:1]
    adjectives = tuple(sorted(adjectives, key=lambda a: a.rank))
    return NounPhrase(noun, determiner, number, adjectives)


def random_subject(rng, tags, lexicon, pronoun_share=0.35):
    if "person" in tags and rng.random() < pronoun_share:
        return rng.choice(list(PRONOUNS))
    return random_noun_phrase(rng, tags, lexicon)


def random_clause(rng, main, lexicon):
    verb = rng.choice(lexicon.verbs)
    tense = rng.choice(TENSES)
    obj = random_noun_phrase(rng, verb.object_tags, lexicon) if verb.object_tags else None
    # "not three dogs" reads badly in German: no negation with a numbered object
    negated = rng.random() < 0.25 and not (obj is not None and obj.determiner == "num")
    adverb = None
    if main and rng.random() < 0.3:
        adverb = rng.choice([a for a in ADVERBS.values() if a.tense == tense])
    place = rng.choice(list(PLACES.values())) if rng.random() < 0.3 else None
    return Clause(random_subject(rng, verb.subject_tags, lexicon), verb, tense, obj, negated, adverb, place)


def random_sentence(rng, lexicon=LEXICONS["compact"]):
    if rng.random() < 0.25:
        sayer = random_subject(rng, frozenset({"person"}), lexicon, pronoun_share=0.5)
        return Sentence(random_clause(rng, False, lexicon), sayer, rng.choice(list(SAYING_VERBS)))
    return Sentence(random_clause(rng, True, lexicon))


def sample_pairs(rng, lang, count, taken, translations, lexicon=LEXICONS["compact"], sentences=None):
    """`count` new (lang text, English text) pairs: not in `taken`, of the lexicon's lengths.

    `translations` maps every text seen so far to its translation, so that one sentence never
    gets two different translations in the corpus (kept for safety; the lexicon avoids such
    ambiguities, e.g. it has no "read", whose present and past look alike for "I").
    `sentences`, a list, receives the structure of every pair (for its alternatives).
    """
    pairs = []
    attempts = 0
    while len(pairs) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise RuntimeError(f"kd/demo.py: cannot find {count} new {lang}-en sentences; "
                               "ask for fewer pairs")
        sentence = random_sentence(rng, lexicon)
        texts = render(sentence)
        english, other = texts["en"], texts[lang]
        if not lexicon.min_words <= len(english.split()) <= lexicon.max_words:
            continue
        if english in taken or other in taken:
            continue
        if translations.get(english, other) != other or translations.get(other, english) != english:
            continue
        translations[english], translations[other] = other, english
        taken.update((english, other))
        pairs.append((other, english))
        if sentences is not None:
            sentences.append(sentence)
    return pairs


def generate_demo_corpus(train_pairs=4000, eval_pairs=200, seed=42, langs=("de", "cs"), lexicon="compact",
                         ambiguity=0.0, ambiguity_report=None):
    """{lang: {"train", "valid", "test.<lang>-en", "test.en-<lang>": [(lang text, English text)]}}.

    `lexicon`: "compact" (the default, learnable by tiny models in minutes of CPU) or "full".

    Training pairs are distinct; every valid and test sentence is absent from all training data
    (of both language pairs: a model trained on de-en and cs-en together must not have seen a
    held-out English sentence either) and from the other held-out sets.

    `ambiguity` (0 to 1): the share of training pairs whose two sides are each drawn at random
    (uniformly, from a seeded generator of their own) from the sentence's `alternatives`; the other
    pairs, and every valid and test pair, keep the canonical rendering. The sentences themselves
    are the same as without it (same seed, same structures, byte-identical valid and test sets).
    `ambiguity_report`, a dict, receives per pair "<lang>-en": the number of pairs, how many were
    drawn, and per side a histogram {number of alternatives: pairs} and how many differ from the
    canonical text.
    """
    if lexicon not in LEXICONS:
        raise ValueError(f"kd/demo.py: unknown lexicon {lexicon!r}; choose one of {', '.join(LEXICONS)}")
    words = LEXICONS[lexicon]
    rngs = {lang: random.Random(f"kd-demo-{seed}-{lang}") for lang in langs}
    translations = {lang: {} for lang in langs}  # per pair: one translation per sentence
    taken = set()  # every text used so far, in any language
    structures = {lang: [] for lang in langs}
    corpus = {lang: {"train": sample_pairs(rngs[lang], lang, train_pairs, taken, translations[lang], words,
                                           structures[lang])}
              for lang in langs}
    if ambiguity > 0:
        for lang in langs:
            report = draw_alternatives(corpus[lang]["train"], structures[lang], lang, ambiguity,
                                       random.Random(f"kd-demo-{seed}-{lang}-ambiguity"))
            taken.update(text for pair in corpus[lang]["train"] for text in pair)
            if ambiguity_report is not None:
                ambiguity_report[f"{lang}-en"] = report
    for lang in langs:
        for part in ("valid", f"test.{lang}-en", f"test.en-{lang}"):
            corpus[lang][part] = sample_pairs(rngs[lang], lang, eval_pairs, taken, translations[lang], words)
    return corpus


def draw_alternatives(pairs, sentences, lang, share, rng):
    """Replace, in place, a `share` of the (lang text, English text) pairs by alternatives of both
    sides drawn uniformly and independently; return the counts for stats.json."""
    report = {"pairs": len(pairs), "drawn": 0,
              "alternatives": {lang: {}, "en": {}}, "not_canonical": {lang: 0, "en": 0}}
    for index, sentence in enumerate(sentences):
        options = {side: alternatives(sentence, side) for side in (lang, "en")}
        for side, texts in options.items():
            histogram = report["alternatives"][side]
            histogram[len(texts)] = histogram.get(len(texts), 0) + 1
        if rng.random() >= share:
            continue
        report["drawn"] += 1
        chosen = {side: rng.choice(texts) for side, texts in options.items()}
        for side, texts in options.items():
            report["not_canonical"][side] += chosen[side] != texts[0]
        pairs[index] = (chosen[lang], chosen["en"])
    for side in (lang, "en"):
        report["alternatives"][side] = dict(sorted(report["alternatives"][side].items()))
    return report


# ---- monolingual sentences (--demo-monolingual): a "base model" learns the languages ----

def generate_monolingual(count, valid_count, held_out, seed=42, langs=("en", "de", "cs"),
                         lexicon="compact", ambiguity=0.0):
    """{"mono": {lang: [text]}, "mono_valid": {lang: [text]}}: `count` and `valid_count` distinct
    sentences per language, each from its own sentence (no sentence is rendered in two languages:
    monolingual corpora are not parallel).

    No sentence is a rendering of a held-out sentence: a sentence is skipped when any of its
    canonical texts (in any language) or the drawn text is in `held_out` (every valid and test
    text). They may repeat training sentences, as real pretraining data would. mono and
    mono_valid are disjoint. With `ambiguity`, that share of the sentences is drawn from the
    sentence's alternatives, so the base model knows the synonyms and word orders too.
    """
    words = LEXICONS[lexicon]
    result = {"mono": {}, "mono_valid": {}}
    for lang in langs:
        rng = random.Random(f"kd-demo-mono-{seed}-{lang}")
        seen, texts = set(), []
        attempts = 0
        while len(texts) < count + valid_count:
            attempts += 1
            if attempts > 100 * (count + valid_count) + 1000:
                raise RuntimeError(f"kd/demo.py: cannot find {count + valid_count} distinct {lang} "
                                   "sentences; ask for fewer monolingual sentences")
            sentence = random_sentence(rng, words)
            canonical = render(sentence)
            if not words.min_words <= len(canonical["en"].split()) <= words.max_words:
                continue
            if any(text in held_out for text in canonical.values()):
                continue
            text = canonical[lang]
            if ambiguity > 0 and rng.random() < ambiguity:
                text = rng.choice(alternatives(sentence, lang))
            if text in seen or text in held_out:
                continue
            seen.add(text)
            texts.append(text)
        result["mono"][lang], result["mono_valid"][lang] = texts[:count], texts[count:]
    return result


# ---- noisy references (--demo-noise): what human-written and crawled parallel data has ----

NOISE_KINDS = ("drop", "replace", "append", "substitute")


def add_reference_noise(rows, probability, seed):
    """Corrupt, in place, the reference of each row with `probability` (a seeded draw per row).

    Kinds, one drawn uniformly per corrupted row: "drop" a word; "replace" a word by a word of
    another reference of the same language; "append" a span of 1-4 words of another reference;
    "substitute" a span of 1-3 words by a span of another reference. Sources stay clean. The
    corrupted text always differs from the clean one. Returns the counts for stats.json.
    """
    rng = random.Random(f"kd-demo-noise-{seed}")
    by_lang = {}
    for row in rows:
        by_lang.setdefault(row["tgt_lang"], []).append(row["reference"])
    vocabulary = {lang: sorted({word.rstrip(",") for text in texts for word in text[:-1].split()[1:]})
                  for lang, texts in by_lang.items()}
    report = {"probability": probability, "rows": len(rows), "corrupted": 0,
              "by_kind": dict.fromkeys(NOISE_KINDS, 0), "by_direction": {}}
    for row in rows:
        direction = report["by_direction"].setdefault(row["direction"], {"rows": 0, "corrupted": 0})
        direction["rows"] += 1
        if rng.random() >= probability:
            continue
        kind = rng.choice(NOISE_KINDS)
        row["reference"] = corrupt(rng, kind, row["reference"], by_lang[row["tgt_lang"]],
                                   vocabulary[row["tgt_lang"]])
        report["corrupted"] += 1
        report["by_kind"][kind] += 1
        direction["corrupted"] += 1
    report["fraction"] = report["corrupted"] / len(rows) if rows else 0.0
    for direction in report["by_direction"].values():
        direction["fraction"] = direction["corrupted"] / direction["rows"]
    return report


def corrupt(rng, kind, text, others, vocabulary):
    """One corruption of a sentence ("Words of it." form) that differs from it."""
    words = text[:-1].split()
    while True:
        if kind == "drop" and len(words) > 1:
            i = rng.randrange(len(words))
            new = words[:i] + words[i + 1:]
        elif kind == "replace":
            i = rng.randrange(len(words))
            new = words[:i] + [rng.choice(vocabulary)] + words[i + 1:]
        else:
            donor = rng.choice(others)[:-1].split()
            start = rng.randrange(1, len(donor)) if len(donor) > 1 else 0
            span = donor[start:start + rng.randint(1, 4)]
            if kind == "append":
                new = words + span
            else:  # "substitute" (and "drop" of a one-word sentence)
                i = rng.randrange(len(words))
                new = words[:i] + span + words[i + rng.randint(1, 3):]
        corrupted = finish(new) if new else text
        if corrupted != text:
            return corrupted
