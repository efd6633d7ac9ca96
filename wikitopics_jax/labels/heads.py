"""Lexical heads of Commons category titles, by rules (no parser, nothing downloaded).

The head is what a category is a set of: "Churches in Paris" -> "Churches", "Art museums in Paris" ->
"Art museums", "1730s maps of the Netherlands" -> "Maps", "Julio Argentino Roca" -> "Julio Argentino
Roca". As the thesis prototype (a constituency parser plus simplified Collins head rules), the head
is the longest run of nouns that ends the title's first noun phrase; adjectives, numbers, dates and
determiners before it are not part of it. The rules:

1. The first noun phrase: the words before the first preposition ("in", "of", "by", ...), clause
   word ("that", "which"), coordination ("and", "or", "&"), comma, colon, dash or parenthesis, or
   before a participle that starts a reduced relative clause ("People associated with ...",
   "Paintings depicting ..."). A possessive ends a modifier: "Women's football" -> "Football".
2. In that phrase, from its last word leftwards, words are taken while they are nouns. A word is
   not a noun when it is a number or date ("1730s", "19th", "100-149-meter-tall"), a determiner,
   an adjective from a small lexicon ("old", "black", "former") or with an adjective suffix when
   lower case ("historical", "-shaped", "-based", "famous"), or a nationality / adjective word in
   capitals ("French", "Roman Catholic") followed by a lower-case word. Capitalised words are
   otherwise proper nouns, so a name stays whole.
3. When no noun ends the phrase (an adjective or number alone: "Colorful", "1899"), that last word
   is the head, so "1899 births" -> "Births" but "1899" -> "1899" (a null head for the labeller).

The first letter is upper-cased, the rest kept (Commons titles are case-sensitive after the first
letter, and a head is looked up as a category by the `headJ` heuristic). docs/labels.md reports the
agreement with hand-checked heads (tests/fixtures/category_heads.tsv).
"""

from __future__ import annotations

import functools
import re

# Words that end the first noun phrase.
_BREAK_WORDS = frozenset("""
in of by from at on for with to during near under over between about without within into onto
upon across along among around against after before behind beyond through throughout toward
towards via per versus vs vs. than as like since until till
and or nor but & + that which who whom whose where when while
""".split())
# Participles that start a reduced relative clause whatever precedes them.
_PARTICIPLES = frozenset("""
depicting showing featuring containing using including representing wearing holding carrying having
being referencing celebrating commemorating honoring honouring dedicated associated named made built designed located published taken
photographed produced painted used related owned operated manufactured printed issued awarded
uploaded created drawn written directed founded established situated known called listed based
""".split())
# Lower-case words in -ing / -ed that are usually nouns (or noun modifiers), not participles.
_ING_ED_NOUNS = frozenset("""
building painting drawing clothing engraving printing wedding housing ceiling lighting mining shipping
fishing farming sailing racing swimming cycling rowing skiing meeting training marking crossing
landing opening recording carving ring king thing spring string wing morning evening pudding
dumpling stocking offering sibling earring railing siding filling icing frosting topping seasoning
stuffing bedding lining setting shooting bombing uprising hearing
bed shed seed speed breed feed need weed reed creed hundred sled red steed
""".split())
_DETERMINERS = frozenset("""
the a an this that these those some any all each every no several many various other another own
""".split())
_ADJECTIVES = frozenset("""
old new young black white red blue green yellow orange purple pink brown grey gray golden silver
small large big little tiny huge giant great high low tall short long wide narrow deep shallow
ancient modern early late former current present recent future past contemporary medieval
historic historical prehistoric traditional classical vintage antique
first second third fourth fifth sixth seventh eighth ninth tenth last next main major minor
north south east west northern southern eastern western central upper lower inner outer middle
open closed empty full free public private local national international regional royal imperial
military civil urban rural religious sacred holy secular naval aerial marine
male female human wild domestic dead living alive natural artificial fresh dry wet hot cold warm
colorful colourful coloured colored multicolored monochrome dark light bright
abandoned ruined destroyed demolished restored unidentified unknown unused disused
famous notable important common rare typical unusual same different similar single double triple
quality featured valued good bad best worst fine real true false
upright vertical horizontal front back rear left right top bottom inside outside external internal
interior exterior homemade handmade complete abstract simple solar lunar polar nuclear linear
sunny rainy snowy foggy cloudy frozen
""".split())
# Suffixes of lower-case adjectives (checked after the lexicon and the noun exceptions).
_ADJ_SUFFIXES = ("ical", "ous", "ive", "ful", "less", "able", "ible", "ary", "ic", "al", "-shaped",
                 "-based", "-tall", "-related", "-like", "-style", "-era", "-century", "-language",
                 "-born", "-made", "-level", "-storey", "-story", "-wheeled", "-sized", "-colored",
                 "-coloured", "-old", "ular", "atory", "-year", "-headed", "-winged", "-legged", "-sided", "-faced")
# Lower-case words with an adjective suffix that are nouns.
_SUFFIX_NOUNS = frozenset("""
animal animals capital capitals hospital hospitals festival festivals memorial memorials canal canals
cathedral cathedrals mural murals portal portals signal signals terminal terminals pedal pedals
fossil fossils crystal crystals metal metals mineral minerals arsenal arsenals general generals
official officials rival rivals ritual rituals journal journals manual manuals pictorial tutorial
dial sundial arrival survival proposal approval rehearsal carnival interval medal medals pedestal pedestals
vial sandal sandals petal petals corral coral corals total totals oval ovals spiral spirals
mammal mammals material materials criminal criminals cereal cereals tribunal tribunals
music logic arithmetic graphic graphics clinic clinics mosaic mosaics fabric fabrics republic
republics topic topics traffic relic relics tunic tunics picnic picnics comic comics classic
classics mechanic mechanics characteristic characteristics critic critics epic epics cleric clerics
rhetoric lyric lyrics tonic public
laboratory laboratories observatory observatories conservatory conservatories lavatory
lavatories oratory purgatory crematory library libraries dictionary dictionaries anniversary anniversaries cemetery cemeteries
monastery monasteries secretary secretaries diary diaries salary summary boundary
boundaries commentary documentary documentaries glossary glossaries sanctuary sanctuaries
aviary apiary granary estuary estuaries emissary missionary missionaries mercenary mercenaries
dignitary dignitaries luminary functionary visionary
explosive explosives locomotive locomotives archive archives detective detectives relative
relatives representative representatives executive executives objective objectives native natives
motive motives adhesive olive olives incentive perspective perspectives
cable cables table tables vegetable vegetables constable constables stable stables timetable
timetables bible bibles marble crucible
house houses bus buses campus census virus viruses
""".split())
_NATIONALITY_SUFFIXES = ("ian", "ean", "can", "ese", "ish", "ic", "ch", "an", "al", "ine", "esque")
_NATIONALITIES = frozenset("""
Roman German Greek Thai Swiss Dutch French Welsh Czech Arab Norman Byzantine Baroque Victorian
Gothic Romanesque Moorish Flemish British Irish Scottish English Danish Swedish Finnish Polish
Spanish Turkish Kurdish Jewish Catholic Orthodox Protestant Anglican Lutheran Islamic Buddhist
Hindu Christian Soviet Ottoman Mughal Maya Aztec Inca Nazi Confederate Union Qing Ming Tang Han
""".split())
# Capitalised words that would look like adjectives by suffix but are usually names.
_NOT_NATIONALITY = frozenset("""
Iran Japan Sudan Pakistan Afghanistan Kazakhstan Uzbekistan Michigan Milan Jordan Taiwan Bhutan
Oman Yucatan Vatican Wisconsin Batman Superman Chapman Newman Freeman Coleman Hitchcock Munich
Zurich Greenwich Norwich Ipswich Church Mercedes Dominican Pan Van Man Plan Dan Ryan Brian
Christian Sebastian Adrian Julian Vivian Jan Stefan Susan Morgan Logan Duncan Aidan Nathan Evan
Dean Sean Jean Crimean Hospital Festival Capital Memorial Cathedral Canal General Royal Central
Imperial National International Federal Municipal Regional Provincial Metropolitan Pacific Atlantic
Arctic Baltic Public Republic Clinic Music Academic Olympic Catholic
""".split()) - {"Catholic"}
_MONTHS = frozenset("January February March April May June July August September October November "
                    "December".split())
_NUMBERISH = re.compile(r"^(\d[\d,.\-–/]*(s|st|nd|rd|th|'s|s')?|[ivxlcdm]+|c\.|ca\.|\d+[a-z]?)$",
                        re.IGNORECASE)
_NUMBER_COMPOUND = re.compile(r"^\d[\d.,\-–]*(-[a-z]+)+$", re.IGNORECASE)  # "100-149-meter-tall"
_ORDINAL_WORDS = frozenset("first second third fourth fifth sixth seventh eighth ninth tenth "
                           "eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth "
                           "eighteenth nineteenth twentieth twenty-first".split())
_TOKEN = re.compile(r"[^\s]+")


def _is_number(word: str) -> bool:
  w = word.strip("'\"")
  return bool(w) and (bool(_NUMBERISH.match(w)) and any(c.isdigit() for c in w) or
                      bool(_NUMBER_COMPOUND.match(w)))


def _is_participle(word: str, prev: str) -> bool:
  """Whether `word` (lower case, after `prev`) starts a reduced relative clause."""
  if word in _PARTICIPLES:
    return True
  if word in _ING_ED_NOUNS or len(word) <= 5 or not word.isalpha():
    return False
  if word.endswith("ed"):
    return True
  # "Paintings depicting ..." but "Fishing boats": -ing after a plural noun is a verb.
  return word.endswith("ing") and (prev.endswith("s") or prev in ("people", "men", "women",
                                                                  "children"))


def _is_adjective(word: str, nxt: str | None, first: bool, name: bool) -> bool:
  """Whether a pre-modifier `word` (before `nxt`) is not a noun; `first`: the title's first word;
  `name`: every word of the phrase is capitalised (a proper name: "Old City Hall")."""
  low = word.lower()
  if _is_number(word) or low in _DETERMINERS or low in _ORDINAL_WORDS:
    return True
  if word[:1].isupper() and (name or not first and nxt is not None and nxt[:1].isupper()):
    return False  # Part of a name: "French Navy", "Argentine Pavilion", "Boston City Council".
  if word[:1].isupper() and word not in _NOT_NATIONALITY:
    if word in _NATIONALITIES or (word.isalpha() and word.endswith(_NATIONALITY_SUFFIXES) and
                                  len(word) > 4):
      return True  # "French paintings", "Roman Catholic churches".
    if not first:
      return False
  # The title's first word is capitalised whatever it is: judged as a lower-case word.
  if low in _SUFFIX_NOUNS:
    return False
  if low in _ADJECTIVES:
    return True
  if "-" in low:
    # "second-hand", "high-speed", "cabbage-based" are adjectives; "x-rays", "intensive-care" nouns.
    part = low.split("-", 1)[0]
    return (low.endswith(_ADJ_SUFFIXES) or part in _ADJECTIVES or part in _ORDINAL_WORDS or
            _is_number(part))
  return low.endswith(_ADJ_SUFFIXES) or (low.endswith("ed") and len(low) > 4 and
                                         low not in _ING_ED_NOUNS)


def _first_phrase(title: str) -> list[str]:
  # A parenthesis, colon, comma or spaced dash closes the phrase: "Mercury (planet)", "Paris,
  # France", "The Radio Times - 1937".
  title = re.split(r"\s*[(\[,:;]|\s[-–—]\s", title, maxsplit=1)[0]
  words = _TOKEN.findall(title)
  phrase: list[str] = []
  for i, word in enumerate(words):
    low = word.lower()
    if low in ("and", "or", "&") and phrase and i + 1 < len(words):
      if all(_is_adjective(w, None, j == 0, False) for j, w in enumerate(phrase) if w.lower() != low):
        phrase.append(word)  # Coordinated adjectives: "Black and white photographs".
        continue
      if words[i + 1][:1].isupper() and all(w[:1].isupper() for w in phrase):
        phrase.append(word)  # Inside a name: "Illinois Mathematics and Science Academy".
        continue
    if i > 0 and (low in _BREAK_WORDS or _is_participle(low, words[i - 1].lower())):
      break
    if low.endswith(("'s", "’s", "s'")) and i + 1 < len(words):
      phrase = []  # The possessor modifies what follows ("Women's football").
      continue
    phrase.append(word)
  return phrase


@functools.lru_cache(maxsize=1 << 20)
def find_head(title: str) -> str:
  """The lexical head of a category title (without "Category:"), first letter upper-cased."""
  phrase = _first_phrase(title.strip())
  if not phrase:
    return ""
  end = len(phrase)
  # Trailing numbers name an instance, not the class ("January 2010" -> January, "Route 66" -> Route),
  # unless the phrase is nothing else ("1899").
  while end > 1 and _is_number(phrase[end - 1]):
    end -= 1
  name = all(w[:1].isupper() or w.lower() in ("and", "&", "de", "la", "of") for w in phrase[:end])
  start = end - 1
  while start > 0 and not _is_adjective(phrase[start - 1], phrase[start], start - 1 == 0, name):
    start -= 1
  # A coordination of adjectives before the head is not part of it.
  while start < end - 1 and phrase[start].lower() in ("and", "or", "&"):
    start += 1
  head = " ".join(phrase[start:end])
  return head[:1].upper() + head[1:]


def last_word(head: str) -> str:
  """The one-word head (the `head` heuristic compares these), first letter upper-cased."""
  word = head.rsplit(" ", 1)[-1]
  return word[:1].upper() + word[1:]


def shorten(head: str) -> str:
  """The head without its first word ("Art museums" -> "Museums"), first letter upper-cased."""
  rest = head.split(" ", 1)[1] if " " in head else head
  return rest[:1].upper() + rest[1:]


def is_null_head(head: str) -> bool:
  """Heads that say nothing about a topic: months, "Century", "Category(ies)", numbers, nothing."""
  return (not head or head in _MONTHS or head in ("Century", "Categories", "Category") or
          _is_number(head))
