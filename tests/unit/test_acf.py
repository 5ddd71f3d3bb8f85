"""The access security file read as EPICS reads it (broker/acf.py).

Whether a file loads is asked of EPICS itself: the access security library of the PCAS
that pcaspy ships (``asInitFile``, in a child process, as ``carelay up`` checks a file).
Every file below loads there exactly when it loads here, and the rules it loads grant
what asLib grants a client at pcaspy's level."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from carelay.broker import acf
from carelay.broker.acf import NONE, READ, WRITE, AcfError, parse

RULES = "ASG(DEFAULT) { RULE(1, READ) }\n"

FILES = {
    "nothing": "",
    "a comment alone": "# x\n",
    "a group with no body": "ASG(DEFAULT)\n",
    "a bare address": "HAG(cr) {192.168.1.10}\n" + RULES,
    "a host name that starts with a digit": "HAG(cr) {1host, opi1.lab.example.org}\n" + RULES,
    "a last comment with no newline": RULES + "# end",
    "a keyword and more": "UAG(u) {RULEr, ASGx, INPAB}\n" + RULES,
    "a keyword alone as a name": "UAG(ASG) {x}\n" + RULES,
    "a number as a name": "UAG(a) {123}\n" + RULES,
    "carriage returns": "ASG(DEFAULT) {\r\n RULE(1, READ)\r\n}\r\n",
    "tabs": "ASG(DEFAULT)\t{\tRULE(1,READ)\t}\n",
    "a vertical tab": "ASG(DEFAULT)\x0b{ RULE(1,READ) }\n",
    "a form feed": "ASG(DEFAULT)\x0c{ RULE(1,READ) }\n",
    "keywords in lower case": "asg(DEFAULT) { RULE(1, READ) }\n",
    "RPC": "ASG(DEFAULT) { RULE(1, RPC) }\n",
    "an unknown right": "ASG(DEFAULT) { RULE(1, READWRITE) }\n",
    "a quoted right": 'ASG(DEFAULT) { RULE(1, "WRITE") }\n',
    "a log option": "ASG(DEFAULT) { RULE(1, WRITE, TRAPWRITE) RULE(1 , READ , NOTRAPWRITE ) }\n",
    "an unknown log option": "ASG(DEFAULT) { RULE(1, WRITE, TRAP) }\n",
    "an undefined UAG": "ASG(DEFAULT) { RULE(1, WRITE) { UAG(nope) } }\n",
    "an undefined HAG": "ASG(DEFAULT) { RULE(1, WRITE) { HAG(nope) } }\n",
    "a UAG defined after its rule": "ASG(DEFAULT) { RULE(1, WRITE) { UAG(a) } }\nUAG(a) {x}\n",
    "a HAG named as a UAG": "HAG(h) {x}\nASG(DEFAULT) { RULE(1, WRITE) { UAG(h) } }\n",
    "a HAG with no body": "HAG(a)\nASG(DEFAULT) { RULE(1, WRITE) { HAG(a) } }\n",
    "a UAG and a HAG of one name": "UAG(a) {x}\nHAG(a) {y}\n" + RULES,
    "a UAG twice": "UAG(a) {x}\nUAG(a) {y}\n" + RULES,
    "an ASG twice": RULES + "ASG(DEFAULT) { RULE(1, WRITE) }\n",
    "an empty list": "UAG(a) {}\n" + RULES,
    "an empty rule body": "ASG(DEFAULT) { RULE(1, READ) {} }\n",
    "an empty group body": "ASG(DEFAULT) {}\n",
    "a trailing comma": "UAG(a) {x,}\n" + RULES,
    "a comma between rules": "ASG(DEFAULT) { RULE(1, READ), RULE(1, WRITE) }\n",
    "quoted names": 'UAG("a b") {"x y", "z#w", "role/ops", "jürgen", ""}\n'
    'ASG("DEFAULT") { RULE(1, READ) { UAG("a b") } }\n',
    "an escaped quote": 'UAG(a) {"x\\"y", "\\q"}\n' + RULES,
    "a newline in quotes": 'UAG(a) {"x\ny"}\n' + RULES,
    "an escaped newline": 'UAG(a) {"x\\\ny"}\n' + RULES,
    "a slash unquoted": "UAG(a) {role/x}\n" + RULES,
    "an at sign unquoted": "UAG(a) {x@y}\n" + RULES,
    "non-ASCII unquoted": "UAG(a) {jürgen}\n" + RULES,
    "every name character": "UAG(a) {+x-<y>[z].:;_9}\n" + RULES,
    "level 0": "ASG(DEFAULT) { RULE(0, WRITE) }\n",
    "a negative level": "ASG(DEFAULT) { RULE(-1, WRITE) }\n",
    "a high level": "ASG(DEFAULT) { RULE(7, WRITE) }\n",
    "a hex level": "ASG(DEFAULT) { RULE(0x1, READ) }\n",
    "a quoted level": 'ASG(DEFAULT) { RULE("1", READ) }\n',
    "a level with letters": "ASG(DEFAULT) { RULE(1x, READ) }\n",
    "inputs and CALC": 'ASG(DEFAULT) { INPA("x:y") INPL(z) RULE(1, WRITE) { CALC("A=1") } '
    "INPB(w) }\n",
    "INPM": 'ASG(DEFAULT) { INPM("x:y") RULE(1, READ) }\n',
    "a group of inputs alone": "ASG(DEFAULT) { INPA(x) }\n",
    "UAGs in one rule": "UAG(a) {x}\nUAG(b) {y}\n"
    "ASG(DEFAULT) { RULE(1, WRITE) { UAG(a) UAG(b, a) HAG() } }\n",
    "a group other than DEFAULT": "ASG(OTHER) { RULE(1, READ) }\n",
    "a NUL at the end": RULES + "\x00",
    "a NUL that cuts a line": "UAG(a) {x}\nUAG(b) {y}\x00 broken(\nASG(DEFAULT)\n",
    "a NUL that starts a line": "ASG(DEFAULT)\n\x00 broken(\n",
    "a NUL first": "\x00ASG(DEFAULT)\n",
}

_ORACLE = """
import json, sys
from pcaspy import cas
print("LOADS" + json.dumps([cas.asInitFile(p, "") == 0 for p in sys.argv[1:]]))
"""


def epics_loads(tmp_path, texts: list[str]) -> list[bool]:
    """Whether EPICS's access security library loads each text (one child process)."""
    paths = []
    for i, text in enumerate(texts):
        path = tmp_path / f"{i}.acf"
        path.write_bytes(text.encode())
        paths.append(str(path))
    r = subprocess.run(
        [sys.executable, "-c", _ORACLE, *paths], capture_output=True, text=True, timeout=60
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("LOADS")), None)
    assert line is not None, r.stdout + r.stderr
    return json.loads(line[5:])


def loads(text: str) -> bool:
    try:
        parse(text)
    except AcfError:
        return False
    return True


def test_a_file_loads_here_exactly_when_it_loads_in_epics(tmp_path):
    names = list(FILES)
    verdicts = epics_loads(tmp_path, [FILES[n] for n in names])
    assert sum(verdicts) > 15 and not all(verdicts)  # the corpus asks both ways
    differ = [(n, v) for n, v in zip(names, verdicts, strict=True) if loads(FILES[n]) != v]
    assert not differ, differ


def test_words_are_cut_as_asLibs_scanner_cuts_them():  # noqa: N802 - asLib's name
    a = parse(FILES["a bare address"] + FILES["a keyword and more"].replace(RULES, ""))
    assert a.hags == {"cr": {"192.168.1.10"}}
    assert a.uags == {"u": {"RULEr", "ASGx", "INPAB"}}
    assert parse(FILES["quoted names"]).uags == {"a b": {"x y", "z#w", "role/ops", "jürgen", ""}}
    assert parse(FILES["an escaped quote"]).uags == {"a": {'x\\"y', "\\q"}}  # kept as written
    assert parse(FILES["a NUL that cuts a line"]).asgs == {"DEFAULT": []}
    assert parse(FILES["a NUL that starts a line"]).asgs == {"DEFAULT": []}


def test_an_error_says_where():
    with pytest.raises(AcfError, match=r"line 3: '\}' where 'RULE' belongs"):
        parse("UAG(a) {x}\nASG(DEFAULT) {\n}\n")
    with pytest.raises(AcfError, match="line 2: invalid character '@'"):
        parse("UAG(a) {x}\nUAG(b) {x@y}\n")
    with pytest.raises(AcfError, match=r"line 1: no UAG\(b\) before"):
        parse("ASG(DEFAULT) { RULE(1, WRITE) { UAG(b) } }")
    with pytest.raises(AcfError, match="defines nothing"):
        parse("# nothing\n")


ACF = """
UAG(ops) {alice, bob}
UAG(guests) {carol}
HAG(cr) {opi1}
ASG(DEFAULT) {
    RULE(1, READ)
    RULE(1, WRITE) { UAG(ops) HAG(cr) }
    RULE(1, WRITE) { UAG(guests) CALC("1") }
    RULE(0, WRITE) { UAG(guests) }
    RULE(2, NONE) { UAG(ops) }
}
ASG(CLOSED) {
    RULE(1, READ) { UAG(ops, guests) }
}
"""


@pytest.mark.parametrize(
    ("group", "uags", "hags", "granted"),
    [
        ("DEFAULT", set(), set(), READ),
        ("DEFAULT", {"ops"}, {"cr"}, WRITE),  # every condition met
        ("DEFAULT", {"ops"}, set(), READ),  # the HAG missing
        ("DEFAULT", {"guests"}, {"cr"}, READ),  # a CALC is never met; level 0 is below
        ("CLOSED", {"guests"}, set(), READ),  # any UAG of a rule's list
        ("CLOSED", set(), {"cr"}, NONE),
        ("ELSEWHERE", {"ops"}, {"cr"}, WRITE),  # an undefined group: DEFAULT's rules
    ],
)
def test_what_a_client_at_pcaspys_level_is_granted(group, uags, hags, granted):
    assert parse(ACF).access(group, uags, hags) == granted


def test_a_rule_of_level_0_grants_a_client_of_level_0():
    assert parse(ACF).access("DEFAULT", {"guests"}, set(), level=0) == WRITE
    assert acf.CLIENT_LEVEL == 1


def test_no_group_at_all_grants_nothing():
    assert parse("ASG(OTHER) { RULE(1, WRITE) }").access("DEFAULT", set(), set()) == NONE
