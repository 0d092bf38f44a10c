"""PII redaction: e-mail addresses, phone numbers, card numbers, IP addresses and person names.

A documented pattern set, pure and offline (standard library only). :func:`find_pii` lists the
matches, :func:`redact` replaces them with ``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IP]`` and
``[PERSON]`` and counts them by type, and :func:`redact_columns` does that for the text columns
of one row before it is written.

Why not a library: Microsoft Presidio (``presidio-analyzer`` 2.2) installs from PyPI, but its
``AnalyzerEngine()`` downloads a spaCy model (``en_core_web_lg``) from GitHub at start-up and
fails offline; the official spaCy models are not on PyPI (only third-party re-uploads are).
``scrubadub`` 2.0 runs offline for e-mails and phones (no IP detector), but its person-name
detectors need TextBlob's NLTK corpora or a spaCy model, both downloaded at run time. Neither
finds person names offline, so names come from the rules below. (``phonenumbers`` would parse
phones well offline; it is not a dependency of raydag, so phones are patterns here too.)

What each type catches (and misses):
    email: ``local@domain.tld`` with an ASCII domain and a 2+ letter top-level domain.
    phone: numbers that start with ``+`` (9-15 digits) or ``00`` (11-17 digits), and national
        numbers of 9-12 digits written with separators (space, ``-``, ``.``, parentheses), like
        ``(415) 555-0100`` or ``020 7946 0958``, or unseparated ones starting with a trunk
        ``0`` (10-11 digits). Not phones: numbers under 9 digits (years, ``3.5``, ``555-0100``),
        plain digit runs (order numbers), dates (``2023-01-15 1030``), amounts after a currency
        sign or with thousands groups (``1 234 567``, ``123.456.789,00``), and runs holding two
        years (``1999 2000 2001``). Missed: 3-3-3 national formats (``612 345 678``) and
        numbers glued to more digits.
    card: 13-19 digits, unbroken or in groups of four (last group 1-4) or 4-6-5/4-6-4, one
        kind of separator (space or ``-``), and a valid Luhn checksum. A random 13-19 digit
        number passes Luhn one time in ten.
    ip: IPv4 (each octet 0-255) and IPv6 (checked with :mod:`ipaddress`). Dotted version
        numbers of four parts (``1.2.3.4``) are indistinguishable and are flagged.
    person: (a) an honorific (Mr, Mrs, Ms, Mx, Miss, Dr, Prof, Professor, Sir, Dame, Rev) with
        or without a dot, then initials and up to three capitalised words (``Dr. Jane Smith``,
        ``Mr Brown``); the span includes the honorific. (b) a first name from the built-in
        list of about 450 common English first names, an optional initial or particle
        (``van``, ``de``...), then a capitalised surname (``John Carter``, ``John F. Kennedy``,
        ``Vincent van Gogh``), plus one more capitalised word when it does not start the
        next name (``Philip Seymour Hoffman``). To keep false positives low, first names that
        are also common words or places (Will, May, Mark, Grace, Jordan, Victoria...) are left
        out of the list, the surname may not be a function word, weekday, month or place word
        (``Square``, ``Station``...), and a first name after ``St.``, ``San``, ``Fort``... is
        a place. Missed by design: lone first or last names (``John said``, ``Nolan's film``),
        names not in the list (most non-English names), all-caps names and names that are
        also common words. Still flagged: character names and titles built like names
        (``John Carter``, ``Mrs. Doubtfire``, ``Little Miss Sunshine``).

Example:
    >>> from raydag.filters.pii import redact
    >>> redact("Mail Dr. Jane Smith at jane@example.org or call +44 20 7946 0958.")
    ('Mail [PERSON] at [EMAIL] or call [PHONE].', {'email': 1, 'phone': 1, 'person': 1})
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

PII_TYPES = ("email", "phone", "card", "ip", "person")

# When two matches overlap, the earlier type in this order wins (an IP is not also a phone).
_PRIORITY = ("email", "ip", "card", "phone", "person")

_PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "ip": "[IP]",
                 "person": "[PERSON]"}


@dataclass(frozen=True)
class PiiMatch:
    """One piece of PII found in a text.

    Attributes:
        type: One of :data:`PII_TYPES`.
        start: Offset of the first character in the text.
        end: Offset one past the last character (``text[start:end]`` is the match).
        text: The matched characters.
    """

    type: str
    start: int
    end: int
    text: str


# --- e-mail ---------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")

# --- IP addresses -----------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
# A loose IPv6 candidate (hex groups with at least two colons), confirmed by ipaddress.
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}"
                   r"(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?(?![\w:]|\.\d)")

# --- numbers: phones and cards ----------------------------------------------------------------

# A rough run of digits, separators and parentheses; split and checked in Python (one flat
# character class, so the scan is linear and never backtracks).
_NUMBER_RUN = re.compile(r"[+(]?\d[\d().\- ]*")
_RUN_BREAK = re.compile(r"[ .\-]{2,}")  # ". " or "  " or " - " separates two numbers
_DIGITS = re.compile(r"\d+")
_DIGIT = re.compile(r"\d")
_GROUP_SEPARATORS = {" ", "-", ".", ")", ") ", ")-", ").", "(", " (", "-(", ".("}
_YEAR = re.compile(r"(?:19|20)\d\d")
_CURRENCY = "$€£¥₹"


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum used by payment card numbers.

    Args:
        digits: Digits only.

    Returns:
        True when the checksum is valid.

    Example:
        >>> luhn_valid("4111111111111111"), luhn_valid("4111111111111112")
        (True, False)
    """
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _is_card(run: str, groups: list[str], separators: list[str]) -> bool:
    digits = "".join(groups)
    if run[0] in "+(" or not 13 <= len(digits) <= 19:
        return False
    if len(groups) > 1:
        if len(set(separators)) != 1 or separators[0] not in (" ", "-"):
            return False
        sizes = [len(g) for g in groups]
        fours = all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4
        if not (fours or sizes in ([4, 6, 5], [4, 6, 4])):
            return False
    return luhn_valid(digits)


def _looks_like_date(groups: list[str]) -> bool:
    if len(groups) < 3:
        return False
    a, b, c = (int(g) for g in groups[:3])
    if len(groups[0]) == 4 and _YEAR.fullmatch(groups[0]):
        return 1 <= b <= 12 and 1 <= c <= 31
    if len(groups[2]) == 4 and _YEAR.fullmatch(groups[2]):
        return (1 <= a <= 31 and 1 <= b <= 12) or (1 <= a <= 12 and 1 <= b <= 31)
    return False


def _is_phone(run: str, groups: list[str]) -> bool:
    digits = "".join(groups)
    if run.startswith("+"):
        return 9 <= len(digits) <= 15
    if digits.startswith("00"):
        return 11 <= len(digits) <= 17
    if not 9 <= len(digits) <= 12:
        return False
    if len(groups) == 1:
        return digits.startswith("0") and 10 <= len(digits) <= 11
    if any(len(g) < 2 for g in groups[1:]):
        return False
    if "(" not in run and len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]):
        return False  # thousands groups: 123 456 789, 1.234.567.890
    if sum(1 for g in groups if _YEAR.fullmatch(g)) >= 2:
        return False  # a list of years
    return not _looks_like_date(groups)


def _pieces(run: str, offset: int):
    """The numbers in a rough run, split at double separators, with their offsets."""
    start = 0
    for gap in _RUN_BREAK.finditer(run):
        yield run[start:gap.start()], offset + start
        start = gap.end()
    yield run[start:], offset + start


def _number_matches(text: str) -> list[PiiMatch]:
    found = []
    for rough in _NUMBER_RUN.finditer(text):
        for run, start in _pieces(rough.group(), rough.start()):
            run = run.rstrip(" .-(")
            if run.endswith(")") and run.count(")") > run.count("("):
                run = run[:-1]
            if run.startswith("(") and run.find(")") == len(run) - 1:
                run, start = run[1:-1], start + 1  # a whole number in parentheses
            if run.startswith("(") and ")" not in run:
                run, start = run[1:], start + 1
            end = start + len(run)
            if not run or not run[-1].isdigit() or not _free_standing(text, start, end):
                continue
            groups = _DIGITS.findall(run)
            separators = _DIGITS.split(run)[1:-1]
            if any(s not in _GROUP_SEPARATORS for s in separators):
                continue
            if _is_card(run, groups, separators):
                found.append(PiiMatch("card", start, end, run))
            elif _is_phone(run, groups):
                found.append(PiiMatch("phone", start, end, run))
    return found


def _free_standing(text: str, start: int, end: int) -> bool:
    """Whether a number is not part of a word, an amount, a decimal, a time or a path."""
    before = text[start - 1] if start > 0 else " "
    if before.isalnum() or before in "_@/:#%" + _CURRENCY:
        return False
    if before in ".,-" and start > 1 and text[start - 2].isdigit():
        return False
    back = start - 1
    while back >= 0 and text[back] == " ":
        back -= 1
    if back >= 0 and text[back] in _CURRENCY:  # "$ 120 999 000"
        return False
    after = text[end] if end < len(text) else " "
    if after.isalnum() or after in "_@/:%" + _CURRENCY:
        return False
    return not (after in ".," and text[end + 1:end + 2].isdigit())


# --- person names ------------------------------------------------------------------------------

# Common English first names. Left out on purpose: names that are also ordinary words or
# places (Will, May, June, April, August, Mark, Bill, Frank, Grace, Hope, Faith, Joy, Rose,
# Art, Guy, Ray, Dawn, Summer, Sandy, Rich, Chase, Hunter, Pat, Sue, Max, Don, Drew, Gene,
# Amber, Ruby, Dolly, Mason, Christian, Angel, Jean, Morgan, Taylor, Jordan, Austin, Dallas,
# Madison, Victoria, Virginia, Georgia, Carolina, Charlotte, Florence, Sydney, Chelsea,
# Brooklyn, Savannah, Lincoln, Paris, Dakota, Phoenix).
FIRST_NAMES = frozenset("""
Aaron Adam Adrian Ahmed Aidan Alan Albert Alex Alexander Alfie Alfred Ali Alice Alison Amanda
Amelia Amy Ana Andre Andrea Andrew Andy Angela Angelina Anita Ann Anna Anne Annie Anthony
Antonio Archie Arjun Arthur Ashley Audrey Ava Barbara Barry Beatrice Ben Benjamin Bernard
Beth Betty Beverly Billy Bob Bobby Brad Bradley Brandon Brenda Brian Bridget Brittany Bruce
Bryan Caitlin Callum Calvin Cameron Carl Carlos Carmen Carol Caroline Carolyn Catherine Cecil
Charles Charlie Cheryl Chloe Chris Christina Christine Christopher Claire Clara Clint Clive
Cody Colin Connor Craig Curtis Cynthia Daisy Dan Daniel Danielle Danny Darren Dave David
Dean Debbie Deborah Debra Denise Dennis Denzel Derek Diana Diane Diego Dmitri Dominic Donald
Donna Doris Dorothy Douglas Duncan Dylan Eddie Edgar Edith Edward Edwin Eileen Elaine Eleanor
Elena Eli Elijah Elizabeth Ella Ellen Ellie Elsie Emily Emma Eric Erica Erin Ernest Esther
Ethan Ethel Eugene Evan Evelyn Evie Fatima Felix Fiona Francesca Francis Francisco Fred
Freddie Frederick Freya Gabriel Gabriella Gail Gareth Gary Gavin Geoffrey George Gerald
Giovanni Gladys Glen Gloria Gordon Graham Greg Gregory Greta Gwen Gwyneth Hannah Hans Harold
Harriet Harrison Harry Harvey Hassan Hazel Heather Helen Henry Herbert Hiroshi Holly Howard
Hugh Hugo Ian Ingrid Irene Isaac Isabel Isabella Isla Ivan Jack Jackie Jacob Jacqueline
Jacques Jake James Jamie Jane Janet Janice Jared Jason Javier Jeff Jeffrey Jennifer Jenny
Jeremy Jerry Jesse Jessica Jill Jim Jimmy Joan Joanne Joe Joel John Johnny Jonathan Jose
Joseph Josh Joshua Joyce Juan Judith Judy Julia Julian Julie Justin Karen Kate Katherine
Kathleen Kathryn Katie Keanu Keira Keith Kelly Kenji Kenneth Kenny Kevin Kieran Kim Kimberly
Kristen Kurt Kyle Lance Larry Lars Laura Lauren Lawrence Leah Leo Leon Leonard Leonardo Leslie
Liam Lily Linda Lisa Logan Lois Lorraine Louis Louise Luca Lucas Lucy Luis Luke Lydia Lynn
Mabel Malcolm Manuel Marco Margaret Margot Maria Marie Marilyn Marion Marjorie Martha Martin
Marvin Mary Matt Matthew Maureen Meg Megan Melanie Melissa Meryl Mia Michael Michelle Miguel Mike
Miriam Mohammed Molly Monica Muhammad Nancy Naomi Natalie Natasha Nathan Neil Nicholas Nick
Nicola Nicole Nigel Noah Nora Norman Olga Olive Oliver Olivia Omar Oscar Owen Pamela Paolo
Patricia Patrick Paul Paula Pauline Pedro Penelope Percy Peter Philip Phillip Phoebe Pierre
Poppy Priya Quentin Rachel Rahul Ralph Randy Raymond Rebecca Reese Reginald Rhys Ricardo
Richard Ricky Rita Rob Robert Roberta Robin Roger Ronald Rosa Rosemary Roy Rupert Russell Ruth
Ryan Sally Sam Samantha Samuel Sandra Sara Sarah Scarlett Scott Sean Sebastian Sergei Seth
Sharon Shirley Simon Sofia Sophia Sophie Stanley Stefan Stella Stephanie Stephen Steve Steven
Stuart Susan Sven Tanya Tatiana Ted Teresa Terry Theo Theodore Thomas Tim Timothy Tina Toby
Todd Tom Tommy Tony Tracy Travis Trevor Tyler Valerie Vanessa Vera Victor Vincent Violet
Walter Warren Wayne Wendy Wesley William Willie Yuki Zachary Zoe Zoey
""".split())

# Words that cannot be a surname right after a first name or honorific: function words,
# weekdays, months, the heads of place and organisation names ("Madison Square") and verbs
# and adverbs common in title-case titles ("Jack and Jill Went Up the Hill").
_NOT_A_SURNAME = frozenset("""
A About After Again All Also Although Always Am An And Any Are As At Be Because Been Before
Being Between Both But By Can Could Dear Did Do Does Each Even Ever Every For From Had Has
Have He Hello Her Here Hers Hi Him His How However If In Into Is It Its Just May Me Might Mine
More Most Much Must My Never No Nor Not Now Of Oh Ok Okay On Only Or Our Over Please Really
Shall She Should Since So Some Still Than Thank Thanks That The Their Them Then There These
They This Those Though Through To Too Under Unless Until Us Very Was We Well Were What When
Where Which While Who Whom Whose Why Will With Without Would Yes Yet You Your
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April June
July August September October November December Christmas Easter Halloween
Street St Road Rd Avenue Ave Lane Drive Boulevard Square Park Place Plaza Station Airport
Bridge Tower Building Center Centre Hospital Clinic University College School Academy
Institute Church Cathedral Abbey Museum Library Gallery Theatre Theater Cinema Stadium Arena
Garden Gardens Zoo Island Islands Lake River Bay Beach Coast Valley Mountain Mountains Hill
Hills Heights Falls Canyon Forest Desert County City Town Village State States Republic
Kingdom Empire Hotel Inn Restaurant Cafe Bar Grill Manor Company Corporation Corp Inc Ltd
Group Foundation Trust Bank Studios Studio Pictures Films Records Entertainment Productions
Media Network News Times Post Journal Magazine Press Award Awards Prize Cup League Festival
Show Series Season Episode Chapter Part Volume Edition Trilogy Saga Franchise Movie Film Book
Novel Album Song Day Night Week Weekend
Up Down Out Off Back Away Home Alone Forever Went Goes Gets Got Says Said Makes Made Meets Met
Loves Saves Takes Comes Returns Rises Strikes Begins Ends Wins Lives Dies
""".split())

# A first name right after one of these is a place ("St. Louis", "San Jose", "Lake Louise").
_PLACE_PREFIXES = frozenset("St St. Saint San Santa Fort Port Lake Mount Mt Mt. Cape Camp".split())

_UPPER = "A-Z\u00c0-\u00d6\u00d8-\u00de"
_LOWER = "a-z\u00df-\u00f6\u00f8-\u00ff"
# A capitalised name word: Smith, McDonald, O'Brien, Smith-Jones, José.
_NAME_WORD = (rf"(?:O['’])?[{_UPPER}][{_LOWER}]+(?:[{_UPPER}][{_LOWER}]+)?"
              rf"(?:-[{_UPPER}][{_LOWER}]+)?(?![\w-])")
_GAP = r"[ \t\u00a0]+"
_HONORIFIC = re.compile(
    rf"\b(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof|Professor|Sir|Dame|Rev)\.?{_GAP}"
    rf"(?:[{_UPPER}]\.{_GAP}?)*(?P<name>{_NAME_WORD})")
_GAZETTEER = re.compile(
    rf"\b(?P<first>[{_UPPER}][{_LOWER}]+){_GAP}"
    rf"(?:[{_UPPER}]\.{_GAP}|(?:van der|van den|van|von|de la|de|del|della|da|di|du|le|la)"
    rf"{_GAP})?(?P<last>{_NAME_WORD})")
_NEXT_NAME_WORD = re.compile(rf"{_GAP}(?P<word>{_NAME_WORD})")


def _word_before(text: str, start: int) -> str:
    words = text[max(0, start - 12):start].split()
    return words[-1] if words else ""


def _extend_name(text: str, end: int, more: int) -> int:
    """Extend a name over up to ``more`` following capitalised words that can be names and
    do not start the next gazetteer name ("Emma Stone Ryan Gosling" stops after Stone)."""
    for _ in range(more):
        extra = _NEXT_NAME_WORD.match(text, end)
        if extra is None or extra.group("word") in _NOT_A_SURNAME:
            break
        next_name = _GAZETTEER.match(text, extra.start("word"))
        if next_name and next_name.group("first") in FIRST_NAMES \
                and next_name.group("last") not in _NOT_A_SURNAME:
            break
        end = extra.end()
    return end


def _person_matches(text: str) -> list[PiiMatch]:
    found = []
    for match in _HONORIFIC.finditer(text):
        if match.group("name") in _NOT_A_SURNAME:  # "Mulholland Dr. The film..."
            continue
        end = _extend_name(text, match.end(), 2)
        found.append(PiiMatch("person", match.start(), end, text[match.start():end]))
    position = 0
    while (match := _GAZETTEER.search(text, position)) is not None:
        position = match.start("last")  # the surname may be the next name's first name
        if (match.group("first") not in FIRST_NAMES or match.group("last") in _NOT_A_SURNAME
                or _word_before(text, match.start()) in _PLACE_PREFIXES):
            continue
        end = _extend_name(text, match.end(), 1)
        found.append(PiiMatch("person", match.start(), end, text[match.start():end]))
        position = end
    return found


# --- public API --------------------------------------------------------------------------------

def _check_types(types: tuple[str, ...] | list[str]) -> None:
    unknown = [t for t in types if t not in PII_TYPES]
    if unknown:
        raise ValueError(f"unknown PII type(s) {unknown}; known types: {', '.join(PII_TYPES)}")


def find_pii(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> list[PiiMatch]:
    """Find PII in a text: non-overlapping matches, left to right.

    Every type is searched so that overlaps resolve the same way whichever types are asked
    for (the digits of an IP address are never a phone); then only ``types`` are returned.

    Args:
        text: The text to scan.
        types: The PII types to return, a subset of :data:`PII_TYPES`.

    Returns:
        The matches, sorted by start offset.

    Raises:
        ValueError: an unknown type in ``types``.

    Example:
        >>> [(m.type, m.text) for m in find_pii("Ask Mr Brown: 10.0.0.7 or 4111 1111 1111 1111")]
        [('person', 'Mr Brown'), ('ip', '10.0.0.7'), ('card', '4111 1111 1111 1111')]
    """
    _check_types(types)
    # Each detector runs only where its pattern can match at all (an e-mail needs "@", an IPv6
    # address ":", an IPv4 address, phone or card a digit, a name a capital letter): the same
    # matches, without five regex scans of every text that has none of these
    digit = _DIGIT.search(text) is not None
    candidates = [PiiMatch("email", m.start(), m.end(), m.group())
                  for m in _EMAIL.finditer(text)] if "@" in text else []
    if digit:
        candidates += [PiiMatch("ip", m.start(), m.end(), m.group()) for m in _IPV4.finditer(text)]
    for m in _IPV6.finditer(text) if ":" in text else ():
        if any(c in "0123456789abcdefABCDEF" for c in m.group()):
            try:
                ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            candidates.append(PiiMatch("ip", m.start(), m.end(), m.group()))
    if digit:
        candidates += _number_matches(text)
    if text != text.lower():  # some capital letter (every letter of _UPPER has a lower case)
        candidates += _person_matches(text)
    if not candidates:
        return []
    candidates.sort(key=lambda m: (_PRIORITY.index(m.type), m.start, -m.end))
    starts: list[int] = []  # the accepted matches, kept sorted and non-overlapping
    taken: list[PiiMatch] = []
    for candidate in candidates:
        at = bisect.bisect_right(starts, candidate.start)
        if (at > 0 and taken[at - 1].end > candidate.start) or \
                (at < len(taken) and taken[at].start < candidate.end):
            continue
        starts.insert(at, candidate.start)
        taken.insert(at, candidate)
    return [m for m in taken if m.type in types]


def redact(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> tuple[str, dict[str, int]]:
    """Replace PII with a placeholder per type (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IP]``,
    ``[PERSON]``).

    Args:
        text: The text to redact.
        types: The PII types to redact, a subset of :data:`PII_TYPES`.

    Returns:
        The redacted text and the number of replacements by type (types with none left out,
        keys in :data:`PII_TYPES` order).

    Raises:
        ValueError: an unknown type in ``types``.

    Example:
        >>> redact("Write to ann@example.com or ann@example.net")
        ('Write to [EMAIL] or [EMAIL]', {'email': 2})
    """
    matches = find_pii(text, types)
    pieces, position, counts = [], 0, dict.fromkeys(PII_TYPES, 0)
    for match in matches:
        pieces += [text[position:match.start], _PLACEHOLDERS[match.type]]
        position = match.end
        counts[match.type] += 1
    pieces.append(text[position:])
    return "".join(pieces), {t: n for t, n in counts.items() if n}


def redact_columns(row: dict, columns: list[str],
                   types: tuple[str, ...] | list[str] = PII_TYPES) -> tuple[dict, dict[str, int]]:
    """Redact the named string columns of a row.

    Args:
        row: The row; it is not changed.
        columns: Columns to redact; missing columns and non-string values (None) are skipped.
        types: The PII types to redact, a subset of :data:`PII_TYPES`.

    Returns:
        A new row with the columns redacted, and the replacement counts by type summed over
        the columns (types with none left out).

    Raises:
        ValueError: an unknown type in ``types``.

    Example:
        >>> redact_columns({"id": "a1", "text": "I'm Dr. Ng, 192.168.1.20"}, ["text", "title"])
        ({'id': 'a1', 'text': "I'm [PERSON], [IP]"}, {'ip': 1, 'person': 1})
    """
    _check_types(types)
    out, counts = dict(row), dict.fromkeys(PII_TYPES, 0)
    for column in columns:
        value = row.get(column)
        if not isinstance(value, str):
            continue
        out[column], found = redact(value, types)
        for pii_type, number in found.items():
            counts[pii_type] += number
    return out, {t: n for t, n in counts.items() if n}


def redact_frame(frame: pd.DataFrame, types: list[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows with PII redacted in ``text``, and the counts by type."""
    frame, total = frame.copy(), {}
    texts = []
    for text in frame["text"].astype(str):
        text, counts = redact(text, tuple(types))
        texts.append(text)
        for kind, count in counts.items():
            total[kind] = total.get(kind, 0) + count
    frame["text"] = texts
    return frame, dict(sorted(total.items()))
